"""Ollama's wire format as the simulator writes it: bodies for every generation endpoint
(native and OpenAI-compatible), the model catalogue, and JSON encoded as Go encodes it.

A renderer turns a parsed `Generation` into a `Plan` before anything is written, so
the writer (`faults.Reply`) can stream it, delay it, or break it part way.
"""

from __future__ import annotations

import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.sim.generation import Generation, text_of

# Fixed timestamps: a real clock would make responses differ between two identical requests.
CREATED_AT = "2024-01-01T00:00:00.000000Z"
MODIFIED_AT = "2024-01-01T00:00:00Z"
EXPIRES_AT = "2024-01-01T00:05:00Z"
CREATED_UNIX = 1704067200
VERSION = "0.12.0"

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Ollama's native handlers answer through gin's c.JSON ("application/json; charset=utf-8");
# its OpenAI layer sets a bare "application/json" and encodes with a trailing newline.
JSON_NATIVE = "application/json; charset=utf-8"
JSON_OPENAI = "application/json"

EMBEDDING_DIMENSIONS = 16


@dataclass(frozen=True)
class Plan:
    """The body of a successful generation, decided before anything is written.

    When streaming, each of ``chunks`` is written separately, and the ``tokens`` chunks
    from ``first_token`` on are each preceded by ``token_delay``. When not streaming,
    ``chunks`` holds the one body, sent after ``tokens * token_delay`` of silence, as
    Ollama sends nothing of a non-streamed answer until it is complete.
    """

    content_type: str
    chunks: list[bytes]
    tokens: int
    first_token: int = 0
    streaming: bool = True


def _render_generate(gen: Generation) -> Plan:
    final: dict[str, Any] = {
        "model": gen.model,
        "created_at": CREATED_AT,
        "response": "",
        "done": True,
        "done_reason": gen.done_reason,
        "context": [(gen.seed + i) % 100_000 for i in range(gen.knobs.context_size)],
        **gen.metrics(),
    }
    words = gen.words
    if not gen.streams:
        final["response"] = "".join(words)
        return Plan(JSON_NATIVE, [dumps(final)], tokens=len(words), streaming=False)
    lines = [
        _ndjson({"model": gen.model, "created_at": CREATED_AT, "response": word, "done": False})
        for word in words
    ]
    return Plan(NDJSON, [*lines, _ndjson(final)], tokens=len(words))


def _render_chat(gen: Generation) -> Plan:
    words = gen.words

    def message(content: str) -> dict[str, str]:
        return {"role": "assistant", "content": content}

    final = {
        "model": gen.model,
        "created_at": CREATED_AT,
        "message": message(""),
        "done_reason": gen.done_reason,
        "done": True,
        **gen.metrics(),
    }
    if not gen.streams:
        final["message"] = message("".join(words))
        return Plan(JSON_NATIVE, [dumps(final)], tokens=len(words), streaming=False)
    lines = [
        _ndjson({"model": gen.model, "created_at": CREATED_AT, "message": message(word), "done": False})
        for word in words
    ]
    return Plan(NDJSON, [*lines, _ndjson(final)], tokens=len(words))


def _render_embed(gen: Generation) -> Plan:
    raw = gen.body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    metrics = gen.metrics()
    body = {
        "model": gen.model,
        "embeddings": [_embedding(text_of(item)) for item in inputs],
        "total_duration": metrics["load_duration"] + metrics["prompt_eval_duration"],
        "load_duration": metrics["load_duration"],
        "prompt_eval_count": metrics["prompt_eval_count"],
    }
    return Plan(JSON_NATIVE, [dumps(body)], tokens=0, streaming=False)


def _render_embeddings(gen: Generation) -> Plan:
    return Plan(JSON_NATIVE, [dumps({"embedding": _embedding(gen.text)})], tokens=0, streaming=False)


def _render_openai_embeddings(gen: Generation) -> Plan:
    raw = gen.body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    as_base64 = gen.body.get("encoding_format") == "base64"  # the openai client's default
    data = []
    for index, item in enumerate(inputs):
        vector = _embedding(text_of(item))
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "embedding": encoded, "index": index})
    usage = {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens}
    body = {"object": "list", "data": data, "model": gen.model, "usage": usage}
    return Plan(JSON_OPENAI, [dumps(body) + b"\n"], tokens=0, streaming=False)


