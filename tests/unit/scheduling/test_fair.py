"""The fair-share policy on its own (injected clock), and inside the dispatcher: priorities,
counters, weights, returning clients, caps and max_running passed over, cancellation, reload."""

from __future__ import annotations

import asyncio
import random
import time
from types import MappingProxyType

from proxy.config import LimitsConfig
from proxy.scheduling.admission import Admission
from proxy.scheduling.capacity import Claim
from proxy.scheduling.fair import FairShare
from proxy.scheduling.policy import Fifo
from proxy.scheduling.waiter import Waiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Line:
    """Makes waiters in arrival order."""

    def __init__(self) -> None:
        self.arrival = 0

    def __call__(self, party: str, priority: int = 1, model: str = "m") -> Waiter:
        self.arrival += 1
        waiter = Waiter(Claim(model, party), self.arrival, float(self.arrival))
        waiter.party, waiter.priority = party, priority
        return waiter


def names(policy: FairShare | Fifo) -> list[str]:
    return [f"{w.party}{w.arrival}" for w in policy.order()]


def admit_next(policy: FairShare) -> Waiter:
    first = next(iter(policy.order()))
    policy.admitted(first)
    return first


def test_one_client_is_first_come_first_served_like_fifo() -> None:
    rng = random.Random(7)
    fair, fifo, make = FairShare(clock=Clock()), Fifo(), Line()
    waiting: list[Waiter] = []
    for _ in range(500):
        if waiting and rng.random() < 0.4:
            gone = waiting.pop(rng.randrange(len(waiting)))
            if rng.random() < 0.5:
                fair.removed(gone), fifo.removed(gone)
            else:
                fair.admitted(gone), fifo.admitted(gone)
                fair.charge(gone, rng.randrange(1, 50))
                if rng.random() < 0.3:  # sent back to the queue: keeps its arrival place
                    fair.added(gone), fifo.added(gone)
                    waiting.append(gone)
        else:
            waiter = make("")
            fair.added(waiter), fifo.added(waiter)
            waiting.append(waiter)
        assert list(fair.order()) == list(fifo.order())


def test_priority_is_strict_whatever_the_counters() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    low, normal, high = make("batch", 2), make("app", 1), make("check", 0)
    for waiter in (low, normal, high):
        fair.added(waiter)
    fair.charge(high, 10_000)  # a high-priority client with a huge counter still goes first
    assert list(fair.order()) == [high, normal, low]
    assert fair.depth_by_priority() == {"high": 1, "normal": 1, "low": 1}


def test_lowest_counter_goes_next_and_ties_go_to_the_oldest_head() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    a1, b1, a2, b2 = make("a"), make("b"), make("a"), make("b")
    for waiter in (a1, b1, a2, b2):
        fair.added(waiter)
    assert admit_next(fair) is a1  # tie at 0: the oldest head
    fair.charge(a1, 100)
    assert admit_next(fair) is b1  # a now has the higher counter
    fair.charge(b1, 30)
    assert admit_next(fair) is b2  # b (30) < a (100): b's oldest, even though a2 arrived first
    assert fair.counters() == {"a": 100.0}


def test_a_flood_does_not_push_a_light_client_back() -> None:
    fair, make = FairShare(cost="requests", clock=Clock()), Line()
    flood = [make("flood") for _ in range(50)]
    for waiter in flood:
        fair.added(waiter)
    admit_next(fair)  # one of the flood runs
    light = make("light")
    fair.added(light)
    order = list(fair.order())
    assert order.index(light) <= 1  # its one request is next or after one, not 50 back
    assert admit_next(fair) is light or admit_next(fair) is light


def test_weights_share_in_proportion() -> None:
    fair, make = FairShare(cost="requests", weights={"heavy": 2.0}, clock=Clock()), Line()
    for _ in range(30):
        fair.added(make("heavy"))
        fair.added(make("light"))
    served = [admit_next(fair).party for _ in range(30)]
    assert served.count("heavy") == 20 and served.count("light") == 10


def test_returning_client_starts_at_the_floor_without_banked_credit() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    a, b = make("a"), make("b")
    fair.added(a), fair.added(b)
    fair.admitted(a), fair.charge(a, 500)
    fair.admitted(b), fair.charge(b, 100)
    # idle while "c" is served a lot
    c = make("c")
    fair.added(c)
    fair.admitted(c), fair.charge(c, 10_000)
    c2 = make("c")
    fair.added(c2)  # c returns alone: no one waits, it keeps its own counter
    assert fair.counters() == {"c": 10_000.0}
    b2 = make("b")
    fair.added(b2)  # b idled at 100: it starts at the floor (c's counter), not with banked credit
    assert fair.counters()["b"] == 10_000.0
    assert next(iter(fair.order())) is c2  # same counter: the older head


def test_charges_stream_then_settle_to_the_final_count_and_never_go_negative() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    waiter = make("a")
    fair.added(waiter), fair.admitted(waiter)
    for _ in range(10):
        fair.charge(waiter, 1)  # one per streamed chunk
    fair.settle(waiter, 42)  # Ollama's prompt_eval_count + eval_count
    assert waiter.charged == 42
    fair.settle(waiter, 5)  # a lower final count never takes service back
    fair.charge(waiter, -3)
    assert waiter.charged == 42
    other = make("a")
    fair.added(other)
    assert fair.counters() == {"a": 42.0}


