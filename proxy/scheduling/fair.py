"""Strict priorities, and within each a fair share of the slots by cost: the virtual token counter.

Each party (who `scheduling.fairness` says shares fairly: a key, an address,
a header's value) has a counter of the service it has received: its requests'
cost divided by its weight (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024). The next waiter is the oldest request of the waiting party
with the lowest counter, in the highest priority that has waiters. A party that
had nothing waiting starts at the lowest counter among those waiting, so idling
banks no credit. With one party (or `fairness: none`) this is arrival order.

Cost: why it is cheap. Waiters live in one line per (priority, party), oldest
first; a heap of the lines' heads per priority is kept between passes and
corrected lazily, and `order` merges the lines from a copy of it, lazily, so a
dispatch pass that stops after one grant costs a copy and a few heap steps,
not a sort of every waiter. Removal is lazy (a waiter leaves the index; its
line skips it), so it is O(1). The floor (lowest waiting counter) is a lazy heap too:
counters only grow while their party waits, so a stale entry is only ever too
low, and is fixed when it reaches the top.

Positions: beyond the head, the order assumes each further request of a party
will cost what requests have cost on average (`cost: requests`: 1), so a light
party's one request is shown near the front of a flood, where it will run.

Memory: counters of parties that have waited for nothing for `forget_after`
seconds are dropped (at most `max_idle` kept), so `fairness: ip` with a million
distinct clients stays bounded; a forgotten party returns at the floor, as any
returning party does.
"""

from __future__ import annotations

import heapq
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from proxy.config import PRIORITIES, Config
from proxy.scheduling.waiter import Waiter


class _Line:
    """One party's waiters at one priority, in arrival order; removed ones are skipped lazily."""

    __slots__ = ("head", "live", "waiters")

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.head = 0
        self.live = 0


