"""The listen port below HTTP without the proxy: the connection cap on its own site, over
real loopback sockets in front of a one-route app, and the parser limits aiohttp is given."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator

import pytest
from aiohttp import web

from proxy.config import RESTART_ONLY_KEYS, RequestConfig
from proxy.edge import listener
from proxy.edge.listener import CappedSite, ConnectionCap
from tests.support import eventually


@pytest.fixture
async def capped() -> AsyncIterator[tuple[ConnectionCap, CappedSite, web.AppRunner]]:
    """A one-route app behind a cap of one connection, on a free loopback port."""

    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", hello)
    runner = web.AppRunner(app)
    await runner.setup()
    cap = ConnectionCap(1, lambda: ())
    site = CappedSite(runner, "127.0.0.1", 0, cap)
    await site.start()
    try:
        yield cap, site, runner
    finally:
        await runner.cleanup()


async def connect(site: CappedSite) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, _, port = site.name.removeprefix("http://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def ask(site: CappedSite, target: str) -> bytes:
    """One request on a new connection that says it will close; every byte answered, to EOF."""
    reader, writer = await connect(site)
    writer.write(
        f"POST {target} HTTP/1.1\r\nHost: test\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    try:
        async with asyncio.timeout(30):
            return await reader.read(-1)
    finally:
        writer.close()


async def test_the_connection_over_the_cap_gets_the_503_in_its_paths_shape(capped):
    cap, site, _ = capped
    reader, writer = await connect(site)  # holds the one place
    writer.write(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
    assert (await reader.readuntil(b"hello")).startswith(b"HTTP/1.1 200")
    assert cap.open == 1

    native = await ask(site, "/api/chat")
    openai = await ask(site, "/v1/chat/completions")
    for raw, content_type in ((native, "application/json; charset=utf-8"), (openai, "application/json")):
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503 Service Unavailable\r\n")
        assert f"Content-Type: {content_type}\r\n".encode() in head + b"\r\n"
        assert b"Retry-After: 1" in head and b"Connection: close" in head
    message = "too many connections: listen.max_connections=1; retry shortly"
    assert json.loads(native.partition(b"\r\n\r\n")[2]) == {"error": message}
    assert json.loads(openai.partition(b"\r\n\r\n")[2]) == {
        "error": {"message": message, "type": "server_error", "code": "too_many_connections"}
    }
    assert cap.refused == 2 and cap.open == 1

    writer.close()  # the place frees once the connection is gone
    await eventually(lambda: cap.open == 0)
    assert (await ask(site, "/api/tags")).startswith(b"HTTP/1.1 200")


async def test_stopping_closes_the_port_and_the_refused_connections_still_lingering(capped):
    cap, site, runner = capped
    _, holder = await connect(site)
    await eventually(lambda: cap.open == 1)
    lingering, writer = await connect(site)  # refused, and sends nothing: it lingers
    await eventually(lambda: cap.refused == 1)
    name = site.name
    await runner.cleanup()
    async with asyncio.timeout(30):
        await lingering.read(-1)
    await eventually(lambda: cap.open == 0)
    host, _, port = name.removeprefix("http://").rpartition(":")
    with pytest.raises(OSError):
        await asyncio.open_connection(host, int(port))
    holder.close()
    writer.close()


async def test_a_reloaded_cap_applies_to_new_connections(capped):
    cap, site, _ = capped
    _, first = await connect(site)
    await eventually(lambda: cap.open == 1)
    cap.resize(2)
    _, second = await connect(site)
    await eventually(lambda: cap.open == 2)
    refused = await ask(site, "/api/tags")
    assert refused.startswith(b"HTTP/1.1 503") and b"listen.max_connections=2;" in refused
    second.close()
    first.close()


def test_the_site_names_the_port_it_bound(capped):
    _, site, _ = capped
    assert site.name.startswith("http://127.0.0.1:") and not site.name.endswith(":0")


def _changed(value: object) -> object:
    return value + "x" if isinstance(value, str) else value * 2 + 1  # type: ignore[operator]


@pytest.mark.parametrize("name", [f.name for f in dataclasses.fields(RequestConfig)])
def test_the_parser_limits_aiohttp_is_given_once_are_exactly_the_restart_only_request_keys(name):
    """A request key that `handler_options` reads is bound when the port opens: a reload
    must keep it (and say so), which it does for the keys `RESTART_ONLY_KEYS` lists."""
    base = RequestConfig()
    other = dataclasses.replace(base, **{name: _changed(getattr(base, name))})
    bound = listener.handler_options(other) != listener.handler_options(base)
    assert bound == (f"request.{name}" in RESTART_ONLY_KEYS)
