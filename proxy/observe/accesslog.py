"""The access log: one line per finished request on the listen port, logger `proxy.access`.

Text (`log.format: text`), greppable key=value pairs, values with spaces,
quotes or non-ASCII quoted as JSON strings, `-` for unknown:

    2026-11-24T09:01:02.123Z client=203.0.113.7 method=POST path=/api/chat model=llama3:latest
    key=alice status=200 outcome=ok wait=12.345 duration=98.765 bytes=10342 tokens=26/301

JSON: the same facts as top-level fields (numbers as numbers, null for
unknown; the token counts as `prompt_tokens` and `completion_tokens`).

The time is the request's arrival (as Apache's `%t`); `wait` is the time in the
queue (unknown for a request that never got a slot), `duration` the whole
request, both in seconds; `bytes` is the body bytes sent to the client.

The field names are older than the code's words: the field `client` is the
exchange's `address` (where the request came from) and `key` its `client` (who
asked: the key's name).

Only facts about the request are logged, never its content: the path without
its query string (which may hold a token), the client key's *name*, never a
key, header, prompt or response.
"""

from __future__ import annotations

import functools
import ipaddress
import json
import logging
import re
from typing import Protocol

from multidict import MultiMapping

from proxy.config import IPNetwork
from proxy.observe.exchange import Exchange
from proxy.observe.logs import clip

log = logging.getLogger("proxy.access")

#: A value written bare: printable ASCII except space, `"` and `=`; anything else is quoted.
_BARE = re.compile(r"[!#-<>-~]+")


class Peer(Protocol):
    """What `client_address` reads of a request (an aiohttp `web.Request` is one)."""

    @property
    def remote(self) -> str | None: ...

    @property
    def headers(self) -> MultiMapping[str]: ...


def client_address(request: Peer, trusted: tuple[IPNetwork, ...]) -> str:
    """The client's address: the peer's, or, when the peer is a trusted proxy
    (cloudflared beside us), the one it names in `CF-Connecting-IP`, else the
    nearest untrusted hop in `X-Forwarded-For`.

    X-Forwarded-For is read from the right: each proxy appends the address it
    saw, so everything left of the last untrusted hop was written by the client
    and could say anything. Headers from an untrusted peer are the client's own
    claims and are ignored, as are values that are not a plain IP address.
    """
    peer = request.remote
    if not peer:
        return "unknown"
    if not _trusted(peer, trusted):
        return peer
    address = _address(request.headers.get("CF-Connecting-IP"))
    if address is not None:
        return address
    hops = [hop for value in request.headers.getall("X-Forwarded-For", []) for hop in value.split(",")]
    for hop in reversed(hops):
        address = _address(hop)
        if address is None:
            break  # a hop we cannot read: nothing further left can be trusted
        if not _trusted(address, trusted):
            return address
        peer = address  # a trusted proxy forwarded it: look one hop further
    return peer


def write(ex: Exchange) -> None:
    """Log one finished request.

    The record is made and handed on directly: `Logger.info` would also look up
    the caller's file and line, which no format here shows, and the text line is
    only built if the text formatter asks for it. Its time is the request's
    arrival, which the formatter writes (`logs.IsoTime`).
    """
    if not log.isEnabledFor(logging.INFO):
        return
    extra = {"log_line": lambda time: text_line(ex, time), "log_fields": record_fields(ex)}
    msg_args = (ex.method, ex.path, ex.status, ex.outcome_text)
    record = log.makeRecord(log.name, logging.INFO, __file__, 0, "%s %s %d %s", msg_args, None, extra=extra)
    record.created, record.msecs = ex.arrived, ex.arrived % 1 * 1000
    log.handle(record)


def record_fields(ex: Exchange) -> dict[str, object]:
    """The JSON form's fields after the record's own (time, level, logger, message)."""
    return {
        "client": ex.address,
        "method": ex.method,
        "path": clip(ex.path),
        "model": clip(ex.model) or None,
        "key": ex.client or None,
        "backend": ex.backend or None,
        "status": ex.status,
        "outcome": ex.outcome_text,
        "wait": None if ex.waited is None else round(ex.waited, 3),
        "duration": round(ex.duration, 3),
        "bytes": ex.sent,
        "prompt_tokens": ex.prompt_tokens,
        "completion_tokens": ex.completion_tokens,
        "fair_client": ex.party or None,
        "priority": ex.priority or None,
        "cost": round(ex.cost, 3),
    }


def text_line(ex: Exchange, time: str) -> str:
    """The text form, `time` (the arrival, as text) first."""
    if ex.prompt_tokens is None and ex.completion_tokens is None:
        tokens = "-"
    else:
        tokens = f"{_value(ex.prompt_tokens)}/{_value(ex.completion_tokens)}"
    return (
        f"{time} client={_value(ex.address)} method={_value(ex.method)} "
        f"path={_value(ex.path)} model={_value(ex.model or None)} key={_value(ex.client or None)} "
        f"status={_value(ex.status)} outcome={_value(ex.outcome_text)} wait={_value(ex.waited)} "
        f"duration={_value(ex.duration)} bytes={_value(ex.sent)} tokens={_value(tokens)} "
        f"backend={_value(ex.backend or None)} fair_client={_value(ex.party or None)} "
        f"priority={_value(ex.priority or None)} cost={_value(ex.cost)}"
    )


def _value(value: object) -> str:
    if value is None:
        return "-"
    kind = type(value)
    if kind is float:
        return f"{value:.3f}"
    if kind is int:
        return str(value)  # digits and a sign: always bare
    text = clip(str(value))
    return text if _BARE.fullmatch(text) else json.dumps(text)


@functools.lru_cache(maxsize=1024)
def _trusted(peer: str, trusted: tuple[IPNetwork, ...]) -> bool:
    """Cached: the same few peers (cloudflared, a load balancer) ask on every request."""
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # a dual-stack socket shows IPv4 peers as ::ffff:a.b.c.d
    return any(address in network for network in trusted)


def _address(claim: str | None) -> str | None:
    """`claim` as a normalised IP address, or None if it is not exactly one (a zone index is refused)."""
    if claim is None or "%" in claim:
        return None
    try:
        return str(ipaddress.ip_address(claim.strip()))
    except ValueError:
        return None
