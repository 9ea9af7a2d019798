"""Settings that cannot work (issue 8 item 9), bounded log fields (item 8) and
`--version` (item 11)."""

from __future__ import annotations

import asyncio
import configparser
import json
import logging
import resource
import subprocess
import sys

import aiohttp
import pytest

from proxy.config import ConfigError, config_from_dict, config_warnings, load_config
from proxy.observe import logs
from proxy.server import Server
from tests.support import REPO, eventually, hold_the_slot, proxy_config, release


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, timeout=30, cwd=REPO
    )


# --- listen.max_connections follows the limits ---------------------------------------


@pytest.mark.parametrize(
    "limits, expected",
    [
        ({}, 100 + 3 + 1024),
        ({"max_queue": 5000}, 5000 + 3 + 1024),
        ({"max_queue": 0, "max_concurrent": 8}, 1032),
    ],
)
def test_the_connection_cap_follows_the_queue_unless_set(limits, expected):
    assert config_from_dict({"limits": limits}).max_connections == expected
    assert (
        config_from_dict({"limits": limits, "listen": {"max_connections": "auto"}}).max_connections
        == expected
    )
    assert config_from_dict({"limits": limits, "listen": {"max_connections": 50}}).max_connections == 50


async def test_5000_waiting_clients_need_no_second_edit(sim):
    """The incident: max_queue 5000 alone used to leave the listen port capped at 1024."""
    server = Server(config_from_dict(proxy_config(sim.url, limits={"max_queue": 5000})))
    assert server.connections.limit >= 5000 + 3
    assert not config_warnings(server.state.config)


async def test_a_reload_that_raises_the_queue_raises_the_cap(sim, tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(proxy_config(sim.url, limits={"max_queue": 10})))
    server = Server(load_config(path), path)
    await server.start()
    try:
        assert server.connections.limit == 10 + 3 + 1024
        path.write_text(json.dumps(proxy_config(sim.url, limits={"max_queue": 4000})))
        assert server.reload() == []
        assert server.connections.limit == 4000 + 3 + 1024
    finally:
        await server.stop()


# --- errors and warnings, by YAML path ------------------------------------------------


def test_two_caps_for_one_model_are_an_error_naming_both_keys():
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {"limits": {"models": {"Llama3.2": 1, "llama3.2:latest": 2, "library/big": 1, "big": 2}}}
        )
    assert err.value.problems == [
        "limits.models.llama3.2:latest: the same model as limits.models.Llama3.2 "
        "(Ollama reads both as llama3.2:latest); keep one cap",
        "limits.models.big: the same model as limits.models.library/big "
        "(Ollama reads both as big:latest); keep one cap",
    ]


def test_a_connection_cap_below_the_queue_is_a_warning_naming_both_keys():
    config = config_from_dict({"listen": {"max_connections": 1024}, "limits": {"max_queue": 5000}})
    assert config_warnings(config) == [
        "listen.max_connections: 1024 is below limits.max_queue + limits.max_concurrent (5000 + 3 = 5003): "
        "past 1024 connections clients get 503 before they can queue; "
        "raise it to at least 5003 or remove it to follow the limits"
    ]
    assert not config_warnings(
        config_from_dict({"listen": {"max_connections": 5003}, "limits": {"max_queue": 5000}})
    )


@pytest.mark.parametrize("interval, warned", [("99s", False), ("100s", True), ("5m", True)])
def test_a_heartbeat_at_cloudflares_timeout_is_a_warning_naming_the_key(interval, warned):
    warnings = config_warnings(config_from_dict({"heartbeat": {"interval": interval}}))
    assert [w.split(":")[0] for w in warnings] == (["heartbeat.interval"] if warned else [])


def test_check_config_prints_warnings_and_still_exits_0(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text(
        "listen:\n  max_connections: 1024\nlimits:\n  max_queue: 5000\nheartbeat:\n  interval: 2m\n"
    )
    result = run("check-config", str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    warnings = [line for line in result.stdout.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == ["listen.max_connections", "heartbeat.interval"]


async def test_warnings_are_logged_at_start_and_on_reload(sim, tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="proxy")
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(proxy_config(sim.url, heartbeat={"interval": "100s"})))
    server = Server(load_config(path), path)
    await server.start()
    try:
        assert server.reload() == []
    finally:
        await server.stop()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("config: heartbeat")]
    assert len(lines) == 2 and all(
        "config: heartbeat.interval: 100s is at or above" in line for line in lines
    )


# --- untrusted strings in logs ---------------------------------------------------------


def test_clip_keeps_short_text_and_says_how_much_it_cut():
    assert logs.clip("llama3.2:latest") == "llama3.2:latest"
    assert logs.clip("a" * 200) == "a" * 200
    assert logs.clip("a" * 1_000_000) == "a" * 200 + "\u2026(+999800 bytes)"
    assert logs.clip("a" * 200 + "\u00e9" * 10) == "a" * 200 + "\u2026(+20 bytes)"


async def test_a_megabyte_model_name_is_a_short_log_line(sim, make_proxy, caplog):
    """Every line the request causes, in both formats, stays short; the name still reaches
    upstream whole (a 1 MB name is Ollama's to refuse)."""
    caplog.set_level(logging.DEBUG)
    name = "m" * 1_000_000
    sim.models.add(name)  # upstream must list a model for it to queue
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 1}, heartbeat={"interval": "10s"})
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        holder = await hold_the_slot(sim, http, proxy)
        try:
            body = {"model": name, "prompt": "hi", "stream": False}
            waiting = asyncio.create_task(http.post(proxy.listen_url + "/api/generate", json=body))
            await eventually(lambda: proxy.state.admission.waiting_by_model().total() == 1, timeout=10)
            async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
                assert resp.status == 503  # the queue is full: a "rejected" line
            waiting.cancel()  # a "client gone" line
            await asyncio.gather(waiting, return_exceptions=True)
        finally:
            await release(holder)
        sim.models.discard(name)
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            assert resp.status == 404  # upstream no longer lists it
    await asyncio.sleep(0)
    mentions = [r for r in caplog.records if "mmmmmmmmmm" in logs.TextFormatter().format(r)]
    assert len(mentions) >= 3  # access lines and the client-gone line at least
    for record in mentions:
        for formatter in (logs.TextFormatter(), logs.JsonFormatter()):
            line = formatter.format(record)
            assert len(line) < 1000, line[:300]
            assert "(+999800 bytes)" in line.encode().decode("unicode_escape")


# --- --version --------------------------------------------------------------------------


def test_version_prints_the_distributions_version():
    declared = configparser.ConfigParser()
    declared.read(REPO / "setup.cfg")
    result = run("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"ollama-queue-proxy {declared['metadata']['version']}\n"


async def test_a_cap_beyond_the_open_files_limit_is_logged_at_start(sim, caplog):
    caplog.set_level(logging.WARNING, logger="proxy")
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = Server(config_from_dict(proxy_config(sim.url, listen={"max_connections": soft})))
    await server.start()
    await server.stop()
    [line] = [r.getMessage() for r in caplog.records if "file descriptors" in r.getMessage()]
    assert line.startswith(f"config: listen.max_connections: {soft} connections need about {2 * soft + 64}")
