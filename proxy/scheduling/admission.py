"""Who may run upstream now, and who waits: the admission queue.

One `Admission` owns every count. A request takes a `Slot` with `async with`;
the slot is granted when both the global limit and the model's cap have room,
and waiters are admitted in arrival order, except that a waiter whose model is
at its cap does not block those behind it.

Invariant kept after every change: no waiter could be admitted right now. So a
newcomer that finds room may run at once without overtaking anyone, and every
release only has to look for the first waiters that now fit.

While upstream is unreachable, admission is paused (`pause`/`resume`, driven
by the health component): newcomers queue even where there is room, and a
request that could not connect goes back to its place (`Slot.requeue`), kept
by its arrival order, so an Ollama restart costs the queue nothing.

Cancellation safety: a slot is counted the moment it is granted, before its
task resumes, so a task cancelled between grant and resume hands the slot on
in `__aenter__`'s own cleanup; a task cancelled while waiting just leaves the
queue. Either way nothing is leaked and `__aexit__` runs only for slots held.
"""

from __future__ import annotations

import asyncio
import itertools
import math
from collections import Counter
from collections.abc import Callable

from proxy.config import LimitsConfig
from proxy.errors import OwnerQueueFull, ProxyError, QueueFull, QueueTimeout
from proxy.ollama.names import canonical_model
from proxy.units import counted, format_duration

#: How long a slot is taken to be held until a request has finished to learn from.
_DEFAULT_HOLD = 10.0
_MAX_RETRY_AFTER = 600


class Slot:
    """One request's place: waiting, then running, then released."""

    __slots__ = ("_admission", "model", "key", "owner", "enqueued_at", "admitted_at", "_future", "_order")

    def __init__(self, admission: Admission, model: str, order: int, owner: str = "") -> None:
        self._admission = admission
        #: Arrival order: a request sent back to the queue goes back to this place.
        self._order = order
        self.model = model
        self.key = canonical_model(model)
        #: Who asked (a client key's name), for the per-key queue bound and the queue page.
        self.owner = owner
        self.enqueued_at = asyncio.get_running_loop().time()
        self.admitted_at: float | None = None
        self._future: asyncio.Future[None] | None = None

    async def __aenter__(self) -> Slot:
        await self._admission._acquire(self)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission._release(self)

    async def requeue(self) -> None:
        """Give the slot back and wait again at this request's original place in the queue.

        For a request that upstream never received (it could not connect): it has
        lost nothing by waiting, so it keeps its arrival time, its queue position
        and its `queue_timeout` deadline. Returns holding a slot again, like entering.
        """
        await self._admission._requeue(self)

    @property
    def waited(self) -> float:
        """Seconds spent in the queue (so far, if still waiting)."""
        end = self.admitted_at if self.admitted_at is not None else asyncio.get_running_loop().time()
        return end - self.enqueued_at

    def position(self) -> tuple[int, int] | None:
        """(1-based place, queue length) while waiting; None once admitted."""
        return self._admission._position(self)


