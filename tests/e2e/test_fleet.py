"""Several Ollama hosts behind one proxy: simulated hosts on loopback, real HTTP.

Per-backend caps, model-aware routing, affinity to the host that has the model
loaded (counted in swaps by the simulators), failover when a host dies, a host
coming back, and a reload adding and removing hosts under load.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
from collections import Counter
from collections.abc import AsyncIterator

import aiohttp
import ollama
import openai
import pytest

from proxy.config import config_from_dict, load_config
from proxy.server import Server
from proxy.sim import Simulator
from tests.support import eventually, proxy_config, sample, scrape

#: Every load loop is bounded in time as well as in count.
BOUND = 60


@pytest.fixture
async def sims() -> AsyncIterator[list[Simulator]]:
    """Three simulated hosts; each test gives them their models and knobs."""
    started = [Simulator() for _ in range(3)]
    for each in started:
        await each.start()
    try:
        yield started
    finally:
        for each in started:
            await each.close()


def fleet_config(backends: dict[str, tuple[Simulator, int]], **sections: dict) -> dict:
    return proxy_config("", **{**FLEET_SECTIONS, "backends": _backends(backends), **sections})


FLEET_SECTIONS: dict = {"health": {"interval": "100ms", "timeout": "1s"}}


def _backends(backends: dict[str, tuple[Simulator, int]]) -> dict:
    return {name: {"url": sim.url, "max_concurrent": most} for name, (sim, most) in backends.items()}


@pytest.fixture
def start(make_proxy):
    """Start a proxy in front of the named hosts ({name: (simulator, max_concurrent)}), once
    each host's model list has been read."""

    async def make(backends: dict[str, tuple[Simulator, int]], **sections: dict) -> Server:
        server = await make_proxy(**{**FLEET_SECTIONS, "backends": _backends(backends), **sections})
        members = [server.state.health.member(name) for name in backends]
        await eventually(lambda: all(m is not None and m.models is not None for m in members), timeout=10)
        return server

    return make


async def generate(http: aiohttp.ClientSession, proxy: Server, model: str, stream: bool = False) -> tuple:
    body = {"model": model, "prompt": "p", "stream": stream}
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        return resp.status, await resp.read()


def ran_on(sim: Simulator, model: str) -> int:
    return sum(1 for record in sim.records if record.model == model)


async def test_each_backend_runs_at_most_its_own_max_concurrent(sims, start, http):
    a, b, _ = sims
    for sim in (a, b):
        sim.token_delay = 0.02
    proxy = await start({"a": (a, 2), "b": (b, 1)})
    assert proxy.state.config.limits.max_concurrent == 3  # the fleet's sum
    async with asyncio.timeout(BOUND):
        answers = await asyncio.gather(*(generate(http, proxy, "llama3.2") for _ in range(15)))
    assert [status for status, _ in answers] == [200] * 15
    assert a.peak <= 2 and b.peak <= 1
    assert len(a.records) + len(b.records) == 15 and a.records and b.records


async def test_a_model_only_one_host_has_reaches_only_it_and_an_unknown_one_is_404(sims, start, http):
    a, b, _ = sims
    a.models, b.models = {"llama3.2"}, {"big"}
    proxy = await start({"a": (a, 2), "b": (b, 2)})
    async with asyncio.timeout(BOUND):
        answers = await asyncio.gather(*(generate(http, proxy, "big") for _ in range(6)))
    assert [status for status, _ in answers] == [200] * 6
    assert ran_on(b, "big") == 6 and not a.records
    status, body = await generate(http, proxy, "nowhere")
    assert status == 404 and json.loads(body) == {"error": "model 'nowhere' not found"}
    assert proxy.state.admission.waiting_total == 0


async def test_affinity_to_the_host_with_the_model_loaded_saves_swaps(sims, start, http):
    """Two models, two hosts that each hold one: the proxy's stream swaps about twice,
    blind round-robin once per request."""
    a, b, _ = sims
    for sim in (a, b):
        sim.models, sim.max_loaded = {"llama3.2", "big"}, 1
    stream = [model for model, _ in zip(itertools.cycle(["llama3.2", "llama3.2", "big", "big"]), range(24))]

    proxy = await start({"a": (a, 1), "b": (b, 1)})
    async with asyncio.timeout(BOUND):
        for model in stream:
            assert (await generate(http, proxy, model))[0] == 200
    routed = a.swaps + b.swaps

    for sim in (a, b):
        sim.swaps = 0
    hosts = itertools.cycle([a, b])
    async with asyncio.timeout(BOUND):
        for model in stream:  # what a balancer blind to loaded models does
            body = {"model": model, "prompt": "p", "stream": False}
            async with http.post(next(hosts).url + "/api/generate", json=body) as resp:
                assert resp.status == 200
    blind = a.swaps + b.swaps
    print(f"swaps for {len(stream)} requests: affinity {routed}, round-robin {blind}")
    assert routed <= 3
    assert blind >= len(stream) - 2


