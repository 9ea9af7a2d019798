"""What waits and what runs, for people and scripts: `GET /-/queue` and `GET /-/status`.

Metrics give counts over time; an operator whose client is stuck wants to see
the queue itself: who is where, for how long, behind which cap. Positions are
the ones SSE keep-alive comments carry, so a user's "position 3 of 7" can be
found on the page. Nothing of a request's content and no key is shown: an
owner is a key's name.

One pass over the running and the waiting slots, with one clock reading, so
every age in an answer is taken at the same instant and the view costs O(slots).
"""

from __future__ import annotations

import asyncio
import functools
from importlib import resources
from typing import Any

from aiohttp import web

from proxy.config import PRIORITIES
from proxy.runtime import STATE
from proxy.scheduling.admission import Admission

#: The answers change every moment; no cache between the page and the proxy may keep one.
_NO_STORE = {"Cache-Control": "no-store"}


def snapshot(admission: Admission, draining: bool, now: float) -> dict[str, Any]:
    """The queue as JSON-ready data, every age measured against `now` (loop time)."""
    limits = admission.limits
    models: dict[str, dict[str, Any]] = {
        model: {"limit": cap, "running": [], "waiting": []} for model, cap in admission.caps.items()
    }

    def model(name: str) -> dict[str, Any]:
        entry = models.get(name)
        if entry is None:
            entry = models[name] = {"limit": None, "running": [], "waiting": []}
        return entry

    running = admission.running()
    for held in running:
        admitted = held.admitted_at if held.admitted_at is not None else now
        model(held.model)["running"].append(
            {"age": _ms(now - admitted), "waited": _ms(admitted - held.enqueued_at), "owner": held.client}
        )
    queue: list[dict[str, Any]] = []
    for position, waiter in enumerate(admission.waiting(), 1):
        age = _ms(now - waiter.enqueued_at)
        model(waiter.model)["waiting"].append({"position": position, "age": age, "owner": waiter.client})
        queue.append(
            {
                "position": position,
                "model": waiter.model,
                "age": age,
                "owner": waiter.client,
                # Who it shares the slots as (scheduling.fairness), and its priority.
                "client": waiter.party,
                "priority": PRIORITIES[waiter.priority],
            }
        )
    return {
        "limits": {
            "max_concurrent": limits.max_concurrent,
            "max_queue": limits.max_queue,
            "queue_timeout": limits.queue_timeout,
            "models": dict(limits.models),
        },
        "running": len(running),
        "waiting": len(queue),
        # The longest wait, whatever order the policy serves the queue in.
        "oldest_wait": max((entry["age"] for entry in queue), default=0.0),
        "draining": draining,
        "models": dict(sorted(models.items())),
        "queue": queue,
        # Each waiting client's counter (service / weight): the lowest goes next within a priority.
        "clients": {party: round(counter, 3) for party, counter in admission.counters().items()},
        "by_priority": admission.waiting_by_priority(),
    }


async def queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = asyncio.get_running_loop().time()
    upstream = state.health.view(state.admission.running_by_backend())
    view = {**snapshot(state.admission, state.draining, now), "upstream": upstream}
    if state.cluster is not None:  # running counts across every proxy; "running" above is this one's
        cluster = state.cluster
        running = await cluster.refresh()
        view["cluster"] = {
            "up": cluster.view.up, "peers": cluster.view.peers, "running": running,
            "leases_lost": cluster.view.leases_lost,
            # What this proxy does while `up` is false (a restart setting: the config it started with).
            "on_redis_down": state.config.cluster.on_redis_down,
        }  # fmt: skip
    return web.json_response(view, headers=_NO_STORE)


async def status(request: web.Request) -> web.Response:
    """The live page: static HTML whose script polls /-/queue, so it costs one file read per process."""
    return web.Response(text=_page(), content_type="text/html", charset="utf-8", headers=_NO_STORE)


@functools.cache
def _page() -> str:
    return resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0), 3)
