"""The official `ollama` and `openai` Python clients through the proxy.

Every successful call here is queued behind a held slot long enough to receive
keep-alive frames (counted on `ollama_proxy_heartbeats_total`), and must still
give exactly what the same call gives directly against the simulated Ollama.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import ollama
import openai
import pytest

from tests.support import eventually, sample, scrape

MODEL = "llama3.2"
PROMPT = "why is the sky blue"
MESSAGES = [{"role": "user", "content": "hello there"}]
#: Keep-alive frames a queued request must have been sent before its slot is freed.
FRAMES = 4
QUEUE_FULL = "queue full: 0 requests waiting, max_queue=0; retry later, or raise limits.max_queue"
NOT_FOUND = "model 'nope' not found"


@pytest.fixture
async def proxy(make_proxy):
    """One slot and a 100 ms heartbeat: anything behind a held slot gets frames."""
    return await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "100ms"})


@contextlib.asynccontextmanager
async def ollama_client(url: str) -> AsyncIterator[ollama.AsyncClient]:
    client = ollama.AsyncClient(host=url, timeout=10)
    try:
        yield client
    finally:
        await client.close()


@contextlib.asynccontextmanager
async def openai_client(url: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(
        base_url=url + "/v1", api_key="unused", max_retries=0, timeout=10
    ) as client:
        yield client


async def heartbeats(http, proxy) -> float:
    return sample(await scrape(http, proxy), "ollama_proxy_heartbeats_total")


async def hold_slot(sim, http, proxy) -> asyncio.Task:
    """Occupy the only slot with a request that itself earns no keep-alive frames.

    Upstream answers a non-streamed body with its Content-Length, sends half of
    it and hangs, so the proxy has upstream's framing and never beats for it:
    every frame counted afterwards went to the request under test.
    """
    got_bytes = asyncio.Event()

    async def hold() -> None:
        body = {"model": MODEL, "prompt": "hold", "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body) as resp:
            assert resp.status == 200 and "Content-Length" in resp.headers
            await resp.content.readany()
            got_bytes.set()
            await resp.read()  # upstream never finishes: until cancelled

    sim.fault = "hang_body"
    task = asyncio.create_task(hold())
    try:
        await sim.wait_until(lambda: sim.active == 1)
    finally:
        sim.fault = None  # knobs are read when a request arrives: only the holder hangs
    async with asyncio.timeout(5):
        await got_bytes.wait()
    return task


async def release(task: asyncio.Task) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


async def queued(sim, http, proxy, call: Callable[[], Awaitable[Any]]) -> tuple[Any, float]:
    """Run `call()` behind the held slot; free the slot once FRAMES frames went out.

    Returns the call's result and the number of keep-alive frames sent meanwhile.
    """
    holder = await hold_slot(sim, http, proxy)
    before = await heartbeats(http, proxy)
    task = asyncio.create_task(call())
    try:

        async def enough() -> bool:
            return task.done() or await heartbeats(http, proxy) - before >= FRAMES

        await eventually(enough, timeout=5)
        if task.done():
            await task  # the call's own failure, if it failed
            raise AssertionError("the call finished while the only slot was held")
    finally:
        await release(holder)
    async with asyncio.timeout(10):
        result = await task
    return result, await heartbeats(http, proxy) - before


async def collect(stream: Awaitable[AsyncIterator[Any]]) -> list[Any]:
    return [part async for part in await stream]


# -- ollama ------------------------------------------------------------------------------


async def test_ollama_generate_streaming_sees_frames_as_empty_parts_only(sim, proxy, http):
    async with ollama_client(sim.url) as direct_client, ollama_client(proxy.listen_url) as client:
        direct = await collect(direct_client.generate(MODEL, PROMPT, stream=True))
        parts, sent = await queued(
            sim, http, proxy, lambda: collect(client.generate(MODEL, PROMPT, stream=True))
        )
    assert sent >= FRAMES
    text = "".join(p.response for p in parts)
    assert text == "".join(p.response for p in direct) and len(text.split()) == 8
    frames = parts[: len(parts) - len(direct)]
    assert len(frames) == sent  # each frame the proxy counted is one empty part, nothing else
    assert all(f.model == MODEL and f.response == "" and f.done is False for f in frames)
    assert parts[len(frames) :] == direct
    assert parts[-1].done is True and parts[-1].eval_count == 8 and parts[-1].done_reason == "stop"


async def test_ollama_generate_non_streaming_equals_direct(sim, proxy, http):
    async with ollama_client(sim.url) as direct_client, ollama_client(proxy.listen_url) as client:
        direct = await direct_client.generate(MODEL, PROMPT, stream=False)
        result, sent = await queued(sim, http, proxy, lambda: client.generate(MODEL, PROMPT, stream=False))
    assert sent >= FRAMES
    assert result == direct
    assert result.response == direct.response and len(result.response.split()) == 8
    assert result.done is True and result.eval_count == 8


async def test_ollama_chat_streaming_sees_frames_as_empty_messages_only(sim, proxy, http):
    async with ollama_client(sim.url) as direct_client, ollama_client(proxy.listen_url) as client:
        direct = await collect(direct_client.chat(MODEL, MESSAGES, stream=True))
        parts, sent = await queued(
            sim, http, proxy, lambda: collect(client.chat(MODEL, MESSAGES, stream=True))
        )
    assert sent >= FRAMES
    text = "".join(p.message.content for p in parts)
    assert text == "".join(p.message.content for p in direct) and len(text.split()) == 8
    frames = parts[: len(parts) - len(direct)]
    assert len(frames) == sent
    assert all(f.message.role == "assistant" and f.message.content == "" and f.done is False for f in frames)
    assert parts[len(frames) :] == direct
    assert parts[-1].done is True and parts[-1].eval_count == 8


async def test_ollama_chat_non_streaming_equals_direct(sim, proxy, http):
    async with ollama_client(sim.url) as direct_client, ollama_client(proxy.listen_url) as client:
        direct = await direct_client.chat(MODEL, MESSAGES, stream=False)
        result, sent = await queued(sim, http, proxy, lambda: client.chat(MODEL, MESSAGES, stream=False))
    assert sent >= FRAMES
    assert result == direct
    assert result.message.role == "assistant" and len(result.message.content.split()) == 8
    assert result.done is True and result.eval_count == 8


async def test_ollama_embed_equals_direct(sim, proxy, http):
    inputs = ["first text", "second text"]
    async with ollama_client(sim.url) as direct_client, ollama_client(proxy.listen_url) as client:
        direct = await direct_client.embed(MODEL, inputs)
        result, sent = await queued(sim, http, proxy, lambda: client.embed(MODEL, inputs))
    assert sent >= FRAMES
    assert result == direct
    assert len(result.embeddings) == 2 and all(len(v) == 16 for v in result.embeddings)
    assert result.embeddings[0] != result.embeddings[1]


# -- openai ------------------------------------------------------------------------------


async def test_openai_chat_non_streaming_equals_direct(sim, proxy, http):
    async with openai_client(sim.url) as direct_client, openai_client(proxy.listen_url) as client:
        direct = await direct_client.chat.completions.create(model=MODEL, messages=MESSAGES)
        result, sent = await queued(
            sim, http, proxy, lambda: client.chat.completions.create(model=MODEL, messages=MESSAGES)
        )
    assert sent >= FRAMES
    assert result.model_dump() == direct.model_dump()
    content = result.choices[0].message.content
    assert content == direct.choices[0].message.content and len(content.split()) == 8
    assert result.choices[0].finish_reason == "stop" and result.usage.completion_tokens == 8


async def test_openai_chat_streaming_sees_only_the_real_chunks(sim, proxy, http):
    async def stream(client: openai.AsyncOpenAI) -> list[Any]:
        chunks = await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
        return [chunk async for chunk in chunks]

    async with openai_client(sim.url) as direct_client, openai_client(proxy.listen_url) as client:
        direct = await stream(direct_client)
        chunks, sent = await queued(sim, http, proxy, lambda: stream(client))
    assert sent >= FRAMES
    # The SSE comment frames are invisible to the client: the same chunks, no more.
    assert [c.model_dump() for c in chunks] == [c.model_dump() for c in direct]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 8
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_openai_embeddings_equal_direct(sim, proxy, http):
    async with openai_client(sim.url) as direct_client, openai_client(proxy.listen_url) as client:
        direct = await direct_client.embeddings.create(model=MODEL, input=["alpha", "beta"])
        result, sent = await queued(
            sim, http, proxy, lambda: client.embeddings.create(model=MODEL, input=["alpha", "beta"])
        )
    assert sent >= FRAMES
    assert result.model_dump() == direct.model_dump()
    assert [d.index for d in result.data] == [0, 1] and all(len(d.embedding) == 16 for d in result.data)


# -- errors ------------------------------------------------------------------------------


async def test_queue_full_is_a_503_response_error_in_ollama(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0}, heartbeat={"interval": "100ms"})
    holder = await hold_slot(sim, http, proxy)
    try:
        async with ollama_client(proxy.listen_url) as client:
            with pytest.raises(ollama.ResponseError) as plain:
                await client.generate(MODEL, PROMPT, stream=False)
            with pytest.raises(ollama.ResponseError) as streamed:
                await collect(client.chat(MODEL, MESSAGES, stream=True))
        metrics = await scrape(http, proxy)
    finally:
        await release(holder)
    for info in (plain, streamed):
        assert info.value.status_code == 503
        assert info.value.error == QUEUE_FULL
    assert sample(metrics, "ollama_proxy_rejected_total", reason="queue_full") == 2
    assert len(sim.records) == 1  # only the holder reached upstream


async def test_queue_full_is_a_503_api_status_error_in_openai(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0}, heartbeat={"interval": "100ms"})
    holder = await hold_slot(sim, http, proxy)
    try:
        async with openai_client(proxy.listen_url) as client:
            with pytest.raises(openai.APIStatusError) as plain:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES)
            with pytest.raises(openai.APIStatusError) as streamed:
                await client.chat.completions.create(model=MODEL, messages=MESSAGES, stream=True)
            with pytest.raises(openai.APIStatusError) as embedding:
                await client.embeddings.create(model=MODEL, input="x")
    finally:
        await release(holder)
    for info in (plain, streamed, embedding):
        err = info.value
        assert isinstance(err, openai.InternalServerError)
        assert err.status_code == 503
        assert err.body == {"message": QUEUE_FULL, "type": "server_error", "code": "queue_full"}
        assert QUEUE_FULL in str(err)
        assert err.code == "queue_full"
        assert err.response.headers["Retry-After"] == "10"  # nothing finished yet: the default
    assert len(sim.records) == 1


async def test_unknown_model_is_the_clients_normal_404(sim, make_proxy, http):
    # Nothing waits here, so no frame is due: a long interval keeps a slow machine from sending one.
    proxy = await make_proxy(heartbeat={"interval": "10s"})

    async def ollama_errors(url: str) -> list[ollama.ResponseError]:
        errors = []
        async with ollama_client(url) as client:
            for call in (
                lambda: client.generate("nope", PROMPT, stream=False),
                lambda: collect(client.generate("nope", PROMPT, stream=True)),
                lambda: client.chat("nope", MESSAGES, stream=False),
                lambda: client.embed("nope", "x"),
            ):
                with pytest.raises(ollama.ResponseError) as info:
                    await call()
                errors.append(info.value)
        return errors

    async def openai_errors(url: str) -> list[openai.NotFoundError]:
        errors = []
        async with openai_client(url) as client:
            for call in (
                lambda: client.chat.completions.create(model="nope", messages=MESSAGES),
                lambda: client.chat.completions.create(model="nope", messages=MESSAGES, stream=True),
                lambda: client.embeddings.create(model="nope", input="x"),
            ):
                with pytest.raises(openai.NotFoundError) as info:
                    await call()
                errors.append(info.value)
        return errors

    direct, proxied = await ollama_errors(sim.url), await ollama_errors(proxy.listen_url)
    assert [(e.status_code, e.error) for e in proxied] == [(e.status_code, e.error) for e in direct]
    assert [(e.status_code, e.error) for e in proxied] == [(404, NOT_FOUND)] * 4

    direct_oa, proxied_oa = await openai_errors(sim.url), await openai_errors(proxy.listen_url)
    assert [(e.status_code, e.body, str(e)) for e in proxied_oa] == [
        (e.status_code, e.body, str(e)) for e in direct_oa
    ]
    assert all(e.status_code == 404 and e.body["message"] == NOT_FOUND for e in proxied_oa)


async def test_unknown_model_is_a_404_at_once_even_behind_a_busy_queue(sim, proxy, http):
    """Upstream does not list the model: the client's normal 404 at once, never a keep-alive
    200 and an in-band error (which streaming clients could not tell from a broken stream)."""
    holder = await hold_slot(sim, http, proxy)
    try:
        # The slot stays held for a minute: queued, either call would run out its 5 s.
        async with ollama_client(proxy.listen_url) as client:
            with pytest.raises(ollama.ResponseError) as info:
                await asyncio.wait_for(collect(client.chat("nope", MESSAGES, stream=True)), timeout=5)
        assert (info.value.status_code, info.value.error) == (404, NOT_FOUND)

        async def stream(client: openai.AsyncOpenAI) -> list[Any]:
            chunks = await client.chat.completions.create(model="nope", messages=MESSAGES, stream=True)
            return [chunk async for chunk in chunks]

        async with openai_client(proxy.listen_url) as client:
            with pytest.raises(openai.NotFoundError) as oa:
                await asyncio.wait_for(stream(client), timeout=5)
        assert oa.value.body == {"message": NOT_FOUND, "type": "not_found_error", "param": None, "code": None}
        assert [r.model for r in sim.records] == ["llama3.2"]  # only the holder reached upstream
    finally:
        await release(holder)


async def test_non_streaming_failure_after_keepalive_raises_in_both_clients(sim, make_proxy, http):
    """A queue timeout after keep-alive whitespace: each call raises, none returns an empty result
    (a complete `{"error":...}` 200 gave `response=None` in ollama, `choices=None` in openai)."""
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "queue_timeout": "400ms"}, heartbeat={"interval": "100ms"}
    )
    holder = await hold_slot(sim, http, proxy)
    try:
        async with ollama_client(proxy.listen_url) as client:
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                await client.generate(MODEL, PROMPT, stream=False)
            with pytest.raises(httpx.RemoteProtocolError, match="incomplete chunked read"):
                await client.chat(MODEL, MESSAGES, stream=False)
        async with openai_client(proxy.listen_url) as oa:
            with pytest.raises(openai.APIConnectionError) as info:
                await oa.chat.completions.create(model=MODEL, messages=MESSAGES)
        assert "incomplete chunked read" in str(info.value.__cause__)
        metrics = await scrape(http, proxy)
    finally:
        await release(holder)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="queue_timeout") == 3
    assert sample(metrics, "ollama_proxy_heartbeats_total") >= 3  # each had its 200 started
    assert len(sim.records) == 1  # only the holder reached upstream
