"""Shared test helpers: proxies in-process and as processes, metrics scrapes, bounded polling."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import re
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from proxy.server import Server

REPO = Path(__file__).resolve().parents[2]
MakeProxy = Callable[..., Awaitable[Server]]


def proxy_config(upstream: str, **sections: dict) -> dict:
    """A config dict on free loopback ports; `sections` override whole keys' fields."""
    data: dict = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream},
        "shutdown_grace": "2s",
    }
    if sections.get("backends"):
        del data["upstream"]  # one or the other
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@dataclass
class ProxyProcess:
    proc: asyncio.subprocess.Process
    listen: str
    admin: str
    log: list[str]  # stderr lines so far, drained continuously so the pipe never fills

    async def log_line(self, pattern: str, timeout: float = 10.0) -> str:
        """Wait for a log line matching `pattern` (the process's own event to await)."""

        async def found() -> bool:
            return any(re.search(pattern, line) for line in self.log)

        await eventually(found, timeout)
        return next(line for line in self.log if re.search(pattern, line))


@contextlib.asynccontextmanager
async def running_proxy(config: Path, *args: str) -> AsyncIterator[ProxyProcess]:
    """`python -m proxy` as its own process, where the process itself is under
    test: its sockets, fds, signals, logs and exit code."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), *args,
        stderr=asyncio.subprocess.PIPE, cwd=REPO,
    )  # fmt: skip
    assert proc.stderr is not None
    stderr = proc.stderr
    log: list[str] = []

    async def drain() -> None:
        async for line in stderr:
            log.append(line.decode(errors="replace"))

    reader = asyncio.create_task(drain())
    try:
        started = ProxyProcess(proc, "", "", log)
        line = await started.log_line(r"serving on", timeout=20)
        match = re.search(r"serving on (\S+) \(admin (http://[^/]+)", line)
        assert match, line
        started.listen, started.admin = match.group(1), match.group(2)
        yield started
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()
        await reader


@contextlib.asynccontextmanager
async def serving(app: web.Application, **runner_kwargs) -> AsyncIterator[str]:
    """Serve a hand-written aiohttp app on a free loopback port; yields its URL."""
    runner = web.AppRunner(app, **runner_kwargs)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    finally:
        await runner.cleanup()


async def scrape(http: aiohttp.ClientSession, server: Server) -> dict[tuple[str, tuple], float]:
    """Every sample on the admin port's /metrics, keyed by (name, sorted labels)."""
    async with http.get(server.admin_url + "/metrics") as resp:
        assert resp.status == 200
        text = await resp.text()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def sample(metrics: dict, name: str, **labels: str) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


async def eventually(predicate: Callable[[], bool | Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll a view that has no event to await (another process, /metrics); bounded."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = predicate()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.005)


async def hold_the_slot(sim, http, proxy) -> asyncio.Task:
    """Occupy the only slot with a request upstream sits on, until cancelled."""

    async def hold() -> None:
        body = {"model": "llama3.2", "prompt": "hold"}
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            await resp.read()  # a keep-alive 200 may come first: keep reading

    sim.load_delay = 60
    task = asyncio.create_task(hold())
    await sim.wait_until(lambda: sim.active == 1)
    sim.load_delay = 0
    return task


async def release(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
