"""Slow and hostile clients at the connection level, over raw loopback sockets.

What a client can hold or send before a handler runs is bounded: header size,
the time the headers may take, the time the body may take, the body's size
while it streams, and the number of connections open at once. A malformed
request costs one log line, never a traceback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import socket
import struct
from collections.abc import AsyncIterator

import httpx
import pytest

from proxy.config import config_from_dict
from proxy.server import Server
from tests.support import eventually, proxy_config

Conn = tuple[asyncio.StreamReader, asyncio.StreamWriter]

REFUSED_BODY = b'{"error":"too many connections: listen.max_connections=5; retry shortly"}'
REFUSED = (
    b"HTTP/1.1 503 Service Unavailable\r\n"
    b"Content-Type: application/json; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Retry-After: 1\r\n"
    b"Connection: close\r\n\r\n" % len(REFUSED_BODY)
) + REFUSED_BODY
VERSION = b"GET /api/version HTTP/1.1\r\nHost: x\r\n\r\n"


def address(server: Server) -> tuple[str, int]:
    host, port = server.listen_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def connect(server: Server) -> Conn:
    return await asyncio.open_connection(*address(server))


@contextlib.asynccontextmanager
async def connections(server: Server, n: int) -> AsyncIterator[list[Conn]]:
    conns = [await connect(server) for _ in range(n)]
    try:
        yield conns
    finally:
        for _, writer in conns:
            writer.close()


async def until_eof(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[bytes, float]:
    """Everything the proxy sends until it closes, and how long that took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with asyncio.timeout(timeout):
        data = await reader.read()
    return data, loop.time() - start


