"""The usage meter, fed byte streams cut every way the network could cut them."""

from __future__ import annotations

import json
import random

import pytest

from proxy.ollama.usage import MAX_LINE, TAIL, Meter, Usage


def _line(value: object) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode() + b"\n"


# Ollama's shapes, as its Go encoder writes them (compact, non-ASCII kept as UTF-8).
TIMINGS = {
    "total_duration": 2_500_000_000,
    "load_duration": 1_250_000_000,
    "prompt_eval_count": 12,
    "prompt_eval_duration": 12_000_000,
    "eval_count": 3,
    "eval_duration": 60_000_000,
}
GENERATE = b"".join(
    [
        *(
            _line({"model": "m", "created_at": "T", "response": word, "done": False})
            for word in ("héllo ", "wörld 🌍 ", "Ω")
        ),
        _line({"model": "m", "created_at": "T", "response": "", "done": True, "done_reason": "stop",
               "context": [1, 2, 3], **TIMINGS}),
    ]
)  # fmt: skip
GENERATE_USAGE = Usage(prompt_tokens=12, completion_tokens=3, eval_seconds=0.06, load_seconds=1.25)
CHAT_JSON = json.dumps(
    {"model": "m", "message": {"role": "assistant", "content": "ça va"}, "done": True, **TIMINGS},
    separators=(",", ":"), ensure_ascii=False,
).encode()  # fmt: skip
HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
USAGE = {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}


def _sse(value: object) -> bytes:
    return b"data: " + _line(value) + b"\n"


SSE_CHUNKS = [
    _sse({**HEAD, "choices": [{"index": 0, "delta": {"content": "日本"}, "finish_reason": None}]}),
    _sse({**HEAD, "choices": [{"index": 0, "delta": {"content": "語"}, "finish_reason": "stop"}]}),
]
SSE_WITH_USAGE = b"".join([*SSE_CHUNKS, _sse({**HEAD, "choices": [], "usage": USAGE}), b"data: [DONE]\n\n"])
SSE_WITHOUT_USAGE = b"".join([*SSE_CHUNKS, b"data: [DONE]\n\n"])

STREAMS: dict[str, tuple[bytes, Usage | None]] = {
    "ndjson": (GENERATE, GENERATE_USAGE),
    "native json, no final newline": (CHAT_JSON, GENERATE_USAGE),
    "sse with usage": (SSE_WITH_USAGE, Usage(7, 2)),
    "sse without usage": (SSE_WITHOUT_USAGE, None),
    "openai json": (_line({**HEAD, "object": "chat.completion", "choices": [], "usage": USAGE}), Usage(7, 2)),
    "ollama embed": (
        json.dumps(
            {
                "model": "m",
                "embeddings": [[0.5, -0.25]],
                "total_duration": 9,
                "load_duration": 4,
                "prompt_eval_count": 5,
            },
            separators=(",", ":"),
        ).encode(),
        Usage(prompt_tokens=5, load_seconds=4e-9),
    ),  # fmt: skip
    "openai embeddings": (
        _line({"object": "list", "data": [], "model": "m", "usage": {"prompt_tokens": 4, "total_tokens": 4}}),
        Usage(prompt_tokens=4),
    ),
    "responses api stream": (
        b"event: response.created\n"
        + _sse({"type": "response.created", "response": {"status": "in_progress", "usage": None}})
        + b"event: response.completed\n"
        + _sse(
            {"type": "response.completed", "response": {"usage": {"input_tokens": 6, "output_tokens": 4}}}
        ),
        Usage(6, 4),
    ),
    # Ollama omits zero fields (Go's omitempty): a final line without eval_count generated nothing.
    "final line with zeros omitted": (
        _line({"model": "m", "done": True, "prompt_eval_count": 2}),
        Usage(2, 0),
    ),
}


def _metered(chunks: list[bytes]) -> Usage | None:
    meter = Meter(lambda: 0.0)
    for chunk in chunks:
        meter.feed(chunk)
    return meter.close()


@pytest.mark.parametrize("name", STREAMS)
def test_every_split_gives_the_same_usage(name: str) -> None:
    data, expected = STREAMS[name]
    assert _metered([data]) == expected
    assert _metered([data[i : i + 1] for i in range(len(data))]) == expected
    for cut in range(1, len(data)):
        assert _metered([data[:cut], data[cut:]]) == expected, cut


