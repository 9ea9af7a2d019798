"""The one path of a proxied request, top to bottom: classify, admit, relay, respond.

Everything a request holds is released by the structure of this function:
the keep-alive beat and the admission slot are `async with` blocks, and the
relay closes its upstream response in `finally`. The server runs with
`handler_cancellation=True`, so a client that vanishes cancels this coroutine
wherever it is waiting, and the same unwinding frees slot and socket.
"""

from __future__ import annotations

import asyncio
import logging

import aiohttp
from aiohttp import web

from . import classify
from .admission import Slot
from .config import Config, format_size
from .errors import BadRequest, ProxyError, TooLarge, UpstreamError, error_response
from .frames import Wire
from .relay import relay
from .reply import Reply
from .state import STATE, ProxyState

log = logging.getLogger("proxy.handler")

#: Status recorded for a client that left before its response ended (nginx's convention).
CLIENT_GONE = 499


async def handle(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    config = state.config  # one view for the whole request, even across a reload
    loop = asyncio.get_running_loop()
    started_at = loop.time()
    route = classify.route(request.method, request.path)
    model = ""
    phase = "queued" if route.queued else "running"
    code = CLIENT_GONE
    reply: Reply | None = None
    try:
        body = await read_body(request, config.request.max_body)
        if not route.queued:
            reply = Reply(request, openai=route.openai)
            code = await _relay(state, config, request, body, reply)
            return await reply.finish()

        job = classify.job(route, body)
        model = classify.canonical_model(job.model)
        beats = job.wire is not Wire.JSON or config.heartbeat.non_streaming
        reply = Reply(
            request,
            openai=route.openai,
            wire=job.wire,
            model=job.model,
            interval=config.heartbeat.interval if beats else 0.0,
            on_frame=state.metrics.heartbeats.inc,
        )
        slot = state.admission.slot(job.model)
        async with reply.keepalive(lambda: _note(slot)):
            async with slot:
                phase = "running"
                state.metrics.queue_wait.labels(state.metrics.model_label(model)).observe(slot.waited)
                code = await _relay(state, config, request, body, reply)
        return await reply.finish()
    except ProxyError as err:
        code = err.status
        _count_failure(state, err, request)
        return await reply.fail(err) if reply else error_response(err, openai=route.openai)
    except (asyncio.CancelledError, ConnectionResetError) as exc:
        state.metrics.disconnects.labels(phase).inc()
        log.info("client gone: %s %s model=%s phase=%s", request.method, request.path, model or "-", phase)
        if isinstance(exc, asyncio.CancelledError):
            raise
        return reply.response if reply and reply.response else web.Response(status=CLIENT_GONE)
    finally:
        m = state.metrics
        label = m.model_label(model)
        m.requests.labels(route.endpoint, label, str(code)).inc()
        m.duration.labels(route.endpoint, label).observe(loop.time() - started_at)


async def read_body(request: web.Request, limit: int) -> bytes:
    """The whole request body, refused as soon as it passes `limit` bytes."""
    if request.content_length is not None and request.content_length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            chunks.append(chunk)
    except web.RequestPayloadError as exc:
        raise BadRequest(f"could not read the request body: {exc}") from None
    return b"".join(chunks)


async def _relay(state: ProxyState, config: Config, request: web.Request, body: bytes, reply: Reply) -> int:
    assert state.session is not None, "client session is opened in cleanup_ctx"
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=config.timeouts.connect, sock_read=config.timeouts.read
    )
    status = await relay(state.session, config.upstream.url, request, body, reply, timeout)
    if status >= 500:
        state.metrics.upstream_errors.labels("status").inc()
    return status


def _note(slot: Slot) -> str:
    place = slot.position()
    if place is None:
        return "running, waiting for upstream"
    return f"queued, position {place[0]} of {place[1]}"


def _too_large(limit: int) -> TooLarge:
    return TooLarge(
        f"request body is larger than request.max_body={format_size(limit)}; "
        "send a smaller body or raise request.max_body"
    )


def _count_failure(state: ProxyState, err: ProxyError, request: web.Request) -> None:
    if isinstance(err, UpstreamError):
        state.metrics.upstream_errors.labels(err.kind).inc()
        log.warning("upstream error (%s): %s %s: %s", err.kind, request.method, request.path, err.message)
    else:
        state.metrics.rejected.labels(err.reason).inc()
        log.info("rejected (%s): %s %s: %s", err.reason, request.method, request.path, err.message)
