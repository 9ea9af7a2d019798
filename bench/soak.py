"""`python -m bench soak --minutes 30`: does the proxy's memory stay flat for months?

A proxy that leaks a few hundred KB a minute is fine in a benchmark and dead
after a few weeks, so this runs the one workload that matters for it for a
long time: steady churn. `clients` streaming clients (default 40) each send one
`/api/chat` after another through a proxy admitting `limit` (8) at a time, so
most of them queue; one request in `leave_every` (5) hangs up mid-answer, as
soon as a real token arrived, which cancels the generation upstream.

The simulated Ollama and the proxy run as processes of their own (started by
`bench.servers`); the churn runs in this process. Every `interval` it prints
the proxy's RSS, the resident part of glibc's main heap (`[heap]` in
/proc/PID/smaps: where malloc fragmentation would show), its open fds and CPU
seconds, then a summary: RSS at 5 minutes and at the end, the least-squares
slope from minute 5 on and over the second half (a leak keeps its slope;
warm-up flattens out), and CPU per request.

Variants of the proxy process: `--env NAME=VALUE` (e.g.
`MALLOC_MMAP_THRESHOLD_=131072`), `--preload LIB` (LD_PRELOAD, e.g. jemalloc),
`--uvloop` (needs uvloop importable by the proxy, e.g. through `--env PYTHONPATH=...`),
`--buffered` (socket reads into a reused buffer: bench/buffered_proxy.py).
Run several soaks at once to compare them under the same load on the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from . import servers
from .load import Conn, Whole, chat_body, connect, request_bytes

#: A streamed chat line carrying a real token; keep-alive frames carry "content":"".
_TOKEN = re.compile(rb'"content":"[^"]')
#: A request that takes longer than this is counted as an error and its connection dropped.
_REQUEST_TIMEOUT = 60.0
#: Where the slope starts: start-up, imports and the first connections are not a leak.
_SETTLE_MINUTES = 5.0


@dataclass(frozen=True)
class Settings:
    """The workload and how long to run it; bounded in time (`minutes`) and count (`max_requests`)."""

    minutes: float = 30.0
    interval: float = 60.0
    clients: int = 40
    limit: int = 8
    leave_every: int = 5
    tokens: int = 20
    token_delay: float = 0.01
    max_requests: int = 1_000_000
    env: dict[str, str] = field(default_factory=dict)
    uvloop: bool = False
    #: Reads sockets into a reused buffer (bench/buffered_proxy.py) instead of recv(256 KiB).
    buffered: bool = False


@dataclass
class Sample:
    """The proxy process at one moment."""

    minutes: float
    requests: int
    left: int
    errors: int
    rss: int
    heap: int
    fds: int
    cpu: float  # user + system seconds since the proxy started


@dataclass
class Counts:
    """What the clients did so far; `left` are the requests hung up on mid-answer."""

    requests: int = 0
    left: int = 0
    errors: int = 0


def heap_bytes(pid: int) -> int:
    """The resident size of the process's glibc main heap (the brk segment), 0 if it has none."""
    lines = iter(Path(f"/proc/{pid}/smaps").read_text().splitlines())
    for line in lines:
        if line.endswith("[heap]"):
            for detail in lines:
                if detail.startswith("Rss:"):
                    return int(detail.split()[1]) * 1024
    return 0


def sample(proc: psutil.Process, started: float, counts: Counts) -> Sample:
    return Sample(
        minutes=(time.monotonic() - started) / 60,
        requests=counts.requests,
        left=counts.left,
        errors=counts.errors,
        rss=proc.memory_info().rss,
        heap=heap_bytes(proc.pid),
        fds=proc.num_fds(),
        cpu=sum(proc.cpu_times()[:2]),
    )


HEADER = f"{'min':>6} {'requests':>9} {'left':>7} {'errors':>6} {'RSS MiB':>8} {'heap MiB':>9} {'fds':>5} {'CPU s':>7}"