def _usage(gen: Generation) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.count,
        "total_tokens": gen.prompt_tokens + gen.count,
    }


def _render_openai_chat(gen: Generation) -> Plan:
    return _render_openai_completion(gen, chat=True)


def _render_openai_text(gen: Generation) -> Plan:
    return _render_openai_completion(gen, chat=False)


def _render_openai_completion(gen: Generation, *, chat: bool) -> Plan:
    """/v1/chat/completions and /v1/completions, which differ only in naming."""
    words = gen.words
    head = {
        "id": f"chatcmpl-{gen.ident}" if chat else f"cmpl-{gen.ident}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": CREATED_UNIX,
        "model": gen.model,
        "system_fingerprint": "fp_ollama",
    }

    def choice(text: str, finish: str | None, *, delta: bool = True) -> dict[str, Any]:
        if not chat:
            return {"text": text, "index": 0, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

    if not gen.streams:
        body = {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice("".join(words), gen.done_reason, delta=False)],
            "usage": _usage(gen),
        }
        return Plan(JSON_OPENAI, [dumps(body) + b"\n"], tokens=len(words), streaming=False)
    events = [_sse({**head, "choices": [choice(word, None)]}) for word in words]
    events.append(_sse({**head, "choices": [choice("", gen.done_reason)]}))
    options = gen.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        events.append(_sse({**head, "choices": [], "usage": _usage(gen)}))
    events.append(b"data: [DONE]\n\n")
    return Plan(SSE, events, tokens=len(words))


def _render_responses(gen: Generation) -> Plan:
    """A minimal OpenAI Responses API answer: one assistant message of output text."""
    words = gen.words
    text = "".join(words)
    message_id = f"msg_{gen.ident}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    response: dict[str, Any] = {
        "id": f"resp_{gen.ident}",
        "object": "response",
        "created_at": CREATED_UNIX,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": gen.body.get("instructions"),
        "model": gen.model,
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.count,
            "total_tokens": gen.prompt_tokens + gen.count,
        },
    }
    if gen.done_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if not gen.streams:
        return Plan(JSON_OPENAI, [dumps(response) + b"\n"], tokens=len(words), streaming=False)

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    pending = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": pending}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
        *(("response.output_text.delta", {**where, "delta": word, "logprobs": []}) for word in words),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        (
            "response.completed" if response["status"] == "completed" else "response.incomplete",
            {"response": response},
        ),
    ]
    chunks = [
        f"event: {kind}\n".encode() + _sse({"type": kind, "sequence_number": number, **payload})
        for number, (kind, payload) in enumerate(events)
    ]
    return Plan(SSE, chunks, tokens=len(words), first_token=3)


RENDERERS: dict[str, Callable[[Generation], Plan]] = {
    "/api/generate": _render_generate,
    "/api/chat": _render_chat,
    "/api/embed": _render_embed,
    "/api/embeddings": _render_embeddings,
    "/v1/chat/completions": _render_openai_chat,
    "/v1/completions": _render_openai_text,
    "/v1/embeddings": _render_openai_embeddings,
    "/v1/responses": _render_responses,
}


def dumps(value: Any) -> bytes:
    """Compact JSON like Go's encoder, so sizes and framing resemble Ollama's."""
    # A lone surrogate from the request cannot be UTF-8; Go's encoder writes U+FFFD for it too.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()


def _ndjson(value: Any) -> bytes:
    return dumps(value) + b"\n"


def _sse(value: Any) -> bytes:
    return b"data: " + dumps(value) + b"\n\n"


def json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=dumps(value), status=status, content_type="application/json", charset="utf-8")


def openai_json_response(value: Any) -> web.Response:
    return web.Response(body=dumps(value) + b"\n", content_type="application/json")


def _embedding(text: str) -> list[float]:
    """A fixed-size vector that depends only on the text."""
    return [((zlib.crc32(f"{i}:{text}".encode()) % 2001) - 1000) / 1000 for i in range(EMBEDDING_DIMENSIONS)]


def model_size(name: str) -> int:
    return 1_000_000_000 + zlib.crc32(name.encode()) % 1_000_000_000


def details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    }


def model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": MODIFIED_AT,
        "size": model_size(name),
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": details(),
    }


# -- standalone --------------------------------------------------------------------------
