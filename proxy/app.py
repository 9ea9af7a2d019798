"""Building both listeners, and the one owner of their life: start, reload, drain, stop.

Two applications on two runners rather than one app on two sites: the listen
app's only route is the relay, so an admin path can never be reached through
the tunnel, whatever the Host header or path tricks.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

from . import admin
from .admission import Admission
from .classify import canonical_model
from .config import Config, ConfigError, load_config
from .handler import handle
from .metrics import Metrics
from .state import STATE, ProxyState

log = logging.getLogger("proxy")

#: The client library must not add headers the client did not send.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
#: Bound when the listeners start; a reload keeps the running values.
_RESTART_KEYS = ("listen", "admin", "metrics", "shutdown_grace")
_ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs "%{User-Agent}i"'


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    """One upstream session for the app's life.

    The pool is unbounded on purpose: admission already bounds generations,
    and a pool limit would only add a second, invisible queue. No cookie jar
    (a proxy must not carry one client's cookies to the next) and no
    decompression (bytes pass through as upstream encoded them).
    """
    state = app[STATE]
    state.session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        cookie_jar=aiohttp.DummyCookieJar(),
        auto_decompress=False,
        skip_auto_headers=_NO_AUTO_HEADERS,
        timeout=aiohttp.ClientTimeout(total=None),
    )
    try:
        yield
    finally:
        await state.session.close()


def build_proxy_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_route("*", "/{path:.*}", handle)
    app.cleanup_ctx.append(_client_session)
    return app


def build_admin_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    admin.add_routes(app, state.config.metrics.path)
    return app


class Server:
    """Both listeners, started and stopped together."""

    def __init__(self, config: Config, config_path: str | os.PathLike[str] | None = None) -> None:
        metrics = Metrics(canonical_model(name) for name in config.limits.models)
        admission = Admission(config.limits)
        metrics.watch(admission)
        self.state = ProxyState(config=config, admission=admission, metrics=metrics)
        self._config_path = config_path
        self._proxy = web.AppRunner(
            build_proxy_app(self.state),
            handler_cancellation=True,
            auto_decompress=False,  # a compressed request body is relayed as it came
            shutdown_timeout=config.shutdown_grace,
            access_log_format=_ACCESS_LOG_FORMAT,
        )
        self._admin = web.AppRunner(build_admin_app(self.state), access_log=None)
        self.listen_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        config = self.state.config
        try:
            for runner, where in ((self._proxy, config.listen), (self._admin, config.admin)):
                await runner.setup()
                await web.TCPSite(runner, where.host, where.port, backlog=1024).start()
        except BaseException:
            # A taken port must not leave the other listener or the session open.
            for runner in (self._proxy, self._admin):
                if runner.server is not None:
                    await runner.cleanup()
            raise
        self.listen_url = _url(self._proxy)
        self.admin_url = _url(self._admin)
        limits = config.limits
        log.info(
            "serving on %s (admin %s%s), upstream %s, max_concurrent=%d max_queue=%d models=%s",
            self.listen_url, self.admin_url, config.metrics.path, config.upstream.url,
            limits.max_concurrent, limits.max_queue, dict(limits.models) or "{}",
        )  # fmt: skip

    async def stop(self) -> None:
        """Drain: refuse new connections, let admitted and queued requests finish
        within `shutdown_grace`, then cancel what is left."""
        self.state.draining = True
        admission = self.state.admission
        log.info(
            "draining: %d running, %d waiting, grace %gs",
            admission.running_total, admission.waiting_total, self.state.config.shutdown_grace,
        )  # fmt: skip
        await self._proxy.cleanup()
        await self._admin.cleanup()
        log.info("stopped")

    def reload(self) -> list[str]:
        """Re-read the config file; on any problem keep the old config and say why.

        Limits apply at once (waiting requests keep their place); timeouts,
        heartbeat and upstream apply to requests that arrive from now on.
        Listener addresses need a restart and are kept as they are.
        """
        if self._config_path is None:
            return ["no config file to reload (the proxy was started without one)"]
        try:
            new = load_config(self._config_path)
        except ConfigError as err:
            self.state.metrics.reloads.labels("failure").inc()
            for problem in err.problems:
                log.error("reload failed, keeping the running config: %s", problem)
            return err.problems
        old = self.state.config
        kept = {key: getattr(old, key) for key in _RESTART_KEYS}
        for key, value in kept.items():
            if getattr(new, key) != value:
                log.warning("reload: %s changed; it takes effect only after a restart", key)
        new = dataclasses.replace(new, **kept)
        self.state.config = new
        self.state.admission.configure(new.limits)
        self.state.metrics.reloads.labels("success").inc()
        log.info(
            "config reloaded: max_concurrent=%d max_queue=%d models=%s",
            new.limits.max_concurrent, new.limits.max_queue, dict(new.limits.models) or "{}",
        )  # fmt: skip
        return []


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
