"""Model metrics read from the relayed answers, end to end against the simulated Ollama.

The simulator is deterministic: a prompt's token count is its number of
whitespace-separated words, an answer has `sim.tokens` tokens (fewer with
`num_predict`/`max_tokens`), eval_duration is tokens x token_delay and
load_duration is load_delay. So every counter has one exact expected value.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from proxy.config import load_config
from proxy.observe.metrics import Metrics
from proxy.server import Server
from tests.support import eventually, hold_the_slot, proxy_config, release, sample, scrape

MODEL = "llama3.2:latest"
TOKEN_DELAY = 0.005  # 8 tokens in 40 ms of nominal eval time: 200 tokens/s


def _chat(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


# (path, body, prompt tokens, completion tokens or None when unreported, streamed?)
CASES = [
    ("/api/generate", {"prompt": "one two three"}, 3, 8, True),
    ("/api/generate", {"prompt": "four five", "stream": False}, 2, 8, False),
    ("/api/generate", {"prompt": "six", "options": {"num_predict": 3}}, 1, 3, True),
    ("/api/chat", {"messages": _chat("hi there")}, 2, 8, True),
    ("/api/chat", {"messages": _chat("a b c d"), "stream": False}, 4, 8, False),
    (
        "/v1/chat/completions",
        {"messages": _chat("x y"), "stream": True, "stream_options": {"include_usage": True}},
        2,
        8,
        True,
    ),  # fmt: skip
    ("/v1/chat/completions", {"messages": _chat("no usage asked"), "stream": True}, None, None, True),
    ("/v1/chat/completions", {"messages": _chat("p q r"), "max_tokens": 5}, 3, 5, False),
    ("/api/embed", {"input": "e m b e d"}, 5, None, False),
    ("/v1/embeddings", {"input": ["v w", "z"]}, 3, None, False),
]
NATIVE_GENERATIONS = [case for case in CASES if case[0] in ("/api/generate", "/api/chat")]


async def _post(http, proxy: Server, path: str, body: dict) -> bytes:
    async with http.post(proxy.listen_url + path, json={"model": "llama3.2", **body}) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.read()


async def test_counters_equal_what_the_simulator_reported(sim, make_proxy, http):
    sim.token_delay = TOKEN_DELAY
    proxy = await make_proxy()
    exchanges = []  # what the access log is handed: the same counts, per request
    observe = proxy.state.metrics.observe
    proxy.state.metrics.observe = lambda ex: (exchanges.append(ex), observe(ex))  # type: ignore[method-assign]
    for path, body, _, _, _ in CASES:
        await _post(http, proxy, path, body)
    await eventually(lambda: len(exchanges) == len(CASES))
    assert [(ex.prompt_tokens, ex.completion_tokens) for ex in exchanges] == [(c[2], c[3]) for c in CASES]
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "nope", "prompt": "x"}) as resp:
        assert resp.status == 404  # an error body: no tokens, no first token
    metrics = await scrape(http, proxy)

    def value(name: str, **labels: str) -> float:
        return sample(metrics, name, model=MODEL, **labels)

    assert value("ollama_proxy_tokens_total", kind="prompt") == sum(c[2] for c in CASES if c[2])
    assert value("ollama_proxy_tokens_total", kind="completion") == sum(c[3] for c in CASES if c[3])
    assert sample(metrics, "ollama_proxy_tokens_total", model="nope:latest", kind="prompt") == 0
    # One first-token time per streamed answer, each a real (small) delay.
    streamed = sum(1 for c in CASES if c[4])
    assert value("ollama_proxy_time_to_first_token_seconds_count") == streamed
    assert sample(metrics, "ollama_proxy_time_to_first_token_seconds_count", model="nope:latest") == 0
    assert TOKEN_DELAY * streamed <= value("ollama_proxy_time_to_first_token_seconds_sum") < 2.0 * streamed
    # Speed is Ollama's eval rate: eval_count / eval_duration = 1 / token_delay, native API only.
    rates = len(NATIVE_GENERATIONS)
    assert value("ollama_proxy_generation_tokens_per_second_count") == rates
    assert value("ollama_proxy_generation_tokens_per_second_sum") == pytest.approx(rates / TOKEN_DELAY)
    assert value("ollama_proxy_generation_tokens_per_second_bucket", le="150.0") == 0
    assert value("ollama_proxy_generation_tokens_per_second_bucket", le="200.0") == rates
    # load_delay is 0: Ollama omits a zero load_duration, and nothing is observed.
    assert value("ollama_proxy_model_load_seconds_count") == 0


async def test_model_load_is_observed_as_upstream_reports_it(sim, make_proxy, http):
    sim.load_delay = 0.05
    proxy = await make_proxy()
    await _post(http, proxy, "/api/generate", {"prompt": "cold"})
    await _post(http, proxy, "/api/chat", {"messages": _chat("cold"), "stream": False})
    await _post(http, proxy, "/api/embed", {"input": "cold"})
    await _post(http, proxy, "/v1/chat/completions", {"messages": _chat("no load field here")})
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_model_load_seconds_count", model=MODEL) == 3
    assert sample(metrics, "ollama_proxy_model_load_seconds_sum", model=MODEL) == pytest.approx(0.15)
    # The first token waited for the load: admission to first byte includes it.
    assert sample(metrics, "ollama_proxy_time_to_first_token_seconds_sum", model=MODEL) >= 0.05


async def test_relayed_bytes_are_unchanged_by_metering(sim, make_proxy, http):
    proxy = await make_proxy()
    for path, body, _, _, _ in CASES:
        async with http.post(sim.url + path, json={"model": "llama3.2", **body}) as resp:
            direct = await resp.read()
        assert await _post(http, proxy, path, body) == direct


async def test_oldest_wait_while_a_request_waits_and_zero_after(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1})
    assert sample(await scrape(http, proxy), "ollama_proxy_oldest_wait_seconds") == 0
    holder = await hold_the_slot(sim, http, proxy)
    waiter = asyncio.create_task(_post(http, proxy, "/api/generate", {"prompt": "wait"}))
    await eventually(lambda: proxy.state.admission.waiting_total == 1)
    waited = sample(await scrape(http, proxy), "ollama_proxy_oldest_wait_seconds")
    assert 0 < waited < 5
    await release(holder)
    await waiter
    assert sample(await scrape(http, proxy), "ollama_proxy_oldest_wait_seconds") == 0


async def test_queue_limit_follows_a_reload(sim, http, tmp_path: Path):
    path = tmp_path / "config.yaml"
    path.write_text(json.dumps(proxy_config(sim.url, limits={"models": {"big": 2}})))
    proxy = Server(load_config(path), path)
    await proxy.start()
    try:
        metrics = await scrape(http, proxy)
        assert sample(metrics, "ollama_proxy_queue_limit", model="big:latest") == 2
        assert sample(metrics, "ollama_proxy_tokens_total", model="big:latest", kind="prompt") == 0
        path.write_text(json.dumps(proxy_config(sim.url, limits={"models": {"big": 1, "Small": 3}})))
        assert proxy.reload() == []
        metrics = await scrape(http, proxy)
        limits = {
            dict(labels)["model"]: v
            for (name, labels), v in metrics.items()
            if name == "ollama_proxy_queue_limit"
        }
        assert limits == {"big:latest": 1, "small:latest": 3}
    finally:
        await proxy.stop()


def test_configure_makes_a_reloaded_model_a_configured_label():
    """A model gets its own label when the config names it (also after a reload) or upstream
    lists it; no number of other names can take a label from it."""
    listed = {"pulled:latest"}
    metrics = Metrics(["big:latest"], listed.__contains__)
    for i in range(60):
        assert metrics.model_label(f"m{i}:latest") == "other"
    assert metrics.model_label("new:latest") == "other"
    assert metrics.model_label("pulled:latest") == "pulled:latest"
    metrics.configure(["New", "big"])
    assert metrics.model_label("new:latest") == "new:latest"
    assert metrics.model_label("big:latest") == "big:latest"
    listed.clear()  # upstream deleted it: its series stay rather than vanish mid-graph
    assert metrics.model_label("pulled:latest") == "pulled:latest"
    assert metrics.model_label.known() == {"big:latest", "new:latest", "pulled:latest", "other"}
