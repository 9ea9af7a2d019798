"""GET /-/queue: who runs and who waits, with positions the keep-alive frames agree with."""

from __future__ import annotations

import asyncio
import re
from types import MappingProxyType

import aiohttp

from proxy.admin.queueview import snapshot
from proxy.config import LimitsConfig
from proxy.scheduling.admission import Admission
from proxy.server import Server
from tests.support import eventually, hold_the_slot, release

SECRET = "prompt-text-that-must-never-show"
SSE_FRAME = re.compile(rb": queued, position (\d+) of (\d+)\n\n")


async def get_queue(http: aiohttp.ClientSession, proxy: Server) -> dict:
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        assert resp.status == 200
        return await resp.json()


async def until_waiting(http: aiohttp.ClientSession, proxy: Server, count: int) -> dict:
    """The queue as soon as it holds `count` waiters (its state changes in another task)."""
    seen: dict = {}

    async def holds() -> bool:
        seen.update(await get_queue(http, proxy))
        return seen["waiting"] == count

    await eventually(holds)
    return seen


def enqueue(http: aiohttp.ClientSession, proxy: Server, path: str, body: dict) -> asyncio.Task:
    async def client() -> None:
        async with http.post(proxy.listen_url + path, json=body) as resp:
            await resp.read()

    return asyncio.create_task(client())


async def test_queue_shows_positions_ages_and_caps(sim, make_proxy, http):
    sim.models.add("gpt-oss:120b")  # upstream must list a model for it to queue
    proxy = await make_proxy(limits={"max_concurrent": 1, "models": {"gpt-oss:120b": 1, "Idle-Model": 2}})
    holder = await hold_the_slot(sim, http, proxy)
    loop = asyncio.get_running_loop()
    started = loop.time()
    arrivals = ["gpt-oss:120b", "llama3.2", "GPT-OSS:120b", "llama3.2:latest"]
    clients = []
    for count, model in enumerate(arrivals, 1):
        clients.append(enqueue(http, proxy, "/api/generate", {"model": model, "prompt": SECRET}))
        await until_waiting(http, proxy, count)  # one at a time, so arrival order is known

    async with http.get(proxy.admin_url + "/-/queue") as resp:
        assert resp.status == 200 and resp.content_type == "application/json"
        assert resp.headers["Cache-Control"] == "no-store"
        raw = await resp.text()
        first = await resp.json()
    elapsed = loop.time() - started
    assert SECRET not in raw
    assert first["limits"] == {
        "max_concurrent": 1, "max_queue": 100, "queue_timeout": 600.0,
        "models": {"gpt-oss:120b": 1, "Idle-Model": 2},
    }  # fmt: skip
    assert (first["running"], first["waiting"], first["draining"]) == (1, 4, False)
    queue = first["queue"]
    assert [w["position"] for w in queue] == [1, 2, 3, 4]
    assert [w["model"] for w in queue] == ["gpt-oss:120b", "llama3.2:latest"] * 2
    assert all(w["owner"] == "" for w in queue)
    ages = [w["age"] for w in queue]
    assert elapsed >= ages[0] >= ages[1] >= ages[2] >= ages[3] >= 0  # earlier arrivals waited longer
    assert first["oldest_wait"] == ages[0]

    models = first["models"]
    assert list(models) == ["gpt-oss:120b", "idle-model:latest", "llama3.2:latest"]
    assert models["idle-model:latest"] == {"limit": 2, "running": [], "waiting": []}
    big, small = models["gpt-oss:120b"], models["llama3.2:latest"]
    assert (big["limit"], big["running"], small["limit"]) == (1, [], None)
    assert big["waiting"] == [{"position": p, "age": ages[p - 1], "owner": ""} for p in (1, 3)]
    assert small["waiting"] == [{"position": p, "age": ages[p - 1], "owner": ""} for p in (2, 4)]
    [holding] = small["running"]
    assert set(holding) == {"age", "waited", "owner"} and holding["owner"] == ""
    assert holding["age"] >= ages[0] and 0 <= holding["waited"] < 1  # it found the slot free

    later = await get_queue(http, proxy)
    # The same waiters, each older by the same time (ages are rounded to the millisecond).
    aged = [w["age"] - age for w, age in zip(later["queue"], ages, strict=True)]
    assert min(aged) >= 0 and max(aged) - min(aged) <= 0.0015

    for client in clients:
        client.cancel()
    await asyncio.gather(*clients, return_exceptions=True)
    gone = await until_waiting(http, proxy, 0)
    assert (gone["queue"], gone["oldest_wait"], gone["running"]) == ([], 0.0, 1)
    assert gone["models"]["gpt-oss:120b"] == {"limit": 1, "running": [], "waiting": []}
    await release(holder)

    async def idle() -> bool:
        return (await get_queue(http, proxy))["running"] == 0

    await eventually(idle)
    assert list((await get_queue(http, proxy))["models"]) == ["gpt-oss:120b", "idle-model:latest"]


