"""What a request is: pure functions from request line and body to a route.

Kept free of I/O so every odd body can be tested without a socket, and so the
handler can reject bad input before it commits to anything.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from proxy.errors import BadRequest
from proxy.ollama.frames import Wire

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
    #: An unload (`ollama stop`): relayed at once, never queued.
    unload: bool = False


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
    400 can no longer be sent. Keys are read as Ollama's Go decoder reads them
    (see `_fields`), so a body Ollama accepts is never refused here.
    """
    try:
        data = json.loads(body, object_pairs_hook=_Object)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad JSON, bad UTF-8 and oversized integers.
        raise BadRequest(f"request body is not valid JSON: {_short(exc)}") from None
    if not isinstance(data, _Object):
        raise BadRequest(f"request body must be a JSON object (got {_json_type(data)})")
    fields = _fields(data)
    model = fields.get("MODEL")
    if not isinstance(model, str) or not model:
        got = "missing" if "MODEL" not in fields else _json_type(model)
        raise BadRequest(f'"model" must be a non-empty string (got {got})')
    if _CONTROL.search(model) or not _encodable(model):
        # A lone surrogate ("\ud800" is valid escaped JSON) or a control character is
        # no model's name, and would poison every place the name is shown: logs, /metrics.
        raise BadRequest('"model" must be text without control characters')
    return Job(
        model=model,
        wire=_wire(route.endpoint, fields.get("STREAM")),
        unload=_unload(route.endpoint, fields),
    )


class _Object(list[tuple[str, object]]):
    """A JSON object as its key-value pairs in order: duplicates and their order survive,
    which a dict would lose (it keeps the first key's place and the last key's value)."""


def _fields(pairs: _Object) -> dict[str, object]:
    """A body's top-level fields as Go's `encoding/json` assigns them to Ollama's request struct.

    Go matches each key to a field exactly or, failing that, case-insensitively
    (`"Model"` from a .NET client fills `model`), and assigns in the order the
    keys come, so the last of `{"model":"a","Model":"b"}` wins. Our field names
    are distinct when folded, so Go's preference for an exact match never
    picks between two of them: keying by the folded name is the same rule.
    """
    return {_fold(key): value for key, value in pairs}


def _fold(key: str) -> str:
    """Go's `foldName`: each rune to upper(lower(rune)), one rune for one.

    Python's `lower`/`upper` may map one character to several (U+0130 to "i" plus
    a combining dot); Go's simple mapping never does, so such results are
    dropped, except U+0130 whose simple lowercase is "i". This keeps the
    Go-only matches that matter for ASCII field names: U+017F (long s) is S,
    U+212A (Kelvin) is K, U+0131 and U+0130 are I.
    """
    if key.isascii():
        return key.upper()
    folded = []
    for char in key:
        lower = "i" if char == "\u0130" else char.lower()
        lower = lower if len(lower) == 1 else char
        upper = lower.upper()
        folded.append(upper if len(upper) == 1 else lower)
    return "".join(folded)


def _unload(endpoint: str, fields: dict[str, object]) -> bool:
    """Whether this is an unload (what `ollama stop` sends): Ollama frees the model and
    generates nothing, so it must not wait behind generations.

    Ollama's own test, mirrored: `/api/generate` with an empty prompt, or
    `/api/chat` with no messages, and a `keep_alive` present that is zero.
    """
    if endpoint == "/api/generate":
        prompt = fields.get("PROMPT")
        nothing = prompt is None or prompt == ""
    elif endpoint == "/api/chat":
        messages = fields.get("MESSAGES")
        nothing = messages is None or (type(messages) is list and not messages)
    else:
        return False
    return nothing and _zero_duration(fields.get("KEEP_ALIVE"))


_GO_DURATION = re.compile(r"[-+]?(?:0|(?:(?:\d+\.?\d*|\.\d+)(?:ns|us|\u00b5s|\u03bcs|ms|s|m|h))+)")
_GO_UNITS = {
    "ns": 1e-9,
    "us": 1e-6,
    "\u00b5s": 1e-6,
    "\u03bcs": 1e-6,
    "ms": 1e-3,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
}
_GO_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|\u00b5s|\u03bcs|ms|s|m|h)")


def _zero_duration(value: object) -> bool:
    """Whether Ollama's `api.Duration` reads `value` as zero: a number of seconds that
    truncates to 0 ns, or a Go duration string ("0", "0s", "0m0s") that does."""
    if isinstance(value, bool) or value is None:
        return False  # null leaves keep_alive unset; a boolean is a 400 upstream
    if isinstance(value, int | float):
        return 0 <= value < 1e-9
    if isinstance(value, str) and _GO_DURATION.fullmatch(value):
        seconds = sum(float(n) * _GO_UNITS[unit] for n, unit in _GO_PART.findall(value))
        return seconds < 1e-9
    return False


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def _encodable(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


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
    if isinstance(value, _Object) or not isinstance(value, list):
        return "object"
    return "array"


def _short(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."
