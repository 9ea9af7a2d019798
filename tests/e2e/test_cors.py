"""Browser apps (CORS): Ollama's rules (gin-contrib/cors as ollama/ollama configures it)
for the responses the proxy makes itself, and preflights answered without a key."""

from __future__ import annotations

import asyncio
import json

import pytest
from aiohttp import web

from proxy.config import ConfigError, config_from_dict, summary
from proxy.edge import access
from proxy.errors import Forbidden
from tests.support import hold_the_slot, release, serving

APP = "http://localhost:5173"
METHODS = "GET,POST,PUT,PATCH,DELETE,HEAD,OPTIONS"
ALLOW_HEADERS = (
    "Authorization,Content-Type,User-Agent,Accept,X-Requested-With,Openai-Beta,X-Stainless-Arch,"
    "X-Stainless-Async,X-Stainless-Custom-Poll-Interval,X-Stainless-Helper-Method,X-Stainless-Lang,"
    "X-Stainless-Os,X-Stainless-Package-Version,X-Stainless-Poll-Helper,X-Stainless-Retry-Count,"
    "X-Stainless-Runtime,X-Stainless-Runtime-Version,X-Stainless-Timeout"
)
PREFLIGHT = [
    ("Access-Control-Allow-Methods", METHODS),
    ("Access-Control-Allow-Headers", ALLOW_HEADERS),
    ("Access-Control-Max-Age", "43200"),
]
DEFAULT = ("default",)


def cors_of(resp) -> list[tuple[str, str]]:
    """The response's CORS headers (and Vary), in order, repeats kept."""
    return [(k, v) for k, v in resp.headers.items() if k.startswith("Access-Control-") or k == "Vary"]


# -- origins: Ollama's default list ------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost", "https://localhost", "http://localhost:5173", "https://localhost:8443",
        "http://127.0.0.1", "http://127.0.0.1:3000", "https://0.0.0.0:1", "app://obsidian.md",
        "file://", "tauri://localhost", "vscode-webview://1a2b3c", "vscode-file://vscode-app",
    ],
)  # fmt: skip
def test_ollamas_default_origins_are_allowed(origin):
    assert access.origin_allowed(origin, DEFAULT)


@pytest.mark.parametrize(
    "origin",
    [
        "https://example.com", "http://localhost.evil.com", "http://127.0.0.1.nip.io", "null",
        "chrome-extension://abc", "http://[::1]:8080", "ws://localhost",
    ],
)  # fmt: skip
def test_other_origins_are_not(origin):
    assert not access.origin_allowed(origin, DEFAULT)


def test_explicit_wildcard_and_any_origins():
    allowed = ("https://chat.example.com", "https://*.corp.example", "chrome-extension://*")
    assert access.origin_allowed("https://chat.example.com", allowed)
    assert not access.origin_allowed("https://chat.example.com:8443", allowed)
    assert access.origin_allowed("https://a.b.corp.example", allowed)
    assert not access.origin_allowed("https://corp.example", allowed)
    assert access.origin_allowed("chrome-extension://abcdef", allowed)
    assert not access.origin_allowed("http://localhost", allowed)  # default is not implied
    assert access.origin_allowed("https://anything.example", ("*",))
    assert not access.origin_allowed("http://localhost", ())


# -- the headers, as gin-contrib/cors writes them for Ollama -----------------------------


def test_headers_for_an_allowed_origin():
    assert access.cors_headers(APP, "proxy:11435", DEFAULT, preflight=False) == (
        ("Vary", "Origin"),
        ("Access-Control-Allow-Origin", APP),
    )
    assert access.cors_headers(APP, "proxy:11435", DEFAULT, preflight=True) == (
        *PREFLIGHT,
        ("Vary", "Origin"),
        ("Vary", "Access-Control-Request-Method"),
        ("Vary", "Access-Control-Request-Headers"),
        ("Access-Control-Allow-Origin", APP),
    )


