"""The client's side of one proxied request: the only writer of its response.

Two things write to a client: the relay (upstream's bytes) and the keep-alive
beat (frames while nothing else flows). Both go through one `Reply`, which
commits the response exactly once, serialises writes with a lock, and knows
whether the bytes so far end on a line or event boundary, so a frame can never
land inside upstream's data.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping

from aiohttp import web

from . import frames
from .errors import ProxyError, error_response
from .frames import Wire

#: How much earlier than `heartbeat.interval` a frame is due: a share, capped.
_EARLY = 0.05
_MAX_EARLY = 0.25


class Reply:
    """Commit once, write in order, keep alive while silent, fail in the right shape."""

    def __init__(
        self,
        request: web.Request,
        *,
        openai: bool,
        wire: Wire | None = None,
        model: str = "",
        interval: float = 0.0,
        on_frame: Callable[[], None] = lambda: None,
    ) -> None:
        self._request = request
        self._openai = openai
        # No wire means no keep-alive: relayed-at-once requests never wait long.
        self._wire = wire
        self._model = model
        self._interval = interval
        self._on_frame = on_frame
        self._lock = asyncio.Lock()
        self._loop = asyncio.get_running_loop()
        self._last_sent = self._loop.time()
        self._tail = b""  # last bytes of upstream data, for boundary checks
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
            response = web.StreamResponse(status=status, headers=headers)
            response.headers.update(self.headers)
            await self._prepare(response)
            return True

    async def write(self, chunk: bytes) -> None:
        async with self._lock:
            assert self.response is not None, "start() before write()"
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
                response = error_response(err, openai=self._openai)
                response.headers.update(self.headers)
                self.sent = len(response.body or b"")
                return response
            if self._wire is not None and frames.at_boundary(self._wire, self._tail):
                with contextlib.suppress(ConnectionResetError):  # the client left too
                    error = frames.inband_error(self._wire, err, openai=self._openai)
                    await self.response.write(error)
                    self.sent += len(error)
                    await self.response.write_eof()
            elif self._request.transport is not None:
                self._request.transport.close()
            return self.response

    @contextlib.asynccontextmanager
    async def keepalive(self, note: Callable[[], str]) -> AsyncIterator[None]:
        """Beat alongside the body of the `async with`; `note` says where we stand (SSE)."""
        if self._wire is None or self._interval <= 0:
            yield
            return
        beat = asyncio.create_task(self._beat(note))
        try:
            yield
        finally:
            beat.cancel()
            # Wait for it so no frame can follow; asyncio.wait never swallows our own cancel.
            await asyncio.wait((beat,))

    async def _beat(self, note: Callable[[], str]) -> None:
        # Aim a little early: the promise is that a client never sees more than
        # `interval` of silence, and timers, the network and the time it took to
        # read the request all come on top of ours.
        interval = self._interval - min(self._interval * _EARLY, _MAX_EARLY)
        while self._wire is not None:
            delay = self._last_sent + interval - self._loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
                continue
            async with self._lock:
                wire = self._wire
                if wire is None:
                    return  # upstream's own framing took over
                silent = self._loop.time() - self._last_sent >= interval
                if silent and frames.at_boundary(wire, self._tail):
                    # Only SSE frames carry the note; finding a queue position costs O(queue).
                    await self._send_frame(wire, note() if wire is Wire.SSE else "")
                    continue
            if silent:
                # Upstream went quiet mid-line: no valid place for a frame yet.
                await asyncio.sleep(interval)

    async def _send_frame(self, wire: Wire, note: str) -> None:
        if self.response is None:
            await self._prepare(
                web.StreamResponse(
                    status=200, headers={"Content-Type": frames.content_type(wire, openai=self._openai)}
                )
            )
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
