"""Keep-alive frames and in-band errors, as bytes, per wire format.

A frame must be something the client's parser already accepts as part of a
normal response: an empty NDJSON chunk, an SSE comment, or JSON-insignificant
whitespace. Nothing here does I/O.
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, datetime

from proxy.errors import JSON_NATIVE, JSON_OPENAI, ProxyError


class Wire(enum.Enum):
    """How a queued request's response is framed, which decides its keep-alive."""

    GENERATE = "generate"  # /api/generate, streaming: NDJSON
    CHAT = "chat"  # /api/chat, streaming: NDJSON
    SSE = "sse"  # /v1/*, streaming: server-sent events
    JSON = "json"  # any non-streaming request


def content_type(wire: Wire, *, openai: bool) -> str:
    """What upstream would send, so a keep-alive 200 looks like upstream's own.

    Ollama's native handlers answer JSON with a charset, its OpenAI layer without.
    """
    if wire is Wire.SSE:
        return "text/event-stream"
    if wire is Wire.JSON:
        return JSON_OPENAI if openai else JSON_NATIVE
    return "application/x-ndjson"


def _dumps(payload: object) -> bytes:
    return json.dumps(payload, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def rfc3339(moment: datetime | None = None) -> str:
    """UTC, microseconds, `Z` suffix: what Ollama's clients parse."""
    moment = moment or datetime.now(UTC)
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def keepalive(wire: Wire, model: str, note: str, now: datetime | None = None) -> bytes:
    """One keep-alive frame; `note` says where the request stands (SSE only)."""
    if wire is Wire.GENERATE:
        return _dumps({"model": model, "created_at": rfc3339(now), "response": "", "done": False}) + b"\n"
    if wire is Wire.CHAT:
        return (
            _dumps(
                {
                    "model": model,
                    "created_at": rfc3339(now),
                    "message": {"role": "assistant", "content": ""},
                    "done": False,
                }
            )
            + b"\n"
        )
    if wire is Wire.SSE:
        # A comment line must not contain a line break, or it would end the event.
        text = note.replace("\r", " ").replace("\n", " ").encode("ascii", "replace")
        return b": " + text + b"\n\n"
    return b"\n"


def inband_error(wire: Wire, err: ProxyError, *, openai: bool) -> bytes:
    """The last bytes of a response that had already started as a 200."""
    if wire is Wire.SSE:
        return b"data: " + _dumps(err.payload(openai=True)) + b"\n\n"
    if wire is Wire.JSON:
        return _dumps(err.payload(openai=openai))
    return _dumps(err.payload(openai=False)) + b"\n"


def at_boundary(wire: Wire, tail: bytes) -> bool:
    """May a frame go out after `tail`, the last bytes of upstream data relayed?

    Only between NDJSON lines or SSE events; for plain JSON only before the
    body has begun, since whitespace inside a document is not ours to add.
    """
    if not tail:
        return True
    if wire is Wire.SSE:
        return tail.endswith((b"\n\n", b"\r\n\r\n", b"\r\r"))
    if wire is Wire.JSON:
        return False
    return tail.endswith(b"\n")