def test_cost_requests_charges_one_at_admission_and_ignores_tokens() -> None:
    fair, make = FairShare(cost="requests", weights={"a": 2.0}, clock=Clock()), Line()
    waiter = make("a")
    fair.added(waiter), fair.admitted(waiter)
    fair.charge(waiter, 1000), fair.settle(waiter, 5000)
    assert waiter.charged == 1.0
    fair.added(make("a"))
    assert fair.counters() == {"a": 0.5}  # 1 request / weight 2


def test_a_waiter_that_leaves_while_the_order_is_walked_is_not_offered() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    waiters = [make(party) for party in "abcabc"]
    for waiter in waiters:
        fair.added(waiter)
    walk = iter(fair.order())
    first = next(walk)
    fair.admitted(first)  # chosen and granted during the walk
    fair.removed(waiters[1])  # and b's first cancelled while the walk holds it
    fair.removed(waiters[4])
    rest = list(walk)
    assert first not in rest and waiters[1] not in rest and waiters[4] not in rest
    assert set(rest) == {waiters[2], waiters[3], waiters[5]}


def test_reload_keeps_places_and_counters_and_applies_new_weights() -> None:
    fair, make = FairShare(cost="requests", clock=Clock()), Line()
    a = [make("a") for _ in range(4)]
    b = [make("b") for _ in range(4)]
    for waiter in a + b:
        fair.added(waiter)
    admit_next(fair)
    before = fair.counters()
    fair.configure(cost="requests", weights={"b": 4.0})
    assert fair.counters() == before
    assert set(fair.order()) == set(a[1:] + b)
    served = [admit_next(fair).party for _ in range(5)]
    assert served.count("b") == 4  # b's weight now counts


def test_idle_counters_are_forgotten_so_memory_stays_bounded() -> None:
    clock = Clock()
    fair, make = FairShare(clock=clock, forget_after=60.0, max_idle=1000), Line()
    for i in range(20_000):
        waiter = make(f"10.0.{i // 256}.{i % 256}")
        fair.added(waiter), fair.admitted(waiter), fair.charge(waiter, 10)
        clock.now += 0.001
    assert fair.known() <= 1100  # a million distinct addresses would stay as bounded
    clock.now += 120
    for _ in range(200):
        waiter = make("late")
        fair.added(waiter), fair.admitted(waiter)
    assert fair.known() < 1000


def test_choosing_and_positions_stay_cheap_with_10000_waiters_from_1000_clients() -> None:
    fair, make = FairShare(clock=Clock()), Line()
    for i in range(10_000):
        fair.added(make(f"c{i % 1000}"))
    started = time.perf_counter()
    for _ in range(100):
        chosen = admit_next(fair)
        fair.charge(chosen, 300)
    per_release = (time.perf_counter() - started) / 100
    assert per_release < 0.01, per_release  # heapify the 1,000 heads, not sort the 10,000 waiters
    started = time.perf_counter()
    places = {w: i for i, w in enumerate(fair.order(), 1)}
    assert len(places) == 9_900
    assert time.perf_counter() - started < 1.0


# -- inside the dispatcher --------------------------------------------------------------


def limits(max_concurrent: int = 1, **models: int) -> LimitsConfig:
    return LimitsConfig(
        max_concurrent=max_concurrent, max_queue=1000, queue_timeout=60.0, models=MappingProxyType(models)
    )


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


class Request:
    def __init__(
        self, adm: Admission, log: list[str], name: str, model: str = "m", client: str = "", priority: int = 1
    ) -> None:
        self.finish = asyncio.Event()
        self.slot = adm.slot(model, client, priority=priority)
        self.task = asyncio.create_task(self._run(log, name))

    async def _run(self, log: list[str], name: str) -> None:
        async with self.slot:
            log.append(name)
            await self.finish.wait()


async def test_a_capped_model_and_max_running_pass_a_waiter_over_without_blocking() -> None:
    adm = Admission(limits(2, big=1), policy=FairShare(cost="requests"))
    adm.configure(limits(2, big=1), max_running={"batch": 1})
    log: list[str] = []
    running = [Request(adm, log, "big0", "big", "x"), Request(adm, log, "batch0", "m", "batch")]
    await settle()
    queued = [
        Request(adm, log, "big1", "big", "x", priority=0),  # high, but its model is at its cap
        Request(adm, log, "batch1", "m", "batch", priority=0),  # high, but batch is at max_running
        Request(adm, log, "alice", "m", "alice", priority=2),  # low, and may run
    ]
    await settle()
    running[0].finish.set()  # frees a global slot and the big cap: the high big1 goes first
    await settle()
    assert log == ["big0", "batch0", "big1"]
    running[1].finish.set()  # batch below its cap again: its high request before alice's low one
    await settle()
    assert log[-1] == "batch1"
    queued[0].finish.set()
    await settle()
    assert log[-1] == "alice"
    for request in queued:
        request.finish.set()
    await asyncio.gather(*(r.task for r in running + queued))
    assert adm.running_total == adm.waiting_total == 0


async def test_a_chosen_waiter_cancelled_before_it_resumes_hands_its_slot_on() -> None:
    adm = Admission(limits(1), policy=FairShare())
    log: list[str] = []
    holder = Request(adm, log, "h", client="a")
    await settle()
    chosen, next_one = Request(adm, log, "c", client="b"), Request(adm, log, "n", client="c")
    await settle()
    holder.finish.set()
    await asyncio.sleep(0)  # granted to `chosen`, which has not resumed yet
    chosen.task.cancel()
    await settle()
    assert log == ["h", "n"]
    next_one.finish.set()
    await asyncio.gather(holder.task, next_one.task)
    assert adm.running_total == adm.waiting_total == 0
