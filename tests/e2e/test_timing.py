"""How long things may take: a non-streamed answer's whole time (`timeouts.generation`)
against the silence bound (`timeouts.read`), and the `Retry-After` a rejected client
is told, which must get its retries past the queue rather than back into it."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai

from tests.support import eventually

MODEL = "llama3.2"
GENERATION_504 = "upstream did not finish the answer within 300ms; ask for a shorter answer, or stream it"


async def _post(http: aiohttp.ClientSession, url: str, body: dict) -> tuple[int, bytes]:
    """Status and every body byte that arrived, whether the body ended cleanly or was cut."""
    async with http.post(url, json=body) as resp:
        data = b""
        try:
            async for chunk in resp.content.iter_any():
                data += chunk
        except aiohttp.ClientPayloadError:
            pass  # a failure after a keep-alive 200 may end the body unfinished, by design
        return resp.status, data


# -- timeouts.generation ------------------------------------------------------------


async def test_a_non_streamed_answer_silent_past_read_but_within_generation_succeeds(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 8, 0.125  # 1 s of silence upstream, then the whole answer
    proxy = await make_proxy(timeouts={"read": "300ms", "generation": "20s"}, heartbeat={"interval": "10s"})
    generate = _post(
        http, proxy.listen_url + "/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}
    )
    chat = _post(
        http,
        proxy.listen_url + "/v1/chat/completions",
        {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    )
    (status, body), (v1_status, v1_body) = await asyncio.gather(generate, chat)
    assert status == 200 and json.loads(body)["done"] is True
    assert v1_status == 200 and json.loads(v1_body)["choices"][0]["finish_reason"] == "stop"
    assert [record.completed for record in sim.records] == [True, True]


async def test_a_non_streamed_answer_past_generation_gets_504_and_upstream_is_closed(
    sim, make_proxy, http, caplog
):
    sim.tokens, sim.token_delay = 8, 2.0  # 16 s upstream: far past the bound
    proxy = await make_proxy(timeouts={"read": "10s", "generation": "300ms"}, heartbeat={"interval": "10s"})
    loop = asyncio.get_running_loop()
    began = loop.time()
    status, body = await _post(http, proxy.listen_url + "/api/chat", {"model": MODEL, "stream": False})
    assert status == 504
    assert body == json.dumps({"error": GENERATION_504}, separators=(",", ":")).encode()
    assert loop.time() - began < 5
    await sim.wait_until(lambda: sim.records[0].peer_closed_at is not None)
    assert not sim.records[0].completed
    assert "(timeouts.generation); raise it for longer answers, or have clients stream" in caplog.text


async def test_generation_running_out_after_keepalive_is_an_inband_504(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 8, 2.0
    proxy = await make_proxy(timeouts={"read": "10s", "generation": "300ms"}, heartbeat={"interval": "100ms"})
    status, body = await _post(http, proxy.listen_url + "/api/generate", {"model": MODEL, "stream": False})
    assert status == 200  # the keep-alive's: the failure can only be in-band now
    frames, _, error = body.rpartition(b"{")
    assert frames and set(frames) == {ord("\n")}
    assert json.loads(b"{" + error) == {"error": GENERATION_504}
    await sim.wait_until(lambda: sim.records[0].peer_closed_at is not None)


async def test_generation_bounds_a_body_that_stalls_after_its_headers(sim, make_proxy, http, caplog):
    """Headers and half the body, then silence: cut off (a Content-Length body has no room for an
    error), upstream closed, and the log says which bound it was."""
    sim.fault = "hang_body"
    proxy = await make_proxy(timeouts={"read": "10s", "generation": "300ms"}, heartbeat={"interval": "10s"})
    status, body = await _post(http, proxy.listen_url + "/api/generate", {"model": MODEL, "stream": False})
    assert status == 200 and body and not body.endswith(b"}")
    await sim.wait_until(lambda: sim.records[0].peer_closed_at is not None)
    assert "(timeouts.generation)" in caplog.text


async def test_streaming_is_bounded_by_read_not_generation(sim, make_proxy, http):
    sim.tokens, sim.token_delay = 8, 0.1  # 0.8 s in all, never more than 0.1 s silent
    proxy = await make_proxy(timeouts={"read": "1s", "generation": "300ms"}, heartbeat={"interval": "10s"})
    status, body = await _post(http, proxy.listen_url + "/api/generate", {"model": MODEL, "prompt": "hi"})
    assert status == 200
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[-1]["done"] is True and not any("error" in line for line in lines)
    # And silence past `read` still ends a stream, generation or not.
    sim.fault, sim.fault_after = "hang_body", 1
    status, body = await _post(http, proxy.listen_url + "/api/generate", {"model": MODEL, "prompt": "hi"})
    assert status == 200
    assert json.loads(body.splitlines()[-1]) == {
        "error": "upstream sent nothing for 1s; the model may be stuck, retry later"
    }


# -- Retry-After -------------------------------------------------------------------


async def _fill(http: aiohttp.ClientSession, url: str, count: int) -> list[asyncio.Task[tuple[int, bytes]]]:
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    return [asyncio.create_task(_post(http, url + "/api/generate", body)) for _ in range(count)]


async def test_retry_after_counts_the_queue_ahead(sim, make_proxy, http):
    """1 slot, 6 waiting, 0.3 s a request: the queue is served in about 2.1 s, and a
    retry sooner than that lands in a queue that is still full."""
    sim.load_delay = 0.3
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 6}, heartbeat={"interval": "10s"})
    loop = asyncio.get_running_loop()
    (warmup,) = await _fill(http, proxy.listen_url, 1)  # the hold time, learned
    assert (await warmup)[0] == 200
    queue = await _fill(http, proxy.listen_url, 7)
    await eventually(lambda: proxy.state.admission.waiting_total == 6)
    async with http.post(proxy.listen_url + "/api/generate", json={"model": MODEL}) as resp:
        assert resp.status == 503
        retry_after = int(resp.headers["Retry-After"])
    told = loop.time()
    assert [status for status, _ in await asyncio.gather(*queue)] == [200] * 7
    truth = loop.time() - told  # when the queue this client would have joined was through
    assert truth * 0.6 <= retry_after <= truth * 3 + 1, (retry_after, truth)


async def test_the_openai_clients_retries_get_through_a_full_queue(sim, make_proxy, http):
    """A burst of 12 at 2 slots and room for 4 waiting: 6 are refused. Told to come back
    when the queue is through, all 6 get in on their first retry; told 1 s (half a hold),
    they came back into a still-full queue and half of them ran out of retries."""
    sim.load_delay = 0.7
    proxy = await make_proxy(limits={"max_concurrent": 2, "max_queue": 4}, heartbeat={"interval": "10s"})
    warmup = await _fill(http, proxy.listen_url, 2)
    assert [status for status, _ in await asyncio.gather(*warmup)] == [200, 200]
    sim.records.clear()
    messages = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(
        base_url=proxy.listen_url + "/v1", api_key="x", max_retries=2, timeout=30
    ) as client:
        answers = await asyncio.gather(
            *(client.chat.completions.create(model=MODEL, messages=messages) for _ in range(12)),
            return_exceptions=True,
        )
    assert [type(answer).__name__ for answer in answers] == ["ChatCompletion"] * 12
    assert len(sim.records) == 12
