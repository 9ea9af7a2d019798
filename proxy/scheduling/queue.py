"""The waiters: bounds on joining, positions in the policy's order, and deadlines in arrival order.

Deadlines do not depend on the policy: every waiter has the same
`queue_timeout` from its arrival, so they run out in arrival order, and one
timer for the oldest waiter covers them all, whatever order the policy serves
them in. The queue keeps that arrival order itself for this reason.

Positions are asked for on every keep-alive beat of every waiting stream, so
they are computed in one pass over the policy's order and kept until the
queue changes: a beat costs a dict lookup, not a walk of the queue.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Callable, Generator, Iterator, Mapping

from proxy.config import LimitsConfig
from proxy.errors import OwnerQueueFull, QueueFull
from proxy.scheduling.capacity import Claim
from proxy.scheduling.policy import SchedulingPolicy
from proxy.scheduling.waiter import ArrivalOrder, Waiter
from proxy.units import counted


class WaitQueue:
    """Who waits, in arrival order and in the policy's order."""

    def __init__(
        self,
        policy: SchedulingPolicy,
        limits: LimitsConfig,
        max_queued_per_client: int,
        on_expired: Callable[[Waiter], None],
    ) -> None:
        self._policy = policy
        self._max_queue = limits.max_queue
        self._timeout = limits.queue_timeout
        self._per_client = max_queued_per_client
        #: Per-client overrides of `_per_client` (`access.keys.NAME.max_queued`).
        self._per_client_caps: Mapping[str, int] = {}
        self._on_expired = on_expired
        self._arrivals = ArrivalOrder()
        self._by_model: Counter[str] = Counter()
        self._by_client: Counter[str] = Counter()
        #: 1-based places in the policy's order; None until asked for after a change.
        self._places: dict[Waiter, int] | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<WaitQueue waiting={len(self._arrivals)} policy={self._policy!r}>"

    def configure(
        self, limits: LimitsConfig, max_queued_per_client: int, per_client: Mapping[str, int] | None = None
    ) -> None:
        """New bounds apply to newcomers; a new timeout also to those already waiting."""
        self._max_queue = limits.max_queue
        self._timeout = limits.queue_timeout
        self._per_client = max_queued_per_client
        self._per_client_caps = per_client or {}
        self._arm()

    def check_room(self, claim: Claim, retry_after: Callable[[], int]) -> None:
        """Raise if a newcomer for `claim` may not join (queue full, or its client has too many waiting)."""
        waiting = len(self._arrivals)
        if waiting >= self._max_queue:
            raise QueueFull(
                f"queue full: {counted(waiting, 'request')} waiting, max_queue={self._max_queue}; "
                "retry later, or raise limits.max_queue",
                retry_after=retry_after(),
            )
        bound = self._per_client_caps.get(claim.client, self._per_client)
        if bound and claim.client:
            mine = self._by_client[claim.client]
            if mine >= bound:
                setting = (
                    f"access.keys.{claim.client}.max_queued"
                    if claim.client in self._per_client_caps
                    else "access.max_queued_per_key"
                )
                raise OwnerQueueFull(
                    f"key {claim.client!r} already has {counted(mine, 'request')} waiting, "
                    f"{setting}={bound}; wait for them to finish",
                    retry_after=retry_after(),
                )

    def add(self, waiter: Waiter) -> None:
        """Join (or rejoin, at the original arrival place) the queue."""
        self._arrivals.add(waiter)
        self._count(waiter.claim, 1)
        self._policy.added(waiter)
        self._places = None
        self._arm()

    def remove(self, waiter: Waiter, *, admitted: bool = False) -> bool:
        """Leave the queue (to run when `admitted`); False if `waiter` was not in it."""
        if not self._arrivals.discard(waiter):
            return False
        self._count(waiter.claim, -1)
        if admitted:
            self._policy.admitted(waiter)
        else:
            self._policy.removed(waiter)
        self._places = None
        return True

    def clear(self) -> list[Waiter]:
        """Empty the queue; returns who was waiting, in arrival order."""
        waiters = list(self._arrivals)
        for waiter in waiters:
            self.remove(waiter)
        self._arm()
        return waiters

    def in_order(self) -> list[Waiter]:
        """The waiters in the policy's order (a copy: the queue may change while it is walked)."""
        return list(self._policy.order())

    def candidates(self) -> Iterator[Waiter]:
        """The waiters in the policy's order, for a dispatch pass that may stop early.

        A generator is consumed lazily (the policy promises it stays valid while the
        queue changes, as `FairShare.order` does); any other iterable, which may be a
        live view of a dict, is copied first.
        """
        order = self._policy.order()
        return order if isinstance(order, Generator) else iter(list(order))

    def in_arrival_order(self) -> list[Waiter]:
        return list(self._arrivals)

    def position(self, waiter: Waiter) -> tuple[int, int] | None:
        """(1-based place in the policy's order, queue length); None when not waiting."""
        if waiter not in self._arrivals:
            return None
        if self._places is None:
            self._places = {each: place for place, each in enumerate(self._policy.order(), 1)}
        return self._places[waiter], len(self._arrivals)

    def oldest(self) -> Waiter | None:
        return self._arrivals.first()

    def waiting_for(self, model: str) -> int:
        return self._by_model[model]

    def by_model(self) -> Counter[str]:
        return +self._by_model

    def __len__(self) -> int:
        return len(self._arrivals)

    def __contains__(self, waiter: object) -> bool:
        return waiter in self._arrivals

    def _count(self, claim: Claim, step: int) -> None:
        for counter, name in ((self._by_model, claim.model), (self._by_client, claim.client)):
            counter[name] += step
            if not counter[name]:
                del counter[name]

    def _arm(self) -> None:
        """Point the one timer at the oldest waiter's deadline (none when nobody waits)."""
        head = self._arrivals.first()
        due = None if head is None else head.enqueued_at + self._timeout
        if self._deadline is not None:
            if self._deadline.when() == due:
                return
            self._deadline.cancel()
            self._deadline = None
        if due is not None:
            self._deadline = asyncio.get_running_loop().call_at(due, self._expire_oldest, due)

    def _expire_oldest(self, due: float) -> None:
        """Time out every waiter, oldest first, whose deadline has come (the oldest may have changed)."""
        self._deadline = None
        limit = max(due, asyncio.get_running_loop().time())
        while (head := self._arrivals.first()) is not None and head.enqueued_at + self._timeout <= limit:
            self.remove(head)
            if head.waiting:  # else its task was cancelled: nothing to say
                self._on_expired(head)
        self._arm()