async def test_a_host_killed_mid_run_fails_over_and_nothing_waits_forever(sims, start, http):
    a, b, _ = sims
    for sim in (a, b):
        sim.tokens, sim.token_delay = 20, 0.05
    proxy = await start({"a": (a, 2), "b": (b, 2)})
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(BOUND):
        tasks = [asyncio.create_task(generate(http, proxy, "llama3.2", stream=True)) for _ in range(10)]
        streaming = lambda: sum(1 for r in a.records if r.chunks and r.ended_at is None) == 2  # noqa: E731
        await a.wait_until(streaming, timeout=10)
        died = loop.time()
        await a.close()
        member = proxy.state.health.member("a")
        assert member is not None
        await eventually(lambda: not member.may_run("llama3.2"), timeout=10)
        out_after = loop.time() - died
        answers = await asyncio.gather(*tasks)
    print(f"host a out of rotation {out_after * 1000:.0f} ms after its death")
    assert [status for status, _ in answers] == [200] * 10  # streamed: the status went out first
    cut = [body for _, body in answers if b'"error"' in body.splitlines()[-1]]
    assert len(cut) == 2  # the two running on a end with the in-band error
    assert all(json.loads(body.splitlines()[-1]).get("done") for _, body in answers if body not in cut)
    assert len(b.records) == 8
    await eventually(lambda: member.up is False, timeout=10)
    assert proxy.state.health.up is True

    # The host comes back: it is probed back into rotation and gets requests again.
    await a.start(port=int(a.url.rsplit(":", 1)[1]))
    await eventually(lambda: member.up is True, timeout=10)
    a.token_delay = b.token_delay = 0.0
    async with asyncio.timeout(BOUND):
        await asyncio.gather(*(generate(http, proxy, "llama3.2") for _ in range(8)))
    assert len(a.records) > 2


async def test_a_reload_adds_and_removes_hosts_under_load(sims, start, http):
    a, b, c = sims
    for sim in sims:
        sim.tokens, sim.token_delay = 10, 0.05
    proxy = await start({"a": (a, 2), "b": (b, 2)})
    async with asyncio.timeout(BOUND):
        first = [asyncio.create_task(generate(http, proxy, "llama3.2", stream=True)) for _ in range(4)]
        await a.wait_until(lambda: a.active == 2, timeout=10)
        proxy.apply(config_from_dict(fleet_config({"b": (b, 2), "c": (c, 2)})))
        assert proxy.state.config.limits.max_concurrent == 4
        on_a = len(a.records)
        second = [asyncio.create_task(generate(http, proxy, "llama3.2", stream=True)) for _ in range(6)]
        answers = await asyncio.gather(*first, *second)
    for _, body in answers:
        assert json.loads(body.splitlines()[-1])["done"] is True  # none dropped, a's ran to the end
    assert len(a.records) == on_a == 2
    assert c.records and len(b.records) + len(c.records) == 8
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_requests_total", endpoint="generate", status="200") >= 0


async def test_backends_are_visible_in_metrics_queue_page_and_readiness(sims, start, http):
    a, b, _ = sims
    a.models, b.models = {"llama3.2"}, {"big"}
    proxy = await start({"a": (a, 2), "b": (b, 1)})
    assert (await generate(http, proxy, "big"))[0] == 200
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_backend_up", backend="a") == 1
    assert sample(metrics, "ollama_proxy_backend_max_concurrent", backend="b") == 1
    assert sample(metrics, "ollama_proxy_backend_in_flight", backend="b") == 0
    assert sample(metrics, "ollama_proxy_backend_requests_total", backend="b", code="200") == 1
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        backends = (await resp.json())["upstream"]["backends"]
    assert backends["b"]["max_concurrent"] == 1 and backends["b"]["up"] is True
    assert backends["b"]["loaded"] == ["big:latest"] and backends["a"]["models"] == ["llama3.2:latest"]

    await a.close()
    await eventually(lambda: proxy.state.health.member("a").up is False, timeout=10)
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 200 and (await resp.json())["healthy_backends"] == ["b"]
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        backends = (await resp.json())["upstream"]["backends"]
    assert backends["a"]["up"] is False and "not answering /api/version" in backends["a"]["last_error"]
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_backend_up", backend="a") == 0
    await b.close()
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 503