def test_random_three_way_splits() -> None:
    rng = random.Random(4)
    for data, expected in STREAMS.values():
        for _ in range(200):
            a, b = sorted(rng.sample(range(1, len(data)), 2))
            assert _metered([data[:a], data[a:b], data[b:]]) == expected


def test_splits_inside_the_marker_and_a_multibyte_character() -> None:
    marker = GENERATE.index(b'"done":true')
    emoji = GENERATE.index("🌍".encode())
    for cut in (marker + 1, marker + 6, marker + 10, emoji + 1, emoji + 2, emoji + 3):
        assert _metered([GENERATE[:cut], GENERATE[cut:]]) == GENERATE_USAGE


def test_tokens_per_second_is_ollamas_eval_rate() -> None:
    assert GENERATE_USAGE.tokens_per_second == pytest.approx(50.0)
    assert Usage(7, 2).tokens_per_second is None  # the OpenAI layer reports no durations
    assert Usage(1, 0, eval_seconds=0.5).tokens_per_second is None


def test_generated_text_that_looks_like_the_final_line_is_not_taken_for_it() -> None:
    fake = '{"done":true,"prompt_eval_count":99,"eval_count":99,"usage":{"prompt_tokens":99}}'
    data = _line({"model": "m", "response": fake, "done": False}) + GENERATE
    assert _metered([data]) == GENERATE_USAGE
    assert _metered([_line({"model": "m", "response": fake, "done": False})]) is None


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\n\n\n",
        bytes(range(256)) * 4,
        b'{"error":"model \\"nope\\" not found, try pulling it first"}',
        b'data: {"error":{"message":"boom","type":"api_error"}}\n\n',
        GENERATE[: GENERATE.index(b'"done":true') + 20],  # cut off inside the final line
        b'{"done":true,"eval_count":\n',  # the marker, then broken JSON
        b'["done":true]\n[{"done":true}]\n"\\"done\\":true"\n',
        b'{"done":false,"eval_count":3}\n',
        b'{"usage":{"prompt_tokens":-3}}\n',
        b"[" * 100_000 + b'"done":true\n',  # deep nesting must not escape as RecursionError
        "\ud800".encode("utf-8", "surrogatepass") + b'{"done":true}\xff\n',
    ],
)
def test_garbage_gives_none_without_raising(data: bytes) -> None:
    assert _metered([data]) is None
    assert _metered([data[i : i + 7] for i in range(0, len(data), 7)]) is None


def test_wrong_types_in_a_final_line_count_as_absent() -> None:
    data = b'{"done":true,"eval_count":"many","prompt_eval_count":true,"eval_duration":1.5}\n'
    assert _metered([data]) == Usage(0, 0)


def test_an_over_long_line_is_not_buffered() -> None:
    meter = Meter(lambda: 0.0)
    piece = b'{"response":"' + b"x" * 65536
    for _ in range(3 * MAX_LINE // len(piece)):
        meter.feed(piece)
        assert len(meter._line) <= MAX_LINE  # white-box: the one buffer never grows past the cap
    assert len(meter._line) <= TAIL
    assert meter.close() is None


def test_counts_after_an_over_long_array_are_found_in_the_tail() -> None:
    """A batch of embeddings, or a final line with a long context: counts come after the big array."""
    vectors = [[0.123456789] * 1024 for _ in range(120)]
    embed = json.dumps(
        {
            "model": "m",
            "embeddings": vectors,
            "total_duration": 9,
            "load_duration": 4,
            "prompt_eval_count": 77,
        },
        separators=(",", ":"),
    ).encode()
    assert len(embed) > MAX_LINE
    final = _line({"model": "m", "done": True, "context": list(range(300_000)), **TIMINGS})
    assert len(final) > MAX_LINE
    for data, expected in (
        (embed, Usage(prompt_tokens=77, load_seconds=4e-9)),
        (GENERATE[: GENERATE.rindex(b"{")] + final, GENERATE_USAGE),
    ):
        assert _metered([data]) == expected
        for size in (7, 1000, 65536, MAX_LINE):
            assert _metered([data[i : i + size] for i in range(0, len(data), size)]) == expected


def test_first_byte_is_timed_from_creation_to_the_first_chunk() -> None:
    now = [10.0]
    meter = Meter(lambda: now[0])
    assert meter.first_byte is None
    now[0] = 12.5
    meter.feed(b'{"response":"a"')
    now[0] = 20.0
    meter.feed(b"}\n")
    assert meter.first_byte == 2.5
