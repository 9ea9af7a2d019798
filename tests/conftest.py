"""Shared fixtures: a simulated Ollama and proxies on loopback ports, real sockets only."""

from __future__ import annotations

import asyncio
import inspect
from typing import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from proxy.app import Server
from proxy.config import config_from_dict
from proxy.simulator import Simulator

MakeProxy = Callable[..., Awaitable[Server]]


def proxy_config(upstream: str, **sections: dict) -> dict:
    """A config dict on free loopback ports; `sections` override whole keys' fields."""
    data: dict = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream},
        "shutdown_grace": "2s",
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value} if isinstance(value, dict) else value
    return data


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    simulator = Simulator()
    await simulator.start()
    try:
        yield simulator
    finally:
        await simulator.close()


@pytest.fixture
async def make_proxy(sim: Simulator) -> AsyncIterator[MakeProxy]:
    """Start a proxy in front of `sim` (or `upstream=`) with config overrides."""
    servers: list[Server] = []

    async def make(upstream: str | None = None, **sections: dict) -> Server:
        server = Server(config_from_dict(proxy_config(upstream or sim.url, **sections)))
        await server.start()
        servers.append(server)
        return server

    try:
        yield make
    finally:
        for server in servers:
            await server.stop()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=60), connector=aiohttp.TCPConnector(limit=0)
    ) as session:
        yield session


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
