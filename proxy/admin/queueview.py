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

from proxy.ollama.names import canonical_model
from proxy.runtime import STATE
from proxy.scheduling.admission import Admission

#: The answers change every moment; no cache between the page and the proxy may keep one.
_NO_STORE = {"Cache-Control": "no-store"}


def snapshot(admission: Admission, draining: bool, now: float) -> dict[str, Any]:
    """The queue as JSON-ready data, every age measured against `now` (loop time)."""
    limits = admission.limits
    caps = {canonical_model(name): cap for name, cap in limits.models.items()}
    models: dict[str, dict[str, Any]] = {
        key: {"limit": cap, "running": [], "waiting": []} for key, cap in caps.items()
    }

    def model(key: str) -> dict[str, Any]:
        entry = models.get(key)
        if entry is None:
            entry = models[key] = {"limit": None, "running": [], "waiting": []}
        return entry

    running = admission.running()
    for slot in running:
        admitted = slot.admitted_at if slot.admitted_at is not None else now
        model(slot.key)["running"].append(
            {"age": _ms(now - admitted), "waited": _ms(admitted - slot.enqueued_at), "owner": slot.owner}
        )
    queue: list[dict[str, Any]] = []
    for position, slot in enumerate(admission.waiting(), 1):
        age = _ms(now - slot.enqueued_at)
        model(slot.key)["waiting"].append({"position": position, "age": age, "owner": slot.owner})
        queue.append({"position": position, "model": slot.key, "age": age, "owner": slot.owner})
    return {
        "limits": {
            "max_concurrent": limits.max_concurrent,
            "max_queue": limits.max_queue,
            "queue_timeout": limits.queue_timeout,
            "models": dict(limits.models),
        },
        "running": len(running),
        "waiting": len(queue),
        "oldest_wait": queue[0]["age"] if queue else 0.0,
        "draining": draining,
        "models": dict(sorted(models.items())),
        "queue": queue,
    }


async def queue(request: web.Request) -> web.Response:
    state = request.app[STATE]
    now = asyncio.get_running_loop().time()
    view = {**snapshot(state.admission, state.draining, now), "upstream": state.health.view()}
    return web.json_response(view, headers=_NO_STORE)


async def status(request: web.Request) -> web.Response:
    """The live page: static HTML whose script polls /-/queue, so it costs one file read per process."""
    return web.Response(text=_page(), content_type="text/html", charset="utf-8", headers=_NO_STORE)


@functools.cache
def _page() -> str:
    return resources.files(__package__).joinpath("status.html").read_text(encoding="utf-8")


def _ms(seconds: float) -> float:
    return round(max(seconds, 0.0), 3)
