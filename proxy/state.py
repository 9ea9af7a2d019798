"""The runtime state both listeners share, under one typed app key."""

from __future__ import annotations

from dataclasses import dataclass

import aiohttp
from aiohttp import web

from .admission import Admission
from .config import Config
from .metrics import Metrics


@dataclass(eq=False)
class ProxyState:
    """What a request needs beyond itself. `config` is replaced whole on reload,
    so a request reads it once and keeps one consistent view."""

    config: Config
    admission: Admission
    metrics: Metrics
    session: aiohttp.ClientSession | None = None
    draining: bool = False


STATE = web.AppKey("state", ProxyState)
