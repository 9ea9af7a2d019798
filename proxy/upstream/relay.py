"""The upstream call and the byte relay: the only code that talks to Ollama.

Headers are cleaned here in one place (hop-by-hop out, X-Forwarded-For in),
bytes are copied as they arrive (no line splitting, no re-encoding), and the
upstream response is *closed* on every path that did not read it to the end,
so an abandoned generation takes its socket, and Ollama's work, with it.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

import aiohttp
from aiohttp import payload, web
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from proxy.errors import (
    UpstreamEncoded,
    UpstreamReset,
    UpstreamStatus,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.units import format_duration

#: RFC 9110 section 7.6.1, plus the legacy ones Go's reverse proxy also strips.
HOP_BY_HOP = frozenset(
    h.lower()
    for h in (
        "Connection",
        "Keep-Alive",
        "Proxy-Authenticate",
        "Proxy-Authorization",
        "Proxy-Connection",
        "TE",
        "Trailer",
        "Transfer-Encoding",
        "Upgrade",
    )
)
#: Recomputed by the client library for the body we send, or meaningless once
#: we have read the body ourselves (Expect: 100-continue was answered by us).
_REQUEST_ONLY = frozenset({"host", "content-length", "expect"})
#: An upstream error body is read this far to quote it in an in-band error.
_ERROR_BODY_LIMIT = 64 * 1024


_UPSTREAM_DROP = HOP_BY_HOP | _REQUEST_ONLY

_T = TypeVar("_T")


class Sink(Protocol):
    """Where upstream's answer goes: the client's side of the exchange (`edge.reply.Reply`).

    The relay only starts the answer and copies bytes into it; ending it, or
    failing it in the client's shape, is the caller's, who knows the client.
    A second sink (a fan-out, a recorder) plugs in here without the relay
    knowing the listen side.
    """

    async def start(self, status: int, headers: Mapping[str, str]) -> bool:
        """Send upstream's status line; False if a response (a keep-alive 200) is already out."""
        ...

    async def write(self, chunk: bytes) -> None:
        """Pass on upstream's bytes as they came."""
        ...


class RequestBody(Protocol):
    """The client's body as received by the listen side (`edge.body.Body`), sent on upstream."""

    def payload(self) -> bytes | payload.Payload | None: ...


@dataclass(frozen=True, slots=True)
class _Budget:
    """The whole time a non-streamed answer may take upstream (`timeouts.generation`).

    Ollama sends nothing of such an answer until it is complete, so a bound on
    silence (`timeouts.read`) would cut every long answer; this bounds the whole
    instead, from the moment the request goes upstream.
    """

    length: float
    deadline: float

    async def within(self, step: Awaitable[_T]) -> _T:
        timer = asyncio.timeout_at(self.deadline)
        try:
            async with timer:
                return await step
        except TimeoutError:
            if not timer.expired():
                raise  # not ours: let the caller judge it
            raise UpstreamTimeout(
                f"upstream did not finish the answer within {format_duration(self.length)}; "
                "ask for a shorter answer, or stream it",
                detail=f"upstream did not finish a non-streaming answer within {format_duration(self.length)} "
                "(timeouts.generation); raise it for longer answers, or have clients stream",
            ) from None


def _strip_hop_by_hop(headers: CIMultiDictProxy[str], drop: frozenset[str] = HOP_BY_HOP) -> CIMultiDict[str]:
    """Drop the headers in `drop` (lower case) and any the Connection header names."""
    if "Connection" in headers:
        drop = drop | {
            token.strip().lower() for value in headers.getall("Connection") for token in value.split(",")
        }
    items = [(name, value) for name, value in headers.items() if name.lower() not in drop]
    if len({name.lower() for name, _ in items}) == len({name for name, _ in items}):
        return CIMultiDict(items)
    # A name repeated in another spelling: aiohttp's client folds "X-T" and "x-t"
    # into one header and upstream would lose a value, so every repeat takes the first.
    spelling: dict[str, str] = {}
    return CIMultiDict([(spelling.setdefault(name.lower(), name), value) for name, value in items])


def upstream_headers(request: web.Request, private: frozenset[str] = frozenset()) -> CIMultiDict[str]:
    """The client's headers as upstream should see them.

    Host is the upstream's own (Ollama refuses foreign Host headers on a
    loopback bind), and X-Forwarded-For gains the client's address.
    """
    headers = _strip_hop_by_hop(request.headers, _UPSTREAM_DROP | private)
    prior = ", ".join(headers.popall("X-Forwarded-For", []))
    client = request.remote or "unknown"
    headers["X-Forwarded-For"] = f"{prior}, {client}" if prior else client
    return headers


def downstream_headers(response: aiohttp.ClientResponse) -> CIMultiDict[str]:
    return _strip_hop_by_hop(response.headers)


