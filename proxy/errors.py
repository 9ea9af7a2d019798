"""Failures the proxy answers itself, and the one place they become a response.

Every stage raises a `ProxyError`; only `error_response` (before headers) and
`frames.inband_error` (after a keep-alive 200) turn one into bytes, so a client
always gets the same shape for the same failure whichever stage noticed it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import ClassVar

from aiohttp import web

#: Ollama's native handlers send JSON with a charset; its OpenAI layer without.
JSON_NATIVE = "application/json; charset=utf-8"
JSON_OPENAI = "application/json"


class ProxyError(Exception):
    """A failure with a status, a metrics reason and a message meant for people."""

    status: int = 500
    #: Label for `ollama_proxy_rejected_total{reason}` and the OpenAI `code` field.
    reason: ClassVar[str] = "internal"
    #: The handler refuses requests with it: counted by `reason` in `ollama_proxy_rejected_total`.
    rejection: ClassVar[bool] = True
    #: OpenAI's error `type`: 4xx are the caller's fault, 5xx ours or upstream's.
    openai_type: ClassVar[str] = "server_error"
    #: Response headers that belong to this kind of failure (a 401's challenge, say).
    headers: ClassVar[Mapping[str, str]] = MappingProxyType({})

    def __init__(self, message: str, *, retry_after: int | None = None, detail: str = "") -> None:
        super().__init__(message)
        #: What the client is told: no internal address and no config advice, as it may be anyone.
        self.message = message
        self.retry_after = retry_after
        #: What the log says: the message, or a fuller account for the operator (where, which key).
        self.detail = detail or message

    def payload(self, *, openai: bool) -> dict[str, object]:
        """Ollama's `{"error": "..."}`, or OpenAI's nested shape on `/v1/*`: the one place the
        shapes are written, for a whole body (`body`) and for an in-band error (`frames`)."""
        if openai:
            return {"error": {"message": self.message, "type": self.openai_type, "code": self.reason}}
        return {"error": self.message}

    def body(self, *, openai: bool) -> bytes:
        """The payload as a whole response body."""
        return json.dumps(self.payload(openai=openai), ensure_ascii=True, separators=(",", ":")).encode()


class BadRequest(ProxyError):
    status = 400
    reason = "bad_request"
    openai_type = "invalid_request_error"


class TooLarge(ProxyError):
    status = 413
    reason = "too_large"
    openai_type = "invalid_request_error"


class BodyTimeout(ProxyError):
    status = 408
    reason = "body_timeout"
    openai_type = "invalid_request_error"


class Unauthorized(ProxyError):
    status = 401
    reason = "unauthorized"
    openai_type = "invalid_request_error"
    #: RFC 9110 11.6.1: a 401 names the scheme that would succeed.
    headers = MappingProxyType({"WWW-Authenticate": 'Bearer realm="ollama-queue-proxy"'})


class Forbidden(ProxyError):
    status = 403
    reason = "forbidden"
    openai_type = "invalid_request_error"


class OwnerQueueFull(ProxyError):
    """One client key has as many requests waiting as it may: its own 429, not everyone's 503."""

    status = 429
    reason = "key_queue_full"
    openai_type = "rate_limit_error"


class Draining(ProxyError):
    status = 503
    reason = "draining"


class TooManyConnections(ProxyError):
    """`listen.max_connections` are open: answered on the connection before a handler runs."""

    status = 503
    reason = "too_many_connections"
    rejection = False  # counted in ollama_proxy_connections_refused_total instead


class ShuttingDown(ProxyError):
    """The drain's grace ran out while this request was still unfinished."""

    status = 503
    reason = "shutdown"
    rejection = False  # the request was taken, then cut: its outcome is "shutdown"


class QueueFull(ProxyError):
    status = 503
    reason = "queue_full"


class QueueTimeout(ProxyError):
    status = 503
    reason = "queue_timeout"


class SpoolFailed(ProxyError):
    """A large body could not be written to `request.spool_dir` (full, missing, no permission)."""

    status = 503
    reason = "spool_failed"


class ClusterDown(ProxyError):
    """Redis, which holds the slots shared by several proxies, is unreachable and
    `cluster.on_redis_down` is `refuse`: a request that needs a new slot is refused."""

    status = 503
    reason = "cluster_down"


class UpstreamDown(ProxyError):
    """Upstream has been unreachable longer than `health.outage_grace` (or the grace is 0)."""

    status = 503
    reason = "upstream_down"


class ModelNotFound(ProxyError):
    """Upstream does not list the model: answered at once, exactly as Ollama itself answers."""

    status = 404
    reason = "model_not_found"
    openai_type = "not_found_error"

    def __init__(self, model: str) -> None:
        # Ollama's routes.go: gin.H{"error": fmt.Sprintf("model '%s' not found", req.Model)}.
        super().__init__(f"model '{model}' not found")

    def body(self, *, openai: bool) -> bytes:
        # Byte for byte what Ollama sends: gin's compact JSON on /api/*; on /v1/* its OpenAI
        # layer (middleware/openai.go, openai.NewError) with null param and code, and the
        # newline of Go's json.Encoder.
        if openai:
            error = {"message": self.message, "type": self.openai_type, "param": None, "code": None}
            return _go_json({"error": error}) + b"\n"
        return _go_json({"error": self.message})


class UpstreamError(ProxyError):
    """Upstream failed; `kind` labels `ollama_proxy_upstream_errors_total`."""

    kind: ClassVar[str] = "reset"
    reason = "upstream_error"
    rejection = False  # counted by `kind` in ollama_proxy_upstream_errors_total


class UpstreamUnreachable(UpstreamError):
    status = 502
    kind = "connect"


class UpstreamTimeout(UpstreamError):
    status = 504
    kind = "timeout"


class UpstreamReset(UpstreamError):
    status = 502
    kind = "reset"


class UpstreamStatus(UpstreamError):
    """Upstream answered an error status after a keep-alive 200 had already gone out.

    Before that point upstream's status is relayed as it is; this exists only so
    the status can still be reported in-band.
    """

    kind = "status"

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class UpstreamEncoded(UpstreamError):
    """Upstream compressed an answer whose uncompressed keep-alive 200 was already out."""

    status = 502
    kind = "status"


def error_body(err: ProxyError, *, openai: bool) -> bytes:
    """Ollama's `{"error": "..."}`, or OpenAI's nested shape on `/v1/*`."""
    return err.body(openai=openai)


def _go_json(value: object) -> bytes:
    """Compact JSON with UTF-8 as is, as Go's encoder writes it (which also escapes <, > and &
    as \\u003c...: the same JSON, left out so the simulator's bytes match)."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def error_response(err: ProxyError, *, openai: bool, cors: Iterable[tuple[str, str]] = ()) -> web.Response:
    """The whole response for a failure noticed before any header was sent; `cors` are the
    headers that let a browser app read it (`access.cors_headers`)."""
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else {}
    response = web.Response(
        status=err.status,
        body=error_body(err, openai=openai),
        headers={"Content-Type": JSON_OPENAI if openai else JSON_NATIVE, **err.headers, **headers},
    )
    response.headers.extend(cors)
    return response
