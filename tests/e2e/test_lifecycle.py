"""Live reload and graceful drain, end to end against the simulated Ollama."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from proxy.config import load_config
from proxy.server import Server
from tests.support import eventually, proxy_config, sample, scrape


def write_config(path: Path, upstream: str, **sections) -> Path:
    path.write_text(json.dumps(proxy_config(upstream, **sections)))
    return path


@pytest.fixture
async def served(tmp_path):
    """A proxy started from a file, so reload has something to read; stopped at the end."""
    servers: list[Server] = []

    async def start(path: Path) -> Server:
        server = Server(load_config(path), path)
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        if not server.state.draining:
            await server.stop()


async def stream(http: aiohttp.ClientSession, base: str, model: str = "llama3.2") -> tuple[int, list[dict]]:
    body = {"model": model, "prompt": "reload me"}
    async with http.post(base + "/api/generate", json=body) as resp:
        return resp.status, [json.loads(line) for line in (await resp.read()).splitlines() if line.strip()]


async def test_reload_under_load_moves_the_upstream_peak_and_fails_nothing(sim, http, served, tmp_path):
    sim.tokens, sim.token_delay = 10, 0.03  # ~0.3 s a request
    path = write_config(tmp_path / "config.yaml", sim.url, limits={"max_concurrent": 3, "max_queue": 50})
    proxy = await served(path)
    loop = asyncio.get_running_loop()

    requests = [asyncio.create_task(stream(http, proxy.listen_url)) for _ in range(20)]
    await sim.wait_until(lambda: sim.active == 3)
    assert sim.peak == 3

    write_config(path, sim.url, limits={"max_concurrent": 1, "max_queue": 50})
    assert proxy.reload() == []
    # Running requests finish; the next is admitted only below the new limit.
    await sim.wait_until(lambda: sim.active == 1, timeout=5)
    sim.reset_peak()
    done_before = sum(r.completed for r in sim.records)
    await sim.wait_until(lambda: sum(r.completed for r in sim.records) >= done_before + 3, timeout=5)
    assert sim.peak == 1

    write_config(path, sim.url, limits={"max_concurrent": 3, "max_queue": 50})
    reloaded_at = loop.time()
    assert proxy.reload() == []
    await sim.wait_until(lambda: sim.active == 3, timeout=5)
    took_effect = loop.time() - reloaded_at
    assert took_effect < 0.5, f"raising the limit took {took_effect:.3f}s to admit waiters"

    results = await asyncio.wait_for(asyncio.gather(*requests), 30)
    assert [status for status, _ in results] == [200] * 20
    assert all(lines[-1]["done"] is True for _, lines in results)
    assert sim.peak == 3
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_config_reloads_total", result="success") == 2
    assert sample(metrics, "ollama_proxy_max_concurrent") == 3


async def test_invalid_reload_changes_nothing_and_answers_400_with_every_problem(sim, http, served, tmp_path):
    path = write_config(tmp_path / "config.yaml", sim.url, limits={"max_concurrent": 2})
    proxy = await served(path)
    before = proxy.state.config
    path.write_text("limits:\n  max_concurrent: 0\n  max_queue: lots\nheartbeat:\n  intervall: 5s\n")

    async with http.post(proxy.admin_url + "/-/reload") as resp:
        assert resp.status == 400
        answer = await resp.json()
    assert answer["status"] == "failed"
    problems = "\n".join(answer["problems"])
    assert "limits.max_concurrent: must be an integer >= 1 (got 0)" in problems
    assert 'limits.max_queue: must be an integer >= 0 (got "lots")' in problems
    assert "heartbeat.intervall: unknown key (did you mean interval?)" in problems
    assert proxy.state.config is before
    assert proxy.state.admission.max_concurrent == 2
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_config_reloads_total", result="failure") == 1
    assert sample(metrics, "ollama_proxy_config_reloads_total", result="success") == 0


async def test_post_reload_applies_limits_and_keeps_restart_only_keys(sim, http, served, tmp_path, caplog):
    path = write_config(tmp_path / "config.yaml", sim.url, limits={"max_concurrent": 2})
    proxy = await served(path)
    listen = proxy.state.config.listen
    write_config(
        path, sim.url,
        listen={"port": 1}, limits={"max_concurrent": 4, "models": {"big": 1}},
        heartbeat={"interval": "3s"}, request={"header_timeout": "1s"},
    )  # fmt: skip

    async with http.post(proxy.admin_url + "/-/reload") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "reloaded"}
    config = proxy.state.config
    assert config.listen == listen  # bound at start: kept, and said so
    assert config.request.header_timeout == 10.0
    assert (config.limits.max_concurrent, dict(config.limits.models)) == (4, {"big": 1})
    assert config.heartbeat.interval == 3.0
    warnings = [r.getMessage() for r in caplog.records if "after a restart" in r.getMessage()]
    assert warnings == [
        "reload: listen changed; it takes effect only after a restart",
        "reload: request.header_timeout changed; it takes effect only after a restart",
    ]
    async with http.get(proxy.admin_url + "/-/reload") as resp:
        assert resp.status == 405  # a reload changes state: POST only


async def test_watch_reloads_when_the_file_changes(sim, served, tmp_path):
    path = write_config(tmp_path / "config.yaml", sim.url, limits={"max_concurrent": 2})
    proxy = await served(path)
    watcher = asyncio.create_task(proxy.watch(interval=0.02))
    try:
        write_config(path, sim.url, limits={"max_concurrent": 5})
        await eventually(lambda: proxy.state.admission.max_concurrent == 5)
        path.write_text("limits: [broken")
        await eventually(lambda: proxy.state.metrics.reloads.labels("failure")._value.get() == 1)
        assert proxy.state.admission.max_concurrent == 5
        path.unlink()  # an editor's replace: missing for a moment is not a change
        write_config(path, sim.url, limits={"max_concurrent": 1})
        await eventually(lambda: proxy.state.admission.max_concurrent == 1)
    finally:
        watcher.cancel()


# --- drain ---------------------------------------------------------------------


async def test_drain_serves_running_and_queued_to_the_end_and_refuses_newcomers(sim, http, served, tmp_path):
    sim.tokens, sim.token_delay = 10, 0.03
    path = write_config(tmp_path / "config.yaml", sim.url, limits={"max_concurrent": 1}, shutdown_grace="10s")
    proxy = await served(path)
    loop = asyncio.get_running_loop()
    requests = [asyncio.create_task(stream(http, proxy.listen_url)) for _ in range(3)]
    await sim.wait_until(lambda: sim.active == 1)
    await eventually(lambda: proxy.state.admission.waiting_total == 2)

    started = loop.time()
    stopping = asyncio.create_task(proxy.stop())
    await eventually(lambda: proxy.state.draining)
    async with http.get(proxy.admin_url + "/-/ready") as resp:
        assert resp.status == 503
        assert "draining" in (await resp.json())["reason"]
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) >= 1
        assert "shutting down" in (await resp.json())["error"]
    async with http.post(proxy.listen_url + "/v1/chat/completions", json={"model": "llama3.2"}) as resp:
        assert resp.status == 503
        assert (await resp.json())["error"]["code"] == "draining"

    results = await asyncio.gather(*requests)
    await asyncio.wait_for(stopping, 5)
    assert [status for status, _ in results] == [200] * 3
    assert all(lines[-1]["done"] is True for _, lines in results)
    assert loop.time() - started < 5  # it ended when the work did, not at the grace
    assert len(sim.records) == 3


async def test_drain_cuts_what_outlives_the_grace_with_an_error_in_every_phase(sim, http, served, tmp_path):
    sim.tokens, sim.token_delay = 200, 0.05  # 10 s: longer than the grace
    path = write_config(
        tmp_path / "config.yaml", sim.url,
        limits={"max_concurrent": 2}, heartbeat={"interval": "0.2s", "non_streaming": False},
        shutdown_grace="0.6s",
    )  # fmt: skip
    proxy = await served(path)
    loop = asyncio.get_running_loop()

    running = asyncio.create_task(stream(http, proxy.listen_url))  # generating
    await sim.wait_until(lambda: sim.active == 1)
    sim.load_delay = 30
    loading = asyncio.create_task(stream(http, proxy.listen_url))  # admitted, upstream still loading
    await sim.wait_until(lambda: sim.active == 2)
    beating = asyncio.create_task(stream(http, proxy.listen_url))  # queued, keep-alive 200 out

    async def silent() -> tuple[int, dict, str | None]:
        body = {"model": "llama3.2", "prompt": "x", "stream": False}  # non_streaming: false
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            return resp.status, await resp.json(), resp.headers.get("Retry-After")

    quiet = asyncio.create_task(silent())  # queued, nothing sent yet
    await eventually(lambda: proxy.state.admission.waiting_total == 2)
    await eventually(lambda: proxy.state.metrics.heartbeats._value.get() >= 2)

    started = loop.time()
    await asyncio.wait_for(proxy.stop(), 5)
    took = loop.time() - started
    assert 0.6 <= took < 3.0

    status, lines = await running
    assert status == 200
    assert lines[0]["response"] != ""  # it was generating
    assert "shutdown_grace" in lines[-1]["error"]
    for task in (loading, beating):  # both had only keep-alive frames so far
        status, lines = await task
        assert status == 200 and lines[0]["response"] == "" and "shutdown_grace" in lines[-1]["error"]
    status, body, retry = await quiet
    assert (status, retry) == (503, "1")
    assert "shutdown_grace=600ms" in body["error"]

    for record in sim.records:  # upstream was told, by its connection closing
        await sim.wait_until(lambda record=record: record.peer_closed_at is not None)
        assert not record.completed
    assert len(sim.records) == 2  # the queued ones never reached upstream
    assert proxy.state.admission.running_total == proxy.state.admission.waiting_total == 0
    assert not proxy.state.requests
    text = proxy.state.metrics.render().decode()  # the admin port is closed by now
    assert (
        'ollama_proxy_requests_total{code="503",endpoint="/api/generate",model="llama3.2:latest"} 4.0' in text
    )


async def test_reloaded_keys_apply_to_the_next_request(sim, http, served, tmp_path):
    path = write_config(tmp_path / "config.yaml", sim.url, access={"keys": {"alice": "old-key-1"}})
    proxy = await served(path)

    async def status(key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with http.get(proxy.listen_url + "/api/tags", headers=headers) as resp:
            return resp.status

    assert (await status("old-key-1"), await status("new-key-2")) == (200, 401)
    write_config(path, sim.url, access={"keys": {"alice": "new-key-2"}})
    assert proxy.reload() == []
    assert (await status("old-key-1"), await status("new-key-2")) == (401, 200)
