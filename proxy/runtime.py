"""The runtime state both listeners share, under one typed app key."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.config import Config
from proxy.observe.metrics import Metrics
from proxy.scheduling.admission import Admission
from proxy.upstream.fleet import Fleet

if TYPE_CHECKING:  # imported only with cluster.redis set: it needs the optional redis package
    from proxy.scheduling.redis_ledger import RedisLedger


@dataclass(eq=False)
class ProxyState:
    """What a request needs beyond itself. `config` is replaced whole on reload,
    so a request reads it once and keeps one consistent view."""

    config: Config
    admission: Admission
    metrics: Metrics
    #: The backends: each up or down, the models it lists and has loaded; where requests go.
    health: Fleet
    session: aiohttp.ClientSession | None = None
    #: The ledger shared through Redis (`cluster.redis`); None when every limit is counted here.
    cluster: RedisLedger | None = None
    #: New requests are refused (503) while admitted and queued ones finish.
    draining: bool = False
    #: The grace ran out: requests still running are being cut, with an error where possible.
    stopping: bool = False
    #: Re-read the config file; returns the problems (empty when it was applied).
    reload: Callable[[], list[str]] = lambda: ["reload is not available here"]
    #: Handler tasks of the listen port, so a drain can wait for them and cut the rest.
    requests: set[asyncio.Task[object]] = field(default_factory=set)
    _idle: asyncio.Event = field(default_factory=asyncio.Event)

    def enter(self, task: asyncio.Task[object]) -> None:
        self.requests.add(task)
        self._idle.clear()

    def leave(self, task: asyncio.Task[object]) -> None:
        self.requests.discard(task)
        if not self.requests:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request is in progress on the listen port."""
        if self.requests:
            await self._idle.wait()


STATE = web.AppKey("state", ProxyState)
