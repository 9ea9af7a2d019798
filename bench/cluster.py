"""`python -m bench cluster`: what sharing the limits through Redis costs (docs/cluster.md).

Three figures, from one run on this machine:

* the added latency of an admission through Redis: sequential requests (so every one
  is admitted at once) to one proxy counting locally, then to one sharing through
  Redis, against the same simulated Ollama; p50/p99 of each and the difference;
* how many admissions per second one Redis sustains with three proxies sharing it:
  many clients spread over three proxies with a small shared limit, instant answers,
  so every request waits for and takes a slot; completed requests per second;
* (the time to reclaim a SIGKILLed proxy's slots is measured by
  tests/e2e/test_cluster.py, which prints it: it is bounded by `cluster.lease`.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .servers import free_port, proxy, simulator

_BODY = {"model": "llama3.2", "prompt": "hi", "stream": False}


@contextlib.asynccontextmanager
async def _redis(workdir: Path):
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed (apt-get install redis-server)")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(200):
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            await asyncio.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.kill()
        await proc.wait()


def _pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000


async def _sequential(http: aiohttp.ClientSession, port: int, count: int) -> list[float]:
    url = f"http://127.0.0.1:{port}/api/generate"
    for _ in range(20):  # warm up: connections, script cache
        async with http.post(url, json=_BODY) as resp:
            await resp.read()
    took = []
    for _ in range(count):
        started = time.perf_counter()
        async with http.post(url, json=_BODY) as resp:
            await resp.read()
            assert resp.status == 200, resp.status
        took.append(time.perf_counter() - started)
    return took


async def _throughput(http: aiohttp.ClientSession, ports: list[int], clients: int, seconds: float) -> float:
    done = 0
    deadline = time.perf_counter() + seconds

    async def client(n: int) -> None:
        nonlocal done
        url = f"http://127.0.0.1:{ports[n % len(ports)]}/api/generate"
        while time.perf_counter() < deadline:
            async with http.post(url, json=_BODY) as resp:
                await resp.read()
                if resp.status == 200:
                    done += 1

    started = time.perf_counter()
    await asyncio.gather(*(client(n) for n in range(clients)))
    return done / (time.perf_counter() - started)


async def run(count: int, seconds: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        connector = aiohttp.TCPConnector(limit=0)
        async with (
            simulator(workdir, tokens=1, token_delay=0) as sim,
            _redis(workdir) as redis_url,
            aiohttp.ClientSession(connector=connector) as http,
        ):
            upstream = f"http://127.0.0.1:{sim.port}"
            cluster = {"redis": redis_url, "lease": "15s"}
            async with proxy(upstream, workdir, max_concurrent=4) as local:
                local_took = await _sequential(http, local.port, count)
            async with proxy(upstream, workdir, max_concurrent=4, cluster=cluster) as shared:
                shared_took = await _sequential(http, shared.port, count)
            p50 = (_pct(local_took, 0.5), _pct(shared_took, 0.5))
            p99 = (_pct(local_took, 0.99), _pct(shared_took, 0.99))
            print(
                f"one request, local ledger:  p50 {p50[0]:.2f} ms, p99 {p99[0]:.2f} ms ({count} sequential)"
            )
            print(f"one request, Redis ledger:  p50 {p50[1]:.2f} ms, p99 {p99[1]:.2f} ms")
            print(f"added by Redis:             p50 {p50[1] - p50[0]:+.2f} ms, p99 {p99[1] - p99[0]:+.2f} ms")
            async with (
                proxy(upstream, workdir, max_concurrent=4, cluster=cluster) as a,
                proxy(upstream, workdir, max_concurrent=4, cluster=cluster) as b,
                proxy(upstream, workdir, max_concurrent=4, cluster=cluster) as c,
            ):
                rate = await _throughput(http, [a.port, b.port, c.port], 48, seconds)
            print(f"three proxies, one Redis, max_concurrent 4, 48 clients: {rate:.0f} admissions/s")
            print(f"  (statistics: mean local {statistics.mean(local_took) * 1000:.2f} ms)", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench cluster", description=__doc__)
    parser.add_argument("--count", type=int, default=500, help="sequential requests per ledger")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the throughput run")
    args = parser.parse_args(argv)
    asyncio.run(run(args.count, args.seconds))
    return 0
