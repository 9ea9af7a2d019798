"""The least an aiohttp reverse proxy can do: one handler, one client call, no queue,
no frames, no logs. The proxy's figures over this one are what its own features cost;
this one's over nginx are what aiohttp and CPython cost.

    python -m bench.floor UPSTREAM_URL PORT
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "transfer-encoding", "content-length"})


async def _session(app: web.Application) -> AsyncIterator[None]:
    app[SESSION] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), auto_decompress=False)
    yield
    await app[SESSION].close()


async def _relay(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream_url = request.app[UPSTREAM] + request.raw_path
    async with request.app[SESSION].request(request.method, upstream_url, data=body or None) as upstream:
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
        response = web.StreamResponse(status=upstream.status, headers=headers)
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


def main() -> None:
    upstream, port = sys.argv[1], int(sys.argv[2])
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(_session)
    app.router.add_route("*", "/{path:.*}", _relay)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None, handler_cancellation=True)


if __name__ == "__main__":
    main()
