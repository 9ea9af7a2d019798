"""The byte relay: what passes through unchanged, which headers are dropped or
added, and that bytes flow as they arrive, whatever their size."""

from __future__ import annotations

import asyncio
import base64
import gzip
import json
import re
from collections.abc import AsyncIterator

import aiohttp
import pytest
import yarl
from aiohttp import web
from multidict import CIMultiDict

from tests.support import hold_the_slot, release, sample, scrape, serving

MODEL = "llama3.2"
#: What the client sends that no upstream may see (RFC 9110 7.6.1), besides Connection itself.
HOP_BY_HOP_REQUEST = {
    "Keep-Alive": "timeout=5, max=100",
    "Proxy-Authorization": "Basic cHJveHk6c2VjcmV0",
    "TE": "trailers",
    "Trailer": "X-Checksum",
    "Upgrade": "websocket",
    "X-Secret": "named-in-connection",
}
END_TO_END_REQUEST = {
    "Authorization": "Bearer sk-end-to-end",
    "X-App": "my-app/2.1",
    "User-Agent": "custom-agent/1.0 (tests)",
    "Cookie": "client=own-cookie",
    "Accept": "application/x-ndjson",
}
GZIPPED = gzip.compress(b'{"models":[]}' * 200, mtime=0)
SET_COOKIES = ["session=abc123; Path=/; HttpOnly", "theme=dark; Max-Age=3600; Path=/"]


# -- a hand-written upstream that reports what it received --------------------------------


async def _echo(request: web.Request) -> web.Response:
    """The request line, query, headers and body exactly as they arrived."""
    version = f"HTTP/{request.version.major}.{request.version.minor}"
    return web.json_response(
        {
            "request_line": f"{request.method} {request.raw_path} {version}",
            "raw_path": request.raw_path,
            "query": request.rel_url.raw_query_string,
            "headers": [[k, v] for k, v in request.headers.items()],
            "body": base64.b64encode(await request.read()).decode(),
        }
    )


async def _hop_by_hop(request: web.Request) -> web.Response:
    headers = {
        "Connection": "x-upstream-secret",
        "X-Upstream-Secret": "only-for-the-next-hop",
        "Keep-Alive": "timeout=5",
        "Proxy-Authenticate": 'Basic realm="upstream"',
        "Trailer": "X-Checksum",
        "Upgrade": "h2c",
        "X-Custom": "passes",
    }
    return web.Response(body=b"hop", headers=headers, content_type="text/plain")


async def _gzip(request: web.Request) -> web.StreamResponse:
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json", "Vary": "Accept-Encoding"}
    if request.query.get("sized") == "1":
        return web.Response(body=GZIPPED, headers=headers)
    resp = web.StreamResponse(headers=headers)  # chunked: no Content-Length
    await resp.prepare(request)
    half = len(GZIPPED) // 2
    await resp.write(GZIPPED[:half])
    await resp.write(GZIPPED[half:])
    await resp.write_eof()
    return resp


async def _cookie(request: web.Request) -> web.Response:
    headers = CIMultiDict([("Set-Cookie", value) for value in SET_COOKIES])
    headers["X-Custom"] = "cookie-page"
    headers["Cache-Control"] = "no-store"
    return web.Response(text="cookies set", headers=headers)


@pytest.fixture
async def upstream() -> AsyncIterator[str]:
    app = web.Application(client_max_size=1 << 24)
    app.router.add_get("/hop", _hop_by_hop)
    app.router.add_get("/gzip", _gzip)
    app.router.add_get("/cookie", _cookie)
    app.router.add_route("*", "/{tail:.*}", _echo)
    async with serving(app, access_log=None, auto_decompress=False) as url:  # echo bodies as sent
        yield url


async def echoed(http: aiohttp.ClientSession, url: str | yarl.URL, **kwargs) -> dict:
    async with http.request(kwargs.pop("method", "GET"), url, **kwargs) as resp:
        assert resp.status == 200
        return await resp.json()


def header_pairs(echo: dict) -> list[tuple[str, str]]:
    return [(k, v) for k, v in echo["headers"]]


def values(echo: dict, name: str) -> list[str]:
    return [v for k, v in echo["headers"] if k.lower() == name.lower()]


# -- non-queued paths -----------------------------------------------------------------


