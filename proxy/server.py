"""The composition root: builds both listeners and their parts, and owns their life
(start, drain, stop). Reloading lives in `proxy.reload`; the server is what it reloads.

Two applications on two runners rather than one app on two sites: the listen
app's only route is the relay, so an admin path can never be reached through
the tunnel, whatever the Host header or path tricks.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import AsyncIterator, Coroutine
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from proxy.admin import routes as admin
from proxy.config import Config, FileStamp
from proxy.edge import listener
from proxy.edge.body import defer_expect
from proxy.edge.handler import LISTENING, Listening, handle
from proxy.observe import logs
from proxy.observe.metrics import Metrics
from proxy.ollama.names import canonical_model
from proxy.reload import WATCH_INTERVAL, Reloader, ReloadResult, log_config_warnings
from proxy.runtime import STATE, ProxyState
from proxy.scheduling.admission import Admission
from proxy.scheduling.capacity import CapacityLedger
from proxy.scheduling.fair import FairShare, fair_share, per_key_bounds, weights_of
from proxy.scheduling.policy import SchedulingPolicy
from proxy.units import counted, format_duration
from proxy.upstream.fleet import Fleet

if TYPE_CHECKING:  # imported only with cluster.redis set: it needs the optional redis package
    from proxy.scheduling.redis_ledger import RedisLedger

log = logging.getLogger("proxy")

#: The client library must not add headers the client did not send.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
#: After the grace, how long cut requests get to write their error and end.
_CUT_TIMEOUT = 2.0


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


async def _health_probes(app: web.Application) -> AsyncIterator[None]:
    """The upstream probe runs while the listen app does, over its session (closed after it)."""
    state = app[STATE]
    assert state.session is not None, "the client session's cleanup_ctx comes first"
    task = asyncio.create_task(state.health.run(state.session), name="backend health probes")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


async def _cluster_ledger(app: web.Application) -> AsyncIterator[None]:
    """With `cluster.redis`: the Redis client, registered before the port opens; closed after the drain."""
    state = app[STATE]
    if state.cluster is None:
        yield
        return
    from proxy.scheduling.redis_ledger import connect  # only here: redis is an optional dependency

    client = connect(state.config.cluster.redis)
    state.cluster.attach(client)
    await state.cluster.start()
    task = asyncio.create_task(state.cluster.run(), name="cluster ledger")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await state.cluster.leave()
        await client.aclose()


def build_proxy_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app[LISTENING] = Listening()
    app.router.add_route("*", "/{path:.*}", handle, expect_handler=defer_expect)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_health_probes)
    app.cleanup_ctx.append(_cluster_ledger)
    return app


def build_admin_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    admin.add_routes(app, state.config.metrics.path)
    return app


class Server:
    """Both listeners, started and stopped together; the `ConfigTarget` a reload applies to.

    `policy` (who waits for a slot goes next) and `ledger` (who counts the slots) are the
    scheduling seams; by default the fair share `scheduling` configures (first come, first
    served while one client waits) and the in-process count.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | os.PathLike[str] | None = None,
        read_at: FileStamp | None = None,
        *,
        policy: SchedulingPolicy | None = None,
        ledger: CapacityLedger | None = None,
    ) -> None:
        """`config_path` is the file a reload re-reads, and `read_at` its stamp when
        `config` was read from it (`read_config`), the baseline of `watch`."""
        cluster = None
        if ledger is None and config.cluster.redis:
            from proxy.scheduling.redis_ledger import RedisLedger  # redis is an optional dependency

            ledger = cluster = RedisLedger(config.cluster, config.limits)
        policy = fair_share(config) if policy is None else policy
        admission = Admission(
            config.limits,
            config.access.max_queued_per_key,
            policy=policy,
            ledger=ledger,
            backends=config.fleet,
        )
        self._configure_scheduling(admission, cluster, config)
        health = Fleet(config, admission)
        admission.route(health)
        metrics = Metrics((canonical_model(name) for name in config.limits.models), health.lists)
        metrics.watch(admission)
        metrics.watch_upstream(lambda: health.up)
        metrics.watch_backends(lambda: health.gauges(admission.running_by_backend()))
        if cluster is not None:
            metrics.watch_cluster(cluster.view)
        self.state = ProxyState(
            config=config, admission=admission, metrics=metrics, health=health, reload=self.reload,
            cluster=cluster,
        )  # fmt: skip
        self._reloader = Reloader(self, config_path, read_at)
        self._proxy = web.AppRunner(
            build_proxy_app(self.state),
            handler_cancellation=True,
            auto_decompress=False,  # a compressed request body is relayed as it came
            shutdown_timeout=_CUT_TIMEOUT,  # stop() drains first; this only bounds the close
            access_log=None,  # proxy.accesslog writes one line per request instead
            **listener.handler_options(config.request),
        )
        #: Connections open on the listen port, capped at `listen.max_connections`.
        self.connections = listener.ConnectionCap(
            config.max_connections, lambda: self.state.config.access.cors_origins
        )
        metrics.watch_connections(self.connections)
        #: Malformed requests logged in one line, while the listen port is open.
        self._bad_requests = listener.OneLineBadRequests()
        self._admin = web.AppRunner(build_admin_app(self.state), access_log=None)
        self.listen_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        config = self.state.config
        listener.http_log.addFilter(self._bad_requests)
        try:
            await self._proxy.setup()
            site = listener.CappedSite(
                self._proxy, config.listen.host, config.listen.port, self.connections, backlog=1024
            )
            await site.start()
            await self._admin.setup()
            await web.TCPSite(self._admin, config.admin.host, config.admin.port, backlog=1024).start()
        except BaseException:
            # A taken port must not leave the other listener or the session open.
            for runner in (self._proxy, self._admin):
                if runner.server is not None:
                    await runner.cleanup()
            listener.http_log.removeFilter(self._bad_requests)
            raise
        self.listen_url = site.name
        self.admin_url = _url(self._admin)
        limits = config.limits
        log.info(
            "serving on %s (admin %s%s), upstream %s, max_concurrent=%d max_queue=%d models=%s",
            self.listen_url, self.admin_url, config.metrics.path,
            ", ".join(f"{name}={backend.url}" for name, backend in config.fleet.items())
            if config.backends else config.upstream.url,
            limits.max_concurrent, limits.max_queue, dict(limits.models) or "{}",
        )  # fmt: skip
        log_config_warnings(config)

    async def stop(self) -> None:
        """Drain, then close: refuse new requests with 503 while admitted and queued
        ones finish within `shutdown_grace`; cut what is left with an error.

        The listeners stay open during the drain so that a new request gets a
        clear 503 with Retry-After rather than a refused connection.
        """
        state = self.state
        state.draining = True
        grace = state.config.shutdown_grace
        admission = state.admission
        log.info(
            "draining: %d running, %d waiting, %s in progress, grace %s",
            admission.running_total, admission.waiting_total, counted(len(state.requests), "request"),
            format_duration(grace),
        )  # fmt: skip
        try:
            async with asyncio.timeout(grace):
                await state.idle()
            log.info("drained: every request finished")
        except TimeoutError:
            state.stopping = True
            unfinished = list(state.requests)
            log.warning(
                "shutdown_grace %s ran out: cutting %d unfinished requests with an error",
                format_duration(grace), len(unfinished),
            )  # fmt: skip
            for task in unfinished:
                task.cancel()
            if unfinished:
                await asyncio.wait(unfinished, timeout=_CUT_TIMEOUT)
        await self._proxy.cleanup()
        await self._admin.cleanup()
        listener.http_log.removeFilter(self._bad_requests)
        log.info("stopped")

    @property
    def config(self) -> Config:
        return self.state.config

    def apply(self, config: Config) -> None:
        """Every part that follows the config takes the reloaded one."""
        self.state.config = config
        logs.reapply(config.log)
        self.state.health.configure(config)  # before admission's pass: new backends take waiters
        self._configure_scheduling(self.state.admission, self.state.cluster, config)
        self.state.metrics.configure(config.limits.models)
        self.connections.resize(config.max_connections)  # follows limits.max_queue unless set

    @staticmethod
    def _configure_scheduling(admission: Admission, cluster: RedisLedger | None, config: Config) -> None:
        """Limits, per-key bounds and the fair share's cost and weights; waiters keep their places.
        With a shared ledger the keys' `max_running` are leased across the proxies as well."""
        queued, running = per_key_bounds(config)
        if cluster is not None:
            cluster.limit_clients(running)
        admission.configure(
            config.limits,
            config.access.max_queued_per_key,
            config.fleet,
            max_queued=queued,
            max_running=running,
        )
        if isinstance(admission.policy, FairShare):
            admission.policy.configure(cost=config.scheduling.cost, weights=weights_of(config))

    def count_reload(self, result: ReloadResult) -> None:
        self.state.metrics.reloads.labels(result).inc()

    def reload(self) -> list[str]:
        """Re-read the config file (SIGHUP, POST /-/reload); the problems, empty when applied."""
        return self._reloader.reload()

    def watch(self, interval: float = WATCH_INTERVAL) -> Coroutine[None, None, None]:
        """Reload whenever the config file changes on disk (`--watch`)."""
        return self._reloader.watch(interval)


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
