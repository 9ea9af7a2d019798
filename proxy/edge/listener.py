"""The listen port's defences below HTTP: what a client can hold or send before a handler runs.

The handler bounds the body (`request.max_body`, `request.body_timeout`); this
module bounds everything before it, where aiohttp would otherwise be generous
to a client on the public internet:

* header size and count, and how long the headers may take (`request.max_header_size`,
  `request.header_timeout`): aiohttp's own parser and keep-alive timer, given our limits;
* how many connections may be open at once (`listen.max_connections`): a site whose
  protocol factory counts connections and answers the one over the cap with a 503 in the
  shape of the path its request line names, with CORS headers for a browser's `Origin`;
* what a malformed request may write to the log: one line, never a traceback.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage, HttpProcessingError

from proxy.config import RequestConfig
from proxy.edge import access
from proxy.errors import JSON_NATIVE, JSON_OPENAI, BadRequest, Forbidden, TooManyConnections, error_body
from proxy.observe.logs import clip
from proxy.ollama import classify

#: More header lines than any real client sends (browsers: ~20; aiohttp's default is 128).
MAX_HEADERS = 100
#: How long a refused connection may keep sending before it is closed. Closing
#: with unread request bytes would send an RST, which can destroy the 503 in
#: flight; reading them for a moment lets the client see why it was refused.
REFUSAL_LINGER = 1.0
#: How long a refused connection has to send its request head, whose request line picks the
#: 503's shape (Ollama's, or OpenAI's on /v1) and whose `Origin` its CORS headers; then what
#: has come is used. Clients send the head as soon as they connect.
REFUSAL_PEEK = 0.25
#: The most of a refused request's head that is looked at.
REFUSAL_PEEK_BYTES = 16384
#: At most one "connections refused" warning this often, however many are refused.
REFUSAL_LOG_INTERVAL = 60.0

log = logging.getLogger("proxy.listener")
#: aiohttp's per-connection logger for the listen port (it defaults to `aiohttp.server`).
http_log = logging.getLogger("proxy.http")


def handler_options(request: RequestConfig) -> dict[str, Any]:
    """Keyword arguments for the listen port's `AppRunner`, passed through to aiohttp's
    `RequestHandler`.

    aiohttp (>= 3.14.4) starts its keep-alive timer when a connection opens and
    does not reset it as bytes arrive, so `keepalive_timeout` is both the idle
    bound between requests and a deadline for a request's headers: a client
    that trickles its headers (slowloris) is cut off when it runs out.
    """
    return {
        "max_line_size": request.max_header_size,
        "max_field_size": request.max_header_size,
        "max_headers": MAX_HEADERS,
        "keepalive_timeout": request.header_timeout,
        "logger": http_log,
    }


class OneLineBadRequests(logging.Filter):
    """aiohttp logs every malformed request at ERROR with a traceback; on a public
    port that is log spam an attacker controls. Such a record becomes one INFO line
    (DEBUG stays DEBUG) naming the client and the parser's reason. Genuine errors
    (a handler's exception) pass unchanged.

    Added to `http_log` by the server while its listen port is open (not at import,
    so merely importing this module changes no logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError):
            return True
        client = record.args[0] if isinstance(record.args, tuple) and record.args else "unknown"
        record.msg = "bad request from %s: %d %s"
        record.args = (
            client,
            exc.code,
            _one_line(exc.message if isinstance(exc, BadHttpMessage) else str(exc)),
        )
        record.exc_info = record.exc_text = None
        record.levelno = min(record.levelno, logging.INFO)
        record.levelname = logging.getLevelName(record.levelno)
        return True


def _one_line(text: str) -> str:
    """Client-controlled text made safe for a log line: no line breaks or control bytes, bounded."""
    flat = " ".join(text.split())
    return clip("".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in flat))


