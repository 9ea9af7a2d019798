"""`python -m bench.buffered_proxy --config PATH`: the proxy reading sockets into one reused buffer.

Measures the "reused read buffer" remedy of the soak (docs/performance.md).
asyncio's socket transport calls `recv(256 KiB)` and shrinks the result for an
`asyncio.Protocol`, but `recv_into` a buffer the protocol lends when the
protocol is an `asyncio.BufferedProtocol`. aiohttp's protocols are the former
and offer no switch, so this wraps each of them, server and client side, in a
BufferedProtocol at the event loop's `create_server`/`create_connection` (a loop
subclass, public API): every read lands in the loop's one 256 KiB bytearray
(reads are sequential, and each is copied out before the next) and reaches
aiohttp as an exact-size copy. The product does not do
this: it would wrap protocols aiohttp owns, on every read.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from proxy.cli import main

_BUFFER = 256 * 1024


class Lender(asyncio.BufferedProtocol):
    """Lends the transport one buffer and hands what arrived to the wrapped protocol."""

    def __init__(self, inner: asyncio.Protocol, buffer: bytearray) -> None:
        self.inner = inner
        self._buffer = buffer

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def get_buffer(self, sizehint: int) -> bytearray:
        return self._buffer

    def buffer_updated(self, nbytes: int) -> None:
        self.inner.data_received(bytes(memoryview(self._buffer)[:nbytes]))

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        self.inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


class LendingLoop(asyncio.SelectorEventLoop):
    """A selector loop whose TCP servers and connections read through a `Lender`."""

    def __init__(self) -> None:
        super().__init__()
        self._read_buffer = bytearray(_BUFFER)

    def _lending(self, factory: Any) -> Any:
        return lambda: Lender(factory(), self._read_buffer)

    async def create_connection(self, protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:
        transport, protocol = await super().create_connection(
            self._lending(protocol_factory), *args, **kwargs
        )
        return transport, protocol.inner  # aiohttp expects its own protocol back

    async def create_server(self, protocol_factory: Any, *args: Any, **kwargs: Any) -> Any:
        return await super().create_server(self._lending(protocol_factory), *args, **kwargs)


class Policy(asyncio.DefaultEventLoopPolicy):
    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        return LendingLoop()


asyncio.set_event_loop_policy(Policy())
sys.exit(main())
