"""The bench's phases, in order, against each server: direct, nginx, the proxy.

This process hosts the simulated Ollama (so its records and knobs are at hand)
and coordinates; the load runs in a child process (`bench.load`) and every
server under measurement is a child process of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil

from proxy.sim import Simulator

from . import servers
from .servers import REPO, Server

SMALL = {
    "GET /api/tags": {"method": "GET", "path": "/api/tags"},
    "POST /api/show": {"method": "POST", "path": "/api/show", "body": '{"model":"llama3.2"}'},
}
CONCURRENCY = (1, 32)
#: Tokens per streamed answer: long enough that answer set-up is a small share of the chunks.
STREAM_TOKENS = 200


@dataclass(frozen=True)
class Settings:
    """How long and how big each phase is."""

    seconds: float  # each small-request measurement
    warmup: float
    stream_seconds: float
    streams: int
    disconnects: int
    waiters: int
    heartbeat: float
    wait_seconds: float  # how long the waiters stay queued, frames timed meanwhile
    nginx: bool = True
    #: Also a bare aiohttp relay (bench/floor.py): what aiohttp itself costs.
    floor: bool = True
    uvloop: bool = False
    profile: Path | None = None


FULL = Settings(
    seconds=4, warmup=0.5, stream_seconds=6, streams=100, disconnects=200,
    waiters=2000, heartbeat=1.0, wait_seconds=8,
)  # fmt: skip
QUICK = Settings(
    seconds=1, warmup=0.3, stream_seconds=2, streams=100, disconnects=50,
    waiters=2000, heartbeat=1.0, wait_seconds=4,
)  # fmt: skip
#: For the test: every row, in seconds.
SMALLEST = Settings(
    seconds=0.3, warmup=0.1, stream_seconds=0.5, streams=20, disconnects=8,
    waiters=100, heartbeat=0.5, wait_seconds=1.6, floor=False,
)  # fmt: skip


@dataclass
class Results:
    """Raw figures: `figures[key][server name]`, plus notes on where the CPU went."""

    settings: Settings
    servers: list[str] = field(default_factory=list)
    figures: dict[str, dict[str, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    profiles: dict[str, Path] = field(default_factory=dict)

    def put(self, key: str, server: str, value: float) -> None:
        self.figures.setdefault(key, {})[server] = value


@dataclass
class Window:
    """CPU and memory samples taken when the load generator marks its window's edges."""

    server: Server | None
    client: psutil.Process | None = None
    samples: dict[str, dict[str, float]] = field(default_factory=dict)
    on_start: Callable[[], None] | None = None

    def mark(self, name: str) -> None:
        self.samples[name] = {
            "t": time.monotonic(),
            "server_cpu": self.server.cpu() if self.server else 0.0,
            "server_rss": self.server.rss() if self.server else 0.0,
            "client_cpu": _cpu(self.client),
            "sim_cpu": _cpu(psutil.Process()),
        }
        if name == "start" and self.on_start:
            self.on_start()

    def delta(self, what: str, first: str = "start", last: str = "end") -> float:
        return self.samples[last][what] - self.samples[first][what]

    def shares(self) -> str:
        """Each party's CPU in the window, as a share of one core."""
        seconds = self.delta("t")
        parts = [
            f"client {self.delta('client_cpu') / seconds:.0%}",
            f"sim {self.delta('sim_cpu') / seconds:.0%}",
        ]
        if self.server:
            parts.insert(0, f"{self.server.name} {self.delta('server_cpu') / seconds:.0%}")
        return ", ".join(parts)


def _cpu(proc: psutil.Process | None) -> float:
    if proc is None:
        return 0.0
    with contextlib.suppress(psutil.Error):
        times = proc.cpu_times()
        return times.user + times.system
    return 0.0


