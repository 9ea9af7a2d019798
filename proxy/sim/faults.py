"""Fault injection: the faults a test may set on the simulator, and the writer of one
generation response, which plays a planned body and breaks it as the fault says.

The writer keeps the request's `GenRecord` current with each step and calls
`changed` after each, so tests waiting on the simulator wake on every step.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from aiohttp import web

from proxy.sim.generation import GenRecord, Knobs
from proxy.sim.wire import JSON_NATIVE, JSON_OPENAI, Plan, dumps

#: Accepted values of :attr:`Simulator.fault` besides ``None``.
FAULTS = frozenset({"die", "hang_headers", "hang_body", "status", "garbage", "garbage_body"})
#: What the ``"garbage"`` and ``"garbage_body"`` faults send: not HTTP, not JSON, not UTF-8,
#: and it ends mid-line, so a reader that expects any framing finds none.
GARBAGE = b'\x00\xff\xfe{"half": "a line\r\n\x1b[31m not json \xc3\x28'


class Reply:
    """Writes one generation response, keeping its GenRecord current with each step."""

    def __init__(self, changed: Callable[[], None], request: web.Request, record: GenRecord) -> None:
        self._changed = changed
        self._request = request
        self._record = record
        # Exists from the start so the handler always has a response to return, even when
        # the peer vanished before anything was prepared (aiohttp then drops it quietly).
        self.response = web.StreamResponse()

    async def start(self, status: int, content_type: str, length: int | None = None) -> None:
        """Send the headers: StreamResponse sends them at prepare(), not with the first chunk."""
        self.response.set_status(status)
        self.response.content_type, _, charset = content_type.partition("; charset=")
        self.response.charset = charset or None
        if length is not None:
            self.response.content_length = length
        await self.response.prepare(self._request)
        self._record.status = status
        self._changed()

    async def send(self, data: bytes) -> None:
        """Write one body chunk: each chunk is its own write, so a relay sees them apart."""
        await self.response.write(data)
        self._record.chunks += 1
        self._changed()

    async def finish(self) -> None:
        await self.response.write_eof()
        self._record.completed = True
        self._changed()

    async def whole(self, status: int, content_type: str, body: bytes) -> None:
        await self.start(status, content_type, len(body))
        await self.send(body)
        await self.finish()

    async def error(self, status: int, message: str, openai: bool, kind: str = "api_error") -> None:
        """Answer with Ollama's error shape, or its OpenAI layer's on /v1 paths."""
        if openai:
            error = {"message": message, "type": kind, "param": None, "code": None}
            await self.whole(status, JSON_OPENAI, dumps({"error": error}) + b"\n")
        else:
            await self.whole(status, JSON_NATIVE, dumps({"error": message}))

    async def play(self, plan: Plan, knobs: Knobs) -> None:
        """Write a planned body with simulated generation time, injecting a body fault if set."""
        faulty = knobs.fault in ("die", "hang_body")
        if plan.streaming:
            await self.start(200, plan.content_type)
            for index, chunk in enumerate(plan.chunks):
                if faulty and index == knobs.fault_after:
                    await self._fail(knobs.fault)
                    return
                if plan.first_token <= index < plan.first_token + plan.tokens:
                    await asyncio.sleep(knobs.token_delay)
                await self.send(chunk)
        else:
            await asyncio.sleep(knobs.token_delay * plan.tokens)
            (body,) = plan.chunks
            await self.start(200, plan.content_type, len(body))
            if faulty:
                await self.send(body[: len(body) // 2])
                await self._fail(knobs.fault)
                return
            await self.send(body)
        await self.finish()

    async def garbage(self) -> None:
        """Answer with bytes that are not HTTP, close, and wait for aiohttp to cancel us."""
        transport = self._request.transport
        assert transport is not None
        transport.write(GARBAGE)
        transport.close()
        self._record.completed = True  # all there is to send was written: not a peer closing early
        self._changed()
        await forever()

    async def _fail(self, fault: str | None) -> None:
        if fault == "hang_body":
            await forever()
        # "die": close() flushes what was written, then sends FIN, so the peer gets exactly
        # the chunks so far and then a truncated body. (abort() could discard them.)
        self.response.force_close()
        transport = self._request.transport
        if transport is not None:
            transport.close()


# -- renderers: parsed request -> planned body -------------------------------------------


async def forever() -> None:
    """Go silent until cancelled (by the peer closing, or by close())."""
    await asyncio.get_running_loop().create_future()