class Admission:
    """The global and per-model limits, and the FIFO of requests waiting for them."""

    def __init__(self, limits: LimitsConfig, max_queued_per_owner: int = 0) -> None:
        self._limits = limits
        self._caps = _caps(limits)
        self._per_owner = max_queued_per_owner
        self._running: Counter[str] = Counter()
        # Dicts as insertion-ordered sets: O(1) removal, arrival order kept.
        self._holding: dict[Slot, None] = {}
        self._waiters: dict[Slot, None] = {}
        self._avg_hold: float | None = None
        self._arrivals = itertools.count()
        #: Upstream is unreachable: nobody is admitted until `resume`.
        self._paused = False
        # One timer for the queue's head: every waiter has the same queue_timeout and
        # joined in order, so they run out in queue order too.
        self._deadline: asyncio.TimerHandle | None = None

    def slot(self, model: str, owner: str = "") -> Slot:
        return Slot(self, model, next(self._arrivals), owner)

    def pause(self) -> None:
        """Admit nobody (upstream is unreachable): newcomers queue even where there is room."""
        self._paused = True

    def resume(self) -> None:
        """Admit again, in arrival order, as many waiting requests as fit."""
        self._paused = False
        self._dispatch()

    def fail_waiting(self, error: Callable[[], ProxyError]) -> int:
        """End every wait with a fresh `error()` (the outage grace ran out); returns how many."""
        waiters, self._waiters = list(self._waiters), {}
        failed = 0
        for slot in waiters:
            future = slot._future
            if future is not None and not future.done():  # else its task was cancelled already
                future.set_exception(error())
                failed += 1
        self._arm()
        return failed

    def configure(self, limits: LimitsConfig, max_queued_per_owner: int = 0) -> None:
        """Apply new limits at once: waiting requests keep their place and arrival time.

        Lowering a limit never stops a running request; it only admits fewer.
        A lower per-owner bound applies to newcomers; nobody already waiting is dropped.
        """
        self._limits = limits
        self._caps = _caps(limits)
        self._per_owner = max_queued_per_owner
        self._dispatch()
        self._arm()

    # -- views, for metrics and the queue page ---------------------------------

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    @property
    def max_concurrent(self) -> int:
        return self._limits.max_concurrent

    @property
    def running_total(self) -> int:
        return len(self._holding)

    def running(self) -> list[Slot]:
        """Slots held now, in the order they were granted."""
        return list(self._holding)

    def waiting(self) -> list[Slot]:
        """Slots waiting now, in queue order (index + 1 is the position)."""
        return list(self._waiters)

    def oldest_wait(self) -> float:
        """Seconds the head of the queue has waited; 0 when nobody waits."""
        head = next(iter(self._waiters), None)
        return 0.0 if head is None else head.waited

    @property
    def waiting_total(self) -> int:
        return len(self._waiters)

    def running_by_model(self) -> Counter[str]:
        return +self._running

    def waiting_by_model(self) -> Counter[str]:
        return Counter(slot.key for slot in self._waiters)

    def retry_after(self, key: str | None = None) -> int:
        """Seconds until a request for model `key` (canonical) that came now would likely get a slot.

        A client told to retry joins the back of the queue as it stands, so the
        estimate is the time to serve everyone waiting now, `max_concurrent` at a
        time (or the model's cap at a time, for those of a capped model), plus
        one hold for the slots busy now: ceil((ahead / slots + 1) * average
        hold). Telling a crowd of rejected clients less only brings them back
        into a queue that is still full, until their retries run out.
        """
        hold = _DEFAULT_HOLD if self._avg_hold is None else self._avg_hold
        rounds = len(self._waiters) / self._limits.max_concurrent
        cap = None if key is None else self._caps.get(key)
        if cap is not None and cap < self._limits.max_concurrent:
            rounds = max(rounds, sum(1 for slot in self._waiters if slot.key == key) / cap)
        return max(1, min(_MAX_RETRY_AFTER, math.ceil((rounds + 1) * hold)))

    # -- the slot protocol ------------------------------------------------------

    def _has_room(self, key: str) -> bool:
        if len(self._holding) >= self._limits.max_concurrent:
            return False
        cap = self._caps.get(key)
        return cap is None or self._running[key] < cap

    def _take(self, slot: Slot) -> None:
        self._holding[slot] = None
        self._running[slot.key] += 1
        slot.admitted_at = asyncio.get_running_loop().time()

    async def _acquire(self, slot: Slot) -> None:
        if not self._paused and self._has_room(slot.key):
            self._take(slot)
            return
        limits = self._limits
        if len(self._waiters) >= limits.max_queue:
            raise QueueFull(
                f"queue full: {counted(len(self._waiters), 'request')} waiting, max_queue={limits.max_queue}; "
                "retry later, or raise limits.max_queue",
                retry_after=self.retry_after(slot.key),
            )
        if self._per_owner and slot.owner:
            mine = sum(1 for other in self._waiters if other.owner == slot.owner)
            if mine >= self._per_owner:
                raise OwnerQueueFull(
                    f"key {slot.owner!r} already has {counted(mine, 'request')} waiting, "
                    f"access.max_queued_per_key={self._per_owner}; wait for them to finish",
                    retry_after=self.retry_after(slot.key),
                )
        slot._future = asyncio.get_running_loop().create_future()
        self._waiters[slot] = None
        await self._wait(slot)

    async def _requeue(self, slot: Slot) -> None:
        assert slot.admitted_at is not None, "only a held slot goes back to the queue"
        self._give_back(slot)
        slot._future = asyncio.get_running_loop().create_future()
        # Back to its arrival place: a rebuild, but only in an outage, and O(queue).
        self._waiters = dict.fromkeys(sorted((*self._waiters, slot), key=lambda waiter: waiter._order))
        self._dispatch()  # when not paused, it may be granted again at once: then the wait ends at once
        await self._wait(slot)

    async def _wait(self, slot: Slot) -> None:
        """Wait, queued with a future, until `_dispatch` grants the slot."""
        assert slot._future is not None
        self._arm()
        try:
            await slot._future
        except BaseException:
            # Cancelled while waiting, timed out, or granted just as the task was
            # cancelled: in the last case the slot is already counted, so give it on.
            self._waiters.pop(slot, None)
            if slot.admitted_at is not None:
                self._release(slot)
            elif slot._future.done() and not slot._future.cancelled():
                slot._future.exception()  # timed out as it was cancelled: mark it seen
            raise
        finally:
            slot._future = None

    def _release(self, slot: Slot) -> None:
        if slot.admitted_at is None:
            return
        hold = asyncio.get_running_loop().time() - slot.admitted_at
        self._avg_hold = hold if self._avg_hold is None else 0.8 * self._avg_hold + 0.2 * hold
        self._give_back(slot)
        self._dispatch()

    def _give_back(self, slot: Slot) -> None:
        """Uncount a held slot (without dispatching: the caller decides when)."""
        slot.admitted_at = None
        del self._holding[slot]
        self._running[slot.key] -= 1
        if not self._running[slot.key]:
            del self._running[slot.key]

    def _dispatch(self) -> None:
        """Admit, in arrival order, every waiter that fits now."""
        if not self._waiters or self._paused:
            return
        admitted: list[Slot] = []
        gone: list[Slot] = []
        for slot in self._waiters:
            if len(self._holding) >= self._limits.max_concurrent:
                break
            future = slot._future
            if future is None or future.done():
                gone.append(slot)  # its task was cancelled; its own cleanup is pending
            elif self._has_room(slot.key):
                self._take(slot)
                admitted.append(slot)
        for slot in gone:
            del self._waiters[slot]
        for slot in admitted:
            del self._waiters[slot]
            assert slot._future is not None
            slot._future.set_result(None)

    def _arm(self) -> None:
        """Point the queue's one timer at its head's deadline (none when nobody waits)."""
        head = next(iter(self._waiters), None)
        due = None if head is None else head.enqueued_at + self._limits.queue_timeout
        if self._deadline is not None:
            if self._deadline.when() == due:
                return
            self._deadline.cancel()
            self._deadline = None
        if due is not None:
            self._deadline = asyncio.get_running_loop().call_at(due, self._expire_heads, due)

    def _expire_heads(self, due: float) -> None:
        """Time out every waiter from the head whose deadline has come (the head may have changed)."""
        self._deadline = None
        limit = max(due, asyncio.get_running_loop().time())
        timeout = self._limits.queue_timeout
        expired = list(itertools.takewhile(lambda slot: slot.enqueued_at + timeout <= limit, self._waiters))
        for slot in expired:
            del self._waiters[slot]
            future = slot._future
            if future is not None and not future.done():  # else its task was cancelled: nothing to say
                self._expire(slot, future)
        self._arm()

    def _expire(self, slot: Slot, future: asyncio.Future[None]) -> None:
        waited = asyncio.get_running_loop().time() - slot.enqueued_at
        future.set_exception(
            QueueTimeout(
                f"waited {waited:.1f}s for a slot, longer than limits.queue_timeout="
                f"{format_duration(self._limits.queue_timeout)}; {counted(self._limits.max_concurrent, 'slot')} stayed busy",
                retry_after=self.retry_after(slot.key),
            )
        )

    def _position(self, slot: Slot) -> tuple[int, int] | None:
        if slot not in self._waiters:
            return None
        for place, other in enumerate(self._waiters, 1):
            if other is slot:
                return place, len(self._waiters)
        raise AssertionError("unreachable")  # pragma: no cover


def _caps(limits: LimitsConfig) -> dict[str, int]:
    return {canonical_model(name): cap for name, cap in limits.models.items()}