async def load(spec: dict[str, Any], window: Window) -> dict[str, Any]:
    """Run one workload in a child process, sampling at each of its marks."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.load", json.dumps(spec), cwd=REPO, stdout=asyncio.subprocess.PIPE
    )
    assert proc.stdout is not None
    window.client = psutil.Process(proc.pid)
    result: dict[str, Any] | None = None
    try:
        async with asyncio.timeout(spec["timeout"] + 10):
            async for raw in proc.stdout:
                line = raw.decode().strip()
                if line.startswith("mark "):
                    window.mark(line.removeprefix("mark "))
                elif line.startswith("result "):
                    result = json.loads(line.removeprefix("result "))
            await proc.wait()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    if proc.returncode or result is None:
        raise RuntimeError(f"load {spec['kind']} failed (exit {proc.returncode})")
    return result


class Profiler:
    """py-spy attached to the proxy for one window, when asked for and installed."""

    def __init__(self, results: Results, server: Server, phase: str, seconds: float) -> None:
        directory = results.settings.profile
        self.out = directory / f"{server.name}-{phase}.txt" if directory else None
        self._server, self._seconds, self._results = server, seconds, results
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        spy = Path(sys.executable).with_name("py-spy")
        if self.out is None or not spy.exists() or "proxy" not in self._server.name:
            return
        command = [str(spy), "record", "--pid", str(self._server.procs[0].pid), "--rate", "200"]
        command += ["--duration", str(max(1, int(self._seconds))), "--format", "raw", "-o", str(self.out)]
        self._proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    async def finish(self) -> None:
        if self._proc is None or self.out is None:
            return
        deadline = time.monotonic() + self._seconds + 15
        while self._proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        if self._proc.poll() is None:
            self._proc.kill()
        elif self.out.exists():
            self._results.profiles[self.out.stem] = self.out


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- phases -------------------------------------------------------------------------------


async def small_requests(results: Results, server: Server) -> None:
    s = results.settings
    for label, request in SMALL.items():
        for concurrency in CONCURRENCY:
            window = Window(server if server.procs else None)
            profiler = Profiler(results, server, f"{label.split('/')[-1]}-c{concurrency}", s.seconds)
            window.on_start = profiler.start
            spec = {
                "kind": "requests", "host": "127.0.0.1", "port": server.port, **request,
                "concurrency": concurrency, "warmup": s.warmup, "seconds": s.seconds,
                "timeout": s.warmup + s.seconds + 20,
            }  # fmt: skip
            out = await load(spec, window)
            await profiler.finish()
            if out["errors"]:
                raise RuntimeError(f"{server.name}: {out['errors']} failed requests on {label}")
            key = f"{label} c={concurrency}"
            results.put(f"{key} p50", server.name, out["latency"]["p50"] * 1e3)
            results.put(f"{key} p99", server.name, out["latency"]["p99"] * 1e3)
            results.put(f"{key} rps", server.name, out["rps"])
            if server.procs:
                per_request = window.delta("server_cpu") / max(1, out["latency"]["n"]) * 1e6
                results.put(f"{key} cpu/request", server.name, per_request)
            results.notes.append(f"{server.name} {key}: {window.shares()}")


async def streams(results: Results, server: Server, sim: Simulator) -> None:
    s = results.settings
    sim.tokens, sim.token_delay = STREAM_TOKENS, 0.0
    window = Window(server if server.procs else None)
    profiler = Profiler(results, server, "streams", s.stream_seconds)
    window.on_start = profiler.start
    spec = {
        "kind": "streams", "host": "127.0.0.1", "port": server.port, "concurrency": s.streams,
        "warmup": s.warmup, "seconds": s.stream_seconds, "timeout": s.warmup + s.stream_seconds + 60,
    }  # fmt: skip
    out = await load(spec, window)
    await profiler.finish()
    sim.records.clear()
    results.put("stream chunks/s", server.name, out["chunks_per_s"])
    if server.procs:
        results.put("stream cpu/1k chunks", server.name, window.delta("server_cpu") / out["chunks"] * 1e3)
    results.notes.append(f"{server.name} {s.streams} streams: {window.shares()}")


async def disconnects(results: Results, server: Server, sim: Simulator) -> None:
    """Client hangs up mid-stream; how long until the simulator sees upstream close."""
    s = results.settings
    sim.tokens, sim.token_delay = 100, 0.01  # 1 s of streaming: far longer than the hold
    sim.records.clear()
    spec = {
        "kind": "disconnects", "host": "127.0.0.1", "port": server.port, "count": s.disconnects,
        "workers": 4, "hold": 0.03, "pause": 0.01, "timeout": 60,
    }  # fmt: skip
    out = await load(spec, Window(None))
    await sim.wait_until(lambda: all(r.ended_at is not None for r in sim.records), timeout=10)
    closed_at = {json.loads(r.body)["messages"][0]["content"]: r.peer_closed_at for r in sim.records}
    delays = [
        (closed_at[tag] - t) * 1e3 for tag, t in out["closed"].items() if closed_at.get(tag) is not None
    ]
    if len(delays) != s.disconnects:
        results.notes.append(f"{server.name}: {s.disconnects - len(delays)} disconnects not seen upstream")
    sim.records.clear()
    sim.tokens, sim.token_delay = STREAM_TOKENS, 0.0
    ordered = sorted(delays)
    results.put("disconnect p50", server.name, ordered[len(ordered) // 2])
    results.put("disconnect p99", server.name, ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))])


async def _queue_depth(admin_port: int, session: aiohttp.ClientSession) -> float:
    async with session.get(f"http://127.0.0.1:{admin_port}/metrics") as resp:
        text = await resp.text()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("ollama_proxy_queue_depth{")
    )


@contextlib.asynccontextmanager
async def _slot_held(server: Server, sim: Simulator, session: aiohttp.ClientSession) -> AsyncIterator[None]:
    """One generation upstream sits on, holding the proxy's only slot."""

    async def hold() -> None:
        body = {"model": "llama3.2", "prompt": "hold the slot"}
        async with session.post(f"http://127.0.0.1:{server.port}/api/generate", json=body) as resp:
            await resp.read()

    sim.load_delay = 3600
    task = asyncio.create_task(hold())
    try:
        await sim.wait_until(lambda: sim.active >= 1, timeout=10)
        sim.load_delay = 0
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        sim.load_delay = 0


