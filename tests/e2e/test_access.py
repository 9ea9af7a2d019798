"""Access control on the listen port: one canonical path, closed admin endpoints, bearer keys.

The first half tests the pure checks in `proxy.access`; the second half, from
"End to end" on, drives the real proxy and needs `handler.py` to call them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import posixpath
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from urllib.parse import unquote_to_bytes

import ollama
import openai
import pytest
import yarl
from aiohttp import web
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import AccessConfig
from proxy.edge import access
from proxy.edge.access import (
    Keys,
    KeysByConfig,
    authenticate,
    canonical_path,
    check_model_management,
    is_model_management,
)
from proxy.errors import BadRequest, Forbidden, Unauthorized, error_response
from proxy.upstream.health import PROBE_USER_AGENT
from tests.support import eventually, sample, scrape, serving

MODEL = "llama3.2"
KEYS = {"alice": "k-alice-123", "bob": "k-bob-456"}
UNAUTHORIZED = "missing or invalid API key: send Authorization: Bearer <key>"
CHALLENGE = 'Bearer realm="ollama-queue-proxy"'
ADMIN = ["/api/pull", "/api/push", "/api/create", "/api/delete", "/api/copy", "/api/blobs"]


def closed(path: str) -> str:
    return (
        f"{path} is an admin endpoint, closed on this proxy; "
        "set access.admin_endpoints: allow in config.yaml to open it"
    )


# -- canonical_path -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("/", "/"),
        ("/api/tags", "/api/tags"),
        ("/api/tags?x=1/../y", "/api/tags"),
        ("//api//tags", "/api/tags"),
        ("/api/./tags", "/api/tags"),
        ("/api/x/../tags", "/api/tags"),
        ("/../../api/tags", "/api/tags"),
        ("/api/%2e%2E/v1/models", "/v1/models"),
        ("/api/tags/", "/api/tags/"),
        ("/api/tags//", "/api/tags/"),
        ("/api/x/..", "/api/"),
        ("/api/x/.", "/api/x/"),
        ("/..", "/"),
        ("/api/%64elete", "/api/delete"),
        ("/api%2Fdelete", "/api/delete"),
        ("/API/DELETE", "/API/DELETE"),
        ("/api/blobs/sha256:abc", "/api/blobs/sha256:abc"),
        ("/caf%c3%a9", "/caf%C3%A9"),
        ("/a b#c", "/a%20b%23c"),
        ("/a%3Fb", "/a%3Fb"),
        ("/~u/a-b_c.d/!$&'()*+,;=:@", "/~u/a-b_c.d/!$&'()*+,;=:@"),
        ("/.../x", "/.../x"),
    ],
)
def test_canonical_path(raw, canonical):
    assert canonical_path(raw) == canonical


@pytest.mark.parametrize(
    "raw, problem",
    [
        ("/api/%2574ags", "double percent-encoded"),
        ("/api/tags%25", "double percent-encoded"),
        ("/api\\tags", "backslash"),
        ("/api%5ctags", "backslash"),
        ("/api/tags%00", "control characters"),
        ("/api/ta%0Ags", "control characters"),
        ("/api/tags%7f", "control characters"),
        ("api/tags", "must start with '/'"),
        ("", "must start with '/'"),
        ("*", "must start with '/'"),
        ("http://evil.example/api/tags", "must start with '/'"),
        ("/caf\u00e9", "must be ASCII"),
    ],
)
def test_ambiguous_paths_are_refused(raw, problem):
    with pytest.raises(BadRequest, match="request path") as caught:
        canonical_path(raw)
    assert problem in caught.value.message


# -- admin endpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    [
        *ADMIN,
        "/api/pull/",
        "/API/DELETE",
        "/Api/Copy/",
        "/api/blobs/",
        "/api/blobs/sha256:abc",
        "/api/BLOBS/sha256:abc/x",
    ],
)
def test_admin_endpoints_are_recognised_in_any_case(path):
    assert is_model_management(path)
    with pytest.raises(Forbidden) as caught:
        check_model_management(path, AccessConfig())
    assert caught.value.message == closed(path)
    assert caught.value.status == 403
    check_model_management(path, AccessConfig(admin_endpoints="allow"))


@pytest.mark.parametrize(
    "path",
    ["/", "/api/tags", "/api/show", "/api/pulls", "/api/blobsx", "/api/pull/x", "/x/api/pull", "/v1/models"],
)
def test_other_paths_are_not_admin_endpoints(path):
    assert not is_model_management(path)
    check_model_management(path, AccessConfig())


# -- bearer keys ---------------------------------------------------------------------------------


@pytest.mark.parametrize("header", [None, "", "Bearer", "Bearer k-alice-123", "Basic abc"])
def test_no_keys_means_auth_is_off(header):
    assert authenticate(header, Keys({})) == ""


@pytest.mark.parametrize(
    "header, name",
    [
        ("Bearer k-alice-123", "alice"),
        ("bearer k-bob-456", "bob"),
        ("BEARER   k-bob-456  ", "bob"),
    ],
)
def test_a_configured_key_authenticates_as_its_name(header, name):
    assert authenticate(header, Keys(KEYS)) == name


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        "Bearer ",
        "k-alice-123",
        "Basic k-alice-123",
        "Bearer k-alice-12",
        "Bearer k-alice-1234",
        "Bearer K-ALICE-123",
        "Bearer k-alice-123 k-bob-456",
        "Bearerk-alice-123",
    ],
)
def test_anything_else_is_unauthorized_without_echoing_it(header):
    with pytest.raises(Unauthorized) as caught:
        authenticate(header, Keys(KEYS))
    assert caught.value.message == UNAUTHORIZED
    assert caught.value.status == 401


@pytest.mark.parametrize("token", [b"k-alice-123", b"k-bob-456", b"nobody", b""])
def test_every_key_is_compared_whichever_matches(monkeypatch, token):
    """No early exit: the number of comparisons says nothing about which key, if any, matched."""
    calls: list[tuple[bytes, bytes]] = []
    real = access.hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(access.hmac, "compare_digest", counting)
    Keys({**KEYS, "carol": "k-carol-789"}).match(token)
    assert len(calls) == 3
    assert {len(a) for a, _ in calls} == {len(b) for _, b in calls} == {32}  # digests: lengths leak nothing


def test_keys_are_hashed_once_per_config():
    first, second = AccessConfig(keys=dict(KEYS)), AccessConfig(keys=dict(KEYS))
    keys = KeysByConfig()
    assert keys.of(first.keys) is keys.of(first.keys)
    assert keys.of(second.keys) is not keys.of(first.keys)


def test_the_401_carries_a_bearer_challenge():
    for openai_shape in (False, True):
        response = error_response(Unauthorized(UNAUTHORIZED), openai=openai_shape)
        assert response.status == 401
        assert response.headers["WWW-Authenticate"] == CHALLENGE
    assert "WWW-Authenticate" not in error_response(Forbidden("no"), openai=False).headers


def test_the_key_is_private_only_when_keys_are_on():
    assert access.private_headers(AccessConfig(keys=KEYS)) == {"authorization"}
    assert access.private_headers(AccessConfig()) == frozenset()


# -- properties --------------------------------------------------------------------------------

PIECES = [
    "/", "/", "//", ".", "..", "/./", "/../", "%2e", "%2E", "%2f", "%2F", "%25", "%5c", "\\", "%00",
    "%0a", "api", "API", "Api", "pull", "PuLL", "delete", "%64elete", "blobs", "sha256:ab", "generate",
    "x", "~", "%20", ";", "?", "#", "%c3%a9", "\u00e9", ":",
]  # fmt: skip
raw_paths = st.builds(
    lambda lead, parts: lead + "".join(parts),
    st.sampled_from(["/", "/", "//", ""]),
    st.lists(st.sampled_from(PIECES), max_size=14),
)


def _refused(raw: str) -> bool:
    """The rejection rules, stated apart from the implementation."""
    path = raw.partition("?")[0]
    if not path.startswith("/") or not path.isascii():
        return True
    decoded = unquote_to_bytes(path)
    return any(b == ord("%") or b == ord("\\") or b < 0x20 or b == 0x7F for b in decoded)


def _resolved(raw: str) -> bytes:
    """What the path names, by the standard library: decoded, dots resolved, slashes collapsed."""
    decoded = unquote_to_bytes(raw.partition("?")[0])
    return posixpath.normpath(b"/" + decoded.lstrip(b"/"))


def _names_admin(resolved: bytes) -> bool:
    folded = resolved.lower().decode("latin-1")
    return folded in ADMIN or folded.startswith("/api/blobs/")


@settings(max_examples=400, deadline=None)
@given(raw_paths)
def test_canonical_path_properties(raw):
    if _refused(raw):
        with pytest.raises(BadRequest):
            canonical_path(raw)
        return
    canonical = canonical_path(raw)
    assert canonical.startswith("/") and canonical.isascii()
    for fragment in ("//", "/./", "/../"):
        assert fragment not in canonical
    assert not canonical.endswith(("/.", "/.."))
    assert canonical_path(canonical) == canonical
    assert (unquote_to_bytes(canonical).rstrip(b"/") or b"/") == _resolved(raw)
    assert is_model_management(canonical) == _names_admin(_resolved(raw))


@st.composite
def disguised_admin_paths(draw: st.DrawFn) -> str:
    """An admin endpoint with its letters re-cased or escaped and its slashes padded with dot segments."""
    target = draw(st.sampled_from([*ADMIN, "/api/blobs/sha256:0f1e"]))
    out = [draw(st.sampled_from(["", "/..", "/.", "/%2e%2e", "//"]))]
    for i, char in enumerate(target):
        if char == "/":
            # An escaped slash separates segments too, but cannot start the path.
            escaped = ["%2F"] if i else []
            out.append(draw(st.sampled_from(["/", "//", "/./", "/x/../", "/%2E/", "/q/%2e%2e/", *escaped])))
        else:
            how = draw(st.sampled_from(["keep", "upper", "escape", "ESCAPE"]))
            if how == "upper":
                char = char.upper()
            elif how != "keep":
                escaped = f"%{ord(char):02x}"
                char = escaped.upper() if how == "ESCAPE" else escaped
            out.append(char)
    out.append(draw(st.sampled_from(["", "/", "/.", "//", "?x=/../tags"])))
    return "".join(out)


@settings(max_examples=400, deadline=None)
@given(disguised_admin_paths())
def test_no_disguise_hides_an_admin_endpoint(raw):
    canonical = canonical_path(raw)
    assert is_model_management(canonical), (raw, canonical)
    with pytest.raises(Forbidden):
        check_model_management(canonical, AccessConfig())


# -- End to end: these pass once handler.py calls access.canonical_path, authenticate and
# -- check_model_management, and relays with path= and private= (see the access-control wiring).


@dataclass
class Recorder:
    """An upstream that answers everything and remembers what reached it."""

    url: str = ""
    seen: list[tuple[str, str, dict[str, str]]] = field(default_factory=list)


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()

    async def record(request: web.Request) -> web.Response:
        if request.headers.get("User-Agent") != PROBE_USER_AGENT:  # the proxy's own health probes
            rec.seen.append((request.method, request.raw_path, dict(request.headers)))
        return web.json_response({"status": "success"})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    async with serving(app, access_log=None) as url:
        rec.url = url
        yield rec


def url_of(base: str, target: str) -> yarl.URL:
    return yarl.URL(base + target, encoded=True)  # as typed: no client-side normalising


DISGUISED = [
    ("DELETE", "/api/delete", "/api/delete"),
    ("POST", "//api/./delete", "/api/delete"),
    ("DELETE", "/api/%64elete", "/api/delete"),
    ("DELETE", "/API/DELETE", "/API/DELETE"),
    ("POST", "/api/blobs/sha256:abc", "/api/blobs/sha256:abc"),
    ("HEAD", "/api/blobs/sha256:abc", "/api/blobs/sha256:abc"),
    ("POST", "/api/x/../pull", "/api/pull"),
    ("POST", "/api/create/", "/api/create/"),
    ("POST", "/api%2Fcopy", "/api/copy"),
    ("POST", "/api/push?insecure=true", "/api/push"),
]


@pytest.mark.parametrize("method, target, canonical", DISGUISED)
async def test_admin_endpoints_are_closed_by_default(make_proxy, http, recorder, method, target, canonical):
    proxy = await make_proxy(upstream=recorder.url)
    async with http.request(method, url_of(proxy.listen_url, target), json={"model": MODEL}) as resp:
        assert resp.status == 403
        if method != "HEAD":
            assert await resp.json() == {"error": closed(canonical)}
    assert recorder.seen == []
    assert sample(await scrape(http, proxy), "ollama_proxy_rejected_total", reason="forbidden") == 1


@pytest.mark.parametrize("method, target, canonical", DISGUISED)
async def test_open_admin_endpoints_are_relayed_by_their_canonical_path(
    make_proxy, http, recorder, method, target, canonical
):
    proxy = await make_proxy(upstream=recorder.url, access={"admin_endpoints": "allow"})
    async with http.request(method, url_of(proxy.listen_url, target), json={"model": MODEL}) as resp:
        assert resp.status == 200
    query = target.partition("?")[2]
    assert [(m, p) for m, p, _ in recorder.seen] == [(method, canonical + ("?" + query if query else ""))]


@pytest.mark.parametrize(
    "target, body",
    [
        (
            "/api/%2574ags",
            {"error": "request path is double percent-encoded: it still holds '%' once decoded"},
        ),
        ("/api/tags%5c", {"error": "request path must not contain a backslash"}),
        ("/api/tags%00", {"error": "request path must not contain control characters"}),
        (
            "/v1/models%250a",
            {
                "error": {
                    "message": "request path is double percent-encoded: it still holds '%' once decoded",
                    "type": "invalid_request_error",
                    "code": "bad_request",
                }
            },
        ),
    ],
)
async def test_ambiguous_paths_get_a_400_and_reach_nobody(make_proxy, http, recorder, target, body):
    proxy = await make_proxy(upstream=recorder.url)
    async with http.get(url_of(proxy.listen_url, target)) as resp:
        assert resp.status == 400
        assert await resp.json() == body
    assert recorder.seen == []


@pytest.mark.parametrize(
    "method, path, openai_shape",
    [
        ("POST", "/api/generate", False),
        ("POST", "/api/chat", False),
        ("GET", "/api/tags", False),
        ("GET", "/", False),
        ("DELETE", "/api/delete", False),  # a stranger learns nothing about the config: 401, not 403
        ("POST", "/v1/chat/completions", True),
        ("GET", "/v1/models", True),
    ],
)
@pytest.mark.parametrize(
    "header", [None, "Bearer k-wrong-000", "Basic azphbGljZS0xMjM=", "Bearer k-alice-12"]
)
async def test_without_a_valid_key_every_path_is_401(
    sim, make_proxy, http, method, path, openai_shape, header
):
    proxy = await make_proxy(access={"keys": KEYS})
    headers = {"Authorization": header} if header else {}
    body = {"model": MODEL, "messages": [], "prompt": "hi"}
    async with http.request(method, proxy.listen_url + path, json=body, headers=headers) as resp:
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"] == CHALLENGE
        if openai_shape:
            assert await resp.json() == {
                "error": {"message": UNAUTHORIZED, "type": "invalid_request_error", "code": "unauthorized"}
            }
        else:
            assert await resp.json() == {"error": UNAUTHORIZED}
    assert sim.records == []


@pytest.mark.parametrize("name, header", [("alice", "Bearer k-alice-123"), ("bob", "bearer k-bob-456")])
async def test_a_valid_key_passes_and_upstream_never_sees_it(sim, make_proxy, http, recorder, name, header):
    proxy = await make_proxy(access={"keys": KEYS})
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    async with http.post(
        proxy.listen_url + "/api/generate", json=body, headers={"Authorization": header}
    ) as resp:
        assert resp.status == 200
        assert (await resp.json())["done"] is True
    assert len(sim.records) == 1
    assert "Authorization" not in sim.records[0].headers

    relayed = await make_proxy(upstream=recorder.url, access={"keys": KEYS})
    async with http.get(
        relayed.listen_url + "/api/tags", headers={"Authorization": header, "X-App": "a"}
    ) as resp:
        assert resp.status == 200
    [(_, _, seen)] = recorder.seen
    assert "Authorization" not in seen and seen["X-App"] == "a"


async def test_with_keys_off_the_authorization_header_is_upstream_s(sim, make_proxy, http):
    proxy = await make_proxy()
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    headers = {"Authorization": "Bearer ollama-own-token"}
    async with http.post(proxy.listen_url + "/api/generate", json=body, headers=headers) as resp:
        assert resp.status == 200
        await resp.read()
    assert sim.records[0].headers["Authorization"] == "Bearer ollama-own-token"


async def test_keys_never_reach_the_logs(sim, make_proxy, http, caplog):
    caplog.set_level(logging.DEBUG)
    proxy = await make_proxy(access={"keys": KEYS})
    body = {"model": MODEL, "prompt": "hi", "stream": False}
    presented = ["k-alice-123", "k-bob-456", "k-wrong-000", "k-alice-1234"]
    for key in presented:
        async with http.post(
            proxy.listen_url + "/api/generate", json=body, headers={"Authorization": f"Bearer {key}"}
        ) as resp:
            await resp.read()
    records = [repr(vars(record)) + record.getMessage() for record in caplog.records]
    assert records, "the proxy logs each request"
    for key in presented:
        assert not any(key in text for text in records), key
    assert any("'key': 'alice'" in text for text in records)  # the name stands in for the key


async def test_the_openai_client_sees_an_authentication_error(sim, make_proxy):
    proxy = await make_proxy(access={"keys": KEYS})
    messages = [{"role": "user", "content": "hi"}]
    async with openai.AsyncOpenAI(
        base_url=proxy.listen_url + "/v1", api_key="k-wrong-000", max_retries=0, timeout=10
    ) as client:
        with pytest.raises(openai.AuthenticationError) as caught:
            await client.chat.completions.create(model=MODEL, messages=messages)
    assert caught.value.status_code == 401
    assert caught.value.body == {
        "message": UNAUTHORIZED,
        "type": "invalid_request_error",
        "code": "unauthorized",
    }
    async with openai.AsyncOpenAI(
        base_url=proxy.listen_url + "/v1", api_key=KEYS["alice"], max_retries=0, timeout=10
    ) as client:
        answer = await client.chat.completions.create(model=MODEL, messages=messages)
    assert answer.choices[0].message.content
    assert "Authorization" not in sim.records[0].headers


async def test_the_ollama_client_sends_its_key_as_a_bearer_token(sim, make_proxy, monkeypatch):
    monkeypatch.delenv("OLLAMA_API_KEY", raising=False)  # the client would send it on its own
    proxy = await make_proxy(access={"keys": KEYS})
    without = ollama.AsyncClient(host=proxy.listen_url, timeout=10)
    with_key = ollama.AsyncClient(
        host=proxy.listen_url, timeout=10, headers={"Authorization": "Bearer k-bob-456"}
    )
    try:
        with pytest.raises(ollama.ResponseError) as caught:
            await without.generate(model=MODEL, prompt="hi", stream=False)
        assert caught.value.status_code == 401
        assert caught.value.error == UNAUTHORIZED
        answer = await with_key.generate(model=MODEL, prompt="hi", stream=False)
        assert answer.done
    finally:
        await without.close()
        await with_key.close()
    assert len(sim.records) == 1 and "Authorization" not in sim.records[0].headers


async def test_rejections_are_counted_by_reason(make_proxy, http, recorder):
    proxy = await make_proxy(upstream=recorder.url, access={"keys": KEYS})
    async with http.get(proxy.listen_url + "/api/tags") as resp:
        assert resp.status == 401
    good = {"Authorization": "Bearer k-alice-123"}
    async with http.delete(proxy.listen_url + "/api/delete", headers=good) as resp:
        assert resp.status == 403
    async with http.get(url_of(proxy.listen_url, "/api/%2574ags"), headers=good) as resp:
        assert resp.status == 400
    metrics = await scrape(http, proxy)
    for reason in ("unauthorized", "forbidden", "bad_request"):
        assert sample(metrics, "ollama_proxy_rejected_total", reason=reason) == 1, reason
    assert recorder.seen == []


# --- per-key queue bound and the key as a label ------------------------------------


async def test_one_key_cannot_fill_the_queue_and_its_name_labels_metrics_and_the_queue(sim, make_proxy, http):
    keys = {"alice": "k-alice-123", "bob": "k-bob-456"}
    proxy = await make_proxy(
        limits={"max_concurrent": 1, "max_queue": 10},
        access={"keys": keys, "max_queued_per_key": 2},
        heartbeat={"interval": "10s"},
    )
    sim.load_delay = 60  # the first request holds the only slot

    async def generate(name: str) -> tuple[int, bytes]:
        headers = {"Authorization": f"Bearer {keys[name]}"}
        body = {"model": "llama3.2", "prompt": name, "stream": False}
        async with http.post(proxy.listen_url + "/api/generate", json=body, headers=headers) as resp:
            return resp.status, await resp.read()

    holder = asyncio.create_task(generate("bob"))
    await sim.wait_until(lambda: sim.active == 1)
    waiting = [asyncio.create_task(generate("alice")) for _ in range(2)]
    await eventually(lambda: proxy.state.admission.waiting_total == 2)

    status, body = await generate("alice")  # a third for alice: her own 429, not everyone's 503
    assert status == 429
    assert "access.max_queued_per_key=2" in json.loads(body)["error"]
    bob = asyncio.create_task(generate("bob"))  # bob still gets in line
    await eventually(lambda: proxy.state.admission.waiting_total == 3)
    async with http.get(proxy.admin_url + "/-/queue") as resp:
        queue = await resp.json()
    # The fair share (scheduling.fairness: key): bob's one request goes between alice's two.
    assert [entry["owner"] for entry in queue["queue"]] == ["alice", "bob", "alice"]
    assert [entry["owner"] for entry in queue["models"]["llama3.2:latest"]["running"]] == ["bob"]

    for task in (holder, *waiting, bob):
        task.cancel()
    await asyncio.gather(holder, *waiting, bob, return_exceptions=True)
    await eventually(lambda: proxy.state.admission.waiting_total == proxy.state.admission.running_total == 0)
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_key_requests_total", key="alice", code="429") == 1
    assert sample(metrics, "ollama_proxy_rejected_total", reason="key_queue_full") == 1
    assert not any("k-alice-123" in name + repr(labels) for name, labels in metrics)