def test_headers_when_any_origin_is_allowed():
    assert access.cors_headers(APP, "h", ("*",), preflight=False) == (("Access-Control-Allow-Origin", "*"),)
    assert access.cors_headers(APP, "h", ("*",), preflight=True) == (
        *PREFLIGHT,
        ("Access-Control-Allow-Origin", "*"),
    )


@pytest.mark.parametrize(
    ("origin", "host"), [(None, "h"), ("", "h"), ("https://proxy.example", "proxy.example")]
)
def test_a_request_that_is_not_cross_origin_gets_no_headers(origin, host):
    assert access.cors_headers(origin, host, (), preflight=True) == ()


def test_a_disallowed_origin_is_forbidden_and_told_what_to_do():
    with pytest.raises(Forbidden) as info:
        access.cors_headers("https://evil.example\n", "h", DEFAULT, preflight=False)
    assert info.value.message == (
        "origin 'https://evil.example\\n' may not call this proxy from a browser; "
        "add it to access.cors_origins in config.yaml"
    )


# -- config -----------------------------------------------------------------------------


def test_cors_origins_config_default_and_summary():
    config = config_from_dict({})
    assert config.access.cors_origins == ("default",)
    assert "access.cors_origins      default (Ollama's own:" in summary(config)
    custom = config_from_dict({"access": {"cors_origins": ["Default", "https://Chat.Example.com", "*"]}})
    assert custom.access.cors_origins == ("default", "https://chat.example.com", "*")
    assert "access.cors_origins      * (any origin)" in summary(custom)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (["https://app.example.com/"], "access.cors_origins: 'https://app.example.com/' has a path: an origin "
         "is scheme://host[:port], with no trailing slash"),
        (["app.example.com"], "access.cors_origins: 'app.example.com' is not an origin: write "
         'scheme://host[:port] (one * may stand for any part), or "default", "*" or "null"'),
        (["https://*.a.*.example"], "access.cors_origins: 'https://*.a.*.example' is not an origin"),
        (5, 'access.cors_origins: must be a list of origins, such as [default, "https://app.example.com"]'),
    ],
)  # fmt: skip
def test_bad_cors_origins_are_named_by_yaml_path(value, problem):
    with pytest.raises(ConfigError) as info:
        config_from_dict({"access": {"cors_origins": value}})
    assert len(info.value.problems) == 1
    assert info.value.problems[0].startswith(problem)


# -- end to end -------------------------------------------------------------------------


async def test_a_preflight_is_answered_by_the_proxy_without_a_key(sim, make_proxy, http):
    proxy = await make_proxy(access={"keys": {"alice": "k-alice-123"}})
    headers = {
        "Origin": APP,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    async with http.options(proxy.listen_url + "/v1/chat/completions", headers=headers) as resp:
        assert resp.status == 204
        assert await resp.read() == b""
        assert cors_of(resp) == [
            *PREFLIGHT,
            ("Vary", "Origin"),
            ("Vary", "Access-Control-Request-Method"),
            ("Vary", "Access-Control-Request-Headers"),
            ("Access-Control-Allow-Origin", APP),
        ]
    async with http.options(
        proxy.listen_url + "/api/chat", headers={**headers, "Origin": "https://x.example"}
    ) as resp:
        assert resp.status == 403
        assert "add it to access.cors_origins" in (await resp.json())["error"]
        assert cors_of(resp) == []
    assert sim.records == []


async def test_the_proxys_own_errors_carry_cors_headers(sim, make_proxy, http):
    proxy = await make_proxy(access={"keys": {"alice": "k-alice-123"}})
    origin = {"Origin": APP}
    async with http.post(proxy.listen_url + "/api/chat", json={}, headers=origin) as resp:
        assert resp.status == 401
        assert cors_of(resp) == [("Vary", "Origin"), ("Access-Control-Allow-Origin", APP)]
    key = {**origin, "Authorization": "Bearer k-alice-123"}
    async with http.post(proxy.listen_url + "/v1/chat/completions", data=b"[]", headers=key) as resp:
        assert resp.status == 400
        assert cors_of(resp) == [("Vary", "Origin"), ("Access-Control-Allow-Origin", APP)]
    evil = {**key, "Origin": "https://evil.example"}
    async with http.post(
        proxy.listen_url + "/api/generate", json={"model": "llama3.2"}, headers=evil
    ) as resp:
        assert resp.status == 403  # before the queue: the page could not read the answer anyway
        assert cors_of(resp) == []
    assert sim.records == []


async def test_any_origin_and_the_queue_full_503(sim, make_proxy, http):
    proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0}, access={"cors_origins": ["*"]})
    holder = await hold_the_slot(sim, http, proxy)
    try:
        body = {"model": "llama3.2", "messages": []}
        headers = {"Origin": "https://anywhere.example"}
        async with http.post(proxy.listen_url + "/v1/chat/completions", json=body, headers=headers) as resp:
            assert resp.status == 503 and "Retry-After" in resp.headers
            assert cors_of(resp) == [("Access-Control-Allow-Origin", "*")]
            assert (await resp.json())["error"]["code"] == "queue_full"
    finally:
        await release(holder)