@pytest.mark.parametrize(
    "method, path, body",
    [
        ("GET", "/", None),
        ("GET", "/api/tags", None),
        ("GET", "/api/ps", None),
        ("GET", "/api/version", None),
        ("GET", "/v1/models", None),
        ("GET", "/api/no-such-path", None),
        ("POST", "/api/show", {"model": MODEL}),
        ("POST", "/api/show", {"model": "nope"}),
        ("GET", "/api/generate", None),  # only POST to a generation path queues
    ],
)
async def test_non_queued_paths_are_relayed_unchanged(sim, make_proxy, http, method, path, body):
    async with http.post(sim.url + "/api/generate", json={"model": MODEL, "stream": False}) as resp:
        assert resp.status == 200  # a model is now loaded: /api/ps has something to list
    proxy = await make_proxy()
    generations = len(sim.records)

    async def fetch(base: str) -> tuple[int, str | None, str | None, bytes]:
        async with http.request(method, base + path, json=body) as resp:
            data = await resp.read()
            return resp.status, resp.headers.get("Content-Type"), resp.headers.get("Content-Length"), data

    direct = await fetch(sim.url)
    proxied = await fetch(proxy.listen_url)
    assert proxied == direct
    assert direct[3] and direct[2] == str(len(direct[3]))
    assert len(sim.records) == generations  # none of these is a generation upstream
    metrics = await scrape(http, proxy)
    assert (
        sample(metrics, "ollama_proxy_requests_total", endpoint="other", model="", code=str(direct[0])) == 1
    )


async def test_non_queued_paths_never_wait_for_a_slot(sim, make_proxy, http):
    """With the only slot taken and no queue room, /api/tags is still answered at once."""
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0})
    holder = await hold_the_slot(sim, http, proxy)
    try:
        async with http.post(proxy.listen_url + "/api/chat", json={"model": MODEL}) as resp:
            assert resp.status == 503  # the slot really is full
        async with asyncio.timeout(2):
            for path in ("/api/tags", "/api/version", "/v1/models"):
                async with http.get(proxy.listen_url + path) as resp:
                    assert resp.status == 200
                    await resp.read()
    finally:
        await release(holder)


async def test_head_is_relayed_without_a_body_and_keeps_the_connection_usable(sim, make_proxy):
    proxy = await make_proxy()
    # One pooled connection: a HEAD answer with a stray body would corrupt the next response.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=1), timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        async with session.head(sim.url + "/") as direct:
            assert await direct.read() == b""
        async with session.head(proxy.listen_url + "/") as resp:
            assert resp.status == direct.status == 200
            assert (
                resp.headers["Content-Type"] == direct.headers["Content-Type"] == "text/plain; charset=utf-8"
            )
            assert resp.headers["Content-Length"] == direct.headers["Content-Length"] == "17"
            assert await resp.read() == b""
        for _ in range(2):
            async with session.get(proxy.listen_url + "/") as resp:
                assert resp.status == 200 and await resp.read() == b"Ollama is running"


async def test_query_string_is_passed_through(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    target = "/api/tags?a=1%2B1&b=x%26y%3Dz&c=%25&empty=&empty=2&name=caf%C3%A9&plus=a+b&flag"
    direct = await echoed(http, yarl.URL(upstream + target, encoded=True))
    proxied = await echoed(http, yarl.URL(proxy.listen_url + target, encoded=True))
    assert proxied["request_line"] == direct["request_line"] == f"GET {target} HTTP/1.1"
    assert proxied["query"] == target.partition("?")[2]


async def test_upstream_path_prefix_is_kept(make_proxy, http, upstream):
    """Ollama behind another proxy at a prefix: the prefix, then the client's target."""
    proxy = await make_proxy(upstream=upstream + "/ollama/")
    proxied = await echoed(http, proxy.listen_url + "/api/tags?a=1")
    assert proxied["request_line"] == "GET /ollama/api/tags?a=1 HTTP/1.1"


@pytest.mark.parametrize(
    "target, canonical",
    [
        ("/api/x/../tags/./more?q=%7E&r=/../x", "/api/tags/more?q=%7E&r=/../x"),
        ("//api//%74ags/", "/api/tags/"),
        ("/api/show/caf%c3%a9%20x%3Fy", "/api/show/caf%C3%A9%20x%3Fy"),
        ("/../../api/tags", "/api/tags"),
    ],
)
async def test_upstream_gets_the_canonical_path_and_the_query_as_sent(
    make_proxy, http, upstream, target, canonical
):
    """The path that was classified is the one upstream runs; the query is not the proxy's to judge."""
    proxy = await make_proxy(upstream=upstream)
    proxied = await echoed(http, yarl.URL(proxy.listen_url + target, encoded=True))
    assert proxied["raw_path"] == canonical


async def test_dot_segments_cannot_smuggle_a_generation_past_the_queue(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0})
    holder = await hold_the_slot(sim, http, proxy)
    try:
        smuggled = yarl.URL(proxy.listen_url + "/api/x/../generate", encoded=True)
        async with http.post(smuggled, json={"model": MODEL, "stream": False}) as resp:
            await resp.read()
    finally:
        await release(holder)
    # Either it is not a generation upstream, or it was admitted like one (503 here).
    assert [r.path for r in sim.records] == ["/api/generate"]
    assert sim.peak == 1