class FairShare:
    """A `SchedulingPolicy`: strict priority, then lowest counter, then oldest."""

    def __init__(
        self,
        *,
        cost: str = "tokens",
        weights: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        forget_after: float = 600.0,
        max_idle: int = 100_000,
    ) -> None:
        self._cost = cost
        self._weights: Mapping[str, float] = weights or {}
        self._clock = clock
        self._forget_after = forget_after
        self._max_idle = max_idle
        self._lines: tuple[dict[str, _Line], ...] = ({}, {}, {})
        #: Per priority, a heap of (counter, head's arrival, party), fixed lazily (`_true_top`).
        self._heads: tuple[list[tuple[float, int, str]], ...] = ([], [], [])
        self._where: dict[Waiter, _Line] = {}
        self._waiting: Counter[str] = Counter()
        self._counter: dict[str, float] = {}
        #: Parties by last activity, oldest first: who may be forgotten.
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._floor: list[tuple[float, str]] = []
        #: Mean cost of a finished request, to project positions beyond each party's first.
        self._mean_cost = 1.0

    def __repr__(self) -> str:
        return f"<FairShare cost={self._cost} waiting={len(self._where)} parties={len(self._waiting)}>"

    def configure(self, *, cost: str, weights: Mapping[str, float]) -> None:
        """New cost and weights; waiters keep their places and parties their counters."""
        self._cost = cost
        self._weights = weights

    # -- the SchedulingPolicy seam ------------------------------------------------

    def added(self, waiter: Waiter) -> None:
        party = waiter.party
        if not self._waiting[party]:
            # Returning (or new): no banked credit, start at the floor of those waiting.
            floor = self.floor()
            if floor is not None and self._counter.get(party, 0.0) < floor:
                self._counter[party] = floor
            self._counter.setdefault(party, 0.0)
            heapq.heappush(self._floor, (self._counter[party], party))
        self._waiting[party] += 1
        lines = self._lines[waiter.priority]
        line = lines.get(party)
        if line is None:
            line = lines[party] = _Line()
        if line.waiters and line.waiters[-1].arrival >= waiter.arrival:
            # Sent back to the queue: rebuild the line in arrival order (rare).
            kept = [w for w in line.waiters[line.head :] if self._where.get(w) is line]
            line.waiters = sorted([*kept, waiter], key=lambda w: w.arrival)
            line.head = 0
        else:
            line.waiters.append(waiter)
        line.live += 1
        self._where[waiter] = line
        if line.waiters[line.head] is waiter:  # a new head: the kept heap must know its key
            heapq.heappush(self._heads[waiter.priority], (self._counter[party], waiter.arrival, party))
        self._touch(party)
        self._forget()

    def removed(self, waiter: Waiter) -> None:
        self._leave(waiter)

    def admitted(self, waiter: Waiter) -> None:
        self._leave(waiter)
        if self._cost == "requests":
            self._add(waiter.party, 1.0 / self._weight(waiter.party))
            waiter.charged += 1.0

    def charge(self, waiter: Waiter, cost: float) -> None:
        """`waiter`'s answer has cost `cost` more tokens so far (ignored with `cost: requests`)."""
        if self._cost == "tokens" and cost > 0:
            self._add(waiter.party, cost / self._weight(waiter.party))
            waiter.charged += cost

    def settle(self, waiter: Waiter, total: float | None) -> None:
        """`waiter` finished; `total` is its cost as Ollama counted it (None: the chunks charged stand)."""
        if self._cost != "tokens":
            return
        if total is not None and total > waiter.charged:
            self.charge(waiter, total - waiter.charged)
        if waiter.charged > 0:
            self._mean_cost = 0.9 * self._mean_cost + 0.1 * waiter.charged

    def order(self) -> Iterator[Waiter]:
        """The waiters, first to go first; lazy, and safe while the queue changes under it.

        Per priority: a copy of the lines' heads heap (kept between calls, its top made
        true first), from which a party's entry, once true, is expanded into its
        waiters, each later one keyed one average request further on.
        """
        step = 1.0 if self._cost == "requests" else self._mean_cost
        where = self._where
        for rank, lines in enumerate(self._lines):
            heap: list[tuple[Any, ...]] = list(self._true_top(rank))
            expanded: set[str] = set()
            while heap:
                entry = heap[0]
                if len(entry) == 3:  # a head from the kept heap: check it, then expand it
                    counter, arrival, party = entry
                    true = None if party in expanded else self._head_key(lines, party)
                    if true is None:
                        heapq.heappop(heap)
                    elif true != (counter, arrival):
                        heapq.heapreplace(heap, (*true, party))
                    else:
                        expanded.add(party)
                        line = lines[party]
                        index = self._next(line, line.waiters, line.head)
                        heapq.heapreplace(heap, (counter, arrival, party, line, line.waiters, index))
                    continue
                key, _, party, line, waiters, index = entry
                waiter = waiters[index]
                if where.get(waiter) is line:
                    yield waiter
                after = self._next(line, waiters, index + 1)
                if after is None:
                    heapq.heappop(heap)
                else:
                    key += step / self._weight(party)
                    heapq.heapreplace(heap, (key, waiters[after].arrival, party, line, waiters, after))

    # -- views ----------------------------------------------------------------------

    def counters(self) -> dict[str, float]:
        """Each waiting party's counter (service / weight), for the queue page."""
        return {party: self._counter.get(party, 0.0) for party in self._waiting}

    def depth_by_priority(self) -> dict[str, int]:
        return {
            name: sum(line.live for line in lines.values())
            for name, lines in zip(PRIORITIES, self._lines, strict=True)
        }

    def floor(self) -> float | None:
        """The lowest counter among the parties waiting; None when nobody waits."""
        heap = self._floor
        if len(heap) > 2 * len(self._waiting) + 64:
            heap[:] = [(self._counter.get(p, 0.0), p) for p in self._waiting]
            heapq.heapify(heap)
        while heap:
            counter, party = heap[0]
            if not self._waiting[party]:
                heapq.heappop(heap)
            elif (now := self._counter.get(party, 0.0)) != counter:
                heapq.heapreplace(heap, (now, party))
            else:
                return counter
        return None

    def known(self) -> int:
        """How many parties' counters are kept (bounded by forgetting)."""
        return len(self._counter)

    # -- inside -----------------------------------------------------------------------

    def _head_key(self, lines: dict[str, _Line], party: str) -> tuple[float, int] | None:
        """(counter, arrival of its oldest waiter) of `party`'s line; None if it has none."""
        line = lines.get(party)
        index = None if line is None else self._next(line, line.waiters, line.head)
        if line is None or index is None:
            return None
        return self._counter.get(party, 0.0), line.waiters[index].arrival

    def _true_top(self, rank: int) -> list[tuple[float, int, str]]:
        """The kept heads heap of priority `rank`, its top entry made true.

        Entries are pushed when a line gains a head and fixed lazily: a counter
        only grows while its party waits and a head only gets younger, so a
        stale entry is too low and is corrected when it comes to the top. Rebuilt
        from the lines when dead entries outnumber the live ones.
        """
        heap, lines = self._heads[rank], self._lines[rank]
        if len(heap) > 2 * len(lines) + 64:
            heap[:] = [(*key, party) for party in lines if (key := self._head_key(lines, party)) is not None]
            heapq.heapify(heap)
        while heap:
            counter, arrival, party = heap[0]
            true = self._head_key(lines, party)
            if true is None:
                heapq.heappop(heap)
            elif true != (counter, arrival):
                heapq.heapreplace(heap, (*true, party))
            else:
                break
        return heap

    def _weight(self, party: str) -> float:
        return self._weights.get(party, 1.0)

    def _add(self, party: str, amount: float) -> None:
        self._counter[party] = self._counter.get(party, 0.0) + amount
        self._touch(party)

    def _next(self, line: _Line, waiters: list[Waiter], start: int) -> int | None:
        """The index of the first waiter still in `line` at or after `start`."""
        where = self._where
        for index in range(start, len(waiters)):
            if where.get(waiters[index]) is line:
                return index
        return None

    def _leave(self, waiter: Waiter) -> None:
        line = self._where.pop(waiter, None)
        if line is None:
            return
        party = waiter.party
        self._waiting[party] -= 1
        if not self._waiting[party]:
            del self._waiting[party]
        line.live -= 1
        if not line.live:
            lines = self._lines[waiter.priority]
            if lines.get(party) is line:
                del lines[party]
        else:
            head = self._next(line, line.waiters, line.head)
            line.head = len(line.waiters) if head is None else head
            if line.head > 64 and line.head * 2 > len(line.waiters):
                line.waiters, line.head = line.waiters[line.head :], 0
        self._touch(party)

    def _touch(self, party: str) -> None:
        self._seen[party] = self._clock()
        self._seen.move_to_end(party)

    def _forget(self) -> None:
        """Drop the counters of parties idle for `forget_after` (or beyond `max_idle`); a few per call."""
        now = self._clock()
        for _ in range(8):
            if not self._seen:
                return
            party, seen = next(iter(self._seen.items()))
            if now - seen < self._forget_after and len(self._seen) <= self._max_idle:
                return
            if self._waiting[party]:
                self._touch(party)  # still waiting: not idle
                continue
            del self._seen[party]
            self._counter.pop(party, None)


def weights_of(config: Config) -> dict[str, float]:
    """Parties' weights: the keys' own with `fairness: key` (a party is then a key's name), else none."""
    if config.scheduling.fairness != "key":
        return {}
    return {name: profile.weight for name, profile in config.access.profiles.items()}


def per_key_bounds(config: Config) -> tuple[dict[str, int], dict[str, int]]:
    """The keys' own `max_queued` and `max_running`, by key name (only where set)."""
    profiles = config.access.profiles.items()
    queued = {name: p.max_queued for name, p in profiles if p.max_queued is not None}
    running = {name: p.max_running for name, p in profiles if p.max_running}
    return queued, running


def fair_share(config: Config) -> FairShare:
    return FairShare(cost=config.scheduling.cost, weights=weights_of(config))
