"""The fairness benchmark: who gets the GPU under `fairness: none`, `cost: requests` and
`cost: tokens`, measured in one run, and what a release costs with 10,000 waiters.

`python -m bench.fair [--quick]` prints two tables and one line:

* flood vs light: one key fires a backlog of generations at once, another sends
  one request at a time; the light client's waits show whether it queues behind
  the whole backlog or about one generation per request of its own;
* long vs short: two keys, both backlogged, one asking for long generations and
  one for short; tokens served to each over the backlogged period (until one of
  them runs out of work) and Jain's index of those tokens (1 is an equal share,
  0.5 is one client taking everything);
* the cost of one release (a slot given back and the next waiter granted) with
  10,000 waiters from 1,000 clients, first come first served and fair share.

Everything runs in this process on loopback (the simulated Ollama, the proxy,
aiohttp clients), each load bounded in count and time.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from dataclasses import dataclass, field
from types import MappingProxyType

import aiohttp

from proxy.config import LimitsConfig, config_from_dict
from proxy.scheduling.admission import Admission
from proxy.scheduling.fair import FairShare
from proxy.scheduling.policy import Fifo
from proxy.server import Server
from proxy.sim import Simulator

SETTINGS = {
    "none": {"fairness": "none", "cost": "tokens"},
    "cost: requests": {"fairness": "key", "cost": "requests"},
    "cost: tokens": {"fairness": "key", "cost": "tokens"},
}
KEYS = {"flood": "fl-bench-0001", "light": "li-bench-0001", "long": "lo-bench-0001", "short": "sh-bench-0001"}
#: Bounds every run: a setting that takes longer than this is a failure, not a figure.
RUN_LIMIT = 120.0


@dataclass
class Served:
    """What one client got: its waits and, per finished request, when and how many tokens."""

    waits: list[float] = field(default_factory=list)
    done: list[tuple[float, int]] = field(default_factory=list)


def jain(values: list[float]) -> float:
    """Jain's fairness index: 1 when all equal, 1/n when one takes everything."""
    total = sum(values)
    squares = sum(v * v for v in values)
    return total * total / (len(values) * squares) if squares else 1.0


async def _generate(
    http: aiohttp.ClientSession, url: str, key: str, tokens: int, served: Served, clock: float
) -> None:
    body = {"model": "llama3.2", "prompt": "x" * 40, "stream": False, "options": {"num_predict": tokens}}
    headers = {"Authorization": f"Bearer {KEYS[key]}"}
    async with http.post(url + "/api/generate", json=body, headers=headers) as resp:
        answer = await resp.json(content_type=None)
        served.waits.append(float(resp.headers.get("X-Queue-Wait", "0")))
    cost = int(answer.get("prompt_eval_count", 0)) + int(answer.get("eval_count", 0))
    served.done.append((time.monotonic() - clock, cost))


async def _proxy(sim: Simulator, scheduling: dict[str, str], slots: int) -> Server:
    config = config_from_dict(
        {
            "listen": {"host": "127.0.0.1", "port": 0},
            "admin": {"host": "127.0.0.1", "port": 0},
            "upstream": {"url": sim.url},
            "limits": {"max_concurrent": slots, "max_queue": 1000},
            "access": {"keys": KEYS},
            "scheduling": scheduling,
            "heartbeat": {"interval": "30s"},
            "log": {"level": "warning"},
        }
    )
    server = Server(config)
    await server.start()
    return server


async def flood_vs_light(sim: Simulator, scheduling: dict[str, str], backlog: int) -> dict[str, Served]:
    """`backlog` requests of 100 tokens at once from `flood`; `light` sends 20-token ones, one at a time."""
    server = await _proxy(sim, scheduling, slots=2)
    served = {"flood": Served(), "light": Served()}
    clock = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            url = server.listen_url
            floods = [
                asyncio.create_task(_generate(http, url, "flood", 100, served["flood"], clock))
                for _ in range(backlog)
            ]
            while server.state.admission.waiting_total < backlog - 2:
                await asyncio.sleep(0.01)
            for _ in range(backlog):  # bounded: at most one light request per flood request
                if all(task.done() for task in floods):
                    break
                await _generate(http, url, "light", 20, served["light"], clock)
            await asyncio.wait_for(asyncio.gather(*floods), RUN_LIMIT)
    finally:
        await server.stop()
    return served