# -- request headers ------------------------------------------------------------------------


async def test_hop_by_hop_request_headers_are_dropped_and_end_to_end_ones_kept(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    sent = CIMultiDict(
        {
            "Connection": "keep-alive, X-Secret",
            **HOP_BY_HOP_REQUEST,
            **END_TO_END_REQUEST,
            "Host": "client.example:8080",
        }
    )
    direct = await echoed(http, upstream + "/echo", headers=sent)
    proxied = await echoed(http, proxy.listen_url + "/echo", headers=sent)
    seen = CIMultiDict(header_pairs(proxied))

    for name in ["Connection", *HOP_BY_HOP_REQUEST]:
        assert name not in seen, name
    for name, value in END_TO_END_REQUEST.items():
        assert seen.getall(name) == [value], name
    assert seen.getall("Host") == [yarl.URL(upstream).raw_authority]
    assert seen.getall("X-Forwarded-For") == ["127.0.0.1"]
    # Exactly what the client sent, less hop-by-hop, with Host and X-Forwarded-For as above.
    dropped = {"connection", "host", *(name.lower() for name in HOP_BY_HOP_REQUEST)}
    expected = [(k, v) for k, v in header_pairs(direct) if k.lower() not in dropped]
    expected += [("Host", yarl.URL(upstream).raw_authority), ("X-Forwarded-For", "127.0.0.1")]
    assert sorted(header_pairs(proxied)) == sorted(expected)


async def test_proxy_adds_no_headers_the_client_did_not_send(make_proxy, upstream):
    proxy = await make_proxy(upstream=upstream)
    bare = ("User-Agent", "Accept", "Accept-Encoding")
    async with aiohttp.ClientSession(
        skip_auto_headers=bare, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        proxied = await echoed(session, proxy.listen_url + "/echo")
    assert sorted(k for k, _ in header_pairs(proxied)) == ["Host", "X-Forwarded-For"]


@pytest.mark.parametrize(
    "prior, expected",
    [
        ([], "127.0.0.1"),
        (["10.0.0.1"], "10.0.0.1, 127.0.0.1"),
        (["10.0.0.1, 192.168.1.7"], "10.0.0.1, 192.168.1.7, 127.0.0.1"),
        (["10.0.0.1", "10.0.0.2"], "10.0.0.1, 10.0.0.2, 127.0.0.1"),  # two header lines: one list
    ],
)
async def test_x_forwarded_for_gains_the_client_address(make_proxy, http, upstream, prior, expected):
    proxy = await make_proxy(upstream=upstream)
    headers = CIMultiDict([("X-Forwarded-For", value) for value in prior])
    proxied = await echoed(http, proxy.listen_url + "/echo", headers=headers)
    assert values(proxied, "X-Forwarded-For") == [expected]


async def test_queued_requests_get_the_same_header_treatment(sim, make_proxy, http):
    proxy = await make_proxy()
    headers = {"Connection": "keep-alive, X-Secret", **HOP_BY_HOP_REQUEST, **END_TO_END_REQUEST}
    headers["X-Forwarded-For"] = "10.0.0.1"
    async with http.post(
        proxy.listen_url + "/api/generate", json={"model": MODEL, "stream": False}, headers=headers
    ) as resp:
        assert resp.status == 200
        await resp.read()
    seen = sim.records[-1].headers
    for name in ["Connection", *HOP_BY_HOP_REQUEST]:
        assert name not in seen, name
    for name, value in END_TO_END_REQUEST.items():
        assert seen.getall(name) == [value], name
    assert seen.getall("X-Forwarded-For") == ["10.0.0.1, 127.0.0.1"]
    assert seen.getall("Host") == [yarl.URL(sim.url).raw_authority]


# -- response headers -------------------------------------------------------------------


async def test_hop_by_hop_response_headers_are_dropped(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    async with http.get(upstream + "/hop") as direct:
        assert direct.headers["X-Upstream-Secret"] == "only-for-the-next-hop"  # the upstream does send them
        assert direct.headers["Keep-Alive"] == "timeout=5"
        direct_type = direct.headers["Content-Type"]
    async with http.get(proxy.listen_url + "/hop") as resp:
        assert resp.status == 200 and await resp.read() == b"hop"
        headers = resp.headers
    for name in ("Connection", "X-Upstream-Secret", "Keep-Alive", "Proxy-Authenticate", "Trailer", "Upgrade"):
        assert name not in headers, name
    assert headers.getall("X-Custom") == ["passes"]
    assert headers["Content-Type"] == direct_type == "text/plain"


@pytest.mark.parametrize("sized", [True, False], ids=["content-length", "chunked"])
async def test_gzip_body_passes_through_undecoded(make_proxy, upstream, sized):
    proxy = await make_proxy(upstream=upstream)
    async with aiohttp.ClientSession(
        auto_decompress=False, timeout=aiohttp.ClientTimeout(total=10)
    ) as session:
        async with session.get(proxy.listen_url + f"/gzip?sized={int(sized)}") as resp:
            raw = await resp.read()
            headers = resp.headers
    assert resp.status == 200
    assert raw == GZIPPED  # the upstream's compressed bytes, not decoded, not recompressed
    assert headers["Content-Encoding"] == "gzip"
    assert headers["Content-Type"] == "application/json"
    assert headers["Vary"] == "Accept-Encoding"
    if sized:
        assert headers["Content-Length"] == str(len(GZIPPED))
    assert gzip.decompress(raw) == b'{"models":[]}' * 200


async def test_set_cookie_passes_through_and_is_never_replayed(make_proxy, http, upstream):
    # By name, not by address: a default aiohttp cookie jar ignores cookies from IP
    # addresses, so only a host name would reveal a jar in the proxy.
    proxy = await make_proxy(upstream=upstream.replace("127.0.0.1", "localhost"))
    async with http.get(proxy.listen_url + "/cookie") as resp:
        assert resp.status == 200 and await resp.text() == "cookies set"
        assert resp.headers.getall("Set-Cookie") == SET_COOKIES
        assert resp.headers["X-Custom"] == "cookie-page"
        assert resp.headers["Cache-Control"] == "no-store"
    # A different client, later: the proxy must not hold a cookie jar.
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as fresh:
        proxied = await echoed(fresh, proxy.listen_url + "/echo")
    assert values(proxied, "Cookie") == []
    assert values(proxied, "Host") == [yarl.URL(upstream).raw_authority.replace("127.0.0.1", "localhost")]


# -- bodies ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body",
    [
        ("/api/generate", {"model": MODEL, "prompt": "tell me"}),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": True},
        ),
    ],
    ids=["ndjson", "sse"],
)
async def test_stream_is_relayed_as_it_arrives(sim, make_proxy, http, path, body):
    sim.tokens, sim.token_delay = 5, 0.1
    proxy = await make_proxy()
    loop = asyncio.get_running_loop()

    async def timed() -> tuple[float, list[tuple[float, bytes]]]:
        sent_at = loop.time()
        async with http.post(proxy.listen_url + path, json=body) as resp:
            assert resp.status == 200
            return sent_at, [(loop.time(), chunk) async for chunk in resp.content.iter_any()]

    async def direct() -> bytes:
        async with http.post(sim.url + path, json=body) as resp:
            return await resp.read()

    (sent_at, arrivals), expected = await asyncio.gather(timed(), direct())
    assert b"".join(chunk for _, chunk in arrivals) == expected
    ended_at = arrivals[-1][0]
    # Upstream writes token 1 at 0.1 s and token 5 at 0.5 s; a buffering relay
    # would deliver them all together at the end.
    token_times = [t for t, chunk in arrivals for _ in TOKEN.finditer(chunk)]
    assert len(token_times) == 5
    assert token_times[0] - sent_at < 0.3
    assert ended_at - token_times[0] >= 0.3
    assert all(b - a >= 0.04 for a, b in zip(token_times, token_times[1:], strict=False))


#: A line carrying a generated word, in NDJSON (`response`) or SSE (`content`).
TOKEN = re.compile(rb'"(?:response|content)":"[^"]')


@pytest.mark.parametrize("stream", [True, False], ids=["ndjson", "json"])
async def test_very_large_final_line_is_relayed_byte_identical(sim, make_proxy, http, stream):
    sim.context_size = 200_000
    proxy = await make_proxy()
    body = {"model": MODEL, "prompt": "long context", "stream": stream}

    async def fetch(base: str) -> bytes:
        async with http.post(base + "/api/generate", json=body) as resp:
            assert resp.status == 200
            return await resp.read()

    direct, proxied = await asyncio.gather(fetch(sim.url), fetch(proxy.listen_url))
    assert len(direct.splitlines()[-1]) > 512 * 1024
    assert proxied == direct
    assert len(json.loads(proxied.splitlines()[-1])["context"]) == 200_000


UNUSUAL_JSON = (
    '{ "model" : "llama3.2",\n\t"prompt": "caf\u00e9 \u2014 \u65e5\u672c\u8a9e \U0001f600 line\u2028sep\u2029para",\r\n'
    '  "system": "escaped \\u00e9 \\u2028 \\ud83d\\ude00 \\"quoted\\" \\/ \\n",'
    ' "options": {"temperature": 1.0E-2, "num_predict": 3}, "stream": false }  \n'
).encode()


@pytest.mark.parametrize("path", ["/api/generate", "/v1/completions"])
@pytest.mark.parametrize("mode", ["sized", "chunked", "expect-100"])
async def test_request_body_reaches_upstream_byte_identical(sim, make_proxy, http, path, mode):
    proxy = await make_proxy()
    body = UNUSUAL_JSON

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 7):  # splits multi-byte characters across chunks
            yield body[start : start + 7]

    data = pieces() if mode == "chunked" else body
    async with http.post(
        proxy.listen_url + path,
        data=data,
        headers={"Content-Type": "application/json"},
        expect100=mode == "expect-100",
    ) as resp:
        assert resp.status == 200
        await resp.read()
    record = sim.records[-1]
    assert record.path == path and record.status == 200
    assert record.body == body
    assert record.headers["Content-Length"] == str(len(body))
    assert "Transfer-Encoding" not in record.headers and "Expect" not in record.headers


