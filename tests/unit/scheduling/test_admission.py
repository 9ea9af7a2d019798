"""The admission queue on its own: order, caps, bounds, timeouts, and no leaked slot
whatever await a request is cancelled at."""

from __future__ import annotations

import asyncio
import random
from types import MappingProxyType

import pytest

from proxy.config import LimitsConfig
from proxy.errors import QueueFull, QueueTimeout
from proxy.ollama.names import canonical_model
from proxy.scheduling.admission import Admission


def limits(max_concurrent=1, max_queue=100, queue_timeout=60.0, **models: int) -> LimitsConfig:
    return LimitsConfig(
        max_concurrent=max_concurrent,
        max_queue=max_queue,
        queue_timeout=queue_timeout,
        models=MappingProxyType(models),
    )


class Holder:
    """A request holding (or waiting for) a slot until told to finish."""

    def __init__(self, admission: Admission, model: str, log: list[str], name: str) -> None:
        self.admitted = asyncio.Event()
        self.finish = asyncio.Event()
        self.task = asyncio.create_task(self._run(admission, model, log, name))

    async def _run(self, admission: Admission, model: str, log: list[str], name: str) -> None:
        async with admission.slot(model):
            log.append(name)
            self.admitted.set()
            await self.finish.wait()


async def settle() -> None:
    """Let every ready task run; the admission logic itself never sleeps."""
    for _ in range(5):
        await asyncio.sleep(0)


def assert_idle(admission: Admission) -> None:
    assert admission.running_total == 0
    assert admission.waiting_total == 0
    assert not admission.running_by_model()
    assert not admission.waiting_by_model()


async def test_admits_up_to_the_limit_then_first_come_first_served():
    adm = Admission(limits(max_concurrent=2))
    order: list[str] = []
    holders = [Holder(adm, "m", order, f"r{i}") for i in range(5)]
    await settle()
    assert order == ["r0", "r1"]
    assert (adm.running_total, adm.waiting_total) == (2, 3)
    for i in range(5):
        holders[i].finish.set()
        await holders[i].task
        await settle()
    assert order == ["r0", "r1", "r2", "r3", "r4"]
    assert_idle(adm)


async def test_a_model_at_its_cap_does_not_block_others_behind_it():
    adm = Admission(limits(max_concurrent=2, big=1))
    order: list[str] = []
    big1 = Holder(adm, "big", order, "big1")
    await settle()
    big2 = Holder(adm, "big", order, "big2")  # waits: big is at its cap
    await settle()
    small = Holder(adm, "small", order, "small")  # arrives later, runs at once
    await small.admitted.wait()
    assert order == ["big1", "small"]
    assert adm.waiting_by_model() == {"big:latest": 1}
    big1.finish.set()
    await big2.admitted.wait()
    assert order == ["big1", "small", "big2"]
    for h in (small, big2):
        h.finish.set()
        await h.task
    assert_idle(adm)


async def test_release_skips_capped_waiters_but_keeps_their_place():
    adm = Admission(limits(max_concurrent=2, big=1))
    order: list[str] = []
    big1 = Holder(adm, "big", order, "big1")
    small1 = Holder(adm, "small", order, "small1")
    await settle()
    big2 = Holder(adm, "big", order, "big2")
    small2 = Holder(adm, "small", order, "small2")
    await settle()
    assert adm.waiting_total == 2
    small1.finish.set()  # frees a global slot: big2 is first but capped, small2 goes
    await small2.admitted.wait()
    assert not big2.admitted.is_set()
    assert big2.task in asyncio.all_tasks()
    big1.finish.set()  # now big2, still first in line, goes
    await big2.admitted.wait()
    assert order == ["big1", "small1", "small2", "big2"]
    for h in (small2, big2):
        h.finish.set()
        await h.task
    assert_idle(adm)


