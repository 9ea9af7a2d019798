"""`Reply` on its own: it commits once, puts frames only at boundaries, and fails in the shape
the moment allows. Each case runs a scripted handler on a loopback port and reads the raw
bytes the client got, so a missing chunked terminator (a cut response) shows as such."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from proxy.edge.keepalive import Heartbeats, KeepAlive
from proxy.edge.reply import Reply
from proxy.errors import JSON_NATIVE, JSON_OPENAI, QueueFull, UpstreamReset
from proxy.ollama.frames import Wire
from tests.support import serving

#: The end of a chunked body: what a cut response lacks.
TERMINATOR = b"0\r\n\r\n"
#: Longer than any `heartbeat.interval` below: time passing, not waiting for an event.
PAST = 0.05
NDJSON = {"Content-Type": "application/x-ndjson"}


async def exchange(scenario: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> bytes:
    """Serve `scenario` once and return every byte a raw HTTP/1.1 client received, to EOF."""
    app = web.Application()
    app.router.add_get("/", scenario)
    async with serving(app) as url:
        port = int(url.rpartition(":")[2])
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n")
        try:
            async with asyncio.timeout(30):
                return await reader.read(-1)
        finally:
            writer.close()


def status_of(raw: bytes) -> int:
    return int(raw.split(b" ", 2)[1])


def body_of(raw: bytes) -> bytes:
    """The body with chunk sizes removed (the terminator too, if it came)."""
    head, _, rest = raw.partition(b"\r\n\r\n")
    if b"transfer-encoding: chunked" not in head.lower():
        return rest
    out = b""
    while rest:
        size, _, rest = rest.partition(b"\r\n")
        length = int(size, 16)
        out, rest = out + rest[:length], rest[length + 2 :]
    return out


def never_due() -> str:
    raise AssertionError("only SSE frames ask where the request stands")


async def test_the_response_is_committed_once():
    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=False, wire=Wire.GENERATE)
        reply.headers["X-Queue-Wait"] = "0.000"
        assert await reply.start(200, NDJSON)
        assert not await reply.start(500, {"Content-Type": "text/plain"})
        await reply.write(b'{"done":true}\n')
        assert reply.sent == 14
        return await reply.finish()

    raw = await exchange(scenario)
    assert status_of(raw) == 200
    assert b"x-queue-wait: 0.000" in raw.lower()
    assert body_of(raw) == b'{"done":true}\n' and raw.endswith(TERMINATOR)


async def test_a_keepalive_200_beats_upstreams_status_and_its_error_goes_in_band():
    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=False, wire=Wire.GENERATE, model="m", interval=0.01)
        await asyncio.sleep(PAST)  # silent for longer than the interval: a frame is due
        assert await reply.beat(never_due) is not None  # the first frame is out: a 200
        assert reply.response is not None and reply.response.status == 200
        assert not await reply.start(500, NDJSON)
        return await reply.fail(UpstreamReset("upstream broke off"))

    raw = await exchange(scenario)
    assert status_of(raw) == 200
    frame, error = body_of(raw).splitlines()
    assert json.loads(frame)["model"] == "m" and json.loads(frame)["done"] is False
    assert json.loads(error) == {"error": "upstream broke off"}
    assert raw.endswith(TERMINATOR)  # an NDJSON client reads the error line as the end


async def test_no_frame_lands_inside_a_line_of_upstreams_data():
    async def scenario(request: web.Request) -> web.StreamResponse:
        frames: list[None] = []
        reply = Reply(
            request, openai=False, wire=Wire.CHAT, interval=0.01, on_frame=lambda: frames.append(None)
        )
        assert await reply.start(200, NDJSON)
        await reply.write(b'{"message":')
        await asyncio.sleep(PAST)
        loop = asyncio.get_running_loop()
        later = await reply.beat(never_due)
        assert later is not None and later > loop.time() and not frames  # mid-line: not yet
        await reply.write(b'"hi"}\n')
        await asyncio.sleep(PAST)
        assert await reply.beat(never_due) is not None
        assert len(frames) == 1  # at the boundary: a frame
        return await reply.finish()

    body = body_of(await exchange(scenario))
    first, frame = body.splitlines()
    assert first == b'{"message":"hi"}'
    assert json.loads(frame)["done"] is False


async def test_an_sse_frame_carries_the_note():
    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=True, wire=Wire.SSE, interval=0.01)
        await asyncio.sleep(PAST)  # silent for longer than the interval: a frame is due
        assert await reply.beat(lambda: "queued, position 1 of 2") is not None
        return await reply.finish()

    raw = await exchange(scenario)
    assert b"content-type: text/event-stream" in raw.lower()
    assert body_of(raw) == b": queued, position 1 of 2\n\n"


async def test_upstreams_own_framing_ends_the_keepalive():
    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=False, wire=Wire.GENERATE, interval=0.01)
        assert reply.next_beat() is not None
        assert await reply.start(200, {"Content-Type": "application/json", "Content-Length": "2"})
        assert reply.next_beat() is None
        assert await reply.beat(never_due) is None
        await reply.write(b"{}")
        return await reply.finish()

    raw = await exchange(scenario)
    assert body_of(raw) == b"{}"


async def test_a_reply_without_an_interval_or_a_wire_never_beats():
    request = make_mocked_request("GET", "/")
    assert Reply(request, openai=False, wire=Wire.GENERATE).next_beat() is None
    assert Reply(request, openai=False, interval=10.0).next_beat() is None


async def test_a_failure_before_anything_was_sent_is_a_whole_response_in_the_paths_shape():
    for openai, content_type in ((False, JSON_NATIVE), (True, JSON_OPENAI)):
        reply = Reply(make_mocked_request("POST", "/"), openai=openai, cors=(("Vary", "Origin"),))
        reply.headers["X-Queue-Wait"] = "1.500"
        response = await reply.fail(QueueFull("queue is full", retry_after=1))
        assert isinstance(response, web.Response) and response.status == 503
        assert response.headers["Content-Type"] == content_type
        assert response.headers["Retry-After"] == "1"
        assert response.headers["X-Queue-Wait"] == "1.500"
        assert response.headers["Vary"] == "Origin"
        payload = json.loads(response.body)  # type: ignore[arg-type]
        expected = {"message": "queue is full", "type": "server_error", "code": "queue_full"}
        assert payload == ({"error": expected} if openai else {"error": "queue is full"})
        assert reply.sent == len(response.body)  # type: ignore[arg-type]


async def test_a_non_streaming_failure_after_a_keepalive_is_an_error_body_left_unterminated():
    """Issue 8: a whole `{"error":...}` under a 200 reads as an empty success to the client
    libraries; unterminated, it is a transport error to every client."""

    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=True, wire=Wire.JSON, interval=0.01)
        await asyncio.sleep(PAST)  # silent for longer than the interval: a frame is due
        assert await reply.beat(never_due) is not None
        return await reply.fail(UpstreamReset("upstream broke off"))

    raw = await exchange(scenario)
    assert status_of(raw) == 200
    body = body_of(raw)
    assert body.startswith(b"\n")
    assert json.loads(body)["error"]["message"] == "upstream broke off"
    assert not raw.endswith(TERMINATOR)


async def test_a_failure_mid_line_cuts_the_response():
    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=False, wire=Wire.GENERATE)
        assert await reply.start(200, NDJSON)
        await reply.write(b'{"response":"par')
        return await reply.fail(UpstreamReset("upstream broke off"))

    raw = await exchange(scenario)
    assert body_of(raw) == b'{"response":"par' and not raw.endswith(TERMINATOR)


async def test_the_keepalive_beats_through_the_ticker_until_its_block_ends():
    beaten = asyncio.Event()
    ticker = Heartbeats()

    async def scenario(request: web.Request) -> web.StreamResponse:
        reply = Reply(request, openai=False, wire=Wire.GENERATE, interval=0.01, on_frame=beaten.set)
        async with KeepAlive(reply, ticker, never_due):
            await beaten.wait()
        assert len(ticker) == 0  # the block's end took its entry with it
        await reply.write(b'{"done":true}\n')
        return await reply.finish()

    raw = await exchange(scenario)
    frame, last = body_of(raw).splitlines()
    assert json.loads(frame)["done"] is False and last == b'{"done":true}'
