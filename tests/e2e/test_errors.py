"""Every error row of the contract, before a response has started, in both shapes."""

from __future__ import annotations

import socket

import pytest

from tests.support import eventually, sample, scrape


@pytest.mark.parametrize(
    "body, message",
    [
        (b"not json", "request body is not valid JSON"),
        (b"[1, 2]", "request body must be a JSON object (got array)"),
        (b"{}", '"model" must be a non-empty string (got missing)'),
        (b'{"model": 7}', '"model" must be a non-empty string (got number)'),
        (b'{"model": ""}', '"model" must be a non-empty string (got string)'),
        (b'{"model": "m", "stream": "yes"}', '"stream" must be true or false (got string)'),
        (b"\xff\xfe{", "request body is not valid JSON"),
        (b"[" * 100_000, "request body is not valid JSON"),
        (b'{"model": "m", "n": 1' + b"0" * 5000 + b"}", "request body is not valid JSON"),
    ],
)
async def test_bad_bodies_on_queued_paths_get_400(sim, make_proxy, http, body, message):
    proxy = await make_proxy()
    async with http.post(proxy.listen_url + "/api/generate", data=body) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].startswith(message)
    assert sim.records == []


async def test_bad_request_on_v1_uses_the_openai_shape(sim, make_proxy, http):
    proxy = await make_proxy()
    async with http.post(proxy.listen_url + "/v1/chat/completions", data=b"{}") as resp:
        assert resp.status == 400
        error = (await resp.json())["error"]
        assert error == {
            "message": '"model" must be a non-empty string (got missing)',
            "type": "invalid_request_error",
            "code": "bad_request",
        }
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="bad_request") == 1


async def test_body_over_max_body_gets_413_declared_or_streamed(sim, make_proxy, http):
    proxy = await make_proxy(request={"max_body": "1KiB"})
    big = b'{"model":"llama3.2","prompt":"' + b"x" * 2000 + b'"}'
    async with http.post(proxy.listen_url + "/api/generate", data=big) as resp:
        assert resp.status == 413
        assert "request.max_body=1 KiB" in (await resp.json())["error"]

    async def trickle():
        for i in range(0, len(big), 100):
            yield big[i : i + 100]

    async with http.post(proxy.listen_url + "/api/generate", data=trickle()) as resp:
        assert resp.status == 413  # chunked, no Content-Length: cut off while reading
    async with http.post(proxy.listen_url + "/api/generate", data=big[:900] + b'"}') as resp:
        assert resp.status != 413
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="too_large") == 2
    assert sim.records[-1].completed and len(sim.records) == 1


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_unreachable_upstream_gets_502(make_proxy, http, caplog):
    """Relayed at once: the 502, which says what failed, not where upstream lives (that and the
    advice are the log's). A generation, once the proxy knows upstream is down (and with no
    outage grace to wait in): the 503 with Retry-After; see test_outage for the waiting."""
    upstream = f"http://127.0.0.1:{_closed_port()}"
    proxy = await make_proxy(upstream=upstream, health={"outage_grace": "0s", "interval": "30s"})
    async with http.get(proxy.listen_url + "/v1/models") as resp:
        assert resp.status == 502
        assert await resp.json() == {
            "error": {
                "message": "upstream is unreachable; retry later",
                "type": "server_error",
                "code": "upstream_error",
            }
        }
    logged = [r.getMessage() for r in caplog.records if r.name == "proxy.handler"]
    assert len(logged) == 1
    assert f"cannot reach upstream {upstream}: " in logged[0]
    assert logged[0].endswith("; is Ollama running there? (upstream.url)")
    await eventually(lambda: proxy.state.health.up is False, timeout=10)
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "m"}) as resp:
        assert resp.status == 503 and resp.headers["Retry-After"] == "30"
        assert "upstream (Ollama) has been unreachable" in (await resp.json())["error"]
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_upstream_errors_total", kind="connect") == 1
    assert sample(metrics, "ollama_proxy_rejected_total", reason="upstream_down") == 1
    assert sample(metrics, "ollama_proxy_upstream_up") == 0


@pytest.mark.parametrize(
    "fault, answer, logged",
    [
        (
            "garbage",
            b'{"error":"upstream closed the connection before answering; retry later"}',
            "upstream {url} closed the connection before answering: ",
        ),
        (
            "hang_headers",
            b'{"error":"upstream sent nothing for 300ms; the model may be stuck, retry later"}',
            "upstream {url} sent nothing for 300ms (timeouts.read); the model may be stuck or the timeout too short",
        ),
    ],
)
async def test_upstream_failures_say_what_failed_and_log_where(
    sim, make_proxy, http, caplog, fault, answer, logged
):
    sim.fault = fault
    proxy = await make_proxy(timeouts={"read": "300ms"}, heartbeat={"interval": "10s"})
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        assert (resp.status, await resp.read()) == (502 if fault == "garbage" else 504, answer)
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.handler"]
    assert logged.format(url=sim.url) in line


async def test_upstream_breaking_off_mid_stream_says_so_in_band_and_logs_where(sim, make_proxy, http, caplog):
    sim.fault, sim.fault_after = "die", 2
    proxy = await make_proxy()
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        lines = (await resp.read()).splitlines()
    assert len(lines) == 3
    assert lines[-1] == b'{"error":"upstream broke off the response; retry the request"}'
    [line] = [r.getMessage() for r in caplog.records if r.name == "proxy.handler"]
    assert f"upstream {sim.url} broke off the response: " in line


async def test_upstream_silent_past_read_timeout_gets_504(sim, make_proxy, http):
    sim.fault = "hang_headers"
    proxy = await make_proxy(timeouts={"read": "300ms"}, heartbeat={"interval": "10s"})
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        assert resp.status == 504
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_upstream_errors_total", kind="timeout") == 1
    assert sample(metrics, "ollama_proxy_in_flight", model="llama3.2:latest") == 0


async def test_upstream_statuses_and_bodies_are_relayed_unchanged(sim, make_proxy, http):
    proxy = await make_proxy()
    for path, body in (
        ("/api/generate", {"model": "nope", "prompt": "x"}),
        ("/v1/chat/completions", {"model": "nope", "messages": []}),
        ("/api/show", {"model": "nope"}),
    ):
        async with http.post(sim.url + path, json=body) as direct:
            expected = (direct.status, direct.content_type, await direct.read())
        async with http.post(proxy.listen_url + path, json=body) as resp:
            assert (resp.status, resp.content_type, await resp.read()) == expected
            assert expected[0] == 404
    sim.fault, sim.fault_status = "status", 500
    async with http.post(proxy.listen_url + "/api/chat", json={"model": "llama3.2"}) as resp:
        assert resp.status == 500
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_upstream_errors_total", kind="status") == 1
    assert (
        sample(
            metrics, "ollama_proxy_requests_total", endpoint="/api/chat", model="llama3.2:latest", code="500"
        )
        == 1
    )
