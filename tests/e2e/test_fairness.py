"""Who goes first, end to end: the real `ollama` and `openai` clients with their keys, the
priority header from aiohttp, and what the queue page, metrics and access log then say."""

from __future__ import annotations

import asyncio
import json
import logging

import ollama
import openai
import pytest

from proxy.config import config_from_dict
from tests.support import eventually, proxy_config, sample, scrape

KEYS = {"flood": "fl-key-0123456789", "light": "li-key-0123456789", "batch": "ba-key-0123456789"}
ACCESS = {
    "keys": {
        "flood": KEYS["flood"],
        "light": KEYS["light"],
        "batch": {"key": KEYS["batch"], "priority": "low", "max_running": 1},
    }
}


def bearer(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[name]}"}


@pytest.mark.parametrize("fairness", ["key", "none"])
async def test_a_light_client_behind_a_flood_waits_about_one_generation_not_the_backlog(
    sim, make_proxy, http, fairness
):
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "max_queue": 50},
        access=ACCESS,
        scheduling={"fairness": fairness},
        heartbeat={"interval": "10s"},
    )
    sim.tokens, sim.token_delay = 4, 0.05
    finished: list[str] = []
    flood_client = ollama.AsyncClient(host=proxy.listen_url, timeout=60, headers=bearer("flood"))

    async def flood(i: int) -> None:
        stream = await flood_client.chat(
            model="llama3.2", messages=[{"role": "user", "content": f"flood {i}"}], stream=True
        )
        async for _ in stream:
            pass
        finished.append(f"flood{i}")

    async def light() -> None:
        async with openai.AsyncOpenAI(
            base_url=proxy.listen_url + "/v1", api_key=KEYS["light"], max_retries=0, timeout=60
        ) as client:
            stream = await client.chat.completions.create(
                model="llama3.2", messages=[{"role": "user", "content": "light"}], stream=True
            )
            async for _ in stream:
                pass
        finished.append("light")

    try:
        floods = [asyncio.create_task(flood(i)) for i in range(6)]
        await eventually(lambda: proxy.state.admission.waiting_total == 5, timeout=20)
        await asyncio.gather(light(), *floods)
    finally:
        await flood_client.close()
    place = finished.index("light")
    if fairness == "key":
        # Behind the one running (and at most one more whose counter tied): not behind the backlog.
        assert place <= 2, finished
    else:
        assert place == 6, finished  # first come, first served: the whole backlog first
    metrics = await scrape(http, proxy)
    label = "light" if fairness == "key" else "other"
    assert sample(metrics, "ollama_proxy_client_cost_total", client=label) > 0