async def test_the_fleet_looks_like_one_ollama(sims, start, http):
    a, b, c = sims
    a.models, b.models, c.models = {"llama3.2", "small"}, {"llama3.2", "big"}, {"tiny"}
    proxy = await start({"a": (a, 1), "b": (b, 1), "c": (c, 1)})
    listed = await ollama.AsyncClient(host=proxy.listen_url).list()
    assert sorted(m.model for m in listed.models) == [
        "big:latest",
        "llama3.2:latest",
        "small:latest",
        "tiny:latest",
    ]
    models = await openai.AsyncOpenAI(base_url=proxy.listen_url + "/v1", api_key="-").models.list()
    assert sorted(m.id for m in models.data) == [
        "big:latest",
        "llama3.2:latest",
        "small:latest",
        "tiny:latest",
    ]
    for model in ("big", "tiny"):
        assert (await generate(http, proxy, model))[0] == 200
    async with http.get(proxy.listen_url + "/api/ps") as resp:
        assert sorted(m["name"] for m in (await resp.json())["models"]) == ["big:latest", "tiny:latest"]
    shown = await ollama.AsyncClient(host=proxy.listen_url).show("tiny")  # only c has it
    assert "FROM tiny:latest" in (shown.modelfile or "")
    async with http.get(proxy.listen_url + "/api/version") as resp:
        assert resp.status == 200 and "version" in await resp.json()

    await c.close()  # a host that is down is left out of the union
    await eventually(lambda: proxy.state.health.member("c").up is False, timeout=10)
    async with http.get(proxy.listen_url + "/api/tags") as resp:
        assert "tiny:latest" not in [m["name"] for m in (await resp.json())["models"]]
    status, body = await generate(http, proxy, "tiny")
    assert status == 404 and json.loads(body) == {"error": "model 'tiny' not found"}


@pytest.mark.parametrize("seed", [1, 2])
async def test_chaos_with_several_hosts_keeps_every_invariant(sims, start, http, seed):
    """Seeded faults on three hosts (mid-stream deaths, 500s, a host lost and back, one
    refusing), clients leaving: every request ends within bounds with its answer or one
    error, no host runs more than its own limit, none gets a request twice, nothing leaks."""
    rng = random.Random(seed)
    for sim in sims:
        sim.tokens, sim.token_delay = 8, 0.01
    proxy = await start(
        {"a": (sims[0], 2), "b": (sims[1], 2), "c": (sims[2], 1)},
        health={"interval": "100ms", "timeout": "1s", "outage_grace": "20s"},
        timeouts={"read": "2s"},
    )
    ports = {sim: int(sim.url.rsplit(":", 1)[1]) for sim in sims}

    async def client(number: int) -> str:
        body = {"model": "llama3.2", "prompt": f"chaos {number}", "stream": rng.random() < 0.7}
        leave = rng.random() < 0.15
        try:
            async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
                if leave:
                    await resp.content.read(1)
                    return "left"
                data = await resp.read()
        except aiohttp.ClientError as exc:
            return f"client error {exc}"
        last = json.loads(data.strip().splitlines()[-1])
        if last.get("done"):
            return "done"
        assert "error" in last, data[-300:]
        return "error"

    async def trouble() -> None:
        for _ in range(12):
            await asyncio.sleep(rng.uniform(0.05, 0.2))  # arrivals of trouble, not synchronisation
            sim = rng.choice(sims)
            action = rng.choice(["die", "status", "clear", "close", "restart", "refuse"])
            if action in ("die", "status"):
                sim.fault = action
            elif action == "clear":
                sim.fault = None
            elif action in ("close", "refuse"):
                await (sim.close() if action == "close" else sim.refuse())
            else:
                await sim.close()
                await sim.start(port=ports[sim])

    async with asyncio.timeout(BOUND):
        clients = []
        for number in range(60):
            clients.append(asyncio.create_task(client(number)))
            await asyncio.sleep(rng.uniform(0, 0.02))
        chaos = asyncio.create_task(trouble())
        await chaos
        for sim in sims:  # every host back and healthy, so the waiting ones finish
            sim.fault = None
            await sim.close()
            await sim.start(port=ports[sim])
        outcomes = Counter(await asyncio.gather(*clients))
    print(f"seed {seed}: {dict(outcomes)}")
    assert sum(outcomes.values()) == 60 and not any(o.startswith("client error") for o in outcomes)
    for sim, most in zip(sims, (2, 2, 1), strict=True):
        assert sim.peak <= most
    prompts = Counter(json.loads(r.body)["prompt"] for sim in sims for r in sim.records if r.body)
    assert not [p for p, n in prompts.items() if n > 1]  # never sent twice
    admission = proxy.state.admission
    await eventually(lambda: admission.running_total == 0 and admission.waiting_total == 0, timeout=10)
    assert not admission.running_by_backend()


async def test_a_reload_from_the_file_applies_backend_changes(sims, http, tmp_path):
    a, b, _ = sims
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(fleet_config({"a": (a, 1)})))
    server = Server(load_config(path), path)
    await server.start()
    try:
        path.write_text(json.dumps(fleet_config({"b": (b, 3)})))
        assert server.reload() == []
        assert server.state.health.names() == ["b"] and server.config.limits.max_concurrent == 3
        assert (await generate(http, server, "llama3.2"))[0] == 200
        assert len(b.records) == 1 and not a.records
        both = {**fleet_config({"b": (b, 3)}), "upstream": {"url": a.url}}
        path.write_text(json.dumps(both))
        problems = server.reload()
        assert any("upstream.url: give either upstream.url" in p for p in problems)
        assert server.state.health.names() == ["b"]  # the running config stands
    finally:
        await server.stop()
