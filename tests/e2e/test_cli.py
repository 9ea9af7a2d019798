"""The commands as an operator runs them: check-config, serve, signals."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys

import aiohttp

from tests.support import REPO, eventually, proxy_config, running_proxy


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30, cwd=REPO
    )


def test_check_config_accepts_the_shipped_file_and_summarises_it():
    result = run("check-config", str(REPO / "config.yaml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "valid" in result.stdout.splitlines()[0]
    assert "limits.max_concurrent    3" in result.stdout
    assert len(result.stdout.splitlines()) < 25  # one screen


def test_check_config_names_every_problem_by_its_path(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "limits:\n  max_concurrent: 0\n  max_queue: -1\n  modles: {}\ntimeouts:\n  read: 5 minutes\n"
    )
    result = run("check-config", str(bad))
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert "limits.max_concurrent: must be an integer >= 1 (got 0)" in lines
    assert any(line.startswith("limits.max_queue: ") for line in lines)
    assert any(line.startswith("limits.modles: unknown key") and "models" in line for line in lines)
    assert any(line.startswith("timeouts.read: ") for line in lines)
    assert len(lines) == 4
    assert "Traceback" not in result.stdout + result.stderr


def test_missing_or_broken_files_are_one_line_never_a_traceback(tmp_path):
    missing = run("check-config", str(tmp_path / "nope.yaml"))
    assert missing.returncode == 1 and len(missing.stdout.splitlines()) == 1
    broken = tmp_path / "broken.yaml"
    broken.write_text("limits: [\n")
    for result in (run("check-config", str(broken)), run("--config", str(broken))):
        assert result.returncode == 1
        assert "invalid YAML" in result.stdout + result.stderr
        assert "Traceback" not in result.stdout + result.stderr


async def test_sighup_reloads_limits_and_keeps_the_old_config_when_invalid(sim, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(proxy_config(sim.url, limits={"max_concurrent": 2})))
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as http:

        async def limit() -> float:
            async with http.get(proxy.admin + "/metrics") as resp:
                text = await resp.text()
            return float(text.split("\nollama_proxy_max_concurrent ")[1].split()[0])

        assert await limit() == 2
        config.write_text(json.dumps(proxy_config(sim.url, limits={"max_concurrent": 5})))
        proxy.proc.send_signal(signal.SIGHUP)
        await eventually(lambda: _equals(limit, 5))

        config.write_text("limits:\n  max_concurrent: zero\n")
        proxy.proc.send_signal(signal.SIGHUP)
        line = await proxy.log_line(r"reload failed")
        assert "limits.max_concurrent: must be an integer >= 1" in line
        async with http.get(proxy.admin + "/metrics") as resp:
            assert 'ollama_proxy_config_reloads_total{result="failure"} 1.0' in await resp.text()
        assert await limit() == 5


async def test_watch_flag_reloads_when_the_file_changes(sim, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(proxy_config(sim.url, limits={"max_concurrent": 2})))
    async with running_proxy(config, "--watch") as proxy:
        config.write_text(json.dumps(proxy_config(sim.url, limits={"max_concurrent": 7})))
        line = await proxy.log_line(r"config reloaded")
        assert "max_concurrent=7" in line
        assert any("config file changed on disk" in line for line in proxy.log)


async def _equals(read, value) -> bool:
    return await read() == value


async def test_sigterm_drains_running_and_queued_requests_then_exits_0(sim, tmp_path):
    sim.tokens, sim.token_delay = 10, 0.05
    config = tmp_path / "config.yaml"
    config.write_text(json.dumps(proxy_config(sim.url, limits={"max_concurrent": 1}, shutdown_grace="10s")))
    async with running_proxy(config) as proxy, aiohttp.ClientSession() as http:

        async def generate() -> tuple[int, bytes]:
            body = {"model": "llama3.2", "prompt": "drain me"}
            async with http.post(proxy.listen + "/api/generate", json=body) as resp:
                return resp.status, await resp.read()

        async def one_waiting() -> bool:
            async with http.get(proxy.admin + "/-/queue") as resp:
                return (await resp.json())["waiting"] == 1

        requests = [asyncio.create_task(generate()) for _ in range(2)]
        await sim.wait_until(lambda: sim.active == 1)  # one running
        await eventually(one_waiting)  # one queued (on a loaded machine it may arrive later)
        proxy.proc.send_signal(signal.SIGTERM)
        await proxy.log_line(r"draining: 1 running, 1 waiting")
        results = await asyncio.gather(*requests)
        assert [status for status, _ in results] == [200, 200]
        assert all(json.loads(body.splitlines()[-1])["done"] for _, body in results)
        assert await asyncio.wait_for(proxy.proc.wait(), 15) == 0


def test_a_taken_port_is_one_clear_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        config = tmp_path / "config.yaml"
        config.write_text(
            json.dumps(proxy_config("http://127.0.0.1:9", listen={"port": taken.getsockname()[1]}))
        )
        result = run("--config", str(config))
    assert result.returncode == 1
    assert "cannot start" in result.stderr and "address already in use" in result.stderr.lower()
    assert "Traceback" not in result.stderr and "Unclosed" not in result.stderr
