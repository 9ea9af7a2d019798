"""Ollama down or restarting, and models upstream does not list (issue 8, items 2 and 4).

The simulated Ollama is closed and started again on the same port under load,
with streaming and non-streaming clients waiting (the official `ollama` and
`openai` clients among them).
"""

from __future__ import annotations

import asyncio
import json
from urllib.parse import urlsplit

import aiohttp
import ollama
import openai

from proxy.sim import Simulator
from tests.support import eventually, hold_the_slot, release, sample, scrape

MESSAGES = [{"role": "user", "content": "hello"}]


async def restart(sim: Simulator) -> None:
    await sim.start(port=urlsplit(sim.url).port or 0)


async def body_of(resp: aiohttp.ClientResponse) -> bytes:
    """The body, or b"<cut>" where a failed non-streaming body is cut off unfinished (the contract)."""
    try:
        return await resp.read()
    except aiohttp.ClientPayloadError:
        return b"<cut>"


async def test_a_restart_costs_no_waiting_request(sim, make_proxy, http):
    """30 clients wait behind 2 slots; Ollama dies and comes back on the same port: all 30 answered."""
    proxy = await make_proxy(
        limits={"max_concurrent": 2}, heartbeat={"interval": "200ms"}, health={"interval": "300ms"}
    )
    sim.load_delay = 60  # the first two hold the slots until Ollama dies under them
    url = proxy.listen_url

    async def raw(n: int) -> tuple[int, bytes]:
        path = ("/api/generate", "/api/chat", "/v1/chat/completions")[n % 3]
        body = {"model": "llama3.2", "prompt": "p", "messages": MESSAGES, "stream": n % 2 == 0}
        async with http.post(url + path, json=body) as resp:
            return resp.status, await body_of(resp)

    async def with_ollama() -> str:
        client = ollama.AsyncClient(host=url)
        response = await client.chat("llama3.2", MESSAGES, stream=False)
        return response.message.content

    async def with_openai() -> str:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0) as client:
            stream = await client.chat.completions.create(model="llama3.2", messages=MESSAGES, stream=True)
            return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    running = [asyncio.create_task(raw(n)) for n in range(2)]
    await sim.wait_until(lambda: sim.active == 2)
    waiting = [asyncio.create_task(raw(n)) for n in range(26)]
    waiting += [asyncio.create_task(with_ollama()) for _ in range(2)]
    waiting += [asyncio.create_task(with_openai()) for _ in range(2)]
    await eventually(lambda: proxy.state.admission.waiting_total == 30, timeout=10)

    await sim.close()  # the running two are cut; the waiting must not be admitted into the gap
    admission = proxy.state.admission
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    await eventually(lambda: (admission.waiting_total, admission.running_total) == (30, 0), timeout=10)
    sim.load_delay = 0
    await restart(sim)

    results = await asyncio.wait_for(asyncio.gather(*waiting), timeout=30)
    for status, body in results[:26]:
        assert status == 200 and b'"error"' not in body, body
    assert all(isinstance(text, str) and text for text in results[26:])
    for task in running:  # running when Ollama died: its error (in-band once keep-alive began), no replay
        status, body = await task
        assert status in (200, 502) and (b"error" in body or body == b"<cut>")
        assert b"cannot reach upstream" not in body
    assert len(sim.records) == 2 + 30  # each reached upstream once: none was sent twice
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="upstream_down") == 0


async def test_a_request_that_cannot_connect_keeps_its_place_in_arrival_order(sim, make_proxy, http):
    """Upstream dies between probes: the first request admitted into the gap goes back to the head."""
    proxy = await make_proxy(limits={"max_concurrent": 1}, health={"interval": "300ms"})
    await eventually(lambda: proxy.state.health.up is True, timeout=10)
    await sim.close()  # the first request (or the next probe) finds out
    order: list[int] = []

    async def one(n: int) -> None:
        body = {"model": "llama3.2", "prompt": f"p{n}", "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            assert resp.status == 200
            json.loads(await resp.read())
        order.append(n)

    tasks = [asyncio.create_task(one(0))]
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    await eventually(lambda: proxy.state.admission.waiting_total == 1, timeout=10)
    for n in range(1, 4):
        tasks.append(asyncio.create_task(one(n)))
        await eventually(lambda n=n: proxy.state.admission.waiting_total == n + 1, timeout=10)
    assert [s.position() for s in proxy.state.admission.waiting()] == [(i, 4) for i in range(1, 5)]
    await restart(sim)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=20)
    assert order == [0, 1, 2, 3]
    assert [json.loads(r.body)["prompt"] for r in sim.records] == ["p0", "p1", "p2", "p3"]