async def relay(
    session: aiohttp.ClientSession,
    base_url: str,
    request: web.Request,
    body: RequestBody,
    reply: Sink,
    timeout: aiohttp.ClientTimeout,
    on_chunk: Callable[[bytes], None] | None = None,
    *,
    path: str,
    private: frozenset[str] = frozenset(),
    generation: float | None = None,
) -> int:
    """Send the request upstream and copy the answer to `reply`; return upstream's status.

    `path` is the request's canonical path (`access.canonical_path`), the one
    it was classified by, so upstream runs exactly what the proxy admitted.

    `on_chunk` sees each body chunk once the client has been sent it (to meter
    usage without delaying a byte).

    `generation`, for a non-streamed answer, bounds the whole time upstream
    takes to send it; `timeout` then should not bound silence (`sock_read`),
    since such an answer is silent until it is whole.

    Raises an `UpstreamError` for upstream failures. A client that vanishes
    surfaces here as cancellation or a write error, and the `finally` closes
    the upstream connection in both cases.
    """
    budget = (
        None if generation is None else _Budget(generation, asyncio.get_running_loop().time() + generation)
    )
    try:
        sent = session.request(
            request.method,
            # Already resolved and escaped: `encoded` keeps yarl from doing either again.
            URL(base_url + _with_query(path, request.raw_path), encoded=True),
            headers=upstream_headers(request, private),
            data=body.payload(),
            allow_redirects=False,
            timeout=timeout,
        )
        upstream = await (sent if budget is None else budget.within(sent))
    except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError) as exc:
        raise UpstreamUnreachable(
            "upstream is unreachable; retry later",
            detail=f"cannot reach upstream {base_url}: {_describe(exc)}; is Ollama running there? (upstream.url)",
        ) from None
    except aiohttp.ServerTimeoutError:
        raise _silent(timeout, base_url) from None
    except aiohttp.ClientOSError as exc:
        if not str(exc.strerror or "").startswith(_UNWRITTEN):
            raise _reset(base_url, exc) from None
        # A pooled connection the host closed as it left (or died): the request was not
        # written whole, so Ollama ran nothing, and it may go elsewhere like a refused connect.
        raise UpstreamUnreachable(
            "upstream is unreachable; retry later",
            detail=f"upstream {base_url} closed the connection before the request was written: {_describe(exc)}",
        ) from None
    except aiohttp.ClientError as exc:
        raise _reset(base_url, exc) from None

    complete = False
    try:
        if not await reply.start(upstream.status, downstream_headers(upstream)):
            # A keep-alive 200 is already out; an error status can only go in-band.
            if upstream.status >= 400:
                raise UpstreamStatus(upstream.status, await _error_message(upstream, timeout, budget))
            encoding = upstream.headers.get("Content-Encoding", "identity")
            if encoding.lower() != "identity":
                raise UpstreamEncoded(
                    f"upstream compressed its answer (Content-Encoding: {encoding}) after keep-alive "
                    "frames had begun it uncompressed; clients that wait in the queue must not send "
                    "Accept-Encoding"
                )
        while chunk := await _read(upstream, timeout, budget):
            await reply.write(chunk)
            if on_chunk is not None:
                on_chunk(chunk)
        complete = True
        return upstream.status
    finally:
        if complete:
            upstream.release()
        else:
            upstream.close()


async def _read(
    upstream: aiohttp.ClientResponse, timeout: aiohttp.ClientTimeout, budget: _Budget | None
) -> bytes:
    """The next bytes upstream has, as they come; b"" at the end.

    Kept apart from the write to the client so that an upstream failure and a
    client that has gone away can never be mistaken for each other, and so
    that `budget` counts upstream's time only, never a slow client's.
    """
    try:
        step = upstream.content.readany()
        return await (step if budget is None else budget.within(step))
    except aiohttp.ServerTimeoutError:
        raise _silent(timeout, _origin(upstream)) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise UpstreamReset(
            "upstream broke off the response; retry the request",
            detail=f"upstream {_origin(upstream)} broke off the response: {_describe(exc)}",
        ) from None


def _with_query(path: str, raw_path: str) -> str:
    """The client's query goes on exactly as it was sent: only the path is the proxy's to judge."""
    query = raw_path.partition("?")[2]
    return f"{path}?{query}" if query else path


def _silent(timeout: aiohttp.ClientTimeout, base_url: str) -> UpstreamTimeout:
    silence = format_duration(timeout.sock_read or 0)
    return UpstreamTimeout(
        f"upstream sent nothing for {silence}; the model may be stuck, retry later",
        detail=f"upstream {base_url} sent nothing for {silence} (timeouts.read); "
        "the model may be stuck or the timeout too short for it",
    )


def _origin(upstream: aiohttp.ClientResponse) -> str:
    """Where upstream is, for the log (its URL is the operator's business, not the client's)."""
    return str(upstream.url.origin())


async def _error_message(
    upstream: aiohttp.ClientResponse, timeout: aiohttp.ClientTimeout, budget: _Budget | None
) -> str:
    """Upstream's own error text, so an in-band error says what Ollama said."""
    raw = b""
    while len(raw) < _ERROR_BODY_LIMIT and (chunk := await _read(upstream, timeout, budget)):
        raw += chunk
    text = raw[:_ERROR_BODY_LIMIT].decode("utf-8", "replace").strip()
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error")
        if isinstance(error, dict):
            error = error.get("message")
        if isinstance(error, str):
            text = error
    return f"upstream answered {upstream.status}: {text or upstream.reason}"


#: How aiohttp words a request it could not write (`ClientRequest.write_bytes`).
_UNWRITTEN = "Can not write request body"


def _reset(base_url: str, exc: Exception) -> UpstreamReset:
    return UpstreamReset(
        "upstream closed the connection before answering; retry later",
        detail=f"upstream {base_url} closed the connection before answering: {_describe(exc)}",
    )


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
