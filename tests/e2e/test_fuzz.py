"""Property-based fuzzing of the listen port, over real loopback sockets.

Three families of hostile input are thrown at a running proxy in front of the
simulated Ollama: malformed HTTP, odd JSON bodies on the queued paths, and header
and path tricks. Whatever arrives, a public port must keep these properties: a
clean 4xx, a closed connection or a faithful relay, never a 5xx of the proxy's
own; no admission slot left taken; no generation reaching upstream without a
slot; nothing forwarded anywhere but upstream; and the next ordinary request
still works.

Each test starts one proxy and drives every example through it: Hypothesis runs
in a worker thread and hands each example to the test's event loop, so the test
reads top to bottom (start, fuzz, final checks) and a proxy is not started per
example. The default run is derandomized, so it is the same every time;
`FUZZ_EXAMPLES=N` draws N random examples per test for a longer hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import string
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TypeVar

import aiohttp
import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from proxy.server import Server
from tests.support import eventually, hold_the_slot, release, sample, scrape, serving

T = TypeVar("T")

FUZZ_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "0"))
#: A long hunt needs more than the default per-test timeout (an example takes ~5 ms).
pytestmark = pytest.mark.timeout(60 + FUZZ_EXAMPLES // 20)
#: How long a message may go unanswered before we take it as waiting for bytes that will never come.
ANSWER_WAIT = 1.0
#: After we hang up our side, the proxy must close within this.
CLOSE_WAIT = 3.0
#: One example, end to end, however it goes.
EXAMPLE_TIMEOUT = 15.0
QUEUED_PATHS = (
    "/api/generate",
    "/api/chat",
    "/api/embed",
    "/api/embeddings",
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
)
#: Hop-by-hop headers (RFC 9110 7.6.1 and the legacy ones): never forwarded upstream.
HOP_BY_HOP = (
    "Connection",
    "Keep-Alive",
    "Proxy-Authorization",
    "Proxy-Connection",
    "TE",
    "Trailer",
    "Upgrade",
)
TOKEN_CHARS = string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~"
VISIBLE = "".join(chr(c) for c in range(0x21, 0x7F))
GENERATION = b'{"model":"llama3.2","stream":false,"prompt":"hi","input":"hi","messages":[{"role":"user","content":"hi"}]}'


# --- driving examples ----------------------------------------------------------


async def fuzz(strategy: st.SearchStrategy[T], example: Callable[[T], Awaitable[None]], default: int) -> int:
    """Run `example` on this event loop for every value Hypothesis draws; return how many ran.

    Hypothesis runs in a worker thread because its test function must be
    synchronous, and the proxy under test lives on this loop.
    """
    loop = asyncio.get_running_loop()
    ran = 0

    @settings(
        max_examples=FUZZ_EXAMPLES or default,
        deadline=None,
        derandomize=not FUZZ_EXAMPLES,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def drive(value: T) -> None:
        nonlocal ran
        future = asyncio.run_coroutine_threadsafe(example(value), loop)
        try:
            future.result(timeout=EXAMPLE_TIMEOUT)
        finally:
            future.cancel()
        ran += 1

    await asyncio.to_thread(drive)
    return ran


# --- raw HTTP ------------------------------------------------------------------


@dataclass(frozen=True)
class Answer:
    """The first final response; status None if the proxy closed without one.

    The body is read only when `send_raw` is asked to and Content-Length frames it.
    """

    status: int | None
    headers: CIMultiDict[str]
    body: bytes = b""


def address(server: Server) -> tuple[str, int]:
    host, port = server.listen_url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


async def read_answer(reader: asyncio.StreamReader, with_body: bool) -> Answer:
    """Skip interim (1xx) responses; an EOF or a reset before a head counts as closed."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionResetError, BrokenPipeError):
            return Answer(None, CIMultiDict())
        status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
        version, code, *_ = status_line.split(" ", 2)
        # aiohttp answers in the request's version, so "HTTP/2.0" may come back over HTTP/1 framing.
        assert version.startswith("HTTP/"), status_line
        headers = CIMultiDict(line.split(": ", 1) for line in lines)
        if not 100 <= int(code) < 200:
            break
    length = headers.get("Content-Length")
    body = await reader.readexactly(int(length)) if with_body and length is not None else b""
    return Answer(int(code), headers, body)


