"""The one path of a proxied request, top to bottom: classify, admit, relay, respond.

Everything a request holds is released by the structure of this function:
the keep-alive beat and the admission slot are `async with` blocks, and the
relay closes its upstream response in `finally`. The server runs with
`handler_cancellation=True`, so a client that vanishes cancels this coroutine
wherever it is waiting, and the same unwinding frees slot and socket.

What happened is written into one `Exchange` (facts only: what failed, where
the request was, what it cost) and handed to the observers (metrics, access
log) once, in `finally`; only what happens while a request waits (keep-alive
frames, a failed connection after which it keeps its place) is counted as it goes.

A little over 400 lines: the one path reads best as one file, top to bottom,
with the few helpers it calls (body, relay, requeue) beside it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

from proxy.config import PRIORITIES, Config
from proxy.edge import access
from proxy.edge.body import EMPTY, Body, receive
from proxy.edge.keepalive import Heartbeats, KeepAlive
from proxy.edge.reply import ClientStalled, Reply
from proxy.errors import (
    BadRequest,
    BodyTimeout,
    Draining,
    ProxyError,
    ShuttingDown,
    TooLarge,
    UpstreamError,
    UpstreamReset,
    UpstreamStatus,
    UpstreamUnreachable,
    error_response,
)
from proxy.observe import accesslog
from proxy.observe.exchange import CLIENT_GONE, Exchange, Outcome, Phase
from proxy.observe.logs import clip
from proxy.ollama import classify, usage
from proxy.ollama.frames import Wire
from proxy.ollama.names import canonical_model
from proxy.runtime import STATE, ProxyState
from proxy.scheduling.admission import Slot
from proxy.units import format_duration
from proxy.upstream import listings
from proxy.upstream.relay import relay

log = logging.getLogger("proxy.handler")


@dataclass(frozen=True, eq=False)
class Listening:
    """What the listen port's requests share besides `ProxyState`: made by the server with
    the listen app, so each proxy has its own and nothing is kept at module level."""

    #: The one ticker for every waiting client's keep-alive frames.
    heartbeats: Heartbeats = field(default_factory=Heartbeats)
    #: Client keys, hashed once per loaded config.
    keys: access.KeysByConfig = field(default_factory=access.KeysByConfig)


LISTENING = web.AppKey("listening", Listening)


async def handle(request: web.Request) -> web.StreamResponse:
    state, listening = request.app[STATE], request.app[LISTENING]
    config = state.config  # one view for the whole request, even across a reload
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    try:
        path, refused = access.canonical_path(request.raw_path), None
    except BadRequest as err:
        # As sent (still escaped, so safe to log); only to shape and log the 400, never forwarded.
        path, refused = request.raw_path.partition("?")[0], err
    route = classify.route(request.method, path)
    ex = Exchange(
        method=request.method,
        path=path,
        address=accesslog.client_address(request, config.listen.trusted_proxies),
        arrived=time.time(),
        started=loop.time(),
        endpoint=route.endpoint,
        phase=Phase.QUEUED if route.queued else Phase.RUNNING,
    )
    reply: Reply | None = None
    cors: access.CorsHeaders = ()
    body: Body = EMPTY
    state.enter(task)
    try:
        cors = access.cors_headers(
            request.headers.get("Origin"),
            request.headers.get("Host"),
            config.access.cors_origins,
            preflight=request.method == "OPTIONS",
        )
        if cors and request.method == "OPTIONS":
            return _preflight(ex, cors)
        if refused is not None:
            raise refused
        ex.client = access.authenticate(
            request.headers.get("Authorization"), listening.keys.of(config.access.keys)
        )
        access.check_model_management(path, config.access)
        if state.draining:
            raise _draining(state)
        body = await _read_body(request, config)
        job = classify.job(route, body.read()) if route.queued else None
        if job is not None:
            ex.model = canonical_model(job.model)
        if job is None or job.unload:  # an unload (`ollama stop`) generates nothing: it never waits
            ex.phase = Phase.RUNNING
            if request.method == "GET" and path in listings.MERGED and len(state.health.names()) > 1:
                if (response := await _merged(state, config, path, ex, cors)) is not None:
                    return response
            reply = Reply(request, openai=route.openai, write_timeout=config.timeouts.write, cors=cors)
            shown = listings.shown_model(body.read()) if path == "/api/show" else None
            ex.backend = state.health.for_model(shown)
            ex.status = await _relay(state, config, request, path, body, reply, ex)
            return await _finish(reply, ex)

        priority = _schedule(request, config, ex)
        state.health.refuse_newcomer()
        await state.health.check_model(job.model, ex.started)
        beats = job.wire is not Wire.JSON or config.heartbeat.non_streaming
        reply = Reply(
            request,
            openai=route.openai,
            wire=job.wire,
            model=job.model,
            interval=config.heartbeat.interval if beats else 0.0,
            on_frame=state.metrics.heartbeats.inc,
            write_timeout=config.timeouts.write,
            cors=cors,
        )
        slot = state.admission.slot(job.model, ex.client, priority=priority, party=ex.party)
        try:
            async with KeepAlive(reply, listening.heartbeats, lambda: _note(slot)):
                async with slot:
                    streaming = job.wire is not Wire.JSON
                    ex.status = await _generate(
                        state, config, request, path, body, reply, ex, slot, streaming
                    )
        finally:
            ex.cost = slot.charged
            if ex.waited is None:  # never admitted: the wait ended some other way
                reply.headers["X-Queue-Wait"] = f"{slot.waited:.3f}"
        return await _finish(reply, ex)
    except ProxyError as err:
        ex.fail(err)
        _log_failure(err, ex)
        if reply is None:
            response = error_response(err, openai=route.openai, cors=cors)
            ex.sent = len(response.body or b"")
        else:
            response = await reply.fail(err)
        if isinstance(err, TooLarge | BodyTimeout):
            response.force_close()  # the rest of the body is not worth reading
        return response
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        if state.stopping and isinstance(exc, asyncio.CancelledError) and task.uncancel() == 0:
            return await _cut_at_shutdown(state, request, reply, route.openai, ex, cors)
        if isinstance(exc, ClientStalled):
            ex.outcome = Outcome.CLIENT_STALLED
            log.warning(
                "client stalled: %s %s model=%s: %s; cut off",
                ex.method,
                clip(ex.path),
                clip(ex.model or "-"),
                exc,
            )
        else:
            log.info(
                "client gone: %s %s model=%s phase=%s",
                ex.method,
                clip(ex.path),
                clip(ex.model or "-"),
                ex.phase,
            )
        if isinstance(exc, asyncio.CancelledError):
            raise
        return reply.response if reply and reply.response else web.Response(status=CLIENT_GONE)
    finally:
        body.close()  # a spooled body's file goes on every path: done, refused, client gone, shutdown
        state.leave(task)
        ex.duration = loop.time() - ex.started
        ex.sent = reply.sent if reply else ex.sent
        state.metrics.observe(ex)
        accesslog.write(ex)


async def _merged(
    state: ProxyState, config: Config, path: str, ex: Exchange, cors: access.CorsHeaders
) -> web.Response | None:
    """The fleet's listing as one Ollama's (`listings.merged`); None when no backend answered."""
    assert state.session is not None, "client session is opened in cleanup_ctx"
    answer = await listings.merged(state.session, state.health.healthy_urls(), path, config.timeouts.connect)
    if answer is None:
        return None
    response = web.json_response(answer, headers=dict(cors))
    ex.status, ex.outcome, ex.sent = 200, Outcome.OK, len(response.body or b"")
    return response


async def _finish(reply: Reply, ex: Exchange) -> web.StreamResponse:
    response = await reply.finish()
    ex.outcome = Outcome.OK if ex.status < 400 else Outcome.UPSTREAM_STATUS
    return response


async def _read_body(request: web.Request, config: Config) -> Body:
    """The whole body within `request.body_timeout`, so a trickling client never reaches the queue."""
    if not request.body_exists:
        return EMPTY  # most relayed-at-once requests (GET /api/tags): no timer to arm
    deadline = config.request.body_timeout
    try:
        async with asyncio.timeout(deadline):
            return await receive(request, config.request)
    except TimeoutError:
        raise BodyTimeout(
            f"the request body did not arrive within request.body_timeout={format_duration(deadline)}; "
            "send the whole body at once"
        ) from None


async def _generate(
    state: ProxyState,
    config: Config,
    request: web.Request,
    path: str,
    body: Body,
    reply: Reply,
    ex: Exchange,
    slot: Slot,
    streaming: bool,
) -> int:
    """Relay an admitted generation. One that could not connect (upstream never received
    it) goes back to its place in the queue while upstream is down, within the outage grace."""
    while True:
        ex.phase, ex.waited = Phase.RUNNING, slot.waited
        reply.headers["X-Queue-Wait"] = f"{slot.waited:.3f}"
        ex.backend = slot.backend
        state.health.sent(slot.backend, slot.model)
        try:
            return await _relay(
                state, config, request, path, body, reply, ex, generation=True, streaming=streaming, slot=slot
            )
        except UpstreamUnreachable as err:
            if not state.health.keep_waiting(err.detail, slot.backend, slot.model):
                raise
            state.metrics.requeued(err.kind)
            log.warning(
                "upstream unreachable, request keeps its place: %s %s model=%s backend=%s: %s",
                ex.method, clip(ex.path), clip(ex.model), slot.backend, clip(err.detail),
            )  # fmt: skip
        except UpstreamReset:
            state.health.suspect(slot.backend)
            raise
        ex.phase, ex.waited = Phase.QUEUED, None
        await slot.requeue()


async def _relay(
    state: ProxyState,
    config: Config,
    request: web.Request,
    path: str,
    body: Body,
    reply: Reply,
    ex: Exchange,
    *,
    generation: bool = False,
    streaming: bool = False,
    slot: Slot | None = None,
) -> int:
    """Relay to upstream (the backend `ex.backend` names); for a generation, also note what upstream says it cost.

    A non-streamed generation is silent upstream until its answer is whole, so
    it is bounded by `timeouts.generation` in all instead of `timeouts.read`.
    """
    assert state.session is not None, "client session is opened in cleanup_ctx"
    whole = generation and not streaming
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.timeouts.connect, sock_read=None if whole else config.timeouts.read
    )
    meter = usage.Meter(asyncio.get_running_loop().time) if generation else None
    on_chunk = meter.feed if meter else None
    if meter is not None and slot is not None and streaming:
        on_chunk = _charging(meter, slot)
    # Stays 0 if relay raises: any body it had relayed by then came with a success status.
    status = 0
    try:
        status = await relay(
            state.session,
            state.health.url(ex.backend),
            request,
            body,
            reply,
            timeout,
            on_chunk,
            path=path,
            private=access.private_headers(config.access),
            generation=config.timeouts.generation if whole else None,
        )
    finally:
        if meter is not None:
            _record_usage(ex, meter, streaming and status < 400)
        if slot is not None:
            slot.settle(_tokens(ex))
    if status >= 500:
        ex.upstream_failure = UpstreamStatus.kind
    return status


def _schedule(request: web.Request, config: Config, ex: Exchange) -> int:
    """The request's priority (its key's, maybe lowered by the header) and its fair-share party."""
    scheduling, profile = config.scheduling, config.access.profiles.get(ex.client)
    base = profile.priority if profile is not None else "normal"
    header = scheduling.priority_header
    priority = access.priority_of(request.headers.get(header) if header else None, base, header)
    ex.priority = PRIORITIES[priority]
    ex.party = access.party_of(scheduling.fairness, ex.client, ex.address, request.headers)
    ex.cost_label = ex.client if scheduling.fairness == "key" and ex.client else "other"
    return priority


def _charging(meter: usage.Meter, slot: Slot) -> Callable[[bytes], None]:
    """Meter each streamed chunk and charge it as one token until the final counts settle it."""

    def on_chunk(chunk: bytes) -> None:
        meter.feed(chunk)
        slot.charge(1)

    return on_chunk


def _tokens(ex: Exchange) -> int | None:
    """What the answer cost as Ollama counted it (prompt + completion; an embedding's prompt)."""
    if ex.prompt_tokens is None and ex.completion_tokens is None:
        return None
    return (ex.prompt_tokens or 0) + (ex.completion_tokens or 0)


def _record_usage(ex: Exchange, meter: usage.Meter, streamed: bool) -> None:
    """What the generation reported; time to first token only when streamed, since a
    non-streamed answer arrives all at once, after the last token."""
    if (found := meter.close()) is not None:
        ex.usage = found
    if streamed and meter.first_byte is not None:
        ex.first_byte = meter.first_byte


async def _cut_at_shutdown(
    state: ProxyState,
    request: web.Request,
    reply: Reply | None,
    openai: bool,
    ex: Exchange,
    cors: access.CorsHeaders,
) -> web.StreamResponse:
    """The grace ran out with this request unfinished: say so, in-band if a response is out."""
    grace = format_duration(state.config.shutdown_grace)
    err = ShuttingDown(
        f"the proxy is shutting down and this request did not finish within shutdown_grace={grace}; retry it",
        retry_after=1,
    )
    ex.status, ex.outcome = err.status, Outcome.SHUTDOWN
    log.warning(
        "cut at shutdown: %s %s model=%s phase=%s", ex.method, clip(ex.path), clip(ex.model or "-"), ex.phase
    )
    return await reply.fail(err) if reply else error_response(err, openai=openai, cors=cors)


def _preflight(ex: Exchange, cors: access.CorsHeaders) -> web.Response:
    """A browser's preflight, answered as Ollama answers it (204) and before any key is
    asked for: browsers send no `Authorization` on a preflight."""
    ex.status, ex.outcome = 204, Outcome.OK
    response = web.Response(status=204)
    response.headers.extend(cors)
    return response


def _draining(state: ProxyState) -> Draining:
    return Draining(
        "the proxy is shutting down and takes no new requests; retry shortly",
        retry_after=max(1, math.ceil(state.config.shutdown_grace)),
    )


def _note(slot: Slot) -> str:
    place = slot.position()
    if place is None:
        return "running, waiting for upstream"
    return f"queued, position {place[0]} of {place[1]}"


def _log_failure(err: ProxyError, ex: Exchange) -> None:
    # ex.path is canonical and escaped: a client cannot split a log line with it.
    if isinstance(err, UpstreamError):
        log.warning("upstream error (%s): %s %s: %s", err.kind, ex.method, clip(ex.path), clip(err.detail))
    else:
        log.info("rejected (%s): %s %s: %s", err.reason, ex.method, clip(ex.path), clip(err.detail))