class ConnectionCap:
    """At most `limit` connections served at once; the count every metric reads.

    The decision is taken in `connection_made`, which the loop runs one at a
    time, so a burst of accepts cannot overshoot the cap; the count goes down in
    `connection_lost`, which asyncio calls exactly once for every transport,
    however it ends (client close or RST, keep-alive or header timeout, shutdown).
    """

    def __init__(self, limit: int, origins: Callable[[], tuple[str, ...]]) -> None:
        self.limit = limit
        #: The browser origins allowed now (`access.cors_origins`, which a reload may change).
        self._origins = origins
        #: Connections being served now.
        self.open = 0
        #: Connections refused since start.
        self.refused = 0
        self._refusals = (_refusal_bytes(limit, openai=False), _refusal_bytes(limit, openai=True))
        self._lingering: set[asyncio.Transport] = set()
        self._logged_at: float | None = None

    def protocol_factory(self, serve: web.Server) -> _Gate:
        return _Gate(self, serve)

    def admit(self) -> bool:
        """Count one more connection if there is room; else count a refusal."""
        if self.open < self.limit:
            self.open += 1
            return True
        self.refused += 1
        now = asyncio.get_running_loop().time()
        if self._logged_at is None or now - self._logged_at >= REFUSAL_LOG_INTERVAL:
            self._logged_at = now
            log.warning(
                "listen.max_connections=%d reached: refusing new connections with 503 (%d refused so far)",
                self.limit, self.refused,
            )  # fmt: skip
        return False

    def release(self) -> None:
        self.open -= 1

    def resize(self, limit: int) -> None:
        """Apply a reloaded cap: open connections stay; new ones count against `limit`."""
        self.limit = limit
        self._refusals = (_refusal_bytes(limit, openai=False), _refusal_bytes(limit, openai=True))

    def refuse(self, transport: asyncio.Transport) -> None:
        """Hand the connection over to a `_Refusal`, kept track of until it closes."""
        refusal = _Refusal(self._refusal_for, self._lingering)
        transport.set_protocol(refusal)
        refusal.connection_made(transport)

    def _refusal_for(self, head: bytes) -> bytes:
        """The 503 for a refused request's head (as much of it as came): the shape of its path,
        and the CORS headers of its `Origin`, as the handler would answer it."""
        *lines, _ = head.split(b"\n")  # the last line may be cut short: not looked at
        if not lines:
            return self._refusals[False]
        openai = _names_openai_path(lines[0].rstrip(b"\r"))
        fields: dict[str, str] = {}
        for line in lines[1:]:
            name, colon, value = line.decode("latin-1").partition(":")
            if colon:
                fields.setdefault(name.strip().lower(), value.strip())
        origin = fields.get("origin", "")
        try:
            cors = access.cors_headers(origin, fields.get("host"), self._origins(), preflight=False)
        except Forbidden:
            cors = ()  # as the handler answers it: no headers for an origin not allowed
        if not cors or not (origin.isascii() and origin.isprintable()):
            return self._refusals[openai]
        return _refusal_bytes(self.limit, openai=openai, cors=cors)

    def close_refused(self) -> None:
        """Close refused connections still lingering (at shutdown)."""
        for transport in list(self._lingering):
            transport.abort()


class _Gate(asyncio.Protocol):
    """One accepted connection: handed to aiohttp while under the cap, else refused.

    Delegates every protocol callback to aiohttp's `RequestHandler` rather than
    subclassing it, so nothing in aiohttp is patched and the count is kept here.
    """

    def __init__(self, cap: ConnectionCap, serve: web.Server) -> None:
        self._cap = cap
        self._serve = serve
        self._inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's TCP transports do not subclass asyncio's.
        transport = cast(asyncio.Transport, transport)
        if not self._cap.admit():
            self._cap.refuse(transport)
            return
        self._inner = self._serve()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        try:
            if self._inner is not None:
                self._inner.connection_lost(exc)
        finally:
            self._cap.release()
            self._inner = None

    def data_received(self, data: bytes) -> None:
        assert self._inner is not None
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        assert self._inner is not None
        return self._inner.eof_received()

    def pause_writing(self) -> None:
        assert self._inner is not None
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        assert self._inner is not None
        self._inner.resume_writing()