async def test_model_names_are_compared_as_ollama_does():
    adm = Admission(limits(max_concurrent=5, **{"Llama3": 1}))
    order: list[str] = []
    first = Holder(adm, "llama3:latest", order, "a")
    second = Holder(adm, "LLAMA3", order, "b")
    await settle()
    assert order == ["a"] and adm.waiting_total == 1
    first.finish.set()
    second.finish.set()
    await asyncio.gather(first.task, second.task)
    assert_idle(adm)


async def test_full_queue_is_refused_at_once_with_a_clear_message():
    adm = Admission(limits(max_concurrent=1, max_queue=2))
    order: list[str] = []
    holders = [Holder(adm, "m", order, str(i)) for i in range(3)]
    await settle()
    with pytest.raises(QueueFull) as info:
        async with adm.slot("m"):
            pass
    assert "queue full: 2 requests waiting, max_queue=2" in info.value.message
    assert info.value.status == 503 and info.value.retry_after >= 1
    for h in holders:
        h.finish.set()
    await asyncio.gather(*(h.task for h in holders))
    assert_idle(adm)


async def test_max_queue_zero_never_queues():
    adm = Admission(limits(max_concurrent=1, max_queue=0))
    holder = Holder(adm, "m", [], "a")
    await holder.admitted.wait()
    with pytest.raises(QueueFull):
        async with adm.slot("m"):
            pass
    holder.finish.set()
    await holder.task
    assert_idle(adm)


async def test_queue_timeout_removes_the_waiter():
    adm = Admission(limits(max_concurrent=1, queue_timeout=0.05))
    holder = Holder(adm, "m", [], "a")
    await holder.admitted.wait()
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    with pytest.raises(QueueTimeout) as info:
        async with adm.slot("m"):
            pass
    assert 0.04 <= loop.time() - t0 < 1.0
    assert info.value.message.endswith("longer than limits.queue_timeout=50ms; 1 slot stayed busy")
    assert adm.waiting_total == 0
    holder.finish.set()
    await holder.task
    assert_idle(adm)


async def test_cancel_while_waiting_leaves_the_queue_and_keeps_order():
    adm = Admission(limits(max_concurrent=1))
    order: list[str] = []
    a, b, c = (Holder(adm, "m", order, n) for n in "abc")
    await settle()
    b.task.cancel()
    await asyncio.gather(b.task, return_exceptions=True)
    assert adm.waiting_total == 1 and order == ["a"]
    assert c.task  # c moves up
    a.finish.set()
    await c.admitted.wait()
    c.finish.set()
    await c.task
    assert order == ["a", "c"]
    assert_idle(adm)


async def test_cancel_between_grant_and_resume_hands_the_slot_on():
    adm = Admission(limits(max_concurrent=1))
    order: list[str] = []
    mine = adm.slot("m")
    await mine.__aenter__()
    b, c = (Holder(adm, "m", order, n) for n in "bc")
    await settle()
    await mine.__aexit__(None, None, None)  # grants b, synchronously, in this step...
    assert adm.running_total == 1 and adm.waiting_total == 1
    b.task.cancel()  # ...and b is cancelled before it could resume
    await asyncio.gather(b.task, return_exceptions=True)
    await c.admitted.wait()  # b's slot went to c, not lost
    assert order == ["c"]
    assert adm.running_total == 1
    c.finish.set()
    await c.task
    assert_idle(adm)


async def test_timeout_and_cancel_in_the_same_step_leak_nothing():
    adm = Admission(limits(max_concurrent=1, queue_timeout=0.01))
    holder = Holder(adm, "m", [], "a")
    await holder.admitted.wait()
    waiter = Holder(adm, "m", [], "b")
    await settle()
    # Let the timer fire, then cancel before the waiter sees its timeout.
    await asyncio.sleep(0.02)
    waiter.task.cancel()
    results = await asyncio.gather(waiter.task, return_exceptions=True)
    assert isinstance(results[0], (asyncio.CancelledError, QueueTimeout))
    holder.finish.set()
    await holder.task
    assert_idle(adm)