async def send_raw(
    server: Server, data: bytes, *, truncated: bool = False, with_body: bool = False
) -> Answer:
    """Write `data` on a new connection and read the answer.

    A truncated message is followed by our FIN. A message the proxy is still
    waiting on after `ANSWER_WAIT` gets our FIN too, and must then be closed.
    """
    reader, writer = await asyncio.open_connection(*address(server))
    try:
        writer.write(data)
        if truncated:
            writer.write_eof()
        try:
            async with asyncio.timeout(ANSWER_WAIT):
                return await read_answer(reader, with_body)
        except TimeoutError:
            if not truncated:
                writer.write_eof()
        async with asyncio.timeout(CLOSE_WAIT):
            return await read_answer(reader, with_body)
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def canary() -> AsyncIterator[tuple[str, list[str]]]:
    """A server nothing may ever reach through the proxy: yields its host:port, to plant in
    Host headers and absolute-form targets, and the paths it was asked for."""
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.raw_path)
        return web.Response(text="canary")

    app = web.Application()
    app.router.add_route("*", "/{path:.*}", record)
    async with serving(app) as url:
        yield url.removeprefix("http://"), hits


def no_slot_taken(server: Server) -> bool:
    admission = server.state.admission
    return admission.running_total == 0 and admission.waiting_total == 0


async def assert_settled(server: Server, http: aiohttp.ClientSession) -> None:
    """No slot left taken, and an ordinary request still works."""
    await eventually(lambda: no_slot_taken(server))
    async with http.get(server.listen_url + "/api/version") as resp:
        assert resp.status == 200
        assert await resp.json() == {"version": "0.12.0"}


def assert_clean(answer: Answer) -> None:
    assert answer.status is None or answer.status < 500, answer


# --- 1. malformed HTTP -----------------------------------------------------------


@dataclass(frozen=True)
class Raw:
    data: bytes
    truncated: bool


def _text(alphabet: str, max_size: int = 12) -> st.SearchStrategy[bytes]:
    return st.text(alphabet, max_size=max_size).map(lambda s: s.encode("latin-1"))


CONTROL = "".join(map(chr, range(0x20))) + "\x7f"
SANE_METHODS = st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH"])
ODD_METHODS = st.one_of(
    st.sampled_from([b"get", b"BREW", b"CONNECT", b"TRACE", b"P\x00ST", b"", b"POST\t", b"G ET"]),
    _text(TOKEN_CHARS, 8),
    st.binary(max_size=8),
)
SANE_TARGETS = st.sampled_from(
    [*(p.encode() for p in QUEUED_PATHS), b"/api/version", b"/", b"/api/tags?x=1", b"/nope"]
)
ODD_TARGETS = st.one_of(
    st.sampled_from(
        [b"", b"*", b"api/generate", b"/api/gen\x00erate", b"/\xff", b"@x/", b"\\x/", b"/a b", b"/%zz"]
    ),
    st.sampled_from(
        [b"http://x/api/generate", b"http://127.0.0.1:1/api/version", b"https://x", b"//x/api/chat"]
    ),
    _text(VISIBLE, 16),
    st.binary(max_size=16),
)
ODD_VERSIONS = st.one_of(
    st.sampled_from(
        [b"HTTP/2.0", b"HTTP/0.9", b"HTTP/1.2", b"http/1.1", b"HTTP/1.10", b"HTTP/1", b"", b"HTTP/1.1 x"]
    ),
    st.binary(max_size=8),
)
SANE_HEADERS = st.builds(
    lambda name, value: name + b": " + value + b"\r\n",
    st.one_of(
        st.sampled_from([b"Content-Type", b"X-Forwarded-For", b"Accept"]), _text(TOKEN_CHARS, 10).filter(bool)
    ),
    _text(VISIBLE + " ", 20).map(bytes.strip),
)
ODD_HEADERS = st.builds(
    lambda name, sep, value: name + sep + value + b"\r\n",
    st.one_of(
        st.sampled_from(
            [b"Host", b"Connection", b"Expect", b"Upgrade", b"TE", b"Content-Length", b"Transfer-Encoding"]
        ),
        st.sampled_from([b"", b" Host", b"Host ", b"X\x00Y", b"X Y", b"\xffX", b"X:Y"]),
        _text(TOKEN_CHARS, 10),
        st.binary(max_size=10),
    ),
    st.sampled_from([b": ", b":", b":  ", b": \t", b" : ", b""]),
    st.one_of(
        st.sampled_from(
            [b"close", b"keep-alive", b"upgrade", b"100-continue", b"h2c", b"websocket", b"chunked"]
        ),
        st.sampled_from(
            [b"a\x00b", b"a\rb", b"a\nb", b"\x7f", b"\xff\xfe", b"a\r\n b", b"a\r\n\tb", b"x" * 9000]
        ),
        _text(CONTROL + VISIBLE, 20),
        st.binary(max_size=20),
    ),
)
GENERATIONS = st.builds(
    lambda model, stream, prompt: json.dumps(
        {
            "model": model,
            "stream": stream,
            "prompt": prompt,
            "input": prompt,
            "messages": [{"role": "user", "content": prompt}],
        }
    ).encode(),
    st.sampled_from(["llama3.2", "big", "small", "unknown"]),
    st.booleans(),
    st.text(max_size=10),
)
BODIES = st.one_of(GENERATIONS, st.binary(max_size=64))
BAD_LENGTHS = [
    b"-1",
    b"+5",
    b"1e3",
    b"0x10",
    b"1 2",
    b"",
    b" ",
    b"99999999999999999999999",
    b"4294967296",
    b"5,5",
]
BAD_CHUNK_SIZES = [b"zz", b"-1", b"0x5", b"fffffffffffffffffff", b"5;", b" 5", b"", b"5\x00"]
#: What may be wrong with a message; a drawn message has up to two of these.
FLAWS = ("method", "target", "version", "header", "framing", "many-headers", "truncated")


