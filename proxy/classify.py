"""What a request is: pure functions from request line and body to a route.

Kept free of I/O so every odd body can be tested without a socket, and so the
handler can reject bad input before it commits to anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .errors import BadRequest
from .frames import Wire

#: Generation paths: these hold an admission slot while upstream works.
QUEUED = frozenset(
    {
        "/api/generate",
        "/api/chat",
        "/api/embed",
        "/api/embeddings",
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/embeddings",
        "/v1/responses",
    }
)
_NATIVE_STREAMING = {"/api/generate": Wire.GENERATE, "/api/chat": Wire.CHAT}
_OPENAI_STREAMING = frozenset({"/v1/chat/completions", "/v1/completions", "/v1/responses"})


@dataclass(frozen=True, slots=True)
class Route:
    """Where a request goes; `endpoint` is its bounded metrics label."""

    endpoint: str
    queued: bool
    openai: bool


@dataclass(frozen=True, slots=True)
class Job:
    """A generation request, read far enough to queue it and keep it alive."""

    model: str
    wire: Wire


def route(method: str, path: str) -> Route:
    """Only POST to a generation path queues; anything else is relayed at once.

    `path` is canonical (`access.canonical_path`), the one upstream will run;
    it is matched exactly and case-sensitively, as Ollama's router matches it.
    """
    queued = method == "POST" and path in QUEUED
    return Route(
        endpoint=path if queued else "other",
        queued=queued,
        openai=path == "/v1" or path.startswith("/v1/"),
    )


def job(route: Route, body: bytes) -> Job:
    """Validate a queued request's body: a JSON object with a non-empty string `model`.

    Checked before the first keep-alive frame, since after a 200 has started a
    400 can no longer be sent.
    """
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and oversized integers.
        raise BadRequest(f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"request body must be a JSON object (got {_json_type(data)})")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        got = "missing" if "model" not in data else _json_type(model)
        raise BadRequest(f'"model" must be a non-empty string (got {got})')
    if _CONTROL.search(model) or not _encodable(model):
        # A lone surrogate ("\ud800" is valid escaped JSON) or a control character is
        # no model's name, and would poison every place the name is shown: logs, /metrics.
        raise BadRequest('"model" must be text without control characters')
    return Job(model=model, wire=_wire(route.endpoint, data.get("stream")))


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def canonical_model(name: str) -> str:
    """Ollama treats `llama3` and `llama3:latest` as one model; so must caps and labels."""
    name = name.strip().lower()
    return name if ":" in name.rsplit("/", 1)[-1] else name + ":latest"


def _wire(endpoint: str, stream: object) -> Wire:
    """Ollama streams unless told not to; OpenAI only when asked to; embeddings never."""
    if stream is not None and not isinstance(stream, bool):
        raise BadRequest(f'"stream" must be true or false (got {_json_type(stream)})')
    if endpoint in _NATIVE_STREAMING:
        return _NATIVE_STREAMING[endpoint] if stream is not False else Wire.JSON
    if endpoint in _OPENAI_STREAMING and stream is True:
        return Wire.SSE
    return Wire.JSON


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
