"""The admin listener's endpoints: metrics and health, never on the listen port.

A tunnel pointed at the listen port can therefore not expose them: the proxy
app has no such routes at all, it relays every path to Ollama.
"""

from __future__ import annotations

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from proxy.admin import queueview
from proxy.runtime import STATE


async def metrics(request: web.Request) -> web.Response:
    body = request.app[STATE].metrics.render()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthy(request: web.Request) -> web.Response:
    """The process serves: for liveness probes, independent of upstream."""
    return web.json_response({"status": "healthy"})


async def ready(request: web.Request) -> web.Response:
    """A backend answers (at least one of the fleet) and we are not draining: for load
    balancers and readiness probes."""
    state = request.app[STATE]
    if state.draining:
        return _not_ready("draining: the proxy is shutting down")
    cluster = state.cluster
    if cluster is not None and not cluster.view.up and state.config.cluster.on_redis_down == "refuse":
        return _not_ready("cluster: redis is unreachable and cluster.on_redis_down is refuse")
    # A probe of its own (shared with one under way), which the health component also learns from.
    probe = await state.health.probe()
    if not probe.ok:
        return _not_ready(probe.detail)
    fleet = state.health
    url = fleet.url(fleet.first_healthy())
    healthy = [name for name in fleet.names() if fleet.member(name).up]  # type: ignore[union-attr]
    return web.json_response(
        {"status": "ready", "upstream": url, "upstream_version": probe.detail, "healthy_backends": healthy}
    )


async def reload(request: web.Request) -> web.Response:
    """The same as SIGHUP, for operators and scripts that cannot send signals."""
    problems = request.app[STATE].reload()
    if problems:
        return web.json_response({"status": "failed", "problems": problems}, status=400)
    return web.json_response({"status": "reloaded"})


def _not_ready(reason: str) -> web.Response:
    return web.json_response({"status": "not ready", "reason": reason}, status=503)


def add_routes(app: web.Application, metrics_path: str) -> None:
    app.router.add_get(metrics_path, metrics)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/-/queue", queueview.queue)
    app.router.add_get("/-/status", queueview.status)
    app.router.add_post("/-/reload", reload)