def framing(kind: str, body: bytes, odd: bytes) -> tuple[list[bytes], bytes]:
    """Headers that frame `body`, and the bytes that carry it; `odd` is a bad length or chunk size."""
    length = b"Content-Length: %d\r\n" % len(body)
    chunked = (b"%x\r\n%s\r\n" % (len(body), body) if body else b"") + b"0\r\n\r\n"
    framings = {
        "none": ([], b""),
        "length": ([length], body),
        "chunked": ([b"Transfer-Encoding: chunked\r\n"], chunked),
        "twice": ([length, length], body),
        "differ": ([length, b"Content-Length: %d\r\n" % (len(body) + 1)], body),
        "both": ([length, b"Transfer-Encoding: chunked\r\n"], chunked),
        "gzip": ([b"Transfer-Encoding: gzip, chunked\r\n"], chunked),
        "absurd": ([b"Content-Length: " + odd + b"\r\n"], body),
        "bad-chunk": ([b"Transfer-Encoding: chunked\r\n"], odd + b"\r\n" + body + b"\r\n0\r\n\r\n"),
    }
    return framings[kind]


@st.composite
def raw_messages(draw: st.DrawFn) -> Raw:
    """A well-formed request with up to two flaws."""
    flaws = draw(st.sets(st.sampled_from(FLAWS), max_size=2))
    method = draw(ODD_METHODS if "method" in flaws else SANE_METHODS)
    target = draw(ODD_TARGETS if "target" in flaws else SANE_TARGETS)
    version = draw(ODD_VERSIONS if "version" in flaws else st.sampled_from([b"HTTP/1.1", b"HTTP/1.0"]))
    headers = draw(st.lists(SANE_HEADERS, max_size=3))
    if "header" in flaws:
        headers.insert(draw(st.integers(0, len(headers))), draw(ODD_HEADERS))
    if "many-headers" in flaws:
        headers += [b"X-N%d: v\r\n" % i for i in range(draw(st.sampled_from([99, 101, 1000])))]
    if "framing" in flaws:
        kind = draw(st.sampled_from(["twice", "differ", "both", "gzip", "absurd", "bad-chunk"]))
    else:
        kind = draw(st.sampled_from(["none", "length", "chunked"]))
    odd = draw(st.sampled_from(BAD_CHUNK_SIZES if kind == "bad-chunk" else BAD_LENGTHS))
    framed, body = framing(kind, draw(BODIES), odd)
    line = b" ".join([method, target, version])
    data = line + b"\r\nHost: x\r\n" + b"".join(headers + framed) + b"\r\n" + body
    if "truncated" in flaws:
        return Raw(data[: draw(st.integers(0, len(data) - 1))], truncated=True)
    return Raw(data, truncated=False)


