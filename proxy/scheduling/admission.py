"""Who may run upstream now, and who waits: the scheduler that ties queue, policy and ledger.

A request takes a `Slot` with `async with`. It runs at once when the capacity
ledger has room for its model, else it waits in the queue until a dispatch pass
(run whenever the ledger reports room, and on resume) offers it the room. A
pass walks the waiters in the policy's order and asks the ledger for each, so
a waiter whose model is at its cap does not block those behind it.

Invariant kept after every pass: no waiter could be admitted right now. So a
newcomer that finds room may run at once without overtaking anyone.

The ledger may answer later (a shared count needs a round trip): one pass runs
at a time, a pass waiting for an answer resumes where it was, and a slot granted
for a waiter that left meanwhile (cancelled, timed out, failed) is given back.
A room report during that wait makes the pass start over once the answer is in.

While upstream is unreachable, admission is paused (`pause`/`resume`, driven
by the health component): newcomers queue even where there is room, and a
request that could not connect goes back to its place (`Slot.requeue`), kept
by its arrival order, so an Ollama restart costs the queue nothing.

Cancellation safety: a slot is counted the moment it is granted, before its
task resumes, so a task cancelled between grant and resume hands the slot on
in its own cleanup; a task cancelled while waiting just leaves the queue.
Either way nothing is leaked and `__aexit__` runs only for slots held.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping

from proxy.config import LimitsConfig
from proxy.errors import ProxyError, QueueTimeout
from proxy.ollama.names import canonical_model
from proxy.scheduling.capacity import CapacityLedger, Claim, LocalLedger
from proxy.scheduling.policy import Fifo, SchedulingPolicy
from proxy.scheduling.queue import WaitQueue
from proxy.scheduling.waiter import Waiter
from proxy.units import counted, format_duration

log = logging.getLogger("proxy.scheduling")

#: How long a slot is taken to be held until a request has finished to learn from.
_DEFAULT_HOLD = 10.0
_MAX_RETRY_AFTER = 600


class Slot:
    """One request's place: waiting, then running, then released.

    The handler's `async with` object, and the read-only view the queue page and
    tests get of each request (`Admission.running()`, `waiting()`).
    """

    __slots__ = ("_admission", "_waiter")

    def __init__(self, admission: Admission, waiter: Waiter) -> None:
        self._admission = admission
        self._waiter = waiter

    def __repr__(self) -> str:
        place = self.position()
        state = "outside" if place is None else f"waiting {place[0]} of {place[1]}"
        state = "running" if self.admitted_at is not None else state
        return f"<Slot {self.model} client={self.client!r} {state} waited={self.waited:.3f}s>"

    async def __aenter__(self) -> Slot:
        await self._admission.acquire(self._waiter)
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._admission.release(self._waiter)

    async def requeue(self) -> None:
        """Give the slot back and wait again at this request's original place in the queue.

        For a request that upstream never received (it could not connect): it has
        lost nothing by waiting, so it keeps its arrival time, its queue position
        and its `queue_timeout` deadline. Returns holding a slot again, like entering.
        """
        await self._admission.requeue(self._waiter)

    @property
    def model(self) -> str:
        """The model as Ollama compares names (what caps are counted by)."""
        return self._waiter.claim.model

    @property
    def client(self) -> str:
        return self._waiter.claim.client

    @property
    def enqueued_at(self) -> float:
        """Loop time of arrival (kept when the request is sent back to the queue)."""
        return self._waiter.enqueued_at

    @property
    def admitted_at(self) -> float | None:
        """Loop time the slot was granted; None while waiting."""
        return self._waiter.admitted_at

    @property
    def waited(self) -> float:
        """Seconds spent in the queue (so far, if still waiting)."""
        end = self.admitted_at if self.admitted_at is not None else asyncio.get_running_loop().time()
        return end - self.enqueued_at

    def position(self) -> tuple[int, int] | None:
        """(1-based place, queue length) while waiting; None once admitted."""
        return self._admission.position(self._waiter)


class Admission:
    """The limits (through the ledger), the waiters (in the queue, ordered by the policy),
    and the passes that admit them."""

    def __init__(
        self,
        limits: LimitsConfig,
        max_queued_per_client: int = 0,
        *,
        policy: SchedulingPolicy | None = None,
        ledger: CapacityLedger | None = None,
    ) -> None:
        self._limits = limits
        self._ledger = LocalLedger(limits) if ledger is None else ledger
        self._queue = WaitQueue(
            Fifo() if policy is None else policy, limits, max_queued_per_client, self._expire
        )
        self._holding: dict[Waiter, None] = {}
        self._avg_hold: float | None = None
        self._arrivals = itertools.count()
        #: Upstream is unreachable: nobody is admitted until `resume`.
        self._paused = False
        #: The dispatch pass waiting for the ledger's answer, if any; `_again` asks it to start over.
        self._pass: asyncio.Task[None] | None = None
        self._again = False
        #: Counts room reports, so a newcomer refused by a later answer knows if it missed one.
        self._room_reports = 0
        #: Slots given back to a ledger that answers later: kept so the tasks are not collected.
        self._returns: set[asyncio.Future[None]] = set()
        self._ledger.on_room(self._dispatch)

    def __repr__(self) -> str:
        paused = " paused" if self._paused else ""
        return (
            f"<Admission running={len(self._holding)}/{self._limits.max_concurrent} "
            f"waiting={len(self._queue)}/{self._limits.max_queue}{paused} "
            f"queue={self._queue!r} ledger={self._ledger!r}>"
        )

    def slot(self, model: str, client: str = "") -> Slot:
        loop = asyncio.get_running_loop()
        waiter = Waiter(Claim(canonical_model(model), client), next(self._arrivals), loop.time())
        return Slot(self, waiter)

    def pause(self) -> None:
        """Admit nobody (upstream is unreachable): newcomers queue even where there is room."""
        self._paused = True

    def resume(self) -> None:
        """Admit again, in the policy's order, as many waiting requests as fit."""
        self._paused = False
        self._dispatch()

    def fail_waiting(self, error: Callable[[], ProxyError]) -> int:
        """End every wait with a fresh `error()` (the outage grace ran out); returns how many."""
        failed = 0
        for waiter in self._queue.clear():
            if waiter.waiting:  # else its task was cancelled already
                assert waiter.future is not None
                waiter.future.set_exception(error())
                failed += 1
        return failed

    def configure(self, limits: LimitsConfig, max_queued_per_client: int = 0) -> None:
        """Apply new limits at once: waiting requests keep their place and arrival time.

        Lowering a limit never stops a running request; it only admits fewer.
        A lower per-client bound applies to newcomers; nobody already waiting is dropped.
        """
        self._limits = limits
        self._queue.configure(limits, max_queued_per_client)
        self._ledger.configure(limits)  # reports room: a pass admits whoever now fits

    # -- views, for metrics and the queue page ---------------------------------

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    @property
    def caps(self) -> Mapping[str, int]:
        """Per-model caps by canonical model name."""
        return self._ledger.caps

    @property
    def max_concurrent(self) -> int:
        return self._limits.max_concurrent

    @property
    def running_total(self) -> int:
        return len(self._holding)

    @property
    def waiting_total(self) -> int:
        return len(self._queue)

    def running(self) -> list[Slot]:
        """Requests holding a slot here, in the order they were granted."""
        return [Slot(self, waiter) for waiter in self._holding]

    def waiting(self) -> list[Slot]:
        """Requests waiting, in the policy's order (index + 1 is the position)."""
        return [Slot(self, waiter) for waiter in self._queue.in_order()]

    def oldest_wait(self) -> float:
        """Seconds the longest waiting request has waited; 0 when nobody waits."""
        oldest = self._queue.oldest()
        return 0.0 if oldest is None else asyncio.get_running_loop().time() - oldest.enqueued_at

    def running_by_model(self) -> Counter[str]:
        return Counter(waiter.claim.model for waiter in self._holding)

    def waiting_by_model(self) -> Counter[str]:
        return self._queue.by_model()

    def retry_after(self, model: str | None = None) -> int:
        """Seconds until a request for `model` (canonical) that came now would likely get a slot.

        A client told to retry joins the back of the queue as it stands, so the
        estimate is the time to serve everyone waiting now, `max_concurrent` at a
        time (or the model's cap at a time, for those of a capped model), plus
        one hold for the slots busy now: ceil((ahead / slots + 1) * average
        hold). Telling a crowd of rejected clients less only brings them back
        into a queue that is still full, until their retries run out.
        """
        hold = _DEFAULT_HOLD if self._avg_hold is None else self._avg_hold
        rounds = len(self._queue) / self._limits.max_concurrent
        cap = None if model is None else self._ledger.caps.get(model)
        if model is not None and cap is not None and cap < self._limits.max_concurrent:
            rounds = max(rounds, self._queue.waiting_for(model) / cap)
        return max(1, min(_MAX_RETRY_AFTER, math.ceil((rounds + 1) * hold)))

    # -- what a Slot asks of its scheduler --------------------------------------

    async def acquire(self, waiter: Waiter) -> None:
        """Return holding a slot for `waiter`: at once if there is room, else after waiting."""
        reports = self._room_reports
        if not self._paused:
            answer = self._ledger.take(waiter.claim)
            if answer if isinstance(answer, bool) else await self._answer(waiter.claim, answer):
                self._hold(waiter)
                return
        self._queue.check_room(waiter.claim, lambda: self.retry_after(waiter.claim.model))
        waiter.future = asyncio.get_running_loop().create_future()
        self._queue.add(waiter)
        if self._room_reports != reports:
            self._dispatch()  # room appeared while the ledger answered: that pass could not see this waiter
        await self._wait(waiter)

    def release(self, waiter: Waiter) -> None:
        """Give back `waiter`'s slot, if it holds one; a pass then admits whoever fits."""
        if waiter.admitted_at is None:
            return
        hold = asyncio.get_running_loop().time() - waiter.admitted_at
        self._avg_hold = hold if self._avg_hold is None else 0.8 * self._avg_hold + 0.2 * hold
        self._unhold(waiter)
        self._give(waiter.claim)

    async def requeue(self, waiter: Waiter) -> None:
        """Give back `waiter`'s slot and wait again at its arrival place."""
        assert waiter.admitted_at is not None, "only a held slot goes back to the queue"
        self._unhold(waiter)
        waiter.future = asyncio.get_running_loop().create_future()
        self._queue.add(waiter)
        # Reports room: when not paused, it may be granted again at once, and the wait ends at once.
        self._give(waiter.claim)
        await self._wait(waiter)

    def position(self, waiter: Waiter) -> tuple[int, int] | None:
        return self._queue.position(waiter)

    # -- granting ---------------------------------------------------------------

    async def _wait(self, waiter: Waiter) -> None:
        """Wait, queued with a future, until a pass grants the slot."""
        future = waiter.future
        assert future is not None
        try:
            await future
        except BaseException:
            # Cancelled while waiting, timed out, or granted just as the task was
            # cancelled: in the last case the slot is already counted, so give it on.
            self._queue.remove(waiter)
            if waiter.admitted_at is not None:
                self.release(waiter)
            elif future.done() and not future.cancelled():
                future.exception()  # timed out as it was cancelled: mark it seen
            raise
        finally:
            waiter.future = None

    def _hold(self, waiter: Waiter) -> None:
        self._holding[waiter] = None
        waiter.admitted_at = asyncio.get_running_loop().time()

    def _unhold(self, waiter: Waiter) -> None:
        waiter.admitted_at = None
        del self._holding[waiter]

    def _grant(self, waiter: Waiter) -> None:
        """Admit a waiter the ledger has counted a slot for; its task resumes later."""
        self._queue.remove(waiter, admitted=True)
        self._hold(waiter)
        assert waiter.future is not None
        waiter.future.set_result(None)

    def _give(self, claim: Claim) -> None:
        answer = self._ledger.give(claim)
        if answer is not None:
            returned = asyncio.ensure_future(answer)
            self._returns.add(returned)
            returned.add_done_callback(self._returns.discard)

    def _dispatch(self) -> None:
        """Start a pass over the waiters (or, while one waits for the ledger, have it start over)."""
        self._room_reports += 1
        if self._pass is not None:
            self._again = True
            return
        if self._paused or not len(self._queue):
            return
        self._again = False
        self._walk(self._queue.in_order(), 0)

    def _walk(self, candidates: list[Waiter], start: int) -> None:
        """Offer the ledger each candidate from `start` on, granting those it has room for."""
        for index in range(start, len(candidates)):
            if self._paused or self._ledger.full():
                return
            waiter = candidates[index]
            if not (waiter.waiting and waiter in self._queue):
                continue  # left since the pass began, or its task's cleanup is pending
            answer = self._ledger.take(waiter.claim)
            if not isinstance(answer, bool):
                self._pass = asyncio.ensure_future(self._resume_walk(candidates, index, answer))
                return
            if answer:
                self._grant(waiter)

    async def _resume_walk(self, candidates: list[Waiter], index: int, answer: Awaitable[bool]) -> None:
        waiter = candidates[index]
        try:
            if await self._answer(waiter.claim, answer, refuse=waiter):
                if waiter.waiting and waiter in self._queue and not self._paused:
                    self._grant(waiter)
                else:
                    self._give(waiter.claim)  # it left while the ledger answered
        finally:
            self._pass = None
        if self._again:
            self._dispatch()
        else:
            self._walk(candidates, index + 1)

    async def _answer(self, claim: Claim, answer: Awaitable[bool], refuse: Waiter | None = None) -> bool:
        """The ledger's later answer; a slot it grants after we were cancelled is given back.

        A `ProxyError` is the ledger refusing outright (a shared ledger that cannot be
        reached, say): it reaches the caller, or ends `refuse`'s wait, as that error.
        """
        pending = asyncio.ensure_future(answer)
        try:
            return await asyncio.shield(pending)
        except ProxyError as refusal:
            if refuse is None:
                raise
            self._queue.remove(refuse)
            if refuse.waiting:
                assert refuse.future is not None
                refuse.future.set_exception(refusal)
            return False
        except asyncio.CancelledError:
            if pending.cancelled():  # the ledger gave up on its own: no slot was taken
                return False
            pending.add_done_callback(lambda done: self._give_late(claim, done))
            raise
        except Exception:
            log.exception("the capacity ledger failed to answer for model %s; taken as no room", claim.model)
            return False

    def _give_late(self, claim: Claim, answer: asyncio.Future[bool]) -> None:
        if not answer.cancelled() and answer.exception() is None and answer.result():
            self._give(claim)

    def _expire(self, waiter: Waiter) -> None:
        """The queue's timer ran out for `waiter` (already out of the queue)."""
        assert waiter.future is not None
        waited = asyncio.get_running_loop().time() - waiter.enqueued_at
        waiter.future.set_exception(
            QueueTimeout(
                f"waited {waited:.1f}s for a slot, longer than limits.queue_timeout="
                f"{format_duration(self._limits.queue_timeout)}; {counted(self._limits.max_concurrent, 'slot')} stayed busy",
                retry_after=self.retry_after(waiter.claim.model),
            )
        )
