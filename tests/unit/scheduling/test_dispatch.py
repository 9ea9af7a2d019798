"""Dispatch with a ledger that answers later: nobody admitted twice, no slot leaked, whatever
happens while an answer is awaited (the waiter leaves, times out, or the limits are reloaded)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from types import MappingProxyType

import pytest

from proxy.config import BackendConfig, LimitsConfig
from proxy.errors import ClusterDown, QueueTimeout
from proxy.scheduling.admission import Admission, Slot
from proxy.scheduling.capacity import Claim


def limits(max_concurrent: int = 1, queue_timeout: float = 60.0) -> LimitsConfig:
    return LimitsConfig(
        max_concurrent=max_concurrent, queue_timeout=queue_timeout, models=MappingProxyType({})
    )


class ScriptedLedger:
    """Each `take` suspends until the test answers it; counts what it granted."""

    def __init__(self) -> None:
        self.pending: list[tuple[Claim, asyncio.Future[bool]]] = []
        self.taken = 0
        self.granted: list[str] = []
        self._listeners: list[Callable[[], None]] = []

    @property
    def caps(self) -> Mapping[str, int]:
        return {}

    def take(self, claim: Claim) -> asyncio.Future[bool]:
        answer = asyncio.get_running_loop().create_future()
        self.pending.append((claim, answer))
        return answer

    async def refuse(self) -> None:
        """Answer the oldest take with a refusal (a shared ledger that cannot be reached)."""
        await until(lambda: bool(self.pending))
        self.pending.pop(0)[1].set_exception(ClusterDown("the shared ledger is unreachable"))
        await settle()

    async def answer(self, room: bool) -> None:
        """Answer the oldest take once it has been asked."""
        await until(lambda: bool(self.pending))
        claim, answer = self.pending.pop(0)
        if room:
            self.taken += 1
            self.granted.append(claim.client)
        answer.set_result(room)
        await settle()

    def give(self, claim: Claim) -> None:
        self.taken -= 1
        for listener in self._listeners:
            listener()

    def full(self) -> bool:
        return False

    def on_room(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def configure(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        for listener in self._listeners:
            listener()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


async def until(predicate: Callable[[], bool]) -> None:
    for _ in range(1000):
        if predicate():
            return
        await asyncio.sleep(0)
    raise AssertionError("never happened")


async def entered(slot: Slot) -> Slot:
    return await slot.__aenter__()


async def holding_one(ledger: ScriptedLedger, admission: Admission) -> Slot:
    task = asyncio.create_task(entered(admission.slot("m", "holder")))
    await ledger.answer(True)
    return await task


async def queued(ledger: ScriptedLedger, admission: Admission, client: str) -> asyncio.Task[Slot]:
    task = asyncio.create_task(entered(admission.slot("m", client)))
    await ledger.answer(False)  # no room on arrival: it joins the queue
    return task


async def test_a_waiter_cancelled_while_its_slot_is_being_taken_hands_it_back():
    ledger = ScriptedLedger()
    admission = Admission(limits(), ledger=ledger)
    holder = await holding_one(ledger, admission)
    waiter = await queued(ledger, admission, "w")
    assert admission.waiting_total == 1
    await holder.__aexit__(None, None, None)  # room: a pass asks the ledger for w
    await until(lambda: bool(ledger.pending))
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    await ledger.answer(True)  # granted for someone who left
    assert ledger.taken == 0 and admission.running_total == 0 and admission.waiting_total == 0


async def test_a_waiter_timed_out_while_its_slot_is_being_taken_hands_it_back():
    ledger = ScriptedLedger()
    admission = Admission(limits(queue_timeout=0.05), ledger=ledger)
    holder = await holding_one(ledger, admission)
    waiter = await queued(ledger, admission, "w")
    await holder.__aexit__(None, None, None)
    await until(lambda: bool(ledger.pending))
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(waiter, timeout=10)
    await ledger.answer(True)
    assert ledger.taken == 0 and admission.running_total == 0


async def test_a_reload_during_a_take_admits_each_waiter_once():
    ledger = ScriptedLedger()
    admission = Admission(limits(), ledger=ledger)
    holder = await holding_one(ledger, admission)
    first = await queued(ledger, admission, "first")
    second = await queued(ledger, admission, "second")
    await holder.__aexit__(None, None, None)
    await until(lambda: len(ledger.pending) == 1)  # the pass asks for first...
    admission.configure(limits(max_concurrent=2))  # ...when a reload reports room again
    await settle()
    assert len(ledger.pending) == 1  # one pass at a time: the reload waits for the answer
    await ledger.answer(True)
    await ledger.answer(True)  # the pass started over and asked for second
    slots = await asyncio.gather(first, second)
    assert ledger.granted == ["holder", "first", "second"]
    assert admission.running_total == 2 and admission.waiting_total == 0 and not ledger.pending
    for slot in slots:
        await slot.__aexit__(None, None, None)
    assert ledger.taken == 0


async def test_a_refusal_passes_the_waiter_over_without_stopping_the_pass():
    ledger = ScriptedLedger()
    admission = Admission(limits(max_concurrent=2), ledger=ledger)
    holder = await holding_one(ledger, admission)
    capped = await queued(ledger, admission, "capped")
    other = await queued(ledger, admission, "other")
    await holder.__aexit__(None, None, None)
    await ledger.answer(False)  # the head's model is at its cap
    await ledger.answer(True)  # the next one goes
    slot = await other
    assert slot.position() is None and not capped.done()
    assert [each.client for each in admission.waiting()] == ["capped"]
    capped.cancel()
    await asyncio.gather(capped, return_exceptions=True)
    await slot.__aexit__(None, None, None)
    assert ledger.taken == 0 and admission.waiting_total == 0


async def test_a_newcomer_refused_late_sees_room_that_appeared_meanwhile():
    ledger = ScriptedLedger()
    admission = Admission(limits(), ledger=ledger)
    holder = await holding_one(ledger, admission)
    newcomer = asyncio.create_task(entered(admission.slot("m", "newcomer")))
    await until(lambda: bool(ledger.pending))  # its take is on the way...
    await holder.__aexit__(None, None, None)  # ...when room appears, with nobody queued to take it
    await ledger.answer(False)  # the answer predates the room
    await ledger.answer(True)  # so, queued, it is offered the room at once
    slot = await newcomer
    assert ledger.granted == ["holder", "newcomer"]
    await slot.__aexit__(None, None, None)
    assert ledger.taken == 0


async def test_a_newcomer_cancelled_while_its_take_is_pending_leaks_nothing():
    ledger = ScriptedLedger()
    admission = Admission(limits(), ledger=ledger)
    task = asyncio.create_task(entered(admission.slot("m", "gone")))
    await until(lambda: bool(ledger.pending))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await ledger.answer(True)  # the ledger counted it after the request left
    assert ledger.taken == 0 and admission.running_total == 0
    assert "running=0/1 waiting=0/100" in repr(admission)


class TwoBackends:
    """A router that always names b1, then b2."""

    def candidates(self, model: str, running: Mapping[str, int]) -> list[str]:
        return ["b1", "b2"]


async def test_a_later_answer_tries_the_next_backend_and_the_grant_names_its_backend():
    ledger = ScriptedLedger()
    admission = Admission(limits(2), ledger=ledger, router=TwoBackends())
    task = asyncio.create_task(entered(admission.slot("m", "w")))
    await until(lambda: bool(ledger.pending))
    assert ledger.pending[0][0].backend == "b1"
    await ledger.answer(False)  # no room on b1: b2 is asked next, in the same take
    await until(lambda: bool(ledger.pending))
    assert ledger.pending[0][0].backend == "b2"
    await ledger.answer(True)
    slot = await task
    assert slot.backend == "b2" and admission.running_by_backend() == {"b2": 1}
    await slot.__aexit__(None, None, None)
    assert ledger.taken == 0 and not admission.running_by_backend()


async def test_a_ledger_refusal_reaches_the_newcomer_and_the_waiter_as_that_error():
    ledger = ScriptedLedger()
    admission = Admission(limits(), ledger=ledger)
    holder = await holding_one(ledger, admission)
    waiter = await queued(ledger, admission, "w")
    newcomer = asyncio.create_task(entered(admission.slot("m", "new")))
    await ledger.refuse()  # the newcomer's own take
    with pytest.raises(ClusterDown):
        await newcomer
    await holder.__aexit__(None, None, None)  # room: the pass asks for w, and is refused
    await ledger.refuse()
    with pytest.raises(ClusterDown):
        await asyncio.wait_for(waiter, timeout=10)
    assert ledger.taken == 0 and admission.running_total == 0 and admission.waiting_total == 0
