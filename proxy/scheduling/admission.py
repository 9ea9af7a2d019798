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

A little over 400 lines: the `Slot` (the handler's view) and the passes that grant
slots share every invariant above, and read best side by side. With several
Ollama hosts, a `Router` (the fleet) names where a slot may go, best first, and
`_take` asks the ledger for each in turn: the granted claim names its backend,
so the ledger counts the backend's own limits and the relay knows where to send
the request; that "where" belongs with the grant it is part of.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import replace

from proxy.config import PRIORITIES, BackendConfig, LimitsConfig
from proxy.errors import ModelNotFound, ProxyError, QueueTimeout
from proxy.ollama.names import canonical_model
from proxy.scheduling.capacity import CapacityLedger, Claim, LocalLedger
from proxy.scheduling.fair import FairShare
from proxy.scheduling.policy import Fifo, SchedulingPolicy
from proxy.scheduling.queue import WaitQueue
from proxy.scheduling.routing import Router
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
    def party(self) -> str:
        """Who this request shares the slots fairly with others as (`scheduling.fairness`)."""
        return self._waiter.party

    @property
    def priority(self) -> int:
        """0 high, 1 normal, 2 low."""
        return self._waiter.priority

    @property
    def charged(self) -> float:
        """Cost charged to its party so far."""
        return self._waiter.charged

    def charge(self, cost: float) -> None:
        """The answer has cost `cost` more (tokens), as it streams."""
        self._admission.policy.charge(self._waiter, cost)

    def settle(self, total: float | None) -> None:
        """The answer is over; `total` is its cost as Ollama counted it, if it said."""
        self._admission.policy.settle(self._waiter, total)

    @property
    def backend(self) -> str:
        """The backend the slot was granted on (empty while waiting, or without a router)."""
        return self._waiter.claim.backend

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
        router: Router | None = None,
        backends: Mapping[str, BackendConfig] | None = None,
    ) -> None:
        self._limits = limits
        self._ledger = LocalLedger(limits, backends) if ledger is None else ledger
        self._policy: SchedulingPolicy = Fifo() if policy is None else policy
        self._queue = WaitQueue(self._policy, limits, max_queued_per_client, self._expire)
        #: Where a slot goes (the fleet); None: no backend named, only fleet-wide limits.
        self._router = router
        self._by_backend: Counter[str] = Counter()
        #: Per-client caps on requests running at once (`access.keys.NAME.max_running`).
        self._max_running: Mapping[str, int] = {}
        self._running_of: Counter[str] = Counter()
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

    def slot(self, model: str, client: str = "", *, priority: int = 1, party: str | None = None) -> Slot:
        """A place for a request for `model` by `client` (a key name), sharing fairly as `party`."""
        loop = asyncio.get_running_loop()
        waiter = Waiter(Claim(canonical_model(model), client), next(self._arrivals), loop.time())
        waiter.priority, waiter.party = priority, client if party is None else party
        waiter.asked = model
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

    def fail_unlisted(self, unlisted: Callable[[str, float], bool]) -> int:
        """End with Ollama's 404 the wait of every request whose model no backend will run:
        `unlisted(model, arrived)` (canonical name, loop time) judges by lists read after the
        request arrived. A request that arrived while upstream was down could not be checked
        then, and would otherwise wait, never placed, until `limits.queue_timeout`."""
        failed = 0
        for waiter in self._queue.in_order():
            if waiter.waiting and unlisted(waiter.claim.model, waiter.enqueued_at):
                self._queue.remove(waiter)
                assert waiter.future is not None
                waiter.future.set_exception(ModelNotFound(waiter.asked))
                failed += 1
        return failed

    def route(self, router: Router) -> None:
        """Name the backends slots are taken on from now (the server wires the fleet here)."""
        self._router = router

    def configure(
        self,
        limits: LimitsConfig,
        max_queued_per_client: int = 0,
        backends: Mapping[str, BackendConfig] | None = None,
        *,
        max_queued: Mapping[str, int] | None = None,
        max_running: Mapping[str, int] | None = None,
    ) -> None:
        """Apply new limits at once: waiting requests keep their place and arrival time.

        Lowering a limit never stops a running request; it only admits fewer.
        A lower per-client bound applies to newcomers; nobody already waiting is dropped.
        `max_queued` and `max_running` are per-client bounds by client (key) name.
        """
        self._limits = limits
        self._max_running = max_running or {}
        self._queue.configure(limits, max_queued_per_client, max_queued or {})
        self._ledger.configure(limits, backends)  # reports room: a pass admits whoever now fits

    # -- views, for metrics and the queue page ---------------------------------

    @property
    def limits(self) -> LimitsConfig:
        return self._limits

    @property
    def policy(self) -> SchedulingPolicy:
        return self._policy

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

    def running_by_backend(self) -> Counter[str]:
        """Slots held per backend (by `backends` name)."""
        return Counter(self._by_backend)

    def running_by_model(self) -> Counter[str]:
        return Counter(waiter.claim.model for waiter in self._holding)

    def waiting_by_model(self) -> Counter[str]:
        return self._queue.by_model()

    def counters(self) -> dict[str, float]:
        """Each waiting client's fair-share counter (none under first come, first served)."""
        return self._policy.counters() if isinstance(self._policy, FairShare) else {}

    def waiting_by_priority(self) -> dict[str, int]:
        """Requests waiting by priority name, every priority present (a walk: for scrapes and pages)."""
        counts = Counter(waiter.priority for waiter in self._queue.in_arrival_order())
        return {name: counts[rank] for rank, name in enumerate(PRIORITIES)}

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
        if not self._paused and self._may_run(waiter):
            answer = self._take(waiter)
            if answer if isinstance(answer, bool) else await self._answer(waiter, answer):
                self._hold(waiter)
                self._policy.admitted(waiter)  # never queued, but it runs: charged like any other
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
        self._running_of[waiter.claim.client] += 1
        self._by_backend[waiter.claim.backend] += 1
        waiter.admitted_at = asyncio.get_running_loop().time()

    def _unhold(self, waiter: Waiter) -> None:
        waiter.admitted_at = None
        del self._holding[waiter]
        self._running_of[waiter.claim.client] -= 1
        if not self._running_of[waiter.claim.client]:
            del self._running_of[waiter.claim.client]
        self._by_backend[waiter.claim.backend] -= 1
        if not self._by_backend[waiter.claim.backend]:
            del self._by_backend[waiter.claim.backend]

    def _take(self, waiter: Waiter) -> bool | Awaitable[bool]:
        """Ask the ledger for a slot for `waiter`: without a router for its claim as it is,
        with one on each backend the router names, best first; the granted claim (naming
        its backend) becomes the waiter's. Answers at once unless the ledger does not."""
        if self._router is None:
            return self._ledger.take(waiter.claim)
        names = self._router.candidates(waiter.claim.model, self._by_backend)
        for index, name in enumerate(names):
            claim = replace(waiter.claim, backend=name)
            answer = self._ledger.take(claim)
            if not isinstance(answer, bool):
                return self._take_later(waiter, claim, answer, names[index + 1 :])
            if answer:
                waiter.claim = claim
                return True
        return False

    async def _take_later(
        self, waiter: Waiter, claim: Claim, answer: Awaitable[bool], rest: Sequence[str]
    ) -> bool:
        """`_take` once the ledger answers later: the remaining backends one round trip each."""
        while True:
            if await answer:
                waiter.claim = claim
                return True
            if not rest:
                return False
            claim, rest = replace(claim, backend=rest[0]), rest[1:]
            taken = self._ledger.take(claim)
            answer = _ready(taken) if isinstance(taken, bool) else taken

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
        self._walk(self._queue.candidates())

    def _may_run(self, waiter: Waiter) -> bool:
        """Its client is below its own `max_running` (if it has one)."""
        cap = self._max_running.get(waiter.claim.client, 0)
        return not cap or self._running_of[waiter.claim.client] < cap

    def _walk(self, candidates: Iterator[Waiter]) -> None:
        """Offer the ledger each further candidate, granting those it has room for.

        The candidates come lazily in the policy's order, so a pass that fills
        the slots after a few grants never walks (or sorts) the rest of the queue.
        """
        for waiter in candidates:
            if self._paused or self._ledger.full():
                return
            if not (waiter.waiting and waiter in self._queue) or not self._may_run(waiter):
                continue  # left since the pass began (or cleanup pending), or its client is at max_running
            answer = self._take(waiter)
            if not isinstance(answer, bool):
                self._pass = asyncio.ensure_future(self._resume_walk(candidates, waiter, answer))
                return
            if answer:
                self._grant(waiter)

    async def _resume_walk(
        self, candidates: Iterator[Waiter], waiter: Waiter, answer: Awaitable[bool]
    ) -> None:
        try:
            if await self._answer(waiter, answer, queued=True):
                if waiter.waiting and waiter in self._queue and not self._paused:
                    self._grant(waiter)
                else:
                    self._give(waiter.claim)  # it left while the ledger answered
        finally:
            self._pass = None
        if self._again:
            self._dispatch()
        else:
            self._walk(candidates)

    async def _answer(self, waiter: Waiter, answer: Awaitable[bool], *, queued: bool = False) -> bool:
        """The ledger's later answer; a slot it grants after we were cancelled is given back
        (on the backend it was granted on: the waiter's claim by then).

        A `ProxyError` is the ledger refusing outright (a shared ledger that cannot be
        reached, say): it reaches a newcomer as that error, or ends a `queued` waiter's wait.
        """
        pending = asyncio.ensure_future(answer)
        try:
            return await asyncio.shield(pending)
        except ProxyError as refusal:
            if not queued:
                raise
            self._queue.remove(waiter)
            if waiter.waiting:
                assert waiter.future is not None
                waiter.future.set_exception(refusal)
            return False
        except asyncio.CancelledError:
            if pending.cancelled():  # the ledger gave up on its own: no slot was taken
                return False
            pending.add_done_callback(lambda done: self._give_late(waiter.claim, done))
            raise
        except Exception:
            log.exception(
                "the capacity ledger failed to answer for model %s; taken as no room", waiter.claim.model
            )
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


async def _ready(answer: bool) -> bool:
    return answer