async def test_a_failed_connection_counts_while_its_request_keeps_waiting(sim, make_proxy, http):
    """The connect error shows in /metrics during the outage, not only once its request ends
    (which may be `health.outage_grace` later): the alert on connect errors needs it now."""
    proxy = await make_proxy(limits={"max_concurrent": 1}, health={"interval": "60s", "outage_grace": "60s"})
    await eventually(lambda: proxy.state.health.up is True, timeout=10)
    await sim.close()  # no probe before the request's own connection finds out

    async def ask() -> None:
        body = {"model": "llama3.2", "prompt": "p", "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            await resp.read()

    waiting = asyncio.create_task(ask())
    try:
        admission = proxy.state.admission
        await eventually(lambda: proxy.state.health.up is False and admission.waiting_total == 1, timeout=10)
        metrics = await scrape(http, proxy)
        assert sample(metrics, "ollama_proxy_upstream_errors_total", kind="connect") == 1
        assert not waiting.done()
    finally:
        waiting.cancel()
        await asyncio.gather(waiting, return_exceptions=True)


async def test_an_outage_past_the_grace_answers_503_then_recovers(sim, make_proxy, http):
    proxy = await make_proxy(
        limits={"max_concurrent": 1},
        heartbeat={"interval": "100ms"},
        health={"interval": "200ms", "outage_grace": "1500ms"},
    )
    await eventually(lambda: proxy.state.health.up is True, timeout=10)
    await sim.close()
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    url = proxy.listen_url
    streaming = http.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "p"})
    plain = http.post(url + "/api/generate", json={"model": "llama3.2", "prompt": "p", "stream": False})
    sse = http.post(url + "/v1/chat/completions", json={"model": "llama3.2", "messages": [], "stream": True})
    async with streaming as a, plain as b, sse as c:
        # Keep-alive went out while they waited: the 503 comes in-band.
        assert (a.status, b.status, c.status) == (200, 200, 200)
        ndjson, sse_body, plain_body = await a.read(), await c.read(), await body_of(b)
    assert plain_body == b"<cut>" or b"upstream (Ollama) has been unreachable" in plain_body
    last = json.loads(ndjson.splitlines()[-1])
    assert "upstream (Ollama) has been unreachable" in last["error"]
    assert b'"error"' in sse_body.split(b"\n\n")[-2]

    async with http.post(url + "/api/chat", json={"model": "llama3.2", "messages": []}) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "1"  # at once, no keep-alive
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="upstream_down") == 4
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        upstream = (await resp.json())["upstream"]
    assert upstream["up"] is False and upstream["down_for"] >= 1.5
    assert "not answering /api/version" in upstream["last_error"] and "llama3.2:latest" in upstream["models"]
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 503 and "not answering /api/version" in (await resp.json())["reason"]
    assert sample(metrics, "ollama_proxy_upstream_up") == 0

    await restart(sim)
    await eventually(lambda: proxy.state.health.up is True, timeout=10)
    async with http.post(
        url + "/api/chat", json={"model": "llama3.2", "messages": [], "stream": False}
    ) as resp:
        assert resp.status == 200
        assert json.loads(await resp.read())["done"] is True


async def test_no_grace_means_502_at_once_then_503_while_down(sim, make_proxy, http):
    proxy = await make_proxy(health={"interval": "1h", "outage_grace": "0s"})
    await eventually(lambda: proxy.state.health.up is True, timeout=10)
    await sim.close()  # the proxy cannot know yet: the first request finds out
    body = {"model": "llama3.2", "prompt": "p", "stream": False}
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        assert resp.status == 502
        assert (await resp.json())["error"] == "upstream is unreachable; retry later"
    # The failed connection woke a probe; with it, health.unhealthy_after=2 failures in a row.
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers


async def test_unknown_model_is_ollamas_404_at_once_and_a_new_pull_is_seen(sim, make_proxy, http):
    proxy = await make_proxy(
        limits={"max_concurrent": 1}, heartbeat={"interval": "100ms"}, health={"interval": "1h"}
    )
    await eventually(lambda: proxy.state.health.models is not None, timeout=10)
    holder = await hold_the_slot(sim, http, proxy)  # for a minute: a queued request would wait that long
    url = proxy.listen_url
    try:
        async with asyncio.timeout(5):
            async with http.post(url + "/api/generate", json={"model": "nope"}) as resp:
                assert (resp.status, await resp.read()) == (404, b'{"error":"model \'nope\' not found"}')
                assert resp.headers["Content-Type"] == "application/json; charset=utf-8"
            async with http.post(url + "/v1/embeddings", json={"model": "nope", "input": "x"}) as resp:
                assert resp.status == 404 and resp.headers["Content-Type"] == "application/json"
                assert await resp.read() == (
                    b'{"error":{"message":"model \'nope\' not found","type":"not_found_error",'
                    b'"param":null,"code":null}}\n'
                )
            # Pulled after the proxy's last read (the next is an hour away): read again before refusing.
            sim.models.add("fresh")
            responses = await asyncio.gather(
                *(http.post(url + "/api/generate", json={"model": "Fresh:latest"}) for _ in range(3))
            )
            for resp in responses:
                assert resp.status == 200  # queued behind the holder (its keep-alive), not refused
                resp.close()
    finally:
        await release(holder)
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="model_not_found") == 2
    assert [r.model for r in sim.records] == ["llama3.2"]  # the 404s never reached upstream


async def test_an_unknown_model_asked_during_an_outage_gets_ollamas_404_once_upstream_is_back(
    sim, make_proxy, http
):
    """Nothing could say "not found" while Ollama was down, so the request waited; once Ollama
    answers and lists no such model, it gets the 404 it would have had (it used to wait, never
    placed, until limits.queue_timeout)."""
    proxy = await make_proxy(heartbeat={"interval": "30s"}, health={"interval": "200ms"})
    await eventually(lambda: proxy.state.health.models is not None, timeout=10)
    await sim.close()
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    url = proxy.listen_url

    async def generate(model: str) -> tuple[int, bytes]:
        async with http.post(url + "/api/generate", json={"model": model, "stream": False}) as resp:
            return resp.status, await resp.read()

    unknown = asyncio.create_task(generate("Nope"))
    known = asyncio.create_task(generate("llama3.2"))
    await eventually(lambda: proxy.state.admission.waiting_total == 2, timeout=10)
    await restart(sim)
    async with asyncio.timeout(10):
        assert await unknown == (404, b'{"error":"model \'Nope\' not found"}')  # as the client spelled it
        assert (await known)[0] == 200
    assert [r.model for r in sim.records] == ["llama3.2"]
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="model_not_found") == 1
