"""Frames while a client waits: one ticker for every waiting client, one keep-alive per request.

Thousands of clients may wait at once (see `docs/performance.md`), so a waiter
costs one small object and one heap entry: no task and no timer of its own. A
task exists only while a frame is actually being written, so a client slow to
take it never holds up anyone else's frames.

Three parts, each with its own state:

* `Heartbeats`, the ticker (one, owned by the server): a heap of due times and
  one timer for the earliest; it calls `due()` on whatever it was given;
* `KeepAlive`, the `async with` a waiting request runs in: asks its reply when
  the next frame is due and has the ticker call it back then;
* the reply (`Silent`, implemented by `edge.reply.Reply`): the only writer of the
  response, which knows when the client last heard something and whether a frame
  may go out now.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from typing import Any, Protocol

#: A heap entry: [due, order, who to call]; the last is None once dropped or fired.
Beat = list[Any]


class Silent(Protocol):
    """A response that may need keep-alive frames: `edge.reply.Reply`."""

    def next_beat(self) -> float | None:
        """When a frame is due if nothing else is sent (loop time); None if it never will be."""
        ...

    async def beat(self, note: Callable[[], str]) -> float | None:
        """Send a frame if one is due and may go out now; when the next is due, or None."""
        ...


class Due(Protocol):
    """What the ticker calls back."""

    def due(self) -> None: ...


class Heartbeats:
    """One timer for every waiting client of a loop, instead of a task and a timer each:
    a heap of [due, order, callee] entries, woken for the earliest.

    An entry is dropped by clearing its callee; the heap is rebuilt once most of it is
    dropped ones, so finished requests are not held on to until their next beat.
    Owned by the server and used only on its loop (the loop is looked up when needed,
    so one can be made before the loop runs).
    """

    __slots__ = ("_heap", "_order", "_dropped", "_timer")

    def __init__(self) -> None:
        self._heap: list[Beat] = []
        self._order = itertools.count()
        self._dropped = 0
        self._timer: asyncio.TimerHandle | None = None

    def schedule(self, callee: Due, due: float) -> Beat:
        """Call `callee.due()` at `due` (loop time); the entry returned is `drop`'s to cancel."""
        entry: Beat = [due, next(self._order), callee]
        heapq.heappush(self._heap, entry)
        if self._timer is None or due < self._timer.when():
            self._arm()
        return entry

    def drop(self, entry: Beat | None) -> None:
        """Forget an entry not yet fired (one that has fired, or None, is left alone)."""
        if entry is None or entry[2] is None:
            return
        entry[2] = None
        self._dropped += 1
        if self._dropped == len(self._heap):
            # Nobody left to beat for: no timer either (it would keep a finished loop alive).
            self._heap.clear()
            self._dropped = 0
            self._arm()
        elif self._dropped > 64 and self._dropped * 2 > len(self._heap):
            self._heap = [e for e in self._heap if e[2] is not None]
            heapq.heapify(self._heap)
            self._dropped = 0

    def __len__(self) -> int:
        """Entries waiting to fire (dropped ones not counted)."""
        return len(self._heap) - self._dropped

    def _fire(self) -> None:
        self._timer = None
        heap = self._heap
        now = asyncio.get_running_loop().time()
        while heap and heap[0][0] <= now:
            entry = heapq.heappop(heap)
            callee = entry[2]
            if callee is None:
                self._dropped -= 1
            else:
                entry[2] = None  # fired: a later `drop` of it is a no-op
                callee.due()
        self._arm()

    def _arm(self) -> None:
        """Point the one timer at the earliest entry."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._heap:
            self._timer = asyncio.get_running_loop().call_at(self._heap[0][0], self._fire)


class KeepAlive:
    """Beat alongside the body of the `async with`; `note` says where we stand (SSE comments).

    A plain object, not a generator, since thousands of these live at once while
    clients wait.
    """

    __slots__ = ("_reply", "_ticker", "_note", "_entry", "_frame", "_active")

    def __init__(self, reply: Silent, ticker: Heartbeats, note: Callable[[], str]) -> None:
        self._reply = reply
        self._ticker = ticker
        self._note = note
        self._entry: Beat | None = None  # the ticker's entry for the next check
        self._frame: asyncio.Task[None] | None = None  # a frame being written
        self._active = False

    async def __aenter__(self) -> None:
        first = self._reply.next_beat()
        if first is not None:
            self._active = True
            self._entry = self._ticker.schedule(self, first)

    async def __aexit__(self, *exc_info: object) -> None:
        self._active = False
        self._ticker.drop(self._entry)
        self._entry = None
        task = self._frame
        if task is not None:
            task.cancel()
            # Wait for it so no frame can follow; asyncio.wait never swallows our own cancel.
            await asyncio.wait((task,))

    def due(self) -> None:
        """The ticker says a frame may be due: check, and write it in a task of its own."""
        self._entry = None
        if not self._active:
            return
        when = self._reply.next_beat()
        if when is None:
            return  # upstream's own framing took over
        loop = asyncio.get_running_loop()
        if when > loop.time():
            self._entry = self._ticker.schedule(self, when)
        else:
            self._frame = loop.create_task(self._send())

    async def _send(self) -> None:
        when = await self._reply.beat(self._note)
        self._frame = None
        if when is not None and self._active:
            self._entry = self._ticker.schedule(self, when)
