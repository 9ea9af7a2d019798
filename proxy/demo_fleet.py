"""`ollama-queue-proxy demo --fleet`: two simulated Ollama hosts behind one proxy, one of
them lost halfway.

gpu-a has llama3.2; gpu-b has llama3.2 and qwen3. A stream of requests for both
models runs through the proxy; halfway, gpu-a stops accepting connections (as a
host being taken out does: its running generations finish). The summary shows
where each request ran (read from the simulators' own records), the requests
that failed over (the proxy's count of connections that could not be opened, each
of which kept its place and went to gpu-b) and that none failed. The exit code
says whether that held, so the demo doubles as a smoke test.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
from collections import Counter
from typing import TextIO

import aiohttp

from proxy.config import config_from_dict
from proxy.demo import run_narrated
from proxy.server import Server
from proxy.sim import Simulator

REQUESTS = 16
MODELS = ("llama3.2", "qwen3")
TOKENS = 10
TOKEN_DELAY = 0.05
REQUEST_TIMEOUT = 30.0


def run_fleet_demo() -> int:
    """Run the fleet demo; exit code 0 when no request failed and none reached the lost host."""
    return run_narrated(_demo)


async def _demo(out: TextIO) -> int:
    async with contextlib.AsyncExitStack() as stack:
        hosts = {"gpu-a": Simulator(models=["llama3.2"]), "gpu-b": Simulator(models=["llama3.2", "qwen3"])}
        for sim in hosts.values():
            sim.tokens, sim.token_delay = TOKENS, TOKEN_DELAY
            await sim.start()
            stack.push_async_callback(sim.close)
        server = Server(config_from_dict(_config(hosts)))
        await server.start()
        stack.push_async_callback(server.stop)
        out.write(
            f"gpu-a {hosts['gpu-a'].url} (llama3.2), gpu-b {hosts['gpu-b'].url} (llama3.2, qwen3), "
            f"2 slots each; proxy on {server.listen_url}\n"
            f"sending {REQUESTS} streaming requests, {' and '.join(MODELS)} in turn; "
            "gpu-a stops accepting connections halfway...\n"
        )
        out.flush()
        statuses, lost_at = await _run(server, hosts["gpu-a"])
        failovers = server.state.metrics.registry.get_sample_value(
            "ollama_proxy_upstream_errors_total", {"kind": "connect"}
        )
    where = _where(hosts)
    found = [f"request #{n} failed: {status}" for n, status in sorted(statuses.items()) if status != "done"]
    late = [n for n, (name, started) in where.items() if name == "gpu-a" and started > lost_at]
    found += [f"request #{n} reached gpu-a after it stopped accepting" for n in late]
    if not failovers:
        found.append("no request failed over: gpu-a was lost before any was sent there")
    lines = ["", "Where each request ran"]
    for number in range(1, REQUESTS + 1):
        name = where.get(number, ("nowhere", 0.0))[0]
        lines.append(f"  #{number:<3} {MODELS[(number - 1) % 2]:<9} {name:<8} {statuses.get(number, '?')}")
    ran = Counter(name for name, _ in where.values())
    lines += [
        "",
        "Summary",
        f"  requests completed   {sum(s == 'done' for s in statuses.values())}/{REQUESTS}",
        f"  ran on               gpu-a {ran['gpu-a']}, gpu-b {ran['gpu-b']}",
        f"  failed over          {int(failovers or 0)} (could not connect to gpu-a; kept their place, ran on gpu-b)",
    ]
    out.write("\n".join(lines) + "\n")
    out.flush()
    for problem in found:
        print(f"demo failed: {problem}", file=sys.stderr)
    return 1 if found else 0


def _config(hosts: dict[str, Simulator]) -> dict[str, object]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "backends": {name: {"url": sim.url, "max_concurrent": 2} for name, sim in hosts.items()},
        "health": {"interval": "5s", "timeout": "1s"},  # so a request, not a probe, finds gpu-a gone
        "heartbeat": {"interval": 1.0},
        "shutdown_grace": 1,
    }


async def _run(server: Server, lost: Simulator) -> tuple[dict[int, str], float]:
    """Send the requests a little apart; lose `lost` once half have been sent."""
    loop = asyncio.get_running_loop()
    statuses: dict[int, str] = {}
    lost_at = float("inf")
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = []
        for number in range(1, REQUESTS + 1):
            if number == REQUESTS // 2 + 1:
                await lost.refuse()
                lost_at = loop.time()
            model = MODELS[(number - 1) % 2]
            clients.append(
                asyncio.create_task(_generate(session, server.listen_url, number, model, statuses))
            )
            await asyncio.sleep(0.1)
        await asyncio.gather(*clients)
    return statuses, lost_at


async def _generate(
    session: aiohttp.ClientSession, base: str, number: int, model: str, statuses: dict[int, str]
) -> None:
    body = {"model": model, "prompt": f"request {number}"}
    try:
        async with session.post(f"{base}/api/generate", json=body) as resp:
            last = b""
            async for raw in resp.content:
                last = raw if raw.strip() else last
        answer = json.loads(last) if last else {}
        statuses[number] = "done" if answer.get("done") else f"HTTP {resp.status} {answer.get('error', '')}"
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        statuses[number] = f"{type(exc).__name__}: {exc}"


def _where(hosts: dict[str, Simulator]) -> dict[int, tuple[str, float]]:
    """Request number -> (host, loop time it arrived there), from the simulators' records."""
    found = {}
    for name, sim in hosts.items():
        for record in sim.records:
            prompt = json.loads(record.body).get("prompt", "")
            found[int(prompt.split()[-1])] = (name, record.started_at)
    return found