async def test_the_priority_header_may_lower_never_raise_and_orders_the_queue(sim, make_proxy, http, caplog):
    proxy = await make_proxy(limits={"max_concurrent": 1}, access=ACCESS, heartbeat={"interval": "10s"})
    sim.load_delay = 60
    done: list[str] = []

    async def generate(name: str, tag: str, priority: str | None = None) -> int:
        headers = bearer(name) | ({"X-Priority": priority} if priority else {})
        body = {"model": "llama3.2", "prompt": tag, "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body, headers=headers) as resp:
            await resp.read()
            done.append(tag)
            return resp.status

    holder = asyncio.create_task(generate("flood", "holder"))
    await sim.wait_until(lambda: sim.active == 1)
    queued = [
        asyncio.create_task(generate("flood", "lowered", "low")),  # normal key, lowered to low
        asyncio.create_task(generate("batch", "raised", "high")),  # a low key cannot raise itself
        asyncio.create_task(generate("light", "normal", "normal")),
    ]
    await eventually(lambda: proxy.state.admission.waiting_total == 3)
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        view = await resp.json()
    assert [(e["owner"], e["priority"], e["position"]) for e in view["queue"]] == [
        ("light", "normal", 1),
        ("flood", "low", 2),
        ("batch", "low", 3),
    ]
    assert view["by_priority"] == {"high": 0, "normal": 1, "low": 2}
    assert set(view["clients"]) == {"light", "flood", "batch"}
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_queue_depth_by_priority", priority="low") == 2

    with caplog.at_level(logging.INFO, logger="proxy.access"):
        sim.load_delay = 0
        holder.cancel()
        assert await asyncio.gather(*queued) == [200, 200, 200]
    assert done == ["normal", "lowered", "raised"]
    lines = [r.getMessage() for r in caplog.records if r.name == "proxy.access"]
    assert len(lines) >= 3
    fields = [
        r.log_fields for r in caplog.records if r.name == "proxy.access" and r.log_fields["status"] == 200
    ]
    assert {(f["key"], f["fair_client"], f["priority"]) for f in fields} == {
        ("light", "light", "normal"),
        ("flood", "flood", "low"),
        ("batch", "batch", "low"),
    }


@pytest.mark.parametrize(("path", "openai_shape"), [("/api/generate", False), ("/v1/chat/completions", True)])
async def test_an_unknown_priority_is_a_400_naming_the_allowed_values(
    sim, make_proxy, http, path, openai_shape
):
    proxy = await make_proxy(access=ACCESS)
    body = {"model": "llama3.2", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}
    headers = bearer("light") | {"X-Priority": "urgent"}
    async with http.post(proxy.listen_url + path, json=body, headers=headers) as resp:
        assert resp.status == 400
        error = json.loads(await resp.read())["error"]
    message = error["message"] if openai_shape else error
    assert "X-Priority: unknown priority 'urgent'" in message and "high, normal, low" in message
    assert sim.records == []  # nothing reached Ollama


async def test_max_running_passes_a_keys_waiter_over_and_max_queued_bounds_it(sim, make_proxy, http):
    access = {
        "keys": {
            "batch": {"key": KEYS["batch"], "max_running": 1, "max_queued": 1},
            "light": KEYS["light"],
        }
    }
    proxy = await make_proxy(limits={"max_concurrent": 2}, access=access, heartbeat={"interval": "10s"})
    sim.load_delay = 60

    async def generate(name: str) -> tuple[int, str]:
        body = {"model": "llama3.2", "prompt": name, "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body, headers=bearer(name)) as resp:
            return resp.status, (await resp.read()).decode()

    first = asyncio.create_task(generate("batch"))
    await sim.wait_until(lambda: sim.active == 1)
    second = asyncio.create_task(generate("batch"))  # a slot is free, but batch may run only one
    await eventually(lambda: proxy.state.admission.waiting_total == 1)
    assert sim.active == 1
    status, text = await generate("batch")  # its own queue bound: 429 naming the key's setting
    assert status == 429 and "access.keys.batch.max_queued=1" in text
    light = asyncio.create_task(generate("light"))  # passes batch's waiter by
    await sim.wait_until(lambda: sim.active == 2)
    assert proxy.state.admission.waiting_total == 1
    for task in (first, second, light):
        task.cancel()
    await asyncio.gather(first, second, light, return_exceptions=True)
    await eventually(lambda: proxy.state.admission.waiting_total == proxy.state.admission.running_total == 0)


async def test_a_reload_keeps_waiters_places_and_counters(sim, make_proxy, http, tmp_path):
    proxy = await make_proxy(limits={"max_concurrent": 1}, access=ACCESS, heartbeat={"interval": "10s"})
    sim.load_delay = 60

    async def generate(name: str) -> int:
        body = {"model": "llama3.2", "prompt": name, "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body, headers=bearer(name)) as resp:
            await resp.read()
            return resp.status

    tasks = [asyncio.create_task(generate(name)) for name in ("flood", "flood", "light", "flood")]
    await eventually(lambda: proxy.state.admission.waiting_total == 3)
    before = [(s.client, s.enqueued_at) for s in proxy.state.admission.waiting()]
    counters = proxy.state.admission.counters()
    proxy.apply(
        config_from_dict(
            proxy_config(
                sim.url,
                limits={"max_concurrent": 1},
                access=ACCESS,
                heartbeat={"interval": "10s"},
                scheduling={"cost": "requests", "fairness": "ip"},
            )
        )
    )
    assert [(s.client, s.enqueued_at) for s in proxy.state.admission.waiting()] == before
    assert proxy.state.admission.counters() == counters
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.mark.parametrize("stream", [False, True])
async def test_the_cost_charged_is_ollamas_final_count(sim, make_proxy, http, stream):
    proxy = await make_proxy(access=ACCESS)
    sim.tokens = 7
    body = {"model": "llama3.2", "prompt": "count me", "stream": stream}
    async with http.post(proxy.listen_url + "/api/generate", json=body, headers=bearer("light")) as resp:
        lines = [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]
    final = lines[-1]
    expected = final["prompt_eval_count"] + final["eval_count"]
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_client_cost_total", client="light") == expected


async def test_cost_requests_charges_one_per_request(sim, make_proxy, http):
    proxy = await make_proxy(access=ACCESS, scheduling={"cost": "requests"})
    for _ in range(3):
        body = {"model": "llama3.2", "prompt": "x", "stream": True}
        async with http.post(proxy.listen_url + "/api/generate", json=body, headers=bearer("flood")) as resp:
            await resp.read()
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_client_cost_total", client="flood") == 3