def row(s: Sample) -> str:
    return (
        f"{s.minutes:6.1f} {s.requests:9d} {s.left:7d} {s.errors:6d} "
        f"{s.rss / 2**20:8.2f} {s.heap / 2**20:9.2f} {s.fds:5d} {s.cpu:7.1f}"
    )


def slope_kib_per_minute(samples: list[Sample]) -> float:
    """Least-squares slope of RSS over time, KiB per minute; 0 with fewer than two samples."""
    if len(samples) < 2:
        return 0.0
    xs = [s.minutes for s in samples]
    ys = [s.rss / 1024 for s in samples]
    mx, my = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / var if var else 0.0


def summary(samples: list[Sample]) -> str:
    """RSS at 5 minutes (or the nearest sample) and at the end, and the slope after settling."""
    last = samples[-1]
    settle = min(_SETTLE_MINUTES, last.minutes / 2)
    at5 = min(samples, key=lambda s: abs(s.minutes - _SETTLE_MINUTES))
    settled = [s for s in samples if s.minutes >= settle - 1e-9]
    late = [s for s in samples if s.minutes >= last.minutes / 2 - 1e-9]
    return (
        f"summary: {last.requests} requests ({last.left} left mid-answer, {last.errors} errors) "
        f"in {last.minutes:.1f} min; RSS {at5.rss / 2**20:.2f} MiB at {at5.minutes:.1f} min, "
        f"{last.rss / 2**20:.2f} MiB at {last.minutes:.1f} min; "
        f"slope {slope_kib_per_minute(settled):+.0f} KiB/min from minute {settle:.1f}, "
        f"{slope_kib_per_minute(late):+.0f} over the second half; "
        f"heap {at5.heap / 2**20:.2f} -> {last.heap / 2**20:.2f} MiB; fds {at5.fds} -> {last.fds}; "
        f"CPU {cpu_ms_per_request(at5, last):.2f} ms per request"
    )


def cpu_ms_per_request(first: Sample, last: Sample) -> float:
    """The proxy's CPU per request between two samples (start-up excluded when `first` is after it)."""
    if last.requests == first.requests:
        first = Sample(0, 0, 0, 0, 0, 0, 0, 0.0)
    return (last.cpu - first.cpu) / max(1, last.requests - first.requests) * 1e3


class Churn:
    """The clients: each sends one streamed chat after another until `stopping` or the count is spent."""

    def __init__(self, port: int, settings: Settings) -> None:
        self.port = port
        self.settings = settings
        self.counts = Counts()
        self.stopping = False
        self._numbers = itertools.count()

    async def run(self) -> None:
        await asyncio.gather(*(self._client() for _ in range(self.settings.clients)))

    async def _client(self) -> None:
        conn: Conn | None = None
        try:
            while not self.stopping and (number := next(self._numbers)) < self.settings.max_requests:
                if conn is None or conn.lost.done():
                    conn = await connect("127.0.0.1", self.port)
                leave = number % self.settings.leave_every == 0
                try:
                    async with asyncio.timeout(_REQUEST_TIMEOUT):
                        ok = await (self._leave(conn) if leave else self._whole(conn, number))
                except TimeoutError:
                    ok = False
                if leave or not ok:
                    _close(conn)
                    conn = None
                self.counts.requests += 1
                self.counts.left += leave and ok
                self.counts.errors += not ok
        finally:
            if conn is not None:
                _close(conn)

    async def _whole(self, conn: Conn, number: int) -> bool:
        whole = Whole()
        conn.sink = whole.feed
        conn.send(request_bytes("POST", "/api/chat", self.port, chat_body(f"soak-{number}")))
        await asyncio.wait((whole.done, conn.lost), return_when=asyncio.FIRST_COMPLETED)
        return whole.done.done() and whole.done.result() == 200

    async def _leave(self, conn: Conn) -> bool:
        """Send a request and hang up once its first real token arrived."""
        flowing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def feed(data: bytes) -> None:
            if _TOKEN.search(data) and not flowing.done():
                flowing.set_result(None)

        conn.sink = feed
        conn.send(request_bytes("POST", "/api/chat", self.port, chat_body("soak-leave")))
        await asyncio.wait((flowing, conn.lost), return_when=asyncio.FIRST_COMPLETED)
        return flowing.done()


