"""Fixtures: a simulated Ollama, proxies in front of it and an HTTP client, on loopback ports."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest

from proxy.config import config_from_dict
from proxy.server import Server
from proxy.sim import Simulator
from tests.support import MakeProxy, proxy_config
from tests.support.redisserver import RedisServer


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


@pytest.fixture
async def redis_server() -> AsyncIterator[RedisServer]:
    """A real redis-server on a free loopback port (tests that use it are marked `needs_redis_server`)."""
    server = RedisServer()
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
