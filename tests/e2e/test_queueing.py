"""Admission end to end: the incident in miniature, per-model caps, full and slow queues."""

from __future__ import annotations

import asyncio

import aiohttp

from tests.support import eventually, sample, scrape


async def generate(
    http: aiohttp.ClientSession, base: str, model: str = "llama3.2", **extra
) -> tuple[int, bytes]:
    body = {"model": model, "prompt": "why is the sky blue", **extra}
    async with http.post(base + "/api/generate", json=body) as resp:
        return resp.status, await resp.read()


async def test_ten_streams_through_three_slots_are_complete_and_identical(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 12, 0.02
    direct_status, direct = await generate(http, sim.url)
    assert direct_status == 200 and direct.count(b"\n") == 13
    sim.reset_peak()
    proxy = await make_proxy(limits={"max_concurrent": 3}, heartbeat={"interval": "10s"})

    results = await asyncio.gather(*(generate(http, proxy.listen_url) for _ in range(10)))

    assert sim.peak == 3
    assert [status for status, _ in results] == [200] * 10
    assert all(body == direct for _, body in results)
    metrics = await scrape(http, proxy)
    assert (
        sample(
            metrics,
            "ollama_proxy_requests_total",
            endpoint="/api/generate",
            model="llama3.2:latest",
            code="200",
        )
        == 10
    )
    assert sample(metrics, "ollama_proxy_queue_wait_seconds_count", model="llama3.2:latest") == 10
    assert sample(metrics, "ollama_proxy_in_flight", model="llama3.2:latest") == 0
    assert sample(metrics, "ollama_proxy_queue_depth", model="llama3.2:latest") == 0


async def test_big_model_capped_at_one_while_small_flows_past(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 25, 0.02  # a big answer takes ~0.5 s
    proxy = await make_proxy(limits={"max_concurrent": 3, "models": {"big": 1}})
    bigs = [asyncio.create_task(generate(http, proxy.listen_url, model="big")) for _ in range(3)]
    await sim.wait_until(lambda: sum(r.model == "big" for r in sim.records) == 1)
    # Two bigs now wait behind the cap, ahead of the smalls in the queue's order.
    short = {"options": {"num_predict": 2}}
    smalls = await asyncio.gather(
        *(generate(http, proxy.listen_url, model="small", **short) for _ in range(4))
    )
    assert [status for status, _ in smalls] == [200] * 4
    assert [status for status, _ in await asyncio.gather(*bigs)] == [200] * 3

    big = sorted((r.started_at, r.ended_at) for r in sim.records if r.model == "big")
    small_ends = [r.ended_at for r in sim.records if r.model == "small"]
    assert len(big) == 3 and len(small_ends) == 4
    assert max(small_ends) < big[0][1]  # every small ran while the first big still did
    for (_, end), (start, _) in zip(big, big[1:], strict=False):
        assert start >= end  # never two bigs at once


async def test_full_queue_gets_503_with_retry_after_in_both_shapes(sim, make_proxy, http):
    sim.load_delay = 30  # hold the single slot
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 1}, heartbeat={"interval": "10s"})
    holders = [asyncio.create_task(generate(http, proxy.listen_url)) for _ in range(2)]
    await sim.wait_until(lambda: sim.active == 1)
    await _until_depth(http, proxy, 1)

    async with http.post(proxy.listen_url + "/api/chat", json={"model": "llama3.2"}) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert resp.content_type == "application/json"
        error = (await resp.json())["error"]
        assert error.startswith("queue full: 1 request waiting, max_queue=1")
    async with http.post(
        proxy.listen_url + "/v1/chat/completions", json={"model": "llama3.2", "messages": []}
    ) as resp:
        assert resp.status == 503 and "Retry-After" in resp.headers
        error = (await resp.json())["error"]
        assert error["code"] == "queue_full" and error["type"] == "server_error"
        assert "max_queue=1" in error["message"]
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="queue_full") == 2
    for task in holders:
        task.cancel()
    await asyncio.gather(*holders, return_exceptions=True)


async def test_queue_timeout_is_503_before_any_keepalive(sim, make_proxy, http):
    sim.load_delay = 30
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "queue_timeout": "200ms"}, heartbeat={"interval": "10s"}
    )
    holder = asyncio.create_task(generate(http, proxy.listen_url))
    await sim.wait_until(lambda: sim.active == 1)
    async with http.post(proxy.listen_url + "/api/embed", json={"model": "llama3.2", "input": "x"}) as resp:
        assert resp.status == 503
        assert "Retry-After" in resp.headers
        assert "limits.queue_timeout=200ms" in (await resp.json())["error"]
    assert len(sim.records) == 1  # the timed-out request never reached upstream
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="queue_timeout") == 1
    assert sample(metrics, "ollama_proxy_queue_depth", model="llama3.2:latest") == 0
    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)


async def _until_depth(http, proxy, depth: int) -> None:
    async def reached() -> bool:
        return sample(await scrape(http, proxy), "ollama_proxy_queue_depth", model="llama3.2:latest") == depth

    await eventually(reached)


async def test_a_response_that_waited_says_how_long_in_x_queue_wait(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 10, 0.03  # the first request holds the slot ~0.3 s
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "10s"})
    first = asyncio.create_task(generate(http, proxy.listen_url))
    await sim.wait_until(lambda: sim.active == 1)

    body = {"model": "llama3.2", "prompt": "second"}
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        waited = float(resp.headers["X-Queue-Wait"])
        await resp.read()
    assert 0.05 < waited < 5
    assert (await first)[0] == 200
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        assert float(resp.headers["X-Queue-Wait"]) < 0.05  # a free slot: no wait to speak of


async def test_x_queue_wait_is_absent_once_a_keep_alive_200_went_first(sim, make_proxy, http):
    sim.load_delay = 0.5  # silent upstream: keep-alive frames start the response
    proxy = await make_proxy(heartbeat={"interval": "0.1s"})
    body = {"model": "llama3.2", "prompt": "slow"}
    async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
        assert resp.status == 200
        assert "X-Queue-Wait" not in resp.headers
        first = (await resp.content.readline()).decode()
        assert '"response":""' in first  # a keep-alive frame came first
        await resp.read()
