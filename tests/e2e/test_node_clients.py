"""The official JavaScript clients (ollama-js, openai-node) through the proxy, run by node.

`.ci/run` installs them with npm into `.ci-node/` (gitignored); elsewhere point
`OQP_NODE_MODULES` at a `node_modules` that holds both. Without node or the
packages these tests skip and say how to get them.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

import pytest

from tests.support import REPO

from .test_clients import hold_slot, release

SCRIPT = REPO / "tests" / "node" / "clients.mjs"
MODULES = Path(os.environ.get("OQP_NODE_MODULES", REPO / ".ci-node" / "node_modules"))
CALLS = ["ollama.generate", "ollama.chat", "openai.chat.completions.create"]


def _node() -> str:
    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: install Node.js 18+ (apt-get install nodejs npm) to run these")
    if not all((MODULES / name / "package.json").is_file() for name in ("ollama", "openai")):
        pytest.skip(
            f"ollama-js and openai-node are not in {MODULES}: run "
            "`npm install --prefix .ci-node ollama openai` (as .ci/run does), or set OQP_NODE_MODULES"
        )
    return node


async def run_clients(url: str) -> dict[str, dict]:
    """Each call's outcome, by name, as the script reports it."""
    proc = await asyncio.create_subprocess_exec(
        _node(), str(SCRIPT), str(MODULES), url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        async with asyncio.timeout(60):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, err.decode(errors="replace")
    results = [json.loads(line) for line in out.decode().splitlines()]
    return {r["call"]: r for r in results}


async def test_js_clients_reject_a_non_streaming_failure_after_keepalive(sim, make_proxy, http):
    """A queue timeout after keep-alive whitespace must reject each promise, never resolve it
    with an object that has no content (as a complete `{"error":...}` 200 did)."""
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "queue_timeout": "300ms"}, heartbeat={"interval": "100ms"}
    )
    holder = await hold_slot(sim, http, proxy)
    try:
        results = await run_clients(proxy.listen_url)
    finally:
        await release(holder)
    assert list(results) == CALLS
    for name, outcome in results.items():
        assert outcome["rejected"], f"{name} resolved: {outcome}"
        # undici's own words for a body cut short: the transport failed, not the call's setup
        cut = (outcome["error"], outcome["cause"])
        assert cut == ("terminated", "SocketError: other side closed"), outcome
    assert len(sim.records) == 1  # only the holder reached upstream