async def test_malformed_http_gets_a_clean_answer_or_a_close(make_proxy, sim, http):
    proxy = await make_proxy()

    async def example(raw: Raw) -> None:
        before = len(sim.records)
        answer = await send_raw(proxy, raw.data, truncated=raw.truncated)
        assert_clean(answer)
        if len(sim.records) > before and answer.status is not None:
            assert "X-Queue-Wait" in answer.headers, "a generation reached upstream without a slot"
        await assert_settled(proxy, http)

    assert await fuzz(raw_messages(), example, 400) > 0
    await assert_settled(proxy, http)


# --- 2. odd JSON bodies on the queued paths -------------------------------------


@dataclass(frozen=True)
class Post:
    path: str
    body: bytes


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING = _Missing()
#: Strings that trip up parsers, encoders, log lines and label sets.
ODD_STRINGS = st.one_of(
    st.sampled_from(
        ["", " ", "\u2028", "\u2029", "a\u2028b\u2029", "\x00", "\ufeff", "\r\n", "\\", '"', "\U0001f999"]
    ),
    st.sampled_from(["llama3.2 ", "LLAMA3.2", "llama3.2:latest", "llama3.2\u2028", "nope", "a" * 300]),
    st.text(max_size=12),
)
#: Text with lone surrogates too, which JSON can carry escaped ("\\ud800").
PROMPTS = st.text(st.one_of(st.characters(), st.characters(categories=["Cs"])), max_size=10)
MODELS = st.one_of(st.sampled_from(["llama3.2", "big", "small"]), ODD_STRINGS, PROMPTS)
WRONG_TYPES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)
JSON_VALUES = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), PROMPTS),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1" + b"0" * 400, b"1E999999999"]
BAD_LITERALS = [b"9" * 5000, b"nan", b"inf", b"01", b"1.", b".5", b"+1", b"0x10", b"'a'", b"undefined"]
BAD_UTF8 = [b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xc0\xaf", b"\xf4\x90\x80\x80", b"\x80"]
NOT_OBJECTS = [
    b"",
    b" ",
    b"null",
    b"[]",
    b"1",
    b'"llama3.2"',
    b"true",
    b"{",
    b"}",
    b"[" * 100_000,
    b'{"a":' * 100_000,
]
#: What a drawn body gets wrong, if anything; "none" twice so that half the bodies are relayed.
FLAWS_JSON = ("none", "none", "model", "stream", "syntax", "top-level")


def _with_field(body: bytes, field: bytes) -> bytes:
    """`body` (a JSON object) with `field` spliced in as its first member."""
    return b"{" + field + (b"," + body[1:] if body != b"{}" else b"}")


@st.composite
def documents(draw: st.DrawFn, flaw: str) -> dict:
    """An object with a model and maybe a stream, one of them wrong if `flaw` says so."""
    doc = draw(st.dictionaries(st.text(max_size=8), JSON_VALUES, max_size=3))
    model = st.one_of(st.just(MISSING), st.just(""), WRONG_TYPES) if flaw == "model" else MODELS
    stream = WRONG_TYPES.filter(lambda v: not isinstance(v, bool | None)) if flaw == "stream" else st.none()
    for key, value in (
        ("model", draw(model)),
        ("stream", draw(st.one_of(stream, st.booleans(), st.just(MISSING)))),
    ):
        if value is not MISSING:
            doc[key] = value
    return doc


def encodings(doc: dict) -> st.SearchStrategy[bytes]:
    """Valid spellings of `doc`, several of which some JSON parsers refuse but Python's accepts."""
    ascii_ = json.dumps(doc).encode()
    text = json.dumps(doc, ensure_ascii=False)
    return st.one_of(
        st.just(ascii_),
        st.just(text.encode("utf-8", "surrogatepass")),  # a lone surrogate goes raw
        st.sampled_from(["utf-16", "utf-32"]).map(lambda codec: text.encode(codec, "surrogatepass")),
        st.just(b"\xef\xbb\xbf" + ascii_),
        st.just(b" \n\t" + ascii_ + b"\r\n"),
        MODELS.map(lambda model: _with_field(ascii_, b'"model":' + json.dumps(model).encode())),
        st.sampled_from(LITERALS).map(lambda literal: _with_field(ascii_, b'"n":' + literal)),
        st.sampled_from([1, 50]).map(
            lambda depth: _with_field(ascii_, b'"n":' + b"[" * depth + b"]" * depth)
        ),
    )


def broken(body: bytes) -> st.SearchStrategy[bytes]:
    """`body` made invalid JSON; deep nesting far past any recursion limit included."""
    return st.one_of(
        st.sampled_from([b"x", b"}", b"\x00", b"{}", b"//", b",", b"]"]).map(lambda tail: body + tail),
        st.sampled_from(BAD_LITERALS).map(lambda literal: _with_field(body, b'"n":' + literal)),
        st.sampled_from(BAD_UTF8).map(lambda raw: _with_field(body, b'"n":"' + raw + b'"')),
        st.just(_with_field(body, b'"n":' + b"[" * 100_000 + b"]" * 100_000)),
        st.integers(1, max(1, len(body) - 1)).map(lambda cut: body[:cut]),
    )


@st.composite
def posts(draw: st.DrawFn) -> Post:
    path = draw(st.sampled_from(QUEUED_PATHS))
    flaw = draw(st.sampled_from(FLAWS_JSON))
    if flaw == "top-level":
        return Post(path, draw(st.one_of(st.sampled_from(NOT_OBJECTS), st.binary(max_size=32))))
    body = draw(encodings(draw(documents(flaw))))
    return Post(path, draw(broken(body)) if flaw == "syntax" else body)


def acceptable(body: bytes) -> bool:
    """A body the proxy must relay: a JSON object with a non-empty string model, and a
    boolean stream if any (the proxy must know whether to keep a stream or a body alive)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return False
    if not isinstance(doc, dict):
        return False
    model, stream = doc.get("model"), doc.get("stream")
    return (
        isinstance(model, str)
        and model != ""
        # No control characters and no lone surrogates: no model's name, and poison for logs.
        and not re.search(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]", model)
        and (stream is None or isinstance(stream, bool))
    )


def assert_error_shape(path: str, headers: Mapping[str, str], body: bytes) -> None:
    """Ollama's `{"error": str}`, or OpenAI's nested error on /v1/*."""
    error = json.loads(body)
    assert set(error) == {"error"}, error
    if path.startswith("/v1/"):
        assert headers["Content-Type"] == "application/json"
        assert set(error["error"]) == {"message", "type", "code"}, error
        assert error["error"]["type"] == "invalid_request_error"
        assert error["error"]["code"] == "bad_request"
        message = error["error"]["message"]
    else:
        assert headers["Content-Type"] == "application/json; charset=utf-8"
        message = error["error"]
    assert isinstance(message, str) and message


async def test_odd_json_bodies_get_a_clear_400_or_are_relayed_as_upstream_answers(make_proxy, sim, http):
    proxy = await make_proxy()
    rejected = 0

    async def example(post: Post) -> None:
        nonlocal rejected
        before = len(sim.records)
        async with http.post(proxy.listen_url + post.path, data=post.body) as resp:
            status, headers, body = resp.status, resp.headers, await resp.read()
        if acceptable(post.body):
            # It took a slot, unless upstream does not list its model: then the proxy answers Ollama's 404.
            took_slot = "X-Queue-Wait" in headers
            assert took_slot or status == 404
            async with http.post(sim.url + post.path, data=post.body) as direct:
                assert (status, body) == (direct.status, await direct.read())
            assert len(sim.records) == before + (2 if took_slot else 1)
        else:
            rejected += 1
            assert status == 400, body
            assert_error_shape(post.path, headers, body)
            assert len(sim.records) == before
        await eventually(lambda: no_slot_taken(proxy))

    assert await fuzz(posts(), example, 500) > 0
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_rejected_total", reason="bad_request") == rejected
    gauges = {
        k: v for k, v in metrics.items() if k[0] in ("ollama_proxy_in_flight", "ollama_proxy_queue_depth")
    }
    assert gauges and set(gauges.values()) == {0.0}
    await assert_settled(proxy, http)


# --- 3. header and path tricks -----------------------------------------------------


@dataclass(frozen=True)
class Tricks:
    """A valid generation request dressed in odd headers."""

    path: str
    #: End-to-end headers, in order: each must reach upstream as sent unless Connection names it.
    extra: tuple[tuple[str, str], ...]
    #: Hop-by-hop headers: must never reach upstream.
    hop: tuple[tuple[str, str], ...]
    #: Header names the Connection header lists (as sent: case and spacing vary).
    named: tuple[str, ...]
    separator: str
    spoofed: tuple[str, ...]
    host: bytes | None
    expect: bool
    framing: str

    def data(self) -> bytes:
        lines = [f"POST {self.path} HTTP/1.1".encode()]
        if self.host is not None:
            lines.append(b"Host: " + self.host)
        if self.named:
            lines.append(f"Connection: {self.separator.join(self.named)}".encode())
        headers = [*self.extra, *self.hop, *(("X-Forwarded-For", value) for value in self.spoofed)]
        lines += [f"{name}: {value}".encode() for name, value in headers]
        if self.expect:
            lines.append(b"Expect: 100-continue")
        if self.framing == "length":
            lines.append(b"Content-Length: %d" % len(GENERATION))
            body = GENERATION
        else:
            lines.append(
                b"Transfer-Encoding: " + (b"chunked" if self.framing == "chunked" else b"gzip, chunked")
            )
            half = len(GENERATION) // 2
            body = b"".join(
                b"%x\r\n%s\r\n" % (len(part), part) for part in (GENERATION[:half], GENERATION[half:])
            )
            body += b"0\r\n\r\n"
        return b"\r\n".join(lines) + b"\r\n\r\n" + body

    def stripped(self) -> set[str]:
        return {name.strip().lower() for name in self.named}


HEADER_VALUE = st.text(VISIBLE + " ", max_size=16).map(str.strip)
#: End-to-end headers, a name possibly repeated, and spelt in another case when it is.
EXTRA_HEADERS = st.lists(
    st.tuples(
        st.text(TOKEN_CHARS, min_size=1, max_size=8)
        .map(lambda t: "X-" + t)
        .filter(lambda n: n.lower() != "x-forwarded-for"),
        st.lists(st.tuples(st.booleans(), HEADER_VALUE), min_size=1, max_size=2),
    ),
    max_size=3,
    unique_by=lambda header: header[0].lower(),
).map(
    lambda headers: [
        (name.swapcase() if swap else name, value) for name, values in headers for swap, value in values
    ]
)
HOP_HEADERS = st.lists(
    st.sampled_from(
        [
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("Trailer", "X-T"),
            ("Proxy-Authorization", "Basic c2VjcmV0"),
            ("Proxy-Connection", "keep-alive"),
        ]
    ),
    max_size=3,
    unique=True,
)
HOSTS = st.one_of(
    st.sampled_from([None, b"", b"evil.example", b"[::1]:1", b"x" * 1000, b"a b", b"host:99999", b"@evil"]),
    st.text(VISIBLE, max_size=20).map(str.encode),
)


@st.composite
def tricks(draw: st.DrawFn) -> Tricks:
    extra = draw(EXTRA_HEADERS)
    names = [name for name, _ in extra] + ["X-Forwarded-For", "close", "keep-alive"]
    named = draw(st.lists(st.sampled_from(names), max_size=3))
    named = [name.upper() if draw(st.booleans()) else name for name in named]
    return Tricks(
        path=draw(st.sampled_from(["/api/generate", "/api/chat", "/api/embed", "/v1/chat/completions"])),
        extra=tuple(extra),
        hop=tuple(draw(HOP_HEADERS)),
        named=tuple(named),
        separator=draw(st.sampled_from([", ", ",", " , ", ",, "])),
        spoofed=tuple(draw(st.lists(HEADER_VALUE, max_size=2))),
        host=draw(HOSTS),
        expect=draw(st.booleans()),
        framing=draw(st.sampled_from(["length", "chunked", "gzip-chunked"])),
    )


async def test_header_tricks_reach_upstream_cleaned(make_proxy, sim, http):
    proxy = await make_proxy()
    upstream_host = sim.url.removeprefix("http://")

    async def example(case: Tricks) -> None:
        before = len(sim.records)
        answer = await send_raw(proxy, case.data())
        if case.host is None:  # HTTP/1.1 requires a Host header (RFC 9112 3.2)
            assert answer.status == 400 and len(sim.records) == before
            return
        assert answer.status == 200, answer
        assert "X-Queue-Wait" in answer.headers
        [record] = sim.records[before:]
        seen = record.headers
        assert record.body == GENERATION
        assert seen["Host"] == upstream_host
        stripped = case.stripped()
        for name in {*HOP_BY_HOP, "Transfer-Encoding", "Expect", *stripped} - {"x-forwarded-for"}:
            assert name not in seen, (name, dict(seen))
        for name in {name for name, _ in case.extra if name.lower() not in stripped}:
            assert seen.getall(name) == [value for sent, value in case.extra if sent.lower() == name.lower()]
        prior = "" if "x-forwarded-for" in stripped else ", ".join(case.spoofed)
        assert seen.getall("X-Forwarded-For") == [f"{prior}, 127.0.0.1" if prior else "127.0.0.1"]
        await assert_settled(proxy, http)

    assert await fuzz(tricks(), example, 250) > 0
    await assert_settled(proxy, http)


#: Ways to disguise a path: percent-encoding (once or twice), slashes doubled, encoded or
#: padded with dot segments, case, NUL, non-ASCII bytes, and junk before or after.
SLASHES = [b"//", b"%2F", b"%2f", b"/./", b"/x/../", b"/%2e/", b"/x/%2e%2e/", b"/x/.%2e/", b"\\", b";/"]
PREFIXES = [b"/x/..", b"/.", b"/%2e%2e", b"/..", b"/", b"/%2F"]
SUFFIXES = [b"/", b"?x=1", b"#f", b"%00", b"%20", b";x", b"?", b"/.", b"/..", b"%2F", b"\xff", b"\t", b"\x00"]
INSERTS = [b"\x00", b"%00", b"\xc3\xa9", b"%C3%A9", b"%ff", b" ", b"\\", b"%"]
PATH_TRICKS = ("encode", "encode", "double", "slash", "slash", "prefix", "suffix", "case", "insert")


@st.composite
def trick_paths(draw: st.DrawFn) -> bytes:
    """A queued path (mostly), disguised by up to three tricks."""
    others = ("/api/version", "/api/tags", "/api/delete", "/api/pull")
    path = draw(st.sampled_from(QUEUED_PATHS + QUEUED_PATHS + others)).encode()
    for trick in draw(st.lists(st.sampled_from(PATH_TRICKS), max_size=3)):
        at = draw(st.integers(1, len(path) - 1))
        if trick in ("encode", "double"):
            hex_ = b"%02X" if draw(st.booleans()) else b"%02x"
            path = path[:at] + (b"%" if trick == "encode" else b"%25") + hex_ % path[at] + path[at + 1 :]
        elif trick == "slash" and b"/" in path[1:]:
            at = path.index(b"/", draw(st.integers(1, path.rindex(b"/"))))
            path = path[:at] + draw(st.sampled_from(SLASHES)) + path[at + 1 :]
        elif trick == "prefix":
            path = draw(st.sampled_from(PREFIXES)) + path
        elif trick == "suffix":
            path += draw(st.sampled_from(SUFFIXES))
        elif trick == "case":
            path = path[:at] + path[at:].swapcase()
        elif trick == "insert":
            path = path[:at] + draw(st.sampled_from(INSERTS)) + path[at:]
    return path


@dataclass(frozen=True)
class Probe:
    method: bytes
    path: bytes
    host: bytes

    def data(self) -> bytes:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n\r\n" % (
            self.method, self.path, self.host, len(GENERATION)
        )  # fmt: skip
        return head + GENERATION


async def test_no_path_trick_reaches_a_generation_without_a_slot(make_proxy, sim, http):
    """With the only slot held and no queue, a request the proxy classifies as a generation
    gets 503 at once; one it lets through must not start a generation upstream."""
    async with canary() as (elsewhere, hits):
        proxy = await make_proxy(limits={"max_concurrent": 1, "max_queue": 0})
        hold = await hold_the_slot(sim, http, proxy)
        hosts = st.sampled_from([b"x", elsewhere.encode(), b"evil.example"])

        async def example(probe: Probe) -> None:
            answer = await send_raw(proxy, probe.data(), with_body=True)
            assert not hold.done(), f"the request holding the slot ended: {hold.exception()!r}"
            if answer.status == 503:  # classified as a generation: refused for want of a slot
                assert "queue full" in answer.body.decode(), answer
                assert "Retry-After" in answer.headers
            else:
                assert_clean(answer)
            assert len(sim.records) == 1 and sim.peak == 1, (
                f"a generation reached upstream without a slot (or the held one ended: {hold.done()=}, "
                f"held={sim.records[0]!r})"
            )
            admission = proxy.state.admission
            await eventually(lambda: admission.running_total == 1 and admission.waiting_total == 0)

        probes = st.builds(Probe, st.sampled_from([b"POST", b"POST", b"GET", b"PUT"]), trick_paths(), hosts)
        assert await fuzz(probes, example, 400) > 0
        assert hits == []
        await release(hold)
    await assert_settled(proxy, http)
    async with http.post(proxy.listen_url + "/api/generate", data=GENERATION) as resp:
        assert resp.status == 200
        assert (await resp.json())["done"] is True


# --- bugs found by fuzzing, pinned down ------------------------------------------


async def test_an_absolute_form_target_gets_a_clean_answer_and_goes_nowhere_else(make_proxy, sim, http):
    """Found by fuzzing: relay.py once built the upstream URL as upstream.url + raw_path, so
    'GET http://host/path' (RFC 9112 3.2.2) made 'http://127.0.0.1:PORThttp://...' and a 500."""
    async with canary() as (elsewhere, hits):
        proxy = await make_proxy()
        for method, path in (("GET", "/api/version"), ("POST", "/api/generate")):
            for authority in ("evil.example", elsewhere):
                line = f"{method} http://{authority}{path} HTTP/1.1\r\n".encode()
                head = b"Host: x\r\nContent-Length: %d\r\n\r\n" % len(GENERATION)
                answer = await send_raw(proxy, line + head + GENERATION)
                assert answer.status is not None and 400 <= answer.status < 500, answer
                await assert_settled(proxy, http)
    assert hits == [] and sim.records == []


async def test_a_lone_surrogate_model_name_does_not_break_metrics(make_proxy, http):
    proxy = await make_proxy()
    async with http.post(
        proxy.listen_url + "/api/generate", data=b'{"model":"\\ud800","stream":false}'
    ) as resp:
        await resp.read()  # upstream's answer; what matters is what it leaves behind
    async with http.get(proxy.admin_url + "/metrics") as resp:
        assert resp.status == 200


async def test_a_huge_model_name_does_not_bloat_metrics(make_proxy, http):
    proxy = await make_proxy()
    async with http.get(proxy.admin_url + "/metrics") as resp:
        before = len(await resp.read())
    name = "m" * 100_000
    async with http.post(proxy.listen_url + "/api/generate", json={"model": name, "stream": False}) as resp:
        assert resp.status == 404  # upstream knows no such model
    async with http.get(proxy.admin_url + "/metrics") as resp:
        after = len(await resp.read())
    assert after - before < len(name)


async def test_a_header_repeated_in_another_case_reaches_upstream_whole(make_proxy, sim, http):
    proxy = await make_proxy()
    head = b"POST /api/generate HTTP/1.1\r\nHost: x\r\nX-T: a\r\nx-t: b\r\nContent-Length: %d\r\n\r\n"
    answer = await send_raw(proxy, head % len(GENERATION) + GENERATION)
    assert answer.status == 200
    assert sim.records[-1].headers.getall("X-T") == ["a", "b"]