async def response(reader: asyncio.StreamReader, timeout: float = 3.0) -> tuple[bytes, dict[str, str], bytes]:
    """One response framed by its Content-Length: status line, headers, body."""
    async with asyncio.timeout(timeout):
        head = await reader.readuntil(b"\r\n\r\n")
        status, *lines = head.decode("latin-1").split("\r\n")[:-2]
        headers = dict(line.split(": ", 1) for line in lines)
        body = await reader.readexactly(int(headers["Content-Length"]))
    return status.encode(), headers, body


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST rather than a FIN, as a crashed client or a middlebox would."""
    writer.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


def no_slot_taken(server: Server) -> bool:
    admission = server.state.admission
    return admission.running_total == 0 and admission.waiting_total == 0


# --- bounded headers ---------------------------------------------------------


async def test_a_header_line_over_the_bound_is_refused_before_the_handler(make_proxy, sim):
    # 1 KiB is below aiohttp's own 8190, so a 400 here proves our bound is the one applied.
    proxy = await make_proxy(request={"max_header_size": "1KiB"})
    reader, writer = await connect(proxy)
    writer.write(b"POST /api/generate HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1100 + b"\r\n\r\n")
    data, _ = await until_eof(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert b"Got more than 1024 bytes" in data
    assert sim.records == []

    reader, writer = await connect(proxy)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 1000 + b"\r\n\r\n")
    status, _, body = await response(reader)
    writer.close()
    assert status == b"HTTP/1.1 200 OK" and b"version" in body


async def test_more_than_100_header_lines_are_refused(make_proxy):
    proxy = await make_proxy()
    reader, writer = await connect(proxy)
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(101))
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    data, _ = await until_eof(reader)
    writer.close()
    assert data.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert b"Too many headers" in data


@pytest.mark.parametrize(
    "garbage",
    [
        b"GET / HTTP/1.1\r\nBad Header\r\n\r\n",
        b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: x\r\nCookie: " + b"c" * 20 * 1024 + b"\r\n\r\n",
    ],
    ids=["header-without-colon", "nul-in-request-line", "20KiB-header"],
)
async def test_a_malformed_request_costs_one_info_line_and_no_traceback(make_proxy, sim, caplog, garbage):
    proxy = await make_proxy()
    caplog.set_level(logging.DEBUG)
    reader, writer = await connect(proxy)
    writer.write(garbage)
    data, _ = await until_eof(reader)  # aiohttp logs before it answers
    writer.close()
    assert data.startswith(b"HTTP/1.0 400 Bad Request\r\n")
    assert sim.records == []
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
    assert [r for r in caplog.records if r.exc_info or r.exc_text] == []
    lines = [r for r in caplog.records if r.name == "proxy.http"]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    message = lines[0].getMessage()
    assert message.startswith("bad request from 127.0.0.1: 400 ")
    assert "\n" not in message and len(message) < 300


# --- header deadline ---------------------------------------------------------


async def test_headers_trickled_slower_than_header_timeout_are_cut_off(make_proxy, sim):
    proxy = await make_proxy(request={"header_timeout": "500ms"})
    reader, writer = await connect(proxy)
    writer.write(b"GET /api/version HTTP/1.1\r\nHost: x\r\n")

    async def trickle() -> None:
        # One header byte every 100 ms: new bytes must not push the deadline back.
        with contextlib.suppress(ConnectionError):
            for _ in range(30):
                await asyncio.sleep(0.1)
                writer.write(b"X")
                await writer.drain()

    trickler = asyncio.create_task(trickle())
    try:
        data, took = await until_eof(reader)
    finally:
        trickler.cancel()
        writer.close()
    assert data == b""
    assert 0.4 <= took <= 2.0
    await eventually(lambda: proxy.connections.open == 0)


async def test_an_idle_keepalive_connection_is_closed_after_header_timeout(make_proxy):
    proxy = await make_proxy(request={"header_timeout": "500ms"})
    reader, writer = await connect(proxy)
    writer.write(VERSION)
    status, _, _ = await response(reader)
    assert status == b"HTTP/1.1 200 OK"
    data, took = await until_eof(reader)
    writer.close()
    assert data == b"" and 0.4 <= took <= 2.0


# --- body deadline and size --------------------------------------------------


async def test_a_trickled_body_gets_408_and_never_reaches_the_queue(make_proxy, sim):
    proxy = await make_proxy(request={"body_timeout": "500ms"})
    reader, writer = await connect(proxy)
    head = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
    writer.write(head + b'{"model":"')
    loop = asyncio.get_running_loop()
    start = loop.time()
    status, headers, body = await response(reader)
    took = loop.time() - start
    writer.close()
    assert status == b"HTTP/1.1 408 Request Timeout"
    assert headers["Connection"] == "close"
    assert json.loads(body) == {
        "error": "the request body did not arrive within request.body_timeout=500ms; send the whole body at once"
    }
    assert 0.4 <= took <= 2.0
    assert sim.records == []
    assert no_slot_taken(proxy)


async def test_a_chunked_body_over_max_body_gets_413_before_it_ends(make_proxy, sim):
    proxy = await make_proxy(request={"max_body": "1KiB"})
    reader, writer = await connect(proxy)
    head = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunk = b"x" * 1025
    writer.write(head + b"%x\r\n%s\r\n" % (len(chunk), chunk))  # no final 0-chunk: the body never ends
    status, headers, body = await response(reader)
    writer.close()
    assert status == b"HTTP/1.1 413 Request Entity Too Large"
    assert headers["Connection"] == "close"
    assert json.loads(body) == {
        "error": "request body is larger than request.max_body=1 KiB; send a smaller body or raise request.max_body"
    }
    assert sim.records == []
    assert no_slot_taken(proxy)


# --- connection cap ----------------------------------------------------------


async def test_the_connection_over_max_connections_gets_a_canned_503(make_proxy):
    proxy = await make_proxy(listen={"max_connections": 5})
    async with connections(proxy, 5) as idle:
        await eventually(lambda: proxy.connections.open == 5)

        reader, writer = await connect(proxy)
        data, took = await until_eof(reader)
        writer.close()
        assert data == REFUSED and took < 1.0

        # httpx (under the ollama and openai clients) sends its whole body before reading:
        # closing on unread bytes would RST the 503 away, so the refusal drains them first.
        async with httpx.AsyncClient(timeout=5) as client:
            resp = await client.post(proxy.listen_url + "/api/generate", content=b"x" * 256 * 1024)
        assert resp.status_code == 503
        assert resp.headers["Retry-After"] == "1"
        assert resp.content == REFUSED_BODY
        assert proxy.connections.refused == 2

        reset(idle.pop()[1])  # a client RST frees its place like a clean close
        await eventually(lambda: proxy.connections.open == 4)
        reader, writer = await connect(proxy)
        writer.write(VERSION)
        status, _, _ = await response(reader)
        writer.close()
        assert status == b"HTTP/1.1 200 OK"
    await eventually(lambda: proxy.connections.open == 0)
    assert proxy.connections.refused == 2


REFUSED_OPENAI_BODY = (
    b'{"error":{"message":"too many connections: listen.max_connections=1; retry shortly",'
    b'"type":"server_error","code":"too_many_connections"}}'
)


REFUSED_OLLAMA_BODY = REFUSED_BODY.replace(b"=5", b"=1")
CORS_HEADERS = b"Vary: Origin\r\nAccess-Control-Allow-Origin: http://localhost:5173\r\n"


@pytest.mark.parametrize(
    ("head", "content_type", "cors", "body"),
    [
        (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n\r\n", b"application/json", b"", REFUSED_OPENAI_BODY),
        (b"GET //v1/./models HTTP/1.1\r\n", b"application/json", b"", REFUSED_OPENAI_BODY),
        (b"POST /api/chat HTTP/1.1\r\nHost: x\r\n\r\n", b"application/json; charset=utf-8", b"",
         REFUSED_OLLAMA_BODY),
        (b"POST /v1%2 HTTP/1.1\r\n\r\n", b"application/json; charset=utf-8", b"", REFUSED_OLLAMA_BODY),
        (b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\norigin: http://localhost:5173\r\n\r\n",
         b"application/json", CORS_HEADERS, REFUSED_OPENAI_BODY),
        (b"POST /api/chat HTTP/1.1\r\nHost: x\r\nOrigin: https://evil.example\r\n\r\n",
         b"application/json; charset=utf-8", b"", REFUSED_OLLAMA_BODY),
    ],
    ids=["openai", "openai-uncanonical-line-only", "ollama", "unparsable", "cors", "origin-not-allowed"],
)  # fmt: skip
async def test_the_connection_cap_503_takes_the_shape_of_the_request(
    make_proxy, head, content_type, cors, body
):
    """Only the request head is read: /v1 paths (as the handler would canonicalise them)
    get OpenAI's error shape, everything else Ollama's, and an allowed browser `Origin`
    its CORS headers, as every other error does."""
    proxy = await make_proxy(listen={"max_connections": 1})
    async with connections(proxy, 1):
        await eventually(lambda: proxy.connections.open == 1)
        reader, writer = await connect(proxy)
        writer.write(head)  # the body never needs to come
        data, _ = await until_eof(reader)
        writer.close()
    expected = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: %s\r\nContent-Length: %d\r\n" % (
        content_type,
        len(body),
    )
    assert data == expected + b"Retry-After: 1\r\n" + cors + b"Connection: close\r\n\r\n" + body


async def test_the_count_returns_to_zero_when_the_server_stops(sim):
    server = Server(config_from_dict(proxy_config(sim.url, listen={"max_connections": 3})))
    await server.start()
    async with connections(server, 3) as idle:
        await eventually(lambda: server.connections.open == 3)
        refused_reader, refused_writer = await connect(server)
        await eventually(lambda: server.connections.refused == 1)
        await server.stop()
        assert server.connections.open == 0
        for reader, _ in [*idle, (refused_reader, refused_writer)]:
            await until_eof(reader)
        refused_writer.close()
