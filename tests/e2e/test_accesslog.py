"""The access log and the log configuration end to end: one line per request, and
`log.level`/`log.format` for every log line of the process (the line itself, the formatters
and the client's address are unit-tested in tests/unit/observe)."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import socket
import sys
from pathlib import Path

import aiohttp
import pytest

from proxy.observe import logs
from tests.support import REPO, eventually, hold_the_slot, proxy_config, release, running_proxy

PROMPT = "the-secret-prompt-xyzzy"
SECRETS = (PROMPT, "secret-123", "hunter2")
AUTH = {"Authorization": "Bearer secret-123"}


# --- end to end: one line per outcome -----------------------------------------------


@pytest.fixture
def captured(caplog) -> pytest.LogCaptureFixture:
    """Every record of every logger, so a test can also show what never gets logged."""
    caplog.set_level(logging.DEBUG)
    return caplog


def access_lines(caplog: pytest.LogCaptureFixture) -> list[dict]:
    return [r.log_fields for r in caplog.records if r.name == "proxy.access"]


async def only_access(caplog: pytest.LogCaptureFixture, count: int = 1) -> list[dict]:
    """The access lines once `count` requests have ended (the handler logs after the client has its bytes)."""
    await eventually(lambda: len(access_lines(caplog)) >= count)
    lines = access_lines(caplog)
    assert len(lines) == count, lines
    return lines


def assert_no_secrets(caplog: pytest.LogCaptureFixture) -> None:
    """Neither the prompt, a credential nor a query string, in any record in any format."""
    text, json_ = logs.TextFormatter(), logs.JsonFormatter()
    for record in caplog.records:
        for rendered in (record.getMessage(), text.format(record), json_.format(record)):
            for secret in SECRETS:
                assert secret not in rendered, (secret, rendered)


def chat(model: str = "llama3.2", stream: bool = True) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": PROMPT}], "stream": stream}


def expect(line: dict, **fields: object) -> None:
    assert {k: line[k] for k in fields} == fields


async def test_ok_streaming_line(make_proxy, sim, http, captured) -> None:
    proxy = await make_proxy()
    headers = {**AUTH, "CF-Connecting-IP": "203.0.113.7"}
    async with http.post(
        proxy.listen_url + "/api/chat?api_key=hunter2", json=chat(), headers=headers
    ) as resp:
        assert resp.status == 200
        body = await resp.read()
    [line] = await only_access(captured)
    expect(
        line, client="203.0.113.7", method="POST", path="/api/chat", model="llama3.2:latest", key=None,
        status=200, outcome="ok", bytes=len(body),
    )  # fmt: skip
    assert 0 <= line["wait"] < 1 and line["wait"] <= line["duration"] < 5
    assert (line["prompt_tokens"], line["completion_tokens"]) == (1, sim.tokens)  # the prompt is one word
    assert_no_secrets(captured)


async def test_headers_of_an_untrusted_peer_are_ignored(make_proxy, http, captured) -> None:
    proxy = await make_proxy(listen={"trusted_proxies": ["10.0.0.0/8"]})
    headers = {"CF-Connecting-IP": "203.0.113.7", "X-Forwarded-For": "198.51.100.1"}
    async with http.get(proxy.listen_url + "/api/tags?token=hunter2", headers=headers) as resp:
        body = await resp.read()
    [line] = await only_access(captured)
    expect(
        line, client="127.0.0.1", method="GET", path="/api/tags", model=None, status=200, outcome="ok",
        wait=None, bytes=len(body), prompt_tokens=None, completion_tokens=None,
    )  # fmt: skip
    assert_no_secrets(captured)


async def test_upstream_status_line(make_proxy, http, captured) -> None:
    proxy = await make_proxy()
    async with http.post(
        proxy.listen_url + "/api/chat", json=chat("nope", stream=False), headers=AUTH
    ) as resp:
        assert resp.status == 404
        body = await resp.read()
    [line] = await only_access(captured)
    expect(
        line, path="/api/chat", model="nope:latest", status=404, outcome="upstream_status", bytes=len(body)
    )
    assert body and line["wait"] is not None
    assert_no_secrets(captured)


async def test_client_gone_lines_queued_and_running(make_proxy, sim, http, captured) -> None:
    proxy = await make_proxy(limits={"max_concurrent": 1})
    holder = await hold_the_slot(sim, http, proxy)

    async def queued() -> None:
        async with http.post(proxy.listen_url + "/api/chat", json=chat(), headers=AUTH) as resp:
            await resp.read()

    waiter = asyncio.create_task(queued())
    await eventually(lambda: proxy.state.admission.waiting_total == 1)
    await release(waiter)
    [gone_queued] = await only_access(captured)
    expect(
        gone_queued, path="/api/chat", model="llama3.2:latest", status=499, outcome="client_gone", wait=None
    )
    await release(holder)
    [_, gone_running] = await only_access(captured, 2)
    expect(
        gone_running,
        path="/api/generate",
        model="llama3.2:latest",
        status=499,
        outcome="client_gone",
        bytes=0,
    )
    assert gone_running["wait"] is not None
    assert_no_secrets(captured)


async def test_queue_full_and_queue_timeout_lines(make_proxy, sim, http, captured) -> None:
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 1, "queue_timeout": "200ms"})
    holder = await hold_the_slot(sim, http, proxy)

    async def post() -> tuple[int, bytes]:
        async with http.post(proxy.listen_url + "/api/chat", json=chat(), headers=AUTH) as resp:
            return resp.status, await resp.read()

    waiter = asyncio.create_task(post())
    await eventually(lambda: proxy.state.admission.waiting_total == 1)
    full_status, full_body = await post()
    timeout_status, timeout_body = await waiter
    assert (full_status, timeout_status) == (503, 503)
    full, timed_out = await only_access(captured, 2)
    expect(
        full,
        path="/api/chat",
        model="llama3.2:latest",
        status=503,
        outcome="queue_full",
        bytes=len(full_body),
    )
    expect(timed_out, status=503, outcome="queue_timeout", wait=None, bytes=len(timeout_body))
    assert 0.2 <= timed_out["duration"] < 2
    await release(holder)
    assert_no_secrets(captured)


async def test_bad_request_and_too_large_lines(make_proxy, http, captured) -> None:
    proxy = await make_proxy(request={"max_body": "1KiB"})
    async with http.post(proxy.listen_url + "/api/chat", data=PROMPT.encode(), headers=AUTH) as resp:
        assert resp.status == 400
        bad_body = await resp.read()
    big = {"model": "llama3.2", "prompt": PROMPT * 100}
    async with http.post(proxy.listen_url + "/api/generate?key=hunter2", json=big, headers=AUTH) as resp:
        assert resp.status == 413
        large_body = await resp.read()
    bad, large = await only_access(captured, 2)
    expect(bad, path="/api/chat", model=None, status=400, outcome="bad_request", wait=None)
    expect(large, path="/api/generate", model=None, status=413, outcome="too_large", wait=None)
    assert bad_body and large_body
    assert (bad["bytes"], large["bytes"]) == (len(bad_body), len(large_body))
    assert_no_secrets(captured)


async def test_upstream_error_line(sim, make_proxy, http, captured) -> None:
    sim.fault = "garbage"  # not HTTP: an upstream error (a dead upstream would be waited for)
    proxy = await make_proxy()
    async with http.post(proxy.listen_url + "/api/chat", json=chat(stream=False), headers=AUTH) as resp:
        assert resp.status == 502
        body = await resp.read()
    [line] = await only_access(captured)
    expect(
        line, path="/api/chat", model="llama3.2:latest", status=502, outcome="upstream_error", bytes=len(body)
    )
    assert body
    assert_no_secrets(captured)


# --- the process: what reaches stderr ---------------------------------------------


def write_config(path: Path, upstream: str, **sections: dict) -> Path:
    path.write_text(json.dumps(proxy_config(upstream, **sections)))
    return path


async def test_json_logs_from_the_process_and_reload_to_text(sim, http, tmp_path) -> None:
    config = write_config(tmp_path / "config.yaml", sim.url, log={"format": "json"})
    async with running_proxy(config) as proc:
        headers = {**AUTH, "CF-Connecting-IP": "203.0.113.7"}
        async with http.post(proc.listen + "/api/chat", json=chat(stream=False), headers=headers) as resp:
            body = await resp.read()
        line = json.loads(await proc.log_line(r'"logger":"proxy\.access"'))
        expect(
            line, level="INFO", client="203.0.113.7", path="/api/chat", model="llama3.2:latest", status=200,
            outcome="ok", bytes=len(body), prompt_tokens=1, completion_tokens=sim.tokens,
        )  # fmt: skip
        entries = [json.loads(entry) for entry in proc.log]  # every line so far is one JSON object
        assert all({"time", "level", "logger", "message"} <= entry.keys() for entry in entries)
        assert any(e["logger"] == "proxy" and e["message"].startswith("serving on ") for e in entries)

        write_config(config, sim.url, log={"format": "text"})
        proc.proc.send_signal(signal.SIGHUP)
        await proc.log_line(r"^\S+ \S+ INFO proxy: config reloaded")
        async with http.get(proc.listen + "/api/tags") as resp:
            await resp.read()
        text = await proc.log_line(r"Z client=127\.0\.0\.1 method=GET path=/api/tags ")
        assert " status=200 outcome=ok " in text
        proc.proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.proc.wait(), 10) == 0
    assert not any(secret in entry for entry in proc.log for secret in SECRETS)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


async def test_warning_level_json_gives_only_json_warnings(sim, http, tmp_path) -> None:
    listen, admin = free_port(), free_port()
    sim.fault = "garbage"  # not HTTP: the request is an upstream error, a WARNING
    config = write_config(
        tmp_path / "config.yaml",
        sim.url,
        listen={"port": listen},
        admin={"port": admin},
        log={"format": "json", "level": "warning"},
    )
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "--config", str(config), stderr=asyncio.subprocess.PIPE, cwd=REPO
    )
    try:

        async def healthy() -> bool:
            try:
                async with http.get(f"http://127.0.0.1:{admin}/-/healthy") as resp:
                    return resp.status == 200
            except aiohttp.ClientConnectionError:
                return False

        await eventually(healthy, timeout=20)
        async with http.post(f"http://127.0.0.1:{listen}/api/chat", json=chat(), headers=AUTH) as resp:
            assert resp.status == 502
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    entries = [json.loads(line) for line in stderr.decode().splitlines()]
    assert {e["level"] for e in entries} <= {"WARNING", "ERROR"}  # not serving, access, draining, stopped
    upstream = [e for e in entries if e["logger"] == "proxy.handler"]
    assert len(upstream) == 1 and upstream[0]["level"] == "WARNING"
    assert upstream[0]["message"].startswith("upstream error (reset): POST /api/chat: ")
