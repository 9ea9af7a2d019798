"""Chaos for who goes first: seeded runs of many clients with keys, priorities, weights,
per-key max_running, capped models, cancellations (also of waiters just chosen), charges and
reloads through the real dispatcher. After each run: no counter went negative, no waiter
was lost, and every admission from the queue was one the policy allowed."""

from __future__ import annotations

import asyncio
import random
from types import MappingProxyType

import pytest

from proxy.config import LimitsConfig
from proxy.scheduling.admission import Admission
from proxy.scheduling.fair import FairShare
from proxy.scheduling.waiter import Waiter

CLIENTS = ("alice", "bob", "batch", "ci", "")
MODELS = ("m", "big", "small")


def limits(max_concurrent: int) -> LimitsConfig:
    return LimitsConfig(
        max_concurrent=max_concurrent, max_queue=1000, queue_timeout=60.0, models=MappingProxyType({"big": 1})
    )


class Judged(FairShare):
    """The fair share, checking each admission from the queue against the order it stands in."""

    def __init__(self, admission_view: list[Admission], caps: dict[str, int], **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.view = admission_view
        self.caps = caps
        self.max_running: dict[str, int] = {}
        self.violations: list[str] = []
        self.admissions = 0

    def admitted(self, waiter: Waiter) -> None:
        admission = self.view[0]
        running_models = admission.running_by_model()  # before this grant is held
        running_clients: dict[str, int] = {}
        for slot in admission.running():
            running_clients[slot.client] = running_clients.get(slot.client, 0) + 1
        for ahead in self.order():
            if ahead is waiter:
                break
            if not ahead.waiting:
                continue  # cancelled; its task's cleanup takes it out of the queue
            cap = self.caps.get(ahead.claim.model)
            at_cap = cap is not None and running_models[ahead.claim.model] >= cap
            own = self.max_running.get(ahead.claim.client, 0)
            at_own = bool(own) and running_clients.get(ahead.claim.client, 0) >= own
            if not (at_cap or at_own):
                self.violations.append(
                    f"{waiter.party}#{waiter.arrival} (p{waiter.priority}) admitted before "
                    f"{ahead.party}#{ahead.arrival} (p{ahead.priority}), which could run"
                )
                break
        self.admissions += 1
        super().admitted(waiter)
        if any(value < 0 for value in self.counters().values()):
            self.violations.append(f"a counter went negative: {self.counters()}")


@pytest.mark.parametrize("seed", range(6))
async def test_fair_share_chaos_keeps_its_invariants(seed: int) -> None:
    rng = random.Random(seed)
    view: list[Admission] = []
    cost = rng.choice(["tokens", "requests"])
    policy = Judged(view, {"big:latest": 1}, cost=cost, weights={"alice": 2.0})
    admission = Admission(limits(3), policy=policy)
    view.append(admission)
    outcomes: dict[int, str] = {}

    async def request(n: int) -> None:
        client = rng.choice(CLIENTS)
        party = client or f"10.0.0.{rng.randrange(5)}"
        slot = admission.slot(rng.choice(MODELS), client, priority=rng.choice((0, 1, 1, 2)), party=party)
        try:
            async with slot:
                outcomes[n] = "ran"
                for _ in range(rng.randrange(4)):
                    slot.charge(1)
                    await asyncio.sleep(0)
                slot.settle(rng.choice([None, rng.randrange(1, 200)]))
        except asyncio.CancelledError:
            outcomes.setdefault(n, "cancelled")
            raise

    tasks: dict[int, asyncio.Task[None]] = {}
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    for n in range(400):
        assert loop.time() < deadline, "the run took too long"
        tasks[n] = asyncio.create_task(request(n))
        roll = rng.random()
        if roll < 0.15:  # a client leaves: waiting, just chosen, or running
            victim = tasks[rng.choice(list(tasks))]
            victim.cancel()
        elif roll < 0.2:  # a reload: new weights and per-key caps; waiters keep their places
            policy.max_running = {"batch": rng.choice([0, 1])}
            admission.configure(limits(rng.choice([2, 3])), max_running=policy.max_running)
            policy.configure(cost=cost, weights={"alice": rng.choice([1.0, 2.0, 3.0])})
        for _ in range(rng.randrange(3)):
            await asyncio.sleep(0)
    results = await asyncio.wait_for(asyncio.gather(*tasks.values(), return_exceptions=True), timeout=30)
    assert not policy.violations, policy.violations[:10]
    lost = [n for n, task in tasks.items() if n not in outcomes and not task.cancelled()]
    assert lost == [], f"never ran nor cancelled: {lost}"
    assert all(r is None or isinstance(r, asyncio.CancelledError) for r in results)
    assert admission.running_total == admission.waiting_total == 0
    assert policy.depth_by_priority() == {"high": 0, "normal": 0, "low": 0}
    assert policy.counters() == {}
    assert policy.admissions > 0