async def test_arbitrary_body_bytes_pass_both_ways_on_relayed_paths(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    body = bytes(range(256)) * 64 + b"\r\n\r\n\x00"
    proxied = await echoed(http, proxy.listen_url + "/api/show", method="POST", data=body)
    assert base64.b64decode(proxied["body"]) == body
    assert values(proxied, "Content-Length") == [str(len(body))]


async def test_fifty_concurrent_gets_all_get_the_right_body(sim, make_proxy, http):
    proxy = await make_proxy()
    async with http.get(sim.url + "/api/tags") as resp:
        expected = await resp.read()

    async def one() -> tuple[int, bytes]:
        async with http.get(proxy.listen_url + "/api/tags") as resp:
            return resp.status, await resp.read()

    async with asyncio.timeout(10):
        results = await asyncio.gather(*(one() for _ in range(50)))
    assert results == [(200, expected)] * 50
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_requests_total", endpoint="other", model="", code="200") == 50


async def test_a_compressed_request_body_is_relayed_as_it_came(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    proxied = await echoed(http, proxy.listen_url + "/api/show", method="POST", data=GZIPPED, headers=headers)
    assert base64.b64decode(proxied["body"]) == GZIPPED
    assert values(proxied, "Content-Encoding") == ["gzip"]


async def test_a_compressed_body_on_a_generation_path_is_a_clear_400(make_proxy, http, upstream):
    proxy = await make_proxy(upstream=upstream)
    headers = {"Content-Encoding": "gzip", "Content-Type": "application/json"}
    async with http.post(proxy.listen_url + "/api/chat", data=b"not gzip", headers=headers) as resp:
        assert resp.status == 400
        assert (await resp.json())["error"].startswith("request body is not valid JSON")
