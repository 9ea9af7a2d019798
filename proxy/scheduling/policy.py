"""Who goes next: the scheduling policy, and first-come-first-served as its one implementation.

The policy only orders the waiters; it never counts slots (the capacity
ledger does) and never times anyone out (the queue keeps its own arrival
order for deadlines). The dispatcher offers the ledger each waiter in the
policy's order, so a waiter whose model is at its cap is passed over without
blocking those behind it, whatever the order. The same order gives the queue
positions that keep-alive frames and the queue page show.

Priorities and fair share (interface part two, "Who goes first") are the
second implementation, `fair.FairShare`: it reorders in `added`, and charges a
party's cost when its waiter is `admitted` (`cost: requests`) or as its answer
streams (`charge`, then `settle` from the final counts).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from proxy.scheduling.waiter import ArrivalOrder, Waiter


class SchedulingPolicy(Protocol):
    """Orders the waiters; told of every arrival and departure."""

    def added(self, waiter: Waiter) -> None:
        """`waiter` joined the queue (or came back to it, keeping its arrival)."""
        ...

    def removed(self, waiter: Waiter) -> None:
        """`waiter` left the queue without running: cancelled, timed out or failed."""
        ...

    def admitted(self, waiter: Waiter) -> None:
        """`waiter` runs (it left the queue, or found room on arrival and never joined it):
        where a policy charges its client."""
        ...

    def order(self) -> Iterable[Waiter]:
        """The waiters, the one to go first first.

        A generator is consumed lazily by a dispatch pass that grants (and so
        removes) waiters as it goes, even across the ledger's awaits: it must stay
        valid while the queue changes. Any other iterable is copied first.
        """
        ...

    def charge(self, waiter: Waiter, cost: float) -> None:
        """`waiter` (running) has cost `cost` more, as its answer streams."""
        ...

    def settle(self, waiter: Waiter, total: float | None) -> None:
        """`waiter` finished; `total` is what it cost as upstream counted it, if known."""
        ...


class Fifo:
    """First come, first served: arrival order, a request sent back keeping its place."""

    def __init__(self) -> None:
        self._waiters = ArrivalOrder()

    def __repr__(self) -> str:
        return f"<Fifo waiting={len(self._waiters)}>"

    def added(self, waiter: Waiter) -> None:
        self._waiters.add(waiter)

    def removed(self, waiter: Waiter) -> None:
        self._waiters.discard(waiter)

    def admitted(self, waiter: Waiter) -> None:
        self._waiters.discard(waiter)

    def order(self) -> Iterable[Waiter]:
        return self._waiters

    def charge(self, waiter: Waiter, cost: float) -> None:
        """First come, first served counts nothing."""

    def settle(self, waiter: Waiter, total: float | None) -> None:
        """First come, first served counts nothing."""
