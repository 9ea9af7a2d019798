"""Tests for the simulated Ollama: wire format, determinism, instrumentation, faults.

Everything runs over real loopback sockets. The official ollama and openai clients
are pointed straight at the simulator, proving its wire format is one they accept,
which is what makes it a fair stand-in for Ollama in the proxy's own tests.
Tests synchronise on Simulator.wait_until(), never on sleeps; the few short
timeouts below are bounds on something that must *not* happen.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import sys
from collections.abc import AsyncIterator

import aiohttp
import ollama
import openai
import pytest
import pytest_asyncio

from proxy.sim import Simulator

GENERATE = {"model": "llama3.2", "prompt": "why is the sky blue"}
CHAT = {"model": "llama3.2", "messages": [{"role": "user", "content": "hello there"}]}


@pytest_asyncio.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    await simulator.start()
    yield simulator
    await simulator.close()


@pytest_asyncio.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def fetch(http: aiohttp.ClientSession, url: str, body: object) -> tuple[int, str, bytes]:
    async with http.post(url, json=body) as resp:
        return resp.status, resp.headers["Content-Type"], await resp.read()


def ndjson(data: bytes) -> list[dict]:
    return [json.loads(line) for line in data.splitlines()]


def sse_data(data: bytes) -> list[str]:
    return [line[len("data: ") :] for line in data.decode().splitlines() if line.startswith("data: ")]


# -- wire format ------------------------------------------------------------------------


async def test_generate_streams_one_ndjson_line_per_token_then_a_final_line(sim: Simulator, http) -> None:
    sim.tokens = 4
    async with http.post(
        f"{sim.url}/api/generate", json=GENERATE, headers={"X-Forwarded-For": "10.0.0.1"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        lines = ndjson(await resp.read())

    assert len(lines) == 5
    assert all(line["done"] is False and line["response"] for line in lines[:4])
    final = lines[-1]
    assert final["done"] is True and final["done_reason"] == "stop" and final["response"] == ""
    assert final["eval_count"] == 4 and final["prompt_eval_count"] == 5 and final["context"] == []
    for key in ("total_duration", "load_duration", "prompt_eval_duration", "eval_duration"):
        assert isinstance(final[key], int)
    assert len("".join(line["response"] for line in lines).split()) == 4

    (record,) = sim.records
    assert (record.path, record.model, record.status, record.chunks) == ("/api/generate", "llama3.2", 200, 5)
    assert record.completed and record.peer_closed_at is None and record.ended_at is not None
    assert record.headers["X-Forwarded-For"] == "10.0.0.1"
    assert json.loads(record.body) == GENERATE


async def test_non_streaming_generate_and_chat_are_single_json_objects(sim: Simulator, http) -> None:
    status, ctype, body = await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "stream": False})
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    answer = json.loads(body)
    assert answer["done"] is True and len(answer["response"].split()) == sim.tokens

    status, ctype, body = await fetch(http, f"{sim.url}/api/chat", {**CHAT, "stream": False})
    answer = json.loads(body)
    assert (status, ctype) == (200, "application/json; charset=utf-8")
    assert (
        answer["message"]["role"] == "assistant" and len(answer["message"]["content"].split()) == sim.tokens
    )
    assert answer["done_reason"] == "stop" and "context" not in answer


async def test_openai_streaming_ends_with_usage_and_done(sim: Simulator, http) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    status, ctype, data = await fetch(http, f"{sim.url}/v1/chat/completions", body)
    assert (status, ctype) == (200, "text/event-stream")
    assert data.endswith(b"data: [DONE]\n\n")
    events = [json.loads(e) for e in sse_data(data)[:-1]]
    assert len(events) == sim.tokens + 2
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == sim.tokens


async def test_knobs_and_token_limits_apply_per_request(sim: Simulator, http) -> None:
    sim.tokens = 3
    first = json.loads((await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "stream": False}))[2])
    sim.tokens = 6
    second = json.loads((await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "stream": False}))[2])
    assert (first["eval_count"], second["eval_count"]) == (3, 6)

    capped = {**GENERATE, "stream": False, "options": {"num_predict": 2}}
    answer = json.loads((await fetch(http, f"{sim.url}/api/generate", capped))[2])
    assert (answer["eval_count"], answer["done_reason"]) == (2, "length")
    body = {**CHAT, "max_tokens": 1}
    answer = json.loads((await fetch(http, f"{sim.url}/v1/chat/completions", body))[2])
    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 1


async def test_other_endpoints(sim: Simulator, http) -> None:
    async with http.get(f"{sim.url}/") as resp:
        assert (resp.status, await resp.text()) == (200, "Ollama is running")
        assert resp.headers["Content-Type"].startswith("text/plain")
    async with http.head(f"{sim.url}/") as resp:
        assert resp.status == 200
    async with http.get(f"{sim.url}/api/version") as resp:
        assert await resp.json() == {"version": "0.12.0"}
    async with http.get(f"{sim.url}/api/tags") as resp:
        names = [m["name"] for m in (await resp.json())["models"]]
        assert names == ["big:latest", "llama3.2:latest", "small:latest"]
    async with http.get(f"{sim.url}/v1/models") as resp:
        assert [m["id"] for m in (await resp.json())["data"]] == names
    async with http.get(f"{sim.url}/api/ps") as resp:
        assert (await resp.json())["models"] == []
    await fetch(http, f"{sim.url}/api/generate", GENERATE)
    async with http.get(f"{sim.url}/api/ps") as resp:
        assert [m["name"] for m in (await resp.json())["models"]] == ["llama3.2:latest"]


# -- determinism -------------------------------------------------------------------------

DETERMINISM_CASES = [
    ("/api/generate", GENERATE),
    ("/api/generate", {**GENERATE, "stream": False}),
    ("/api/chat", CHAT),
    ("/api/chat", {**CHAT, "stream": False}),
    ("/api/embed", {"model": "small", "input": ["one", "two"]}),
    ("/api/embeddings", {"model": "small", "prompt": "one"}),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True}}),
    ("/v1/chat/completions", CHAT),
    ("/v1/completions", {"model": "big", "prompt": "once upon", "stream": True}),
    ("/v1/completions", {"model": "big", "prompt": "once upon"}),
    ("/v1/embeddings", {"model": "small", "input": "one"}),
    ("/v1/responses", {"model": "big", "input": "tell me", "stream": True}),
    ("/v1/responses", {"model": "big", "input": "tell me"}),
]


@pytest.mark.parametrize(
    ("path", "body"), DETERMINISM_CASES, ids=[f"{p}-{i}" for i, (p, _) in enumerate(DETERMINISM_CASES)]
)
async def test_identical_requests_get_identical_bytes(sim: Simulator, http, path: str, body: dict) -> None:
    sim.token_delay = 0.001
    sim.context_size = 3
    first = await fetch(http, sim.url + path, body)
    second = await fetch(http, sim.url + path, body)
    assert first[0] == 200
    assert first == second


async def test_different_prompts_get_different_text(sim: Simulator, http) -> None:
    """So a proxy that mixed up two concurrent streams could not go unnoticed."""
    one = await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "prompt": "a"})
    two = await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "prompt": "b"})
    assert one[2] != two[2]


# -- real clients ------------------------------------------------------------------------


async def test_official_ollama_client_accepts_the_wire_format(sim: Simulator) -> None:
    client = ollama.AsyncClient(host=sim.url)
    try:
        parts = [p async for p in await client.generate(model="llama3.2", prompt="hi", stream=True)]
        assert len(parts) == sim.tokens + 1 and parts[-1].done and parts[-1].eval_count == sim.tokens
        whole = await client.generate(model="llama3.2", prompt="hi")
        assert whole.response == "".join(p.response for p in parts) and whole.done_reason == "stop"

        messages = [{"role": "user", "content": "hi"}]
        parts = [p async for p in await client.chat(model="llama3.2", messages=messages, stream=True)]
        whole = await client.chat(model="llama3.2", messages=messages)
        assert whole.message.content == "".join(p.message.content for p in parts)
        assert whole.message.role == "assistant" and len(whole.message.content.split()) == sim.tokens

        embedded = await client.embed(model="small", input=["a", "b"])
        assert len(embedded.embeddings) == 2 and len(embedded.embeddings[0]) > 0
        legacy = await client.embeddings(model="small", prompt="a")
        assert list(legacy.embedding) == list(embedded.embeddings[0])

        assert {m.model for m in (await client.list()).models} == {
            "big:latest",
            "llama3.2:latest",
            "small:latest",
        }
        assert (await client.show("big")).details.family == "llama"
        assert [m.model for m in (await client.ps()).models] == ["llama3.2:latest", "small:latest"]

        with pytest.raises(ollama.ResponseError) as caught:
            await client.generate(model="missing", prompt="hi")
        assert caught.value.status_code == 404
        assert caught.value.error == "model 'missing' not found"
    finally:
        await client.close()


async def test_official_openai_client_accepts_the_wire_format(sim: Simulator) -> None:
    async with openai.AsyncOpenAI(base_url=f"{sim.url}/v1", api_key="x", max_retries=0, timeout=5) as client:
        messages = [{"role": "user", "content": "hi"}]
        whole = await client.chat.completions.create(model="llama3.2", messages=messages)
        assert whole.choices[0].finish_reason == "stop" and whole.usage.completion_tokens == sim.tokens

        stream = await client.chat.completions.create(
            model="llama3.2", messages=messages, stream=True, stream_options={"include_usage": True}
        )
        chunks = [chunk async for chunk in stream]
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == whole.choices[0].message.content
        assert chunks[-1].usage.total_tokens == whole.usage.total_tokens

        completion = await client.completions.create(model="big", prompt="once")
        assert len(completion.choices[0].text.split()) == sim.tokens

        # The client asks for base64 unless told otherwise; both must decode to the same floats.
        packed = await client.embeddings.create(model="small", input=["a", "b"])
        plain = await client.embeddings.create(model="small", input=["a", "b"], encoding_format="float")
        for got, expected in zip(packed.data, plain.data, strict=True):
            assert got.embedding == pytest.approx(expected.embedding, abs=1e-6)
        assert len(plain.data) == 2 and plain.usage.prompt_tokens == 2

        assert {m.id async for m in client.models.list()} == {"big:latest", "llama3.2:latest", "small:latest"}

        response = await client.responses.create(model="big", input="tell me")
        assert len(response.output_text.split()) == sim.tokens
        events = [
            event async for event in await client.responses.create(model="big", input="tell me", stream=True)
        ]
        deltas = "".join(e.delta for e in events if e.type == "response.output_text.delta")
        assert deltas == response.output_text
        assert events[-1].type == "response.completed" and events[-1].response.output_text == deltas

        with pytest.raises(openai.NotFoundError) as caught:
            await client.chat.completions.create(model="missing", messages=messages)
        assert caught.value.body["message"] == "model 'missing' not found"


# -- errors ------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/api/generate", "/api/chat", "/api/embed", "/api/embeddings"])
async def test_unknown_model_on_native_paths_is_ollamas_404(sim: Simulator, http, path: str) -> None:
    status, ctype, body = await fetch(http, sim.url + path, {"model": "nope", "prompt": "x", "input": "x"})
    assert (status, ctype) == (404, "application/json; charset=utf-8")
    assert json.loads(body) == {"error": "model 'nope' not found"}


@pytest.mark.parametrize(
    "path", ["/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"]
)
async def test_unknown_model_on_openai_paths_is_openai_shaped(sim: Simulator, http, path: str) -> None:
    status, _, body = await fetch(http, sim.url + path, {"model": "nope", "input": "x"})
    assert status == 404
    assert json.loads(body) == {
        "error": {
            "message": "model 'nope' not found",
            "type": "not_found_error",
            "param": None,
            "code": None,
        }
    }


async def test_model_names_match_with_or_without_latest_tag(sim: Simulator, http) -> None:
    assert (await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "model": "llama3.2:latest"}))[0] == 200
    sim.models = {"gpt-oss:120b"}
    assert (await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "model": "gpt-oss"}))[0] == 404
    assert (await fetch(http, f"{sim.url}/api/generate", {**GENERATE, "model": "gpt-oss:120b"}))[0] == 200


async def test_show(sim: Simulator, http) -> None:
    status, _, body = await fetch(http, f"{sim.url}/api/show", {"model": "big"})
    assert status == 200 and json.loads(body)["details"]["format"] == "gguf"
    status, _, body = await fetch(http, f"{sim.url}/api/show", {"model": "x"})
    assert (status, json.loads(body)) == (404, {"error": "model 'x' not found"})


async def test_bad_bodies_are_400(sim: Simulator, http) -> None:
    async with http.post(f"{sim.url}/api/chat", data=b"{not json") as resp:
        assert resp.status == 400 and "error" in await resp.json(content_type=None)
    async with http.post(f"{sim.url}/v1/chat/completions", data=b"[1") as resp:
        assert resp.status == 400
        assert (await resp.json(content_type=None))["error"]["type"] == "invalid_request_error"
    status, _, body = await fetch(http, f"{sim.url}/api/generate", {"prompt": "no model"})
    assert (status, json.loads(body)) == (400, {"error": "model is required"})
    assert [r.status for r in sim.records] == [400, 400, 400]


# -- instrumentation ---------------------------------------------------------------------


async def test_active_and_peak_follow_concurrent_generations(sim: Simulator, http) -> None:
    sim.tokens, sim.token_delay = 4, 0.03
    requests = [
        asyncio.create_task(fetch(http, f"{sim.url}/api/generate", {**GENERATE, "prompt": str(i)}))
        for i in range(3)
    ]
    await sim.wait_until(lambda: sim.active == 3)
    assert sim.peak == 3
    await asyncio.wait_for(asyncio.gather(*requests), 5)
    await sim.wait_until(lambda: sim.active == 0)
    assert sim.peak == 3
    assert all(r.completed and r.ended_at is not None and r.ended_at >= r.started_at for r in sim.records)

    sim.reset_peak()
    assert sim.peak == 0
    await fetch(http, f"{sim.url}/api/embed", {"model": "small", "input": "x"})
    assert (sim.peak, len(sim.records)) == (1, 4)


async def test_non_generation_paths_are_not_recorded(sim: Simulator, http) -> None:
    async with http.get(f"{sim.url}/api/tags") as resp:
        await resp.read()
    await fetch(http, f"{sim.url}/api/show", {"model": "big"})
    assert sim.records == [] and sim.peak == 0


async def test_wait_until_times_out_with_a_message(sim: Simulator) -> None:
    with pytest.raises(TimeoutError, match="condition not met within 0.05s"):
        await sim.wait_until(lambda: False, timeout=0.05)


async def test_peer_closing_mid_stream_is_seen_within_100ms(sim: Simulator, http) -> None:
    sim.tokens, sim.token_delay = 100, 0.05
    loop = asyncio.get_running_loop()
    resp = await http.post(f"{sim.url}/api/chat", json=CHAT)
    await resp.content.readline()
    closed_at = loop.time()
    resp.close()  # closes the client's connection, as a proxy must when its client leaves

    (record,) = sim.records
    await sim.wait_until(lambda: record.peer_closed_at is not None, timeout=1)
    assert record.peer_closed_at - closed_at < 0.1
    assert not record.completed and 1 <= record.chunks < 100
    await sim.wait_until(lambda: sim.active == 0, timeout=1)
    assert record.ended_at is not None


async def test_peer_closing_while_the_model_loads_is_seen_within_100ms(sim: Simulator) -> None:
    """Before any header is sent, the only sign of the peer leaving is its FIN."""
    sim.load_delay = 30
    loop = asyncio.get_running_loop()
    host, port = sim.url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    body = json.dumps(GENERATE).encode()
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    await sim.wait_until(lambda: bool(sim.records) and sim.records[0].model == "llama3.2")
    closed_at = loop.time()
    writer.close()
    await writer.wait_closed()

    record = sim.records[0]
    await sim.wait_until(lambda: record.peer_closed_at is not None, timeout=1)
    assert record.peer_closed_at - closed_at < 0.1
    assert record.status is None and record.chunks == 0


async def test_final_line_can_exceed_512_kib(sim: Simulator, http) -> None:
    sim.tokens, sim.context_size = 2, 100_000
    status, _, data = await fetch(http, f"{sim.url}/api/generate", GENERATE)
    final = data.splitlines()[-1]
    assert status == 200 and len(final) > 512 * 1024
    assert len(json.loads(final)["context"]) == 100_000


# -- faults ------------------------------------------------------------------------------


async def test_die_cuts_a_stream_after_fault_after_chunks(sim: Simulator, http) -> None:
    sim.fault, sim.fault_after, sim.tokens = "die", 2, 6
    lines = []
    async with http.post(f"{sim.url}/api/generate", json=GENERATE) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            async for line in resp.content:
                lines.append(line)
    assert len(lines) == 2 and all(not json.loads(line)["done"] for line in lines)
    (record,) = sim.records
    await sim.wait_until(lambda: record.ended_at is not None)
    assert (record.completed, record.peer_closed_at, record.chunks) == (False, None, 2)


async def test_die_cuts_a_non_streamed_body_in_half(sim: Simulator, http) -> None:
    sim.fault = "die"
    async with http.post(f"{sim.url}/v1/chat/completions", json=CHAT) as resp:
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_hang_headers_sends_nothing_until_the_peer_leaves(sim: Simulator, http) -> None:
    sim.fault = "hang_headers"
    with pytest.raises(asyncio.TimeoutError):
        await http.post(f"{sim.url}/api/generate", json=GENERATE, timeout=aiohttp.ClientTimeout(total=0.2))
    (record,) = sim.records
    await sim.wait_until(lambda: record.peer_closed_at is not None, timeout=1)
    assert record.status is None and not record.completed


async def test_hang_body_goes_silent_after_fault_after_chunks(sim: Simulator, http) -> None:
    sim.fault, sim.fault_after = "hang_body", 1
    resp = await http.post(f"{sim.url}/v1/chat/completions", json={**CHAT, "stream": True})
    assert resp.status == 200
    assert (await resp.content.readline()).startswith(b"data: ")
    await resp.content.readline()  # the blank line ending the event
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(resp.content.readline(), 0.2)
    resp.close()
    (record,) = sim.records
    await sim.wait_until(lambda: record.peer_closed_at is not None, timeout=1)
    assert record.chunks == 1


async def test_status_fault_answers_with_the_error_shape_of_the_path(sim: Simulator, http) -> None:
    sim.fault, sim.fault_status = "status", 503
    status, ctype, body = await fetch(http, f"{sim.url}/api/chat", CHAT)
    assert (status, ctype, json.loads(body)) == (
        503,
        "application/json; charset=utf-8",
        {"error": "simulated failure"},
    )
    status, _, body = await fetch(http, f"{sim.url}/v1/completions", {"model": "big", "prompt": "x"})
    assert status == 503 and json.loads(body)["error"]["message"] == "simulated failure"
    async with http.get(f"{sim.url}/api/version") as resp:  # faults only touch generation paths
        assert resp.status == 200


async def test_unknown_fault_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown fault"):
        Simulator().fault = "hang-body"


async def test_close_does_not_wait_for_hung_requests(http) -> None:
    sim = Simulator()
    await sim.start()
    sim.fault = "hang_headers"
    hung_headers = asyncio.create_task(fetch(http, f"{sim.url}/api/generate", GENERATE))
    await sim.wait_until(lambda: sim.active == 1)
    sim.fault = "hang_body"
    hung_body = asyncio.create_task(fetch(http, f"{sim.url}/api/chat", CHAT))
    await sim.wait_until(lambda: len(sim.records) == 2 and sim.records[1].chunks == sim.fault_after)

    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(sim.close(), 2)
    assert loop.time() - started < 1
    assert sim.active == 0
    assert all(r.ended_at is not None and r.peer_closed_at is None and not r.completed for r in sim.records)
    outcomes = await asyncio.wait_for(asyncio.gather(hung_headers, hung_body, return_exceptions=True), 2)
    assert all(isinstance(o, aiohttp.ClientError) for o in outcomes)
    await sim.close()  # idempotent


# -- standalone --------------------------------------------------------------------------


async def test_module_runs_standalone_until_interrupted(http) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy.sim", "--port", "0", "--tokens", "3", "--token-delay", "0",
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        banner = (await asyncio.wait_for(proc.stdout.readline(), 10)).decode()
        url = re.search(r"http://\S+", banner).group(0)
        status, _, body = await fetch(http, f"{url}/api/generate", {**GENERATE, "stream": False})
        assert status == 200 and json.loads(body)["eval_count"] == 3
        proc.send_signal(signal.SIGINT)
        assert await asyncio.wait_for(proc.wait(), 5) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_a_lone_surrogate_in_the_prompt_is_answered_not_a_crash(sim, http):
    body = b'{"model": "llama3.2", "prompt": "\\ud800 hi", "stream": false}'
    async with http.post(sim.url + "/api/generate", data=body) as resp:
        assert resp.status == 200
        assert (await resp.json())["done"] is True