async def test_the_keepalive_200_carries_cors_and_relayed_answers_carry_upstreams(make_proxy, http):
    """Upstream says its own CORS words; the proxy adds its own only to what it starts itself."""
    release_answer = asyncio.Event()

    async def generate(request: web.Request) -> web.Response:
        if (await request.json()).get("prompt") == "wait":
            await release_answer.wait()
        body = json.dumps({"model": "llama3.2", "response": "hi", "done": True}).encode() + b"\n"
        return web.Response(
            body=body, headers={"Access-Control-Allow-Origin": "upstream's", "Vary": "Upstream"}
        )

    app = web.Application()
    app.router.add_post("/api/generate", generate)
    async with serving(app, access_log=None) as upstream:
        proxy = await make_proxy(upstream=upstream, heartbeat={"interval": "100ms"})
        headers = {"Origin": APP}
        async with http.post(
            proxy.listen_url + "/api/generate", json={"model": "llama3.2", "prompt": "now"}, headers=headers
        ) as resp:
            assert resp.status == 200 and await resp.read()
            assert cors_of(resp) == [("Access-Control-Allow-Origin", "upstream's"), ("Vary", "Upstream")]
        async with http.post(
            proxy.listen_url + "/api/generate", json={"model": "llama3.2", "prompt": "wait"}, headers=headers
        ) as resp:
            assert resp.status == 200  # the keep-alive 200, started by the proxy
            assert cors_of(resp) == [("Vary", "Origin"), ("Access-Control-Allow-Origin", APP)]
            release_answer.set()
            assert json.loads((await resp.read()).splitlines()[-1])["done"] is True


async def test_an_options_request_that_is_not_a_preflight_is_relayed(make_proxy, http):
    """No `Origin`, or the proxy's own address as origin: not cross-origin, so upstream answers it."""
    seen: list[str] = []

    async def anything(request: web.Request) -> web.Response:
        if request.path == "/api/chat":  # not the proxy's health probes
            seen.append(request.method)
        return web.Response(status=405, headers={"Allow": "POST"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    async with serving(app, access_log=None) as upstream:
        proxy = await make_proxy(upstream=upstream)
        host = proxy.listen_url.removeprefix("http://")
        for headers in ({}, {"Origin": proxy.listen_url, "Host": host}):
            async with http.options(proxy.listen_url + "/api/chat", headers=headers) as resp:
                assert resp.status == 405 and resp.headers["Allow"] == "POST"
                assert cors_of(resp) == []
        async with http.options(proxy.listen_url + "/api/chat", headers={"Origin": APP}) as resp:
            assert resp.status == 204
    assert seen == ["OPTIONS", "OPTIONS"]
