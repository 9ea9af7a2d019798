"""Keep-alive frames: their exact bytes, their spacing, their placement, and the
in-band errors that end a response once a keep-alive 200 has gone out."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import logging
import re

import aiohttp
import pytest
from aiohttp import web

from tests.support import hold_the_slot, release, serving

from .test_hostile import address

T = rb'"created_at":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z"'
GENERATE_FRAME = re.compile(rb'\{"model":"llama3\.2",' + T + rb',"response":"","done":false\}\n')
CHAT_FRAME = re.compile(
    rb'\{"model":"llama3\.2",' + T + rb',"message":\{"role":"assistant","content":""\},"done":false\}\n'
)


async def timed_chunks(resp: aiohttp.ClientResponse) -> list[tuple[float, bytes]]:
    loop = asyncio.get_running_loop()
    return [(loop.time(), chunk) async for chunk in resp.content.iter_any()]


async def test_queued_client_never_sees_more_than_the_interval_of_silence(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "200ms"})
    holder = await hold_the_slot(sim, http, proxy)
    loop = asyncio.get_running_loop()
    sent_at = loop.time()
    releaser = loop.call_later(2.0, holder.cancel)
    async with http.post(
        proxy.listen_url + "/api/generate", json={"model": "llama3.2", "prompt": "p"}
    ) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "application/x-ndjson"
        chunks = await timed_chunks(resp)
    releaser.cancel()
    await release(holder)
    times = [sent_at] + [t for t, _ in chunks]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    assert max(gaps) < 0.3, f"largest gap {max(gaps):.3f}s"
    body = b"".join(c for _, c in chunks)
    lines = body.splitlines(keepends=True)
    frames = [line for line in lines if GENERATE_FRAME.fullmatch(line)]
    assert len(frames) >= 8  # ~2 s of waiting at 0.2 s
    assert all(json.loads(line) for line in lines)
    assert json.loads(lines[-1])["done"] is True


async def _frames_then_result(
    sim, make_proxy, http, path: str, body: dict
) -> tuple[aiohttp.ClientResponse, bytes, bytes]:
    """A request queued ~0.5 s at a 0.1 s interval: (response, whole body, direct body)."""
    async with http.post(sim.url + path, json=body) as direct:
        direct_body = await direct.read()
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "100ms"})
    holder = await hold_the_slot(sim, http, proxy)
    asyncio.get_running_loop().call_later(0.5, holder.cancel)
    async with http.post(proxy.listen_url + path, json=body) as resp:
        data = await resp.read()
    await release(holder)
    return resp, data, direct_body


async def test_generate_frames_are_exact_empty_chunks(sim, make_proxy, http):
    resp, data, direct = await _frames_then_result(
        sim, make_proxy, http, "/api/generate", {"model": "llama3.2", "prompt": "p"}
    )
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    assert data.endswith(direct)
    head = data[: len(data) - len(direct)]
    frames = head.splitlines(keepends=True)
    assert len(frames) >= 3 and all(GENERATE_FRAME.fullmatch(f) for f in frames)
    assert head.isascii()


async def test_chat_frames_are_exact_empty_messages(sim, make_proxy, http):
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]}
    resp, data, direct = await _frames_then_result(sim, make_proxy, http, "/api/chat", body)
    assert resp.status == 200 and resp.content_type == "application/x-ndjson"
    assert data.endswith(direct)
    frames = data[: len(data) - len(direct)].splitlines(keepends=True)
    assert len(frames) >= 3 and all(CHAT_FRAME.fullmatch(f) for f in frames)


async def test_sse_frames_are_comments_with_the_queue_position(sim, make_proxy, http):
    body = {"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    resp, data, direct = await _frames_then_result(sim, make_proxy, http, "/v1/chat/completions", body)
    assert resp.status == 200 and resp.content_type == "text/event-stream"
    assert data.endswith(direct) and direct.endswith(b"data: [DONE]\n\n")
    head = data[: len(data) - len(direct)]
    # Once admitted, a slow upstream may earn a frame or two of its own.
    assert re.fullmatch(
        rb"(: queued, position 1 of 1\n\n){3,}(: running, waiting for upstream\n\n)*", head
    ), head


async def test_non_streaming_frames_are_leading_newlines(sim, make_proxy, http):
    body = {"model": "llama3.2", "prompt": "p", "stream": False}
    resp, data, direct = await _frames_then_result(sim, make_proxy, http, "/api/generate", body)
    assert resp.status == 200 and resp.headers["Content-Type"] == "application/json; charset=utf-8"
    assert re.fullmatch(rb"\n{3,}", data[: len(data) - len(direct)])
    assert data.endswith(direct)
    assert json.loads(data) == json.loads(direct)


async def test_non_streaming_keepalive_can_be_turned_off(sim, make_proxy, http):
    proxy = await make_proxy(
        limits={"max_concurrent": 1}, heartbeat={"interval": "100ms", "non_streaming": False}
    )
    holder = await hold_the_slot(sim, http, proxy)
    asyncio.get_running_loop().call_later(0.4, holder.cancel)
    async with http.post(proxy.listen_url + "/api/embed", json={"model": "llama3.2", "input": "x"}) as resp:
        data = await resp.read()
    await release(holder)
    assert resp.status == 200 and not data.startswith(b"\n")


async def test_admitted_request_is_kept_alive_while_upstream_loads(sim, make_proxy, http):
    sim.load_delay = 0.5  # Ollama sends no headers while it loads a model
    proxy = await make_proxy(heartbeat={"interval": "100ms"})
    body = {"model": "llama3.2", "messages": [], "stream": True}
    async with http.post(proxy.listen_url + "/v1/chat/completions", json=body) as resp:
        data = await resp.read()
    assert resp.status == 200
    assert re.match(rb"(: running, waiting for upstream\n\n){3,}data: ", data)


def hand_written_upstream(handler) -> contextlib.AbstractAsyncContextManager[str]:
    """An upstream for timings the simulator does not offer; yields its URL."""
    app = web.Application()
    app.router.add_post("/api/generate", handler)
    return serving(app)


async def test_frames_mid_stream_go_only_between_lines(make_proxy, http):
    """An upstream that pauses mid-line and between lines: frames only at the latter."""

    async def stalling(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        await resp.write(b'{"model":"llama3.2","created_at":"2024-01-01T00:00:00Z","resp')
        await asyncio.sleep(0.5)  # silent mid-line: no frame may go here
        await resp.write(b'onse":"a","done":false}\n')
        await asyncio.sleep(0.5)  # silent between lines: frames go here
        await resp.write(
            b'{"model":"llama3.2","created_at":"2024-01-01T00:00:00Z","response":"","done":true}\n'
        )
        return resp

    async with hand_written_upstream(stalling) as upstream:
        proxy = await make_proxy(upstream=upstream, heartbeat={"interval": "100ms"})
        async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
            data = await resp.read()
    lines = data.splitlines(keepends=True)
    assert [json.loads(line) for line in lines]  # every line whole JSON
    assert lines[0].startswith(b'{"model":"llama3.2","created_at":"2024-01-01T00:00:00Z","response":"a"')
    middle = lines[1:-1]
    assert len(middle) >= 3 and all(GENERATE_FRAME.fullmatch(f) for f in middle)
    assert json.loads(lines[-1])["done"] is True


async def test_no_frame_is_added_to_a_body_upstream_sized_itself(make_proxy, http):
    """With Content-Length, upstream owns the framing: pauses get no frames."""
    body = b'{"model":"llama3.2","response":"whole","done":true}\n'

    async def sized(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        resp.content_length = len(body)
        await resp.prepare(request)  # headers go out now...
        await asyncio.sleep(0.4)  # ...then a silence that would earn frames
        await resp.write(body)
        return resp

    async with hand_written_upstream(sized) as upstream:
        proxy = await make_proxy(upstream=upstream, heartbeat={"interval": "100ms"})
        async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
            assert await resp.read() == body
            assert resp.headers["Content-Length"] == str(len(body))


# -- in-band errors after a keep-alive 200 -------------------------------------


async def test_queue_timeout_after_keepalive_is_an_inband_error(sim, make_proxy, http):
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "queue_timeout": "350ms"}, heartbeat={"interval": "100ms"}
    )
    holder = await hold_the_slot(sim, http, proxy)
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        data = await resp.read()
    await release(holder)
    assert resp.status == 200
    *frames, last = data.splitlines(keepends=True)
    assert frames and all(GENERATE_FRAME.fullmatch(f) for f in frames)
    assert last.endswith(b"\n")
    assert "limits.queue_timeout=350ms" in json.loads(last)["error"]


async def test_upstream_error_status_after_keepalive_is_reported_inband(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "100ms"})
    holder = await hold_the_slot(sim, http, proxy)
    sim.fault, sim.fault_status = "status", 404  # for the request below, not the holder
    asyncio.get_running_loop().call_later(0.35, holder.cancel)
    body = {"model": "llama3.2", "messages": [], "stream": True}
    async with http.post(proxy.listen_url + "/v1/chat/completions", json=body) as resp:
        data = await resp.read()
    await release(holder)
    assert resp.status == 200
    events = data.split(b"\n\n")
    assert events[-1] == b""
    error = json.loads(events[-2].removeprefix(b"data: "))["error"]
    assert error["message"] == "upstream answered 404: simulated failure"
    assert error["code"] == "upstream_error"


@pytest.mark.parametrize(
    ("path", "body", "content_type", "error"),
    [
        ("/api/generate", {"model": "llama3.2", "stream": False}, "application/json; charset=utf-8",
         rb'\{"error":"[^"]*limits\.queue_timeout=350ms[^"]*"\}'),
        ("/v1/embeddings", {"model": "llama3.2", "input": "x"}, "application/json",
         rb'\{"error":\{"message":"[^"]*limits\.queue_timeout=350ms[^"]*",'
         rb'"type":"server_error","code":"queue_timeout"\}\}'),
    ],
    ids=["ollama", "openai"],
)  # fmt: skip
async def test_non_streaming_failure_after_keepalive_is_an_error_body_left_unterminated(
    sim, make_proxy, http, caplog, path, body, content_type, error
):
    """The error chunk goes out whole, the chunked body never ends and the connection closes:
    a strict client raises instead of reading a complete 200 as an empty success."""
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "queue_timeout": "350ms"}, heartbeat={"interval": "100ms"}
    )
    holder = await hold_the_slot(sim, http, proxy)
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection(*address(proxy))
    try:
        writer.write(
            b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
            % (path.encode(), len(payload), payload)
        )
        async with asyncio.timeout(10):
            data = await reader.read(-1)  # to EOF: the proxy closes the connection
    finally:
        writer.close()
        await release(holder)
    head, _, chunks = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nTransfer-Encoding: chunked" in head
    assert f"\r\nContent-Type: {content_type}".encode() in head
    match = re.fullmatch(rb"(?:1\r\n\n\r\n)+([0-9a-f]+)\r\n(.*)\r\n", chunks, re.DOTALL)
    assert match, chunks  # keep-alive chunks, then one error chunk, and no 0\r\n\r\n
    assert int(match.group(1), 16) == len(match.group(2))
    assert re.fullmatch(error, match.group(2)), match.group(2)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.ERROR]


async def test_upstream_dying_mid_stream_ends_with_an_inband_error(sim, make_proxy, http):
    sim.fault, sim.fault_after = "die", 2
    proxy = await make_proxy()
    async with http.post(proxy.listen_url + "/api/chat", json={"model": "llama3.2", "messages": []}) as resp:
        data = await resp.read()
    assert resp.status == 200
    lines = [json.loads(line) for line in data.splitlines()]
    assert len(lines) == 3 and all("message" in line for line in lines[:2])
    assert lines[-1]["error"].startswith("upstream broke off the response")


async def test_upstream_silent_mid_stream_past_read_timeout_is_an_inband_504(sim, make_proxy, http):
    sim.fault, sim.fault_after = "hang_body", 1
    proxy = await make_proxy(timeouts={"read": "300ms"}, heartbeat={"interval": "10s"})
    async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
        data = await resp.read()
    lines = [json.loads(line) for line in data.splitlines()]
    assert lines[-1] == {"error": "upstream sent nothing for 300ms; the model may be stuck, retry later"}
    assert len(lines) == 2


async def test_a_compressed_answer_after_keepalive_is_an_error_not_garbage(make_proxy, http):
    """Ollama never compresses, but an upstream that does cannot follow a plain 200."""

    async def late_gzip(request: web.Request) -> web.Response:
        await asyncio.sleep(0.3)  # long enough for keep-alive frames to start the 200
        body = gzip.compress(b'{"model":"llama3.2","response":"x","done":true}\n')
        return web.Response(body=body, headers={"Content-Encoding": "gzip"})

    async with hand_written_upstream(late_gzip) as upstream:
        proxy = await make_proxy(upstream=upstream, heartbeat={"interval": "100ms"})
        async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
            data = await resp.read()
    *frames, last = data.splitlines()
    assert resp.status == 200 and "Content-Encoding" not in resp.headers
    assert frames and all(GENERATE_FRAME.fullmatch(f + b"\n") for f in frames)
    assert "Content-Encoding: gzip" in json.loads(last)["error"]