async def long_vs_short(sim: Simulator, scheduling: dict[str, str], each: int) -> dict[str, Served]:
    """Both backlogged at once: `long` asks for 200 tokens a request, `short` for 20."""
    server = await _proxy(sim, scheduling, slots=2)
    served = {"long": Served(), "short": Served()}
    clock = time.monotonic()
    try:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
            url = server.listen_url
            tasks = [
                asyncio.create_task(_generate(http, url, "long", 200, served["long"], clock))
                for _ in range(each)
            ]
            await asyncio.sleep(0.05)  # long arrived first: first come, first served would serve it all first
            tasks += [
                asyncio.create_task(_generate(http, url, "short", 20, served["short"], clock))
                for _ in range(each)
            ]
            await asyncio.wait_for(asyncio.gather(*tasks), RUN_LIMIT)
    finally:
        await server.stop()
    return served


def backlogged_tokens(served: dict[str, Served]) -> dict[str, int]:
    """Tokens each client was served until the first of them had all its requests answered."""
    end = min(max(t for t, _ in s.done) for s in served.values())
    return {name: sum(cost for t, cost in s.done if t <= end) for name, s in served.items()}


def _ms(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values) * 1000:.0f} / {max(values) * 1000:.0f}"


async def release_cost(waiters: int = 10_000, clients: int = 1_000, releases: int = 200) -> dict[str, float]:
    """Microseconds from a slot given back to the next waiter granted, by policy."""
    limits = LimitsConfig(
        max_concurrent=1, max_queue=waiters + 1, queue_timeout=3600.0, models=MappingProxyType({})
    )
    result = {}
    for name, policy in (("first come, first served", Fifo()), ("fair share", FairShare())):
        admission = Admission(limits, policy=policy)
        gate = asyncio.Event()
        granted: list[float] = []

        async def hold(
            i: int,
            admission: Admission = admission,
            gate: asyncio.Event = gate,
            granted: list[float] = granted,
        ) -> None:
            async with admission.slot("m", "", party=f"c{i % clients}"):
                granted.append(time.perf_counter())
                await gate.wait()

        tasks = [asyncio.create_task(hold(i)) for i in range(waiters + 1)]
        while admission.waiting_total < waiters:
            await asyncio.sleep(0)
        costs = []
        for _ in range(releases):
            running = admission.running()[0]
            before = len(granted)
            started = time.perf_counter()
            await running.__aexit__(None, None, None)  # the release, run synchronously: no await inside
            costs.append(time.perf_counter() - started)
            assert admission.running_total == 1 and len(granted) == before  # granted, not yet resumed
            await asyncio.sleep(0)
        gate.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        result[name] = statistics.median(costs) * 1e6
    return result


async def main(quick: bool) -> None:
    sim = Simulator(tokens=200, token_delay=0.002)
    await sim.start()
    backlog, each = (12, 8) if quick else (40, 24)
    try:
        print(
            f"flood vs light: 2 slots; flood sends {backlog} x 100 tokens at once, light 20-token requests one at a time"
        )
        print(
            f"{'setting':<16} {'light wait ms mean/max':>24} {'flood wait ms mean/max':>24} {'light reqs':>11}"
        )
        for name, scheduling in SETTINGS.items():
            served = await flood_vs_light(sim, scheduling, backlog)
            light, flood = served["light"], served["flood"]
            print(f"{name:<16} {_ms(light.waits):>24} {_ms(flood.waits):>24} {len(light.waits):>11}")
        print()
        print(f"long vs short: 2 slots; each sends {each} requests at once (200 vs 20 tokens), long first")
        print(
            f"{'setting':<16} {'long tokens':>12} {'short tokens':>13} {'Jain':>6} {'short wait ms mean/max':>24}"
        )
        for name, scheduling in SETTINGS.items():
            served = await long_vs_short(sim, scheduling, each)
            tokens = backlogged_tokens(served)
            index = jain([float(v) for v in tokens.values()])
            print(
                f"{name:<16} {tokens['long']:>12} {tokens['short']:>13} {index:>6.2f} "
                f"{_ms(served['short'].waits):>24}"
            )
        print()
        costs = await release_cost()
        print(
            "release with 10,000 waiters from 1,000 clients (median us): "
            + ", ".join(f"{name} {us:.0f}" for name, us in costs.items())
        )
    finally:
        await sim.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller backlogs (for tests)")
    asyncio.run(main(parser.parse_args().quick))