class _Refusal(asyncio.Protocol):
    """Answer 503 once the request head has come, half-close, and discard what the
    client sends until it stops sending or `REFUSAL_LINGER` has passed.

    At most `REFUSAL_PEEK_BYTES` of the head are kept, for at most `REFUSAL_PEEK`,
    and only its request line and `Origin` and `Host` are looked at.
    """

    def __init__(self, answer: Callable[[bytes], bytes], lingering: set[asyncio.Transport]) -> None:
        self._answer_for = answer
        self._lingering = lingering
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._head: bytes | None = b""  # the request head so far; None once answered

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        self._lingering.add(transport)
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_PEEK, self._answer)

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            return  # answered: drained only so that closing sends no RST
        self._head = (self._head + data)[:REFUSAL_PEEK_BYTES]
        if b"\r\n\r\n" in self._head or b"\n\n" in self._head or len(self._head) == REFUSAL_PEEK_BYTES:
            self._answer()

    def _answer(self) -> None:
        assert self._transport is not None and self._head is not None
        if self._timer is not None:
            self._timer.cancel()
        head, self._head = self._head, None
        self._transport.write(self._answer_for(head))
        self._transport.write_eof()
        self._timer = asyncio.get_running_loop().call_later(REFUSAL_LINGER, self._transport.abort)

    def eof_received(self) -> bool:
        if self._head is not None:
            self._answer()  # no more of the head will come
        return False  # the client is done too: close now

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self._transport is not None:
            self._lingering.discard(self._transport)


def _names_openai_path(request_line: bytes) -> bool:
    """Whether a request line's target is a path the handler would answer in OpenAI's shape."""
    method, _, rest = request_line.decode("latin-1").partition(" ")
    target = rest.rpartition(" ")[0]
    try:
        return classify.route(method, access.canonical_path(target)).openai
    except BadRequest:
        return False


def _refusal_bytes(limit: int, *, openai: bool, cors: access.CorsHeaders = ()) -> bytes:
    err = TooManyConnections(f"too many connections: listen.max_connections={limit}; retry shortly")
    body = error_body(err, openai=openai)
    head = (
        "HTTP/1.1 503 Service Unavailable\r\n"
        f"Content-Type: {JSON_OPENAI if openai else JSON_NATIVE}\r\n"
        f"Content-Length: {len(body)}\r\n"
        "Retry-After: 1\r\n"
        + "".join(f"{name}: {value}\r\n" for name, value in cors)
        + "Connection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class CappedSite(web.BaseSite):
    """The listen port: a site whose connections pass through a `ConnectionCap`.

    Only aiohttp's public surface: `BaseSite.start` and `stop` register the site with
    its runner (so `runner.cleanup()` stops it before closing connections), and the
    runner's `server` is a protocol factory, which the cap wraps. The listening socket
    is this site's own, from `loop.create_server`, so nothing of `TCPSite` is copied.
    """

    __slots__ = ("_serve", "_host", "_port", "_accept_backlog", "_cap", "_listening")

    def __init__(
        self, runner: web.BaseRunner, host: str, port: int, cap: ConnectionCap, *, backlog: int = 128
    ) -> None:
        super().__init__(runner)  # refuses a runner not set up yet
        serve = runner.server
        assert serve is not None
        #: aiohttp's protocol factory for the runner's app: it makes one `RequestHandler` a call.
        self._serve: web.Server = serve
        self._host = host
        self._port = port
        self._accept_backlog = backlog
        self._cap = cap
        self._listening: asyncio.Server | None = None

    @property
    def name(self) -> str:
        """The address served, as `http://host:port` (the port bound, once started)."""
        if self._listening is None or not self._listening.sockets:
            return f"http://{self._host}:{self._port}"
        host, port = self._listening.sockets[0].getsockname()[:2]
        return f"http://{host}:{port}"

    async def start(self) -> None:
        await super().start()
        self._listening = await asyncio.get_running_loop().create_server(
            lambda: self._cap.protocol_factory(self._serve),
            self._host,
            self._port,
            backlog=self._accept_backlog,
        )

    async def stop(self) -> None:
        await super().stop()
        if self._listening is not None:
            self._listening.close()
        self._cap.close_refused()