async def test_random_cancellations_at_every_phase_never_leak_a_slot():
    """Seeded chaos: requests are cancelled while waiting, at grant, or while running."""
    rng = random.Random(1234)
    adm = Admission(limits(max_concurrent=3, max_queue=40, big=1, small=2))
    peak = 0
    running = 0

    async def request(i: int) -> None:
        nonlocal peak, running
        async with adm.slot(rng.choice(["big", "small", "other"])):
            running += 1
            peak = max(peak, running)
            assert adm.running_total <= 3
            try:
                for _ in range(rng.randrange(3)):
                    await asyncio.sleep(0)
            finally:
                running -= 1

    for _round in range(20):
        tasks = [asyncio.create_task(request(i)) for i in range(rng.randrange(5, 40))]
        for _ in range(rng.randrange(4)):
            await asyncio.sleep(0)
            for t in rng.sample(tasks, k=len(tasks) // 3):
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        assert_idle(adm)
    assert peak == 3


async def test_raising_the_limit_admits_waiters_at_once_and_lowering_stops_nobody():
    adm = Admission(limits(max_concurrent=1))
    order: list[str] = []
    holders = [Holder(adm, "m", order, str(i)) for i in range(4)]
    await settle()
    assert order == ["0"]
    adm.configure(limits(max_concurrent=3))
    await settle()
    assert order == ["0", "1", "2"]
    adm.configure(limits(max_concurrent=1))
    assert adm.running_total == 3  # nobody is stopped
    holders[0].finish.set()
    holders[1].finish.set()
    await settle()
    assert order == ["0", "1", "2"]  # still 1 running >= new limit: "3" waits
    holders[2].finish.set()
    await holders[3].admitted.wait()
    holders[3].finish.set()
    await asyncio.gather(*(h.task for h in holders))
    assert_idle(adm)


async def test_a_shorter_queue_timeout_applies_to_those_already_waiting():
    adm = Admission(limits(max_concurrent=1, queue_timeout=60))
    holder = Holder(adm, "m", [], "a")
    waiter = Holder(adm, "m", [], "b")
    await settle()
    adm.configure(limits(max_concurrent=1, queue_timeout=0.05))
    with pytest.raises(QueueTimeout):
        await asyncio.wait_for(waiter.task, timeout=2)
    holder.finish.set()
    await holder.task
    assert_idle(adm)


async def test_retry_after_for_a_capped_model_counts_its_own_queue_at_its_cap():
    """4 slots, but one `big` at a time: 3 bigs waiting take 3 holds, whatever is free."""
    adm = Admission(limits(max_concurrent=4, big=1))
    holders = [Holder(adm, "big", [], str(i)) for i in range(4)]
    await holders[0].admitted.wait()
    await settle()
    assert adm.waiting_total == 3
    assert adm.retry_after(canonical_model("big")) == 40  # (3 / 1 + 1) x 10 s
    assert adm.retry_after(canonical_model("small")) == 18  # (3 / 4 + 1) x 10 s: the global queue ahead
    for holder in holders:
        holder.finish.set()
    await asyncio.gather(*(holder.task for holder in holders))
    assert_idle(adm)


async def test_positions_and_retry_after():
    adm = Admission(limits(max_concurrent=1))
    holder = Holder(adm, "m", [], "a")
    await holder.admitted.wait()
    slots = [adm.slot("m") for _ in range(3)]
    tasks = [asyncio.create_task(s.__aenter__()) for s in slots]
    await settle()
    assert [s.position() for s in slots] == [(1, 3), (2, 3), (3, 3)]
    assert adm.retry_after() == 40  # nothing finished yet: 3 ahead and the one running, 10 s a hold
    tasks[1].cancel()
    await settle()
    assert [slots[0].position(), slots[2].position()] == [(1, 2), (2, 2)]
    assert adm.retry_after() == 30
    for t in tasks:
        t.cancel()
    holder.finish.set()
    await asyncio.gather(holder.task, *tasks, return_exceptions=True)
    assert 1 <= adm.retry_after() <= 600
    assert_idle(adm)