def _close(conn: Conn) -> None:
    if conn.transport is not None:
        conn.transport.close()


async def soak(settings: Settings, out: Callable[[str], None] = print) -> list[Sample]:
    """Run the churn against a fresh simulator and proxy, printing a row every `interval`."""
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        work = Path(tmp)
        async with (
            servers.simulator(work, tokens=settings.tokens, token_delay=settings.token_delay) as sim,
            servers.proxy(
                f"http://127.0.0.1:{sim.port}", work, uvloop=settings.uvloop, env=settings.env,
                module="bench.buffered_proxy" if settings.buffered else None,
                max_concurrent=settings.limit, max_queue=settings.clients * 2,
            ) as proxy,
        ):  # fmt: skip
            proc = proxy.procs[0]
            churn = Churn(proxy.port, settings)
            started = time.monotonic()
            task = asyncio.create_task(churn.run())
            samples = [sample(proc, started, churn.counts)]
            out(HEADER)
            out(row(samples[0]))
            deadline = started + settings.minutes * 60
            try:
                while not task.done() and time.monotonic() < deadline:
                    await asyncio.wait({task}, timeout=min(settings.interval, deadline - time.monotonic()))
                    samples.append(sample(proc, started, churn.counts))
                    out(row(samples[-1]))
                churn.stopping = True
                async with asyncio.timeout(_REQUEST_TIMEOUT + 10):
                    await task
            finally:
                if not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
    out(summary(samples))
    return samples


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench soak", description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="how long to run (default: 30)")
    parser.add_argument("--interval", type=float, default=60.0, help="seconds between rows (default: 60)")
    parser.add_argument("--clients", type=int, default=40, help="concurrent clients (default: 40)")
    parser.add_argument("--limit", type=int, default=8, help="the proxy's max_concurrent (default: 8)")
    parser.add_argument(
        "--max-requests", type=int, default=1_000_000, help="stop after this many (default: 1,000,000)"
    )
    parser.add_argument(
        "--env", action="append", default=[], metavar="NAME=VALUE", help="set in the proxy's environment"
    )
    parser.add_argument("--preload", metavar="LIB", help="LD_PRELOAD for the proxy, e.g. libjemalloc.so.2")
    parser.add_argument("--uvloop", action="store_true", help="run the proxy on uvloop")
    parser.add_argument(
        "--buffered",
        action="store_true",
        help="the proxy reads into a reused buffer (bench/buffered_proxy.py)",
    )
    args = parser.parse_args(argv)
    env = dict(item.split("=", 1) for item in args.env if "=" in item)
    if len(env) != len(args.env):
        parser.error("--env takes NAME=VALUE")
    if args.preload:
        env["LD_PRELOAD"] = args.preload
    settings = Settings(
        minutes=args.minutes, interval=args.interval, clients=args.clients, limit=args.limit,
        max_requests=args.max_requests, env=env, uvloop=args.uvloop, buffered=args.buffered,
    )  # fmt: skip
    flags = [name for name in ("uvloop", "buffered") if getattr(args, name)]
    variant = " ".join([*(f"{k}={v}" for k, v in env.items()), *flags])
    print(
        f"soak: {settings.clients} clients, limit {settings.limit}, 1 in {settings.leave_every} leaving "
        f"mid-answer, {settings.minutes:g} min; proxy: {variant or 'as shipped'}; "
        f"load average {psutil.getloadavg()[0]:.1f} on {psutil.cpu_count()} cores",
        flush=True,
    )
    samples = asyncio.run(soak(settings, lambda line: print(line, flush=True)))
    return 1 if samples[-1].errors else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