async def test_sse_keepalive_names_the_position_the_queue_shows(sim, make_proxy, http):
    sim.models.add("sse-model")
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "100ms"})
    holder = await hold_the_slot(sim, http, proxy)
    ahead = [enqueue(http, proxy, "/api/generate", {"model": "llama3.2", "prompt": "p"})]
    await until_waiting(http, proxy, 1)
    ahead.append(enqueue(http, proxy, "/api/generate", {"model": "llama3.2", "prompt": "p"}))
    await until_waiting(http, proxy, 2)
    body = {"model": "sse-model", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    async with http.post(proxy.listen_url + "/v1/chat/completions", json=body) as resp:
        assert resp.status == 200 and resp.content_type == "text/event-stream"
        frame = await resp.content.readuntil(b"\n\n")
        shown = await get_queue(http, proxy)
        [mine] = [w for w in shown["queue"] if w["model"] == "sse-model:latest"]
        assert frame == f": queued, position {mine['position']} of {shown['waiting']}\n\n".encode()
        assert (mine["position"], shown["waiting"]) == (3, 3)

        ahead[0].cancel()  # the head leaves: everyone behind moves up
        await asyncio.gather(ahead[0], return_exceptions=True)
        shown = await until_waiting(http, proxy, 2)
        assert [w["model"] for w in shown["queue"]] == ["llama3.2:latest", "sse-model:latest"]
        # Frames sent before the change may still be buffered; the first new one must agree.
        for _ in range(50):
            frame = await asyncio.wait_for(resp.content.readuntil(b"\n\n"), timeout=2)
            match = SSE_FRAME.fullmatch(frame)
            assert match, frame
            if match.groups() != (b"3", b"3"):
                break
        assert frame == b": queued, position 2 of 2\n\n"
    for client in ahead:
        client.cancel()
    await asyncio.gather(*ahead, return_exceptions=True)
    await until_waiting(http, proxy, 0)
    await release(holder)


async def test_snapshot_shows_owners_and_nothing_else():
    """Owners are set by access control; the view must show a key's name and no more."""
    limits = LimitsConfig(
        max_concurrent=1, max_queue=5, queue_timeout=30.0, models=MappingProxyType({"m": 1})
    )
    admission = Admission(limits)
    slots = [admission.slot("m", "alice"), admission.slot("M:latest", "bob"), admission.slot("x", "")]
    tasks = [asyncio.create_task(slot.__aenter__()) for slot in slots]
    await tasks[0]
    for _ in range(5):
        await asyncio.sleep(0)  # let the others join the queue
    now = slots[2].enqueued_at + 2.0
    view = snapshot(admission, draining=True, now=now)
    assert set(view) == {
        "limits", "running", "waiting", "oldest_wait", "draining", "models", "queue", "clients", "by_priority"
    }  # fmt: skip
    assert view["draining"] is True
    assert view["models"]["m:latest"]["running"] == [
        {
            "age": round(now - slots[0].admitted_at, 3),
            "waited": round(slots[0].admitted_at - slots[0].enqueued_at, 3),  # ~0, more on a busy machine
            "owner": "alice",
        }
    ]
    assert view["queue"] == [
        {
            "position": 1,
            "model": "m:latest",
            "age": round(now - slots[1].enqueued_at, 3),
            "owner": "bob",
            "client": "bob",
            "priority": "normal",
        },
        {"position": 2, "model": "x:latest", "age": 2.0, "owner": "", "client": "", "priority": "normal"},
    ]
    assert view["clients"] == {}  # first come, first served keeps no counters
    assert view["by_priority"] == {"high": 0, "normal": 2, "low": 0}
    assert view["models"]["x:latest"] == {
        "limit": None, "running": [], "waiting": [{"position": 2, "age": 2.0, "owner": ""}]
    }  # fmt: skip
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await slots[0].__aexit__(None, None, None)
    assert snapshot(admission, draining=False, now=now)["running"] == 0


async def test_queue_and_status_are_admin_only(sim, make_proxy, http):
    proxy = await make_proxy()
    for path in ("/-/queue", "/-/status"):
        async with http.get(proxy.listen_url + path) as resp:
            assert resp.status == 404  # relayed to Ollama, which has no such path
        async with http.get(proxy.admin_url + path) as resp:
            assert resp.status == 200