async def waiters(results: Results, server: Server, sim: Simulator) -> None:
    """`waiters` clients queued behind one slot: memory per client and heartbeat timing."""
    s = results.settings
    timeout = aiohttp.ClientTimeout(total=None)
    async with aiohttp.ClientSession(timeout=timeout) as session, _slot_held(server, sim, session):
        await asyncio.sleep(0.3)  # let start-up allocations settle before the baseline
        baseline = server.rss()
        window = Window(server)
        spec = {
            "kind": "waiters", "host": "127.0.0.1", "port": server.port, "count": s.waiters,
            "seconds": s.wait_seconds, "interval": s.heartbeat, "timeout": s.wait_seconds + 60,
        }  # fmt: skip
        task = asyncio.create_task(load(spec, window))
        depth = 0.0
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(s.wait_seconds):
                while depth < s.waiters:
                    await asyncio.sleep(0.1)
                    depth = await _queue_depth(server.admin_port, session)
        out = await task
    per_client = (window.samples["end"]["server_rss"] - baseline) / s.waiters / 1024
    results.put("rss/waiter KiB", server.name, per_client)
    lateness = out["lateness"]
    for q in ("p50", "p99", "max"):
        results.put(f"heartbeat lateness {q}", server.name, lateness.get(q, float("nan")) * 1e3)
    results.notes.append(
        f"{server.name} {s.waiters} waiting: queue depth reached {depth:.0f}, {out['frames']} frames, "
        f"{lateness['n']} gaps, {out['silent']} clients without a frame, {out['lost']} connections lost"
    )
    await sim.wait_until(lambda: sim.active == 0, timeout=10)


async def held(results: Results, server: Server, sim: Simulator) -> None:
    """nginx's memory per open proxied request that upstream has not answered yet."""
    s = results.settings
    sim.load_delay = 3600
    baseline = server.rss()
    window = Window(server)
    seconds = max(1.0, s.wait_seconds / 2)
    spec = {
        "kind": "waiters", "host": "127.0.0.1", "port": server.port, "count": s.waiters,
        "seconds": seconds, "timeout": seconds + 60,
    }  # fmt: skip
    task = asyncio.create_task(load(spec, window))
    try:
        await sim.wait_until(lambda: sim.active >= s.waiters, timeout=seconds)
    finally:
        await task
        sim.load_delay = 0
    results.put(
        "rss/waiter KiB", server.name, (window.samples["end"]["server_rss"] - baseline) / s.waiters / 1024
    )
    await sim.wait_until(lambda: sim.active == 0, timeout=10)
    sim.records.clear()


# -- the whole run ------------------------------------------------------------------------


def raise_fd_limit(need: int) -> None:
    """Children inherit it: the proxy and the client each hold one fd per waiting client."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < need:
        target = need if hard == resource.RLIM_INFINITY else min(need, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


async def run(settings: Settings, say: Callable[[str], None] = lambda text: None) -> Results:
    raise_fd_limit(4 * settings.waiters + 1024)
    results = Results(settings)
    nginx_bin = servers.install_nginx() if settings.nginx else None
    if settings.nginx and nginx_bin is None:
        results.notes.append("nginx not available: its column is empty")
    sim = Simulator(tokens=STREAM_TOKENS)
    await sim.start()
    try:
        with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
            work = Path(tmp)
            direct = Server("direct", _port(sim.url))
            hostport = sim.url.removeprefix("http://")
            proxies = [False, True] if settings.uvloop else [False]

            async def throughput(server: Server) -> None:
                results.servers.append(server.name)
                say(f"{server.name}: small requests")
                await small_requests(results, server)
                say(f"{server.name}: {settings.streams} streams")
                await streams(results, server, sim)
                say(f"{server.name}: disconnects")
                await disconnects(results, server, sim)

            await throughput(direct)
            if nginx_bin:
                async with servers.nginx(nginx_bin, hostport, work) as server:
                    await throughput(server)
                    say(f"nginx: {settings.waiters} held requests")
                    await held(results, server, sim)
            if settings.floor:
                async with servers.floor(sim.url, work) as server:
                    await throughput(server)
            for uvloop in proxies:
                async with servers.proxy(sim.url, work, uvloop=uvloop) as server:
                    await throughput(server)
                queue = {"max_concurrent": 1, "max_queue": settings.waiters + 100}
                async with servers.proxy(
                    sim.url, work, uvloop=uvloop, heartbeat=settings.heartbeat, **queue
                ) as server:
                    say(f"{server.name}: {settings.waiters} waiting clients")
                    await waiters(results, server, sim)
    finally:
        await sim.close()
    return results
