"""The scheduling seams are real: a second policy and a second ledger plug in from this file alone.

Both are throwaways written here against the protocols (`SchedulingPolicy`,
`CapacityLedger`), handed to `Server`, and driven by real requests over real
sockets to the simulated Ollama. The ledger answers `take` only after a
suspension, as a shared (Redis) count would, so the dispatcher's asynchronous
path carries every grant.
"""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable, Iterable, Mapping

from proxy.config import BackendConfig, LimitsConfig, config_from_dict
from proxy.scheduling.capacity import Claim, model_caps
from proxy.scheduling.waiter import Waiter
from proxy.server import Server
from tests.support import eventually, hold_the_slot, proxy_config, release


class LastInFirstOut:
    """The newest waiter goes first."""

    def __init__(self) -> None:
        self._waiters: dict[Waiter, None] = {}
        self.admitted_count = 0

    def added(self, waiter: Waiter) -> None:
        self._waiters[waiter] = None

    def removed(self, waiter: Waiter) -> None:
        self._waiters.pop(waiter, None)

    def admitted(self, waiter: Waiter) -> None:
        self.admitted_count += 1
        self.removed(waiter)

    def order(self) -> Iterable[Waiter]:
        return reversed(self._waiters)

    def charge(self, waiter: Waiter, cost: float) -> None:
        """Counts nothing."""

    def settle(self, waiter: Waiter, total: float | None) -> None:
        """Counts nothing."""


class SlowMemoryLedger:
    """Counts slots in a dict, answering `take` after a suspension like a remote store."""

    def __init__(self, limits: LimitsConfig) -> None:
        self.configure(limits)
        self.taken: Counter[str] = Counter()
        self.takes: list[str] = []
        self.gives: list[str] = []
        self._listeners: list[Callable[[], None]] = []

    @property
    def caps(self) -> Mapping[str, int]:
        return self._caps

    async def take(self, claim: Claim) -> bool:
        await asyncio.sleep(0)  # a round trip
        if self.full() or self.taken[claim.model] >= self._caps.get(claim.model, self._limit):
            return False
        self.taken[claim.model] += 1
        self.takes.append(claim.model)
        return True

    def give(self, claim: Claim) -> None:
        self.taken[claim.model] -= 1
        self.gives.append(claim.model)
        for listener in self._listeners:
            listener()

    def full(self) -> bool:
        return sum(self.taken.values()) >= self._limit

    def on_room(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def configure(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        self._limit = limits.max_concurrent  # one host: the backends' own limits are not counted
        self._caps = model_caps(limits)


async def test_a_lifo_policy_and_a_slow_ledger_plugged_into_the_server(sim, http):
    config = config_from_dict(proxy_config(sim.url, limits={"max_concurrent": 1}))
    policy, ledger = LastInFirstOut(), SlowMemoryLedger(config.limits)
    server = Server(config, policy=policy, ledger=ledger)
    await server.start()
    try:
        holder = await hold_the_slot(sim, http, server)

        async def generate(n: int) -> int:
            body = {"model": "llama3.2", "prompt": f"p{n}", "stream": False}
            async with http.post(server.listen_url + "/api/generate", json=body) as resp:
                await resp.read()
                return resp.status

        waiting = []
        for n in range(1, 4):  # one at a time, so their arrival order is known
            waiting.append(asyncio.create_task(generate(n)))
            await eventually(lambda n=n: server.state.admission.waiting_total == n, timeout=10)
        positions = [slot.position() for slot in server.state.admission.waiting()]
        assert positions == [(1, 3), (2, 3), (3, 3)]
        assert [slot.enqueued_at for slot in server.state.admission.waiting()] == sorted(
            (slot.enqueued_at for slot in server.state.admission.waiting()), reverse=True
        )  # the newest is first in line
        await release(holder)
        assert await asyncio.gather(*waiting) == [200, 200, 200]
    finally:
        await server.stop()

    prompts = [json.loads(record.body)["prompt"] for record in sim.records]
    assert prompts == ["hold", "p3", "p2", "p1"]  # last in, first out
    assert policy.admitted_count == 4  # the holder found room at once, the others were dispatched
    assert ledger.takes == ["llama3.2:latest"] * 4
    assert ledger.gives == ["llama3.2:latest"] * 4
    assert not +ledger.taken
