"""The admin listener: metrics and health on their own port, and only there."""

from __future__ import annotations

import re
import socket

from tests.support import sample, scrape

CONTRACT_METRICS = {
    "ollama_proxy_requests_total": "counter",
    "ollama_proxy_queue_depth": "gauge",
    "ollama_proxy_in_flight": "gauge",
    "ollama_proxy_max_concurrent": "gauge",
    "ollama_proxy_queue_wait_seconds": "histogram",
    "ollama_proxy_request_duration_seconds": "histogram",
    "ollama_proxy_rejected_total": "counter",
    "ollama_proxy_client_disconnects_total": "counter",
    "ollama_proxy_heartbeats_total": "counter",
    "ollama_proxy_upstream_errors_total": "counter",
}


async def test_every_contract_metric_is_exposed_with_its_type(sim, make_proxy, http):
    proxy = await make_proxy(limits={"models": {"gpt-oss:120b": 1}})
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        await resp.read()
    async with http.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=")
        text = await resp.text()
    for name, kind in CONTRACT_METRICS.items():
        family = name.removesuffix("_total")
        assert f"# TYPE {family} {kind}" in text or f"# TYPE {name} {kind}" in text, name
    metrics = await scrape(http, proxy)
    # Known series exist at 0 before anything happens to them.
    for reason in ("queue_full", "queue_timeout", "bad_request", "too_large"):
        assert ("ollama_proxy_rejected_total", (("reason", reason),)) in metrics
    assert ("ollama_proxy_queue_depth", (("model", "gpt-oss:120b"),)) in metrics
    assert sample(metrics, "ollama_proxy_max_concurrent") == 3
    # Buckets reach past 300 s: generations take minutes.
    assert sample(
        metrics, "ollama_proxy_request_duration_seconds_bucket",
        endpoint="/api/generate", model="llama3.2:latest", le="450.0",
    ) == 1  # fmt: skip


async def test_model_label_only_for_configured_or_listed_models(sim, make_proxy, http):
    """55 junk names (issue 8) once used up the label budget, and real models became "other"
    for good. Now only the config and upstream's list give a model its own label."""
    proxy = await make_proxy(limits={"models": {"gpt-oss:120b": 1}})
    for i in range(55):
        async with http.post(proxy.listen_url + "/api/generate", json={"model": f"m{i}"}) as resp:
            assert resp.status == 404
    for model in ("llama3.2", "small"):
        async with http.post(proxy.listen_url + "/api/generate", json={"model": model}) as resp:
            assert resp.status == 200
            await resp.read()
    metrics = await scrape(http, proxy)
    models = {dict(labels)["model"] for (name, labels) in metrics if name == "ollama_proxy_requests_total"}
    assert models == {"other", "llama3.2:latest", "small:latest"}
    assert (
        sample(metrics, "ollama_proxy_requests_total", endpoint="/api/generate", model="other", code="404")
        == 55
    )
    depth = {dict(labels)["model"] for (name, labels) in metrics if name == "ollama_proxy_queue_depth"}
    assert depth == {"gpt-oss:120b", "other", "llama3.2:latest", "small:latest"}


async def test_listen_port_serves_none_of_the_admin_paths(sim, make_proxy, http):
    proxy = await make_proxy()
    for path in ("/metrics", "/-/healthy", "/-/ready"):
        async with http.get(proxy.listen_url + path) as direct_through_proxy:
            body = await direct_through_proxy.read()
        async with http.get(sim.url + path) as upstream:
            assert (direct_through_proxy.status, body) == (upstream.status, await upstream.read())
            assert upstream.status == 404  # relayed to Ollama, which has no such path
        assert b"ollama_proxy" not in body


async def test_healthy_and_ready(sim, make_proxy, http):
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/-/healthy") as resp:
        assert resp.status == 200
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 200
        assert (await resp.json())["upstream_version"]
    proxy.state.draining = True
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["reason"]


async def test_ready_is_503_with_the_reason_when_upstream_is_down(make_proxy, http):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{s.getsockname()[1]}"
    proxy = await make_proxy(upstream=dead)
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 503
        reason = (await resp.json())["reason"]
        assert re.match(rf"upstream {re.escape(dead)} not answering /api/version", reason)
    async with http.get(proxy.admin_url + "/-/healthy") as resp:
        assert resp.status == 200  # alive, just not ready
