"""One request's place in the scheduler, and the arrival order both the queue and FIFO keep.

A `Waiter` is a plain record the scheduling package shares between its parts
(queue, policy, admission); the handler never sees it, only its `Slot`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass

from proxy.scheduling.capacity import Claim


@dataclass(eq=False, slots=True)
class Waiter:
    """A request from its arrival to its release: waiting while `future` is pending, then held."""

    claim: Claim
    #: Arrival order: a request sent back to the queue goes back to this place.
    arrival: int
    #: Loop time of arrival; a request sent back keeps it, and with it its queue deadline.
    enqueued_at: float
    #: Loop time the slot was granted; None while waiting (or once given back).
    admitted_at: float | None = None
    #: Resolved by the scheduler when the slot is granted (or failed: timeout, outage).
    future: asyncio.Future[None] | None = None
    #: 0 high, 1 normal, 2 low: a waiter of a higher priority always goes first.
    priority: int = 1
    #: Who shares the slots fairly with others (`scheduling.fairness`): a key name, an address, a header.
    party: str = ""
    #: Cost charged to `party` for this request so far (settled from the final counts).
    charged: float = 0.0
    #: The model as the client named it: an error about the model quotes it so, as Ollama does.
    asked: str = ""

    @property
    def waiting(self) -> bool:
        """Still waiting for an answer (not granted, failed or cancelled)."""
        return self.future is not None and not self.future.done()


class ArrivalOrder:
    """Waiters in arrival order, with O(1) removal.

    Arrivals come in order, so adding is an append; only a waiter sent back to
    the queue (upstream could not be reached: rare) costs a rebuild to regain its place.
    """

    __slots__ = ("_waiters",)

    def __init__(self) -> None:
        # A dict as an insertion-ordered set.
        self._waiters: dict[Waiter, None] = {}

    def add(self, waiter: Waiter) -> None:
        last = next(reversed(self._waiters), None)
        self._waiters[waiter] = None
        if last is not None and last.arrival > waiter.arrival:
            self._waiters = dict.fromkeys(sorted(self._waiters, key=lambda each: each.arrival))

    def discard(self, waiter: Waiter) -> bool:
        """Remove `waiter`; False if it was not here."""
        return self._waiters.pop(waiter, False) is None

    def first(self) -> Waiter | None:
        return next(iter(self._waiters), None)

    def __iter__(self) -> Iterator[Waiter]:
        return iter(self._waiters)

    def __len__(self) -> int:
        return len(self._waiters)

    def __contains__(self, waiter: object) -> bool:
        return waiter in self._waiters
