"""Building both listeners, and the one owner of their life: start, reload, drain, stop.

Two applications on two runners rather than one app on two sites: the listen
app's only route is the relay, so an admin path can never be reached through
the tunnel, whatever the Host header or path tricks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
from collections.abc import AsyncIterator, Coroutine

import aiohttp
from aiohttp import web

from proxy.admin import routes as admin
from proxy.config import Config, ConfigError, config_warnings, load_config
from proxy.edge import listener
from proxy.edge.body import defer_expect
from proxy.edge.handler import handle
from proxy.observe import logs
from proxy.observe.metrics import Metrics
from proxy.ollama.classify import canonical_model
from proxy.runtime import STATE, ProxyState
from proxy.scheduling.admission import Admission
from proxy.scheduling.capacity import CapacityLedger
from proxy.scheduling.policy import SchedulingPolicy
from proxy.units import counted, format_duration
from proxy.upstream.health import UpstreamHealth

log = logging.getLogger("proxy")

#: The client library must not add headers the client did not send.
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")
#: After the grace, how long cut requests get to write their error and end.
_CUT_TIMEOUT = 2.0
#: How often `--watch` looks at the config file.
WATCH_INTERVAL = 1.0


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
    task = asyncio.create_task(state.health.run(state.session), name="upstream health probe")
    try:
        yield
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


def build_proxy_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    app.router.add_route("*", "/{path:.*}", handle, expect_handler=defer_expect)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_health_probes)
    return app


def build_admin_app(state: ProxyState) -> web.Application:
    app = web.Application()
    app[STATE] = state
    admin.add_routes(app, state.config.metrics.path)
    return app


class Server:
    """Both listeners, started and stopped together.

    `policy` (who waits for a slot goes next) and `ledger` (who counts the slots) are the
    scheduling seams; by default first-come-first-served and the in-process count.
    """

    def __init__(
        self,
        config: Config,
        config_path: str | os.PathLike[str] | None = None,
        *,
        policy: SchedulingPolicy | None = None,
        ledger: CapacityLedger | None = None,
    ) -> None:
        admission = Admission(config.limits, config.access.max_queued_per_key, policy=policy, ledger=ledger)
        health = UpstreamHealth(config.health, config.upstream.url, admission)
        metrics = Metrics((canonical_model(name) for name in config.limits.models), health.lists)
        metrics.watch(admission)
        metrics.watch_upstream(lambda: health.up)
        self.state = ProxyState(
            config=config, admission=admission, metrics=metrics, health=health, reload=self.reload
        )
        self._config_path = config_path
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
        self._admin = web.AppRunner(build_admin_app(self.state), access_log=None)
        self.listen_url = ""
        self.admin_url = ""

    async def start(self) -> None:
        config = self.state.config
        try:
            await self._proxy.setup()
            await listener.CappedTCPSite(
                self._proxy, config.listen.host, config.listen.port, self.connections, backlog=1024
            ).start()
            await self._admin.setup()
            await web.TCPSite(self._admin, config.admin.host, config.admin.port, backlog=1024).start()
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
        _log_warnings(config)

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
        log.info("stopped")

    def reload(self) -> list[str]:
        """Re-read the config file; on any problem keep the old config and say why.

        Limits apply at once (waiting requests keep their place); timeouts,
        heartbeat, upstream and keys apply to requests that arrive from now on.
        What is bound when the listeners start is kept and reported.
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
        new, kept = _keep_restart_keys(old, new)
        for key in kept:
            log.warning("reload: %s changed; it takes effect only after a restart", key)
        self.state.config = new
        logs.reapply(new.log)
        self.state.admission.configure(new.limits, new.access.max_queued_per_key)
        self.state.health.configure(new.health, new.upstream.url)
        self.state.metrics.configure(new.limits.models)
        self.connections.resize(new.max_connections)  # follows limits.max_queue unless set
        self.state.metrics.reloads.labels("success").inc()
        log.info(
            "config reloaded: max_concurrent=%d max_queue=%d models=%s",
            new.limits.max_concurrent, new.limits.max_queue, dict(new.limits.models) or "{}",
        )  # fmt: skip
        _log_warnings(new)
        return []

    def watch(self, interval: float = WATCH_INTERVAL) -> Coroutine[None, None, None]:
        """Reload whenever the config file changes on disk (`--watch`).

        Polls the file's stat rather than using inotify: no dependency, works on
        every filesystem, and an editor's write-and-rename is seen as one change.
        The file as it is now is the baseline, taken before this returns.
        """
        assert self._config_path is not None
        return self._watch(self._config_path, _stamp(self._config_path), interval)

    async def _watch(
        self, path: str | os.PathLike[str], last: tuple[int, int, int] | None, interval: float
    ) -> None:
        while True:
            await asyncio.sleep(interval)
            stamp = _stamp(path)
            if stamp is None or stamp == last:
                continue  # missing for a moment while an editor replaces it
            last = stamp
            log.info("config file changed on disk: reloading %s", os.fspath(path))
            self.reload()


#: File descriptors the process needs besides its connections: logs, the listeners, the upstream pool.
FD_RESERVE = 64


def _log_warnings(config: Config) -> None:
    """What `check-config` warns about, logged when a config takes effect, and whether this
    process may open enough files for the connection cap (which `check-config`, run from
    another shell, cannot know)."""
    for warning in config_warnings(config):
        log.warning("config: %s", warning)
    # Each running request holds two sockets (client, upstream); the rest, a few files.
    needed = 2 * config.max_connections + FD_RESERVE
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "config: listen.max_connections: %d connections need about %d file descriptors, and this "
            "process may open %d (ulimit -n): past that, accepting fails; raise LimitNOFILE "
            "or lower listen.max_connections",
            config.max_connections, needed, soft,
        )  # fmt: skip


def _keep_restart_keys(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the values bound at start put back, and the names of those that differed."""
    kept: list[str] = []
    for key in ("listen", "admin", "metrics"):
        if getattr(new, key) != getattr(old, key):
            kept.append(key)
            new = dataclasses.replace(new, **{key: getattr(old, key)})
    bound = ("max_header_size", "header_timeout")
    for name in bound:
        if getattr(new.request, name) != getattr(old.request, name):
            kept.append(f"request.{name}")
    request = dataclasses.replace(new.request, **{name: getattr(old.request, name) for name in bound})
    return dataclasses.replace(new, request=request), kept


def _stamp(path: str | os.PathLike[str]) -> tuple[int, int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_mtime_ns, st.st_size, st.st_ino


def _url(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"
