"""The one ticker for every waiting client: calls back in due order and forgets dropped entries."""

from __future__ import annotations

import asyncio

from proxy.edge.keepalive import Heartbeats


class Callee:
    """Records when the ticker calls it, under its name."""

    def __init__(self, name: str, calls: list[str], done: asyncio.Event | None = None) -> None:
        self.name, self.calls, self.done = name, calls, done

    def due(self) -> None:
        self.calls.append(self.name)
        if self.done is not None:
            self.done.set()


async def test_entries_fire_in_due_order_whatever_order_they_came_in():
    ticker, calls, done = Heartbeats(), [], asyncio.Event()
    now = asyncio.get_running_loop().time()
    ticker.schedule(Callee("last", calls, done), now + 0.03)
    ticker.schedule(Callee("first", calls), now + 0.01)
    ticker.schedule(Callee("second", calls), now + 0.02)
    assert len(ticker) == 3
    async with asyncio.timeout(30):
        await done.wait()
    assert calls == ["first", "second", "last"]
    assert len(ticker) == 0


async def test_a_dropped_entry_never_fires_and_a_fired_one_drops_as_a_no_op():
    ticker, calls, done = Heartbeats(), [], asyncio.Event()
    now = asyncio.get_running_loop().time()
    dropped = ticker.schedule(Callee("dropped", calls), now + 0.01)
    fired = ticker.schedule(Callee("fired", calls, done), now + 0.02)
    ticker.drop(dropped)
    ticker.drop(None)
    async with asyncio.timeout(30):
        await done.wait()
    ticker.drop(fired)
    ticker.drop(dropped)
    assert calls == ["fired"] and len(ticker) == 0


async def test_many_entries_dropped_leave_the_live_one_to_fire():
    ticker, calls, done = Heartbeats(), [], asyncio.Event()
    later = asyncio.get_running_loop().time() + 3600
    entries = [ticker.schedule(Callee(str(i), calls), later) for i in range(200)]
    kept = ticker.schedule(Callee("kept", calls, done), later - 3599.99)
    for entry in entries:
        ticker.drop(entry)
    assert len(ticker) == 1
    async with asyncio.timeout(30):
        await done.wait()
    assert calls == ["kept"]
    ticker.drop(kept)
