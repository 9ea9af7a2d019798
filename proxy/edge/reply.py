"""The client's side of one proxied request: the only writer of its response.

Two things write to a client: the relay (upstream's bytes) and the keep-alive
beat (frames while nothing else flows). Both go through one `Reply`, which
commits the response exactly once, serialises writes with a lock, and knows
whether the bytes so far end on a line or event boundary, so a frame can never
land inside upstream's data.

`Reply` is the relay's `upstream.relay.Sink` and the keep-alive's
`edge.keepalive.Silent`: each sees only the few methods it needs, and neither
touches the reply's state.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Mapping

from aiohttp import web

from proxy.edge.access import CorsHeaders
from proxy.errors import ProxyError, error_response
from proxy.ollama import frames
from proxy.ollama.frames import Wire

#: Bytes waiting in the kernel for a client before a write may block on it, and gets a deadline.
_BACKLOG = 16 * 1024
#: How much earlier than `heartbeat.interval` a frame is due: a share, capped.
_EARLY = 0.05
_MAX_EARLY = 0.25


class ClientStalled(ConnectionResetError):
    """The client stopped reading: treated like a client that left (the connection is cut)."""


class Reply:
    """Commit once, write in order, keep alive while silent, fail in the right shape."""

    # Thousands live at once while clients wait: no per-instance dict.
    __slots__ = (
        "_request", "_openai", "_wire", "_model", "_aim", "_on_frame", "_lock", "_loop", "_last_sent",
        "_tail", "_writing", "_write_timeout", "response", "headers", "sent", "_cors",
    )  # fmt: skip

    def __init__(
        self,
        request: web.Request,
        *,
        openai: bool,
        wire: Wire | None = None,
        model: str = "",
        interval: float = 0.0,
        on_frame: Callable[[], None] = lambda: None,
        write_timeout: float = 60.0,
        cors: CorsHeaders = (),
    ) -> None:
        self._request = request
        # CORS headers for the responses the proxy makes itself; upstream's carry its own.
        self._cors = cors
        self._openai = openai
        # No wire means no keep-alive: relayed-at-once requests never wait long.
        self._wire = wire
        self._model = model
        # Aim a little early: the promise is that a client never sees more than
        # `interval` of silence, and timers, the network and the time it took to
        # read the request all come on top of ours.
        self._aim = interval - min(interval * _EARLY, _MAX_EARLY)
        self._on_frame = on_frame
        self._write_timeout = write_timeout
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._loop.time()
        self._tail = b""  # last bytes of upstream data, for boundary checks
        self._writing = False  # a write of upstream's bytes is under way without the lock
        #: Set once a status line is out; from then on failures go in-band.
        self.response: web.StreamResponse | None = None
        #: Added to the status line whoever sends it first (upstream's or an error's), not to keep-alive.
        self.headers: dict[str, str] = {}
        #: Body bytes written to the client, keep-alive frames and in-band errors included.
        self.sent = 0

    async def start(self, status: int, headers: Mapping[str, str]) -> bool:
        """Send upstream's status and headers, unless a keep-alive 200 beat them to it."""
        async with self._lock:
            if self.response is not None:
                return False
            if status >= 300 or "Content-Length" in headers:
                # Upstream frames this body itself: a frame or an in-band error
                # added to it would corrupt it. A failure now can only cut it off.
                self._wire = None
            if "Content-Length" in headers:
                response: web.StreamResponse = _HeadersWithBody(status=status, headers=headers)
            else:
                response = web.StreamResponse(status=status, headers=headers)
            response.headers.update(self.headers)
            await self._prepare(response)
            return True

    async def write(self, chunk: bytes) -> None:
        if not self._lock.locked():
            # No frame is being written, and one that starts while this write waits for the
            # client sees `_writing` and stands back: the lock, per chunk, only when needed.
            self._writing = True
            try:
                await self._write(chunk)
            finally:
                self._writing = False
        else:
            async with self._lock:
                await self._write(chunk)

    async def _write(self, chunk: bytes) -> None:
        assert self.response is not None, "start() before write()"
        transport = self._request.transport
        if transport is not None and transport.get_write_buffer_size() + len(chunk) > _BACKLOG:
            # The client is behind, so this write may wait for it to read: not forever,
            # or a client that stops reading would hold its slot and the GPU for nobody.
            try:
                async with asyncio.timeout(self._write_timeout):
                    await self.response.write(chunk)
            except TimeoutError:
                transport.abort()
                raise ClientStalled(
                    f"client read nothing for {self._write_timeout:g}s (timeouts.write)"
                ) from None
        else:
            await self.response.write(chunk)
        self.sent += len(chunk)
        self._last_sent = self._loop.time()
        self._tail = chunk[-4:] if len(chunk) >= 4 else (self._tail + chunk)[-4:]

    async def finish(self) -> web.StreamResponse:
        async with self._lock:
            assert self.response is not None
            await self.response.write_eof()
            return self.response

    async def fail(self, err: ProxyError) -> web.StreamResponse:
        """Answer `err` as a status if nothing is out yet, else in-band and end.

        If upstream's data stopped mid-line there is no valid place left for an
        error, so the connection is cut: a client must not mistake a truncated
        body for a complete one.
        """
        async with self._lock:
            if self.response is None:
                response = error_response(err, openai=self._openai, cors=self._cors)
                response.headers.update(self.headers)
                self.sent = len(response.body or b"")
                return response
            wire = self._wire
            if wire is not None and frames.at_boundary(wire, self._tail):
                with contextlib.suppress(ConnectionResetError):  # the client left too
                    await self._write(frames.inband_error(wire, err, openai=self._openai))
                    if wire is not Wire.JSON:
                        # NDJSON and SSE clients read the error line as the end.
                        await self.response.write_eof()
                        return self.response
            # A whole `{"error":...}` body under a 200 reads as an empty success to
            # the `ollama` and `openai` libraries; unterminated, it is a transport
            # error to every client, and curl still shows the message.
            self._cut()
            return self.response

    def _cut(self) -> None:
        """End the response without its chunked terminator: close the connection once the
        bytes written so far have gone out, or abort it if the client will not take them.

        aiohttp's own `write_eof` after the handler returns then meets a closing
        transport, which it takes for a client that left: no terminator, no traceback.
        """
        transport = self._request.transport
        if transport is None:
            return  # already gone
        transport.close()
        if transport.get_write_buffer_size():
            self._loop.call_later(self._write_timeout, transport.abort)

    def next_beat(self) -> float | None:
        """When a keep-alive frame is due if nothing else is sent (loop time); None once
        upstream's own framing took over, or for a reply that never beats."""
        if self._wire is None or self._aim <= 0:
            return None
        return self._last_sent + self._aim

    async def beat(self, note: Callable[[], str]) -> float | None:
        """Send a keep-alive frame if the client has heard nothing for the interval and the
        bytes so far end on a boundary; return when the next one is due (None: never)."""
        async with self._lock:
            wire = self._wire
            if wire is None:
                return None  # upstream's own framing took over
            now = self._loop.time()
            due = self._last_sent + self._aim
            if self._writing:
                return now + self._aim  # upstream's bytes are on their way: not silent
            if due > now:
                return due
            if not frames.at_boundary(wire, self._tail):
                return now + self._aim  # upstream went quiet mid-line: no valid place for a frame yet
            # Only SSE frames carry the note; finding a queue position costs O(queue).
            await self._send_frame(wire, note() if wire is Wire.SSE else "")
            return self._last_sent + self._aim

    async def _send_frame(self, wire: Wire, note: str) -> None:
        if self.response is None:
            response = web.StreamResponse(
                status=200, headers={"Content-Type": frames.content_type(wire, openai=self._openai)}
            )
            response.headers.extend(self._cors)
            await self._prepare(response)
        assert self.response is not None
        frame = frames.keepalive(wire, self._model, note)
        await self.response.write(frame)
        self.sent += len(frame)
        self._last_sent = self._loop.time()
        self._on_frame()

    async def _prepare(self, response: web.StreamResponse) -> None:
        # Claimed before the await: if we are cancelled inside prepare(), the
        # response still counts as started and nobody tries to start another.
        self.response = response
        await response.prepare(self._request)


class _HeadersWithBody(web.StreamResponse):
    """Holds its headers back until the first body bytes (as `web.Response` does), so a
    small answer goes out in one send instead of two. Only for a body of known length:
    that arrives at once, while a stream's headers must not wait for its first token."""

    _send_headers_immediately = False
