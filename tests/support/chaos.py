"""Chaos helpers: a seeded plan of clients and faults, a raw-socket client, and the judge.

A plan is a pure function of its seed: which requests, which clients vanish and
how, and which faults and reloads happen before which request. The interleaving
of a run still depends on timing, so a seed replays the same mix, not the same
microsecond schedule.

The client speaks HTTP/1.1 over a plain socket so it can leave at any moment,
with a FIN or an RST, and so the judge sees the exact bytes and whether the
HTTP framing ended where it said it would (a cut body is a clear error to any
HTTP client; a body that is framed complete but is missing its end is not).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import random
import re
import socket
import struct
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from proxy.sim import GARBAGE, GenRecord, Simulator

MODELS = ("llama3.2", "big", "small")
#: A model upstream does not list: Ollama's 404 at once, never a place in the queue.
UNKNOWN_MODEL = "ghost"
UPSTREAM_FAULTS = ("die", "hang_headers", "hang_body", "status", "garbage", "garbage_body")
PATHS = {
    "generate": "/api/generate",
    "chat": "/api/chat",
    "openai": "/v1/chat/completions",
    "tags": "/api/tags",
}
_ID = re.compile(rb"req-\d+\b")
#: The proxy's body bounds in this suite, small so that bodies at them are cheap: a body
#: above SPOOL_ABOVE waits in a file, and MAX_BODY is the largest accepted.
SPOOL_ABOVE = 16 * 1024
MAX_BODY = 256 * 1024
#: Body sizes at those bounds, given to some generation requests.
BOUND_SIZES = (SPOOL_ABOVE, SPOOL_ABOVE + 1, MAX_BODY)
#: Clients with keys and priorities (long form): who goes first is part of every run.
CHAOS_KEYS = {
    "app": "ch-app-0123456789",
    "ops": {"key": "ch-ops-0123456789", "priority": "high", "weight": 2},
    "batch": {"key": "ch-batch-0123456789", "priority": "low", "max_running": 2},
}
#: What a request may send in X-Priority ("" sends none): valid values only, so none is refused.
PRIORITY_HEADERS = ("", "low", "normal", "high", "")
#: What a proxy that cannot reach Redis with `cluster.on_redis_down: refuse` says, in its 503
#: or in-band after a keep-alive 200 (`ClusterDown`'s message, in both APIs' shapes).
CLUSTER_DOWN = b"slot ledger (Redis) is unreachable"
#: Keep-alive frames of the two NDJSON wires: an empty token that is not the end.
_NDJSON_FRAME = re.compile(rb'"(response|content)":""\}?,"done":false\}$')


@dataclass(frozen=True)
class Spec:
    """One client request and how its client behaves."""

    n: int
    kind: str  # a key of PATHS, or "bad" (a body that is not JSON)
    model: str
    stream: bool
    vanish: str | None  # None, or when to leave: partial_body, early, upstream, token
    rst: bool  # leave with an RST rather than a FIN
    delay: float  # how long `early` waits, or how long a partial body hangs before leaving
    size: int = 0  # the body's exact size in bytes, padded; 0: as small as it comes
    key: str = "app"  # a name in CHAOS_KEYS
    priority: str = ""  # its X-Priority header, "" for none

    @property
    def ident(self) -> str:
        return f"req-{self.n}"

    @property
    def path(self) -> str:
        return PATHS.get(self.kind, "/api/generate")

    @property
    def openai(self) -> bool:
        return self.path.startswith("/v1/")

    @property
    def wire(self) -> str:
        if self.kind in ("tags", "bad") or not self.stream:
            return "json"
        return "sse" if self.openai else "ndjson"

    def request(self) -> tuple[bytes, bytes]:
        """The request head and body, the id in the prompt so upstream's records name it."""
        entry = CHAOS_KEYS[self.key]
        secret = entry if isinstance(entry, str) else entry["key"]
        auth = f"Authorization: Bearer {secret}\r\n" + (
            f"X-Priority: {self.priority}\r\n" if self.priority else ""
        )
        if self.kind == "tags":
            return f"GET /api/tags HTTP/1.1\r\nHost: chaos\r\n{auth}\r\n".encode(), b""
        prompt = f"{self.ident} tell me something"
        payload: dict[str, Any] = {"model": self.model, "stream": self.stream}
        if self.kind == "generate":
            payload["prompt"] = prompt
        else:
            payload["messages"] = [{"role": "user", "content": prompt}]
        if self.size:
            payload["pad"] = ""  # a key Ollama ignores, filled to make the body `size` bytes
            payload["pad"] = "x" * (self.size - len(json.dumps(payload)))
        body = json.dumps(payload).encode() if self.kind != "bad" else f"{{not json {self.ident}".encode()
        head = (
            f"POST {self.path} HTTP/1.1\r\nHost: chaos\r\nContent-Type: application/json\r\n"
            f"{auth}Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        return head, body


@dataclass(frozen=True)
class Event:
    """Something done to upstream or the proxy just before request `at` is sent."""

    at: int
    #: fault, clear, slow, fast, down, up, restart, reload, drain; in a cluster also
    #: kill (SIGKILL proxy `arg`), redis_kill, redis_start, crawl and walk (generations
    #: slow enough to run through Redis's outage, and back).
    action: str
    arg: Any = None


@dataclass(frozen=True)
class Settings:
    max_concurrent: int
    caps: dict[str, int]
    max_queue: int
    queue_timeout: float
    interval: float
    non_streaming: bool
    tokens: int
    token_delay: float
    gap: float  # mean seconds between two requests


@dataclass(frozen=True)
class Plan:
    seed: int
    mode: str  # "inproc": Server in this process; "process": python -m proxy; "cluster": several
    settings: Settings
    specs: list[Spec]
    events: list[Event]
    proxies: int = 1
    #: The proxy each request is sent to, by index (a cluster's; empty: proxy 0).
    routes: tuple[int, ...] = ()

    def events_at(self, index: int) -> list[Event]:
        return [event for event in self.events if event.at == index]

    def route(self, index: int) -> int:
        return self.routes[index] if self.routes else 0


def make_plan(seed: int, n: int) -> Plan:
    return _plan(seed, n)[0]


def make_cluster_plan(seed: int, n: int) -> Plan:
    """The plan of `seed` (its clients, upstream faults, reloads and drain) spread over 2 or 3
    proxies that share one Redis, with one proxy SIGKILLed and Redis killed and started again
    at seeded moments.

    Proxy 0 takes about half the clients and is never killed nor drained, so one proxy
    always survives. A drain (of the proxy not killed) takes the requests from the plan's
    hang onwards, as in a single proxy's run: they hang into it or arrive while it drains.
    The requests of a killed proxy that come after the kill go to the others.
    """
    plan, span = _plan(seed, n)
    rng = random.Random(seed * 7_000_003 + 1)  # its own: the single proxy's plan stays what it was
    drain = any(event.action == "drain" for event in plan.events)
    proxies = 3 if drain else rng.choice((2, 3))
    victim = rng.randrange(1, proxies)
    drained = 3 - victim  # the other of 1 and 2 (used only with 3 proxies, when the plan drains)
    weights = [proxies - 1] + [1] * (proxies - 1)
    routes = tuple(
        drained if drain and i >= span else rng.choices(range(proxies), weights)[0] for i in range(n)
    )
    first, last = max(1, n // 6), max(2, span - 4)
    down = rng.randrange(first, last)
    up = min(span, down + rng.randint(3, 8))
    events = [
        dataclasses.replace(event, arg=drained) if event.action == "drain" else event for event in plan.events
    ] + [
        Event(rng.randrange(first, last), "kill", victim),
        # Requests admitted just before Redis goes still run when it is back: every proxy
        # writes them back while the others admit again, where the limit is easiest to lose.
        Event(max(0, down - 6), "crawl"),
        Event(down, "redis_kill"),
        Event(up, "redis_start"),
        Event(min(span, up + 3), "walk"),
    ]
    events.sort(key=lambda e: e.at)  # stable: the single proxy's events first at each index
    return dataclasses.replace(plan, mode="cluster", events=events, proxies=proxies, routes=routes)


def _plan(seed: int, n: int) -> tuple[Plan, int]:
    """The plan, and where its last stretch begins (a drain's, or `n`)."""
    rng = random.Random(seed)
    limit = rng.randint(1, 4)
    tokens, token_delay = 6, rng.choice((0.005, 0.01, 0.02))
    settings = Settings(
        max_concurrent=limit,
        caps={"big": 1, "small": rng.randint(1, 2)},
        max_queue=rng.choice((n, n, 6)),  # sometimes small enough to fill
        queue_timeout=rng.choice((30.0, 30.0, 0.6)),  # sometimes short enough to expire
        interval=rng.choice((0.1, 0.2, 0.3)),
        non_streaming=rng.random() < 0.7,
        tokens=tokens,
        token_delay=token_delay,
        # Offered load near capacity, so a queue builds and drains.
        gap=tokens * token_delay / limit * rng.uniform(0.6, 1.1),
    )
    specs = [_spec(rng, i) for i in range(n)]
    # Its own generator, so that the plans of every seed are otherwise what they were.
    sizes = random.Random(seed * 1_000_003)
    specs = [
        dataclasses.replace(spec, size=sizes.choice(BOUND_SIZES))
        if spec.kind in ("generate", "chat", "openai") and sizes.random() < 0.2
        else spec
        for spec in specs
    ]
    events: list[Event] = []
    drain = rng.random() < 0.5
    # A drain keeps the last requests to itself: hung into it, they outlive its grace and
    # are cut; the last few arrive while it drains.
    span = max(1, n - 8) if drain else n

    def window(begin: str, end: str, arg: Any = None, longest: int = 6) -> None:
        start = rng.randrange(span)
        events.append(Event(start, begin, arg))
        events.append(Event(min(span, start + rng.randint(2, longest)), end))

    for _ in range(max(2, n // 12)):
        window("fault", "clear", rng.choice(UPSTREAM_FAULTS))
    for _ in range(max(1, n // 60)):
        window("down", "up", longest=4)
        window("slow", "fast", longest=8)
        events.append(Event(rng.randrange(span), "restart"))
    for _ in range(max(2, n // 30)):
        caps = {"big": rng.randint(1, 2), "small": rng.randint(1, 3)}
        events.append(Event(rng.randrange(span), "reload", (rng.randint(1, 4), caps)))
    if drain:
        events.append(Event(span, "fault", rng.choice(("hang_headers", "hang_body"))))
        events.append(Event(max(span, n - 3), "drain"))
    events.sort(key=lambda e: e.at)  # stable: a window's begin and end keep their order
    return Plan(seed, "process" if seed % 2 else "inproc", settings, specs, events), span


def _spec(rng: random.Random, n: int) -> Spec:
    kind = rng.choices(("generate", "chat", "openai", "tags", "bad"), (35, 25, 25, 10, 5))[0]
    stream = rng.random() < 0.7 if kind in ("generate", "chat", "openai") else False
    vanish = None
    if kind in ("generate", "chat", "openai") and rng.random() < 0.3:
        vanish = rng.choice(("partial_body", "early", "upstream", "token" if stream else "upstream"))
    model = rng.choices(MODELS, (60, 25, 15))[0]
    if kind in ("generate", "chat", "openai") and vanish is None and rng.random() < 0.06:
        model = UNKNOWN_MODEL
    return Spec(
        n=n,
        kind=kind,
        model=model,
        stream=stream,
        vanish=vanish,
        rst=rng.random() < 0.5,
        delay=rng.uniform(0.0, 0.3),
        # From n, not rng: the plans' other draws stay what they were for every seed.
        key=("app", "ops", "batch")[n % 3],
        priority=PRIORITY_HEADERS[(n * 7) % len(PRIORITY_HEADERS)],
    )


class Ledger:
    """Upstream's records by request id, scanned incrementally (records only grow)."""

    def __init__(self, sim: Simulator) -> None:
        self._sim = sim
        self._next = 0
        self._unread: list[GenRecord] = []  # body not read yet
        self._by_id: dict[str, list[GenRecord]] = defaultdict(list)

    def records(self, ident: str) -> list[GenRecord]:
        new = self._sim.records[self._next :]
        self._next += len(new)
        unread = []
        for record in self._unread + new:
            match = _ID.search(record.body)
            if match:
                self._by_id[match.group().decode()].append(record)
            elif record.ended_at is None:
                unread.append(record)
        self._unread = unread
        return self._by_id.get(ident, [])

    def all(self) -> dict[str, list[GenRecord]]:
        self.records("")
        return dict(self._by_id)


@dataclass
class Call:
    """What one client saw."""

    spec: Spec
    sent_at: float = 0.0
    ended_at: float = 0.0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    framed: bool = False  # the HTTP message ended where its framing said it would
    failure: str | None = None  # why the response ended early, from the client's side
    vanished: str | None = None  # the phase the client left in, on purpose
    vanished_at: float | None = None
    data_seen: asyncio.Event = field(default_factory=asyncio.Event)


async def call(spec: Spec, host: str, port: int, ledger: Ledger, sim: Simulator, timeout: float) -> Call:
    """Send one request over a new connection and read the answer, or leave as `spec` says."""
    loop = asyncio.get_running_loop()
    result = Call(spec, sent_at=loop.time())
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        result.failure, result.ended_at = f"connect: {exc}", loop.time()
        return result
    head, body = spec.request()
    try:
        if spec.vanish == "partial_body":
            writer.write(head + body[: len(body) // 2])
            await writer.drain()
            await asyncio.sleep(spec.delay)  # part of the chaos: how long the body hangs
            result.vanished, result.vanished_at = "before_body", loop.time()
            return result
        writer.write(head + body)
        reading = asyncio.create_task(_read_response(reader, result))
        trigger = asyncio.create_task(_trigger(spec, result, ledger, sim, timeout))
        done, _ = await asyncio.wait((reading, trigger), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if reading not in done and trigger in done:
            result.vanished_at = loop.time()
            result.vanished = _phase(result, ledger.records(spec.ident))
        elif not done:
            result.failure = "timeout"
        for task in (reading, trigger):
            task.cancel()
        await asyncio.gather(reading, trigger, return_exceptions=True)
    except OSError as exc:
        result.failure = f"send: {exc}"
    finally:
        result.ended_at = loop.time()
        if result.vanished and spec.rst:
            reset(writer)
        else:
            writer.close()
            with contextlib.suppress(OSError, TimeoutError):
                async with asyncio.timeout(1):
                    await writer.wait_closed()
    return result


def _phase(result: Call, records: list[GenRecord]) -> str:
    """Where a request stood when its client left, as far as client and upstream can tell."""
    if result.data_seen.is_set():
        return "mid_stream"
    if not records:
        return "queued"  # or admitted and not yet connected: upstream has not seen it
    return "upstream_headers" if records[0].status is None else "upstream_body"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a crashed client or a middlebox would."""
    sock = writer.get_extra_info("socket")
    with contextlib.suppress(OSError, AttributeError):  # already closed by the proxy: nothing to reset
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.close()


async def _trigger(spec: Spec, result: Call, ledger: Ledger, sim: Simulator, timeout: float) -> None:
    """Return when the client should leave; never, if it should read to the end."""
    if spec.vanish == "early":
        await asyncio.sleep(spec.delay)
        return
    if spec.vanish == "token":
        await result.data_seen.wait()
        return
    if spec.vanish == "upstream":
        with contextlib.suppress(TimeoutError):
            await sim.wait_until(lambda: bool(ledger.records(spec.ident)), timeout)
            return
    await asyncio.get_running_loop().create_future()  # read the answer to its end


async def _read_response(reader: asyncio.StreamReader, result: Call) -> None:
    """Status, headers and the de-chunked body, kept current in `result` as they arrive."""

    def got(data: bytes) -> None:
        result.body += data
        if not result.data_seen.is_set() and upstream_data(result.spec.wire, result.body):
            result.data_seen.set()

    try:
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *lines = head.decode("latin-1").split("\r\n")[:-2]
        result.headers = {k.lower(): v for k, v in (line.split(": ", 1) for line in lines)}
        result.status = int(status_line.split()[1])
        if result.headers.get("transfer-encoding", "").lower() == "chunked":
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                got((await reader.readexactly(size + 2))[:-2])
            while await reader.readuntil(b"\r\n") != b"\r\n":
                pass  # trailers
        elif "content-length" in result.headers:
            remaining = int(result.headers["content-length"])
            while remaining and (data := await reader.read(min(remaining, 65536))):
                remaining -= len(data)
                got(data)
            if remaining:
                raise asyncio.IncompleteReadError(b"", remaining)
        else:
            while data := await reader.read(65536):
                got(data)
        result.framed = True
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError) as exc:
        result.failure = type(exc).__name__


def upstream_data(wire: str, body: bytes) -> bool:
    """Has anything but keep-alive frames arrived?"""
    if wire == "json":
        return bool(body.strip())
    if wire == "sse":
        return any(e and not e.startswith(b":") for e in body.split(b"\n\n")[:-1])
    return any(line and not _NDJSON_FRAME.search(line) for line in body.split(b"\n")[:-1])


# -- the judge ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Verdict:
    outcome: str  # complete, error:<status>, inband_error, cut, garbage_relayed, vanished:<phase>, ...
    violation: str | None = None


def judge(
    result: Call,
    records: list[GenRecord],
    tokens: int,
    drain_began: float | None,
    *,
    killed_at: float | None = None,
    redis_down: tuple[float, float] | None = None,
) -> Verdict:
    """Complete answer, or exactly one clear error; never silence, never a false end.

    In a cluster two more clear errors: `killed_at` is when the client's own proxy was
    SIGKILLed (None: it was not), so a connection it cut is the client's one error; and
    Redis's refusal (503, or in-band after a keep-alive 200) is right only for a request
    that was open while Redis was down, `redis_down` being from its kill until every proxy
    said it answers again (None: Redis never went down, so no refusal is right).
    """
    if killed_at is not None and _cut_by_kill(result, killed_at):
        return Verdict("cut_by_kill")
    verdict = _judge(result, records, tokens, drain_began)
    if CLUSTER_DOWN not in result.body:
        return verdict
    if redis_down is None or not (result.sent_at <= redis_down[1] and result.ended_at >= redis_down[0]):
        return Verdict(verdict.outcome, f"refused for Redis down while Redis answered: {_seen(result)}")
    if verdict.violation is None and verdict.outcome in ("error:503", "inband_error"):
        return Verdict("refused:cluster_down")
    return verdict


def _cut_by_kill(result: Call, killed_at: float) -> bool:
    """The connection broke (no status, or a body cut short) and was open when its proxy died."""
    if result.vanished or result.failure in (None, "timeout") or result.ended_at < killed_at:
        return False
    return result.status is None or not result.framed


def _judge(result: Call, records: list[GenRecord], tokens: int, drain_began: float | None) -> Verdict:
    spec = result.spec
    if result.vanished:
        if result.vanished == "before_body" and records:
            return Verdict("vanished:before_body", "reached upstream though its body never arrived whole")
        return Verdict(f"vanished:{result.vanished}")
    after_drain = drain_began is not None and result.sent_at >= drain_began
    if result.failure == "timeout":
        return Verdict("silence", f"no end within the client's timeout: {_seen(result)}")
    if result.status is None:
        if after_drain and _refused(result, records):
            return Verdict("refused_after_drain")  # the drain had ended and the listener closed
        return Verdict("no_response", f"the connection ended without a status line: {_seen(result)}")
    if not result.framed:
        return _judge_cut(result, records)
    if spec.kind == "bad" and not (after_drain and result.status == 503):  # refused before it is read
        if result.status == 400 and _error_shape(result.body, spec.openai):
            return Verdict("error:400")
        return Verdict("wrong", f"a body that is not JSON must get a 400 with an error: {_seen(result)}")
    if spec.model == UNKNOWN_MODEL and spec.kind != "bad" and not (after_drain and result.status == 503):
        return _judge_unknown_model(result, records)
    if _lost_in_outage(result):
        return Verdict("lost_in_outage", f"failed for a connection upstream never received: {_seen(result)}")
    if result.status >= 400:
        return _judge_status(result, records)
    if result.status != 200:
        return Verdict("wrong", f"unexpected status: {_seen(result)}")
    upstream = records[0] if records else None
    if upstream is not None and upstream.fault == "garbage_body" and upstream.completed:
        end = len(result.body) - len(GARBAGE)
        frames = result.body[:end]
        if result.body.endswith(GARBAGE) and not upstream_data(spec.wire, frames + b"\n\n"):
            return Verdict("garbage_relayed")
        return Verdict("wrong", f"upstream's 200 body was not relayed as sent: {_seen(result)}")
    verdict = _judge_body(result, tokens)
    if verdict.outcome == "complete" and spec.kind != "tags":
        if upstream is None or not upstream.completed or upstream.status != 200:
            return Verdict("wrong", f"a complete answer that upstream never completed: {upstream}")
    if verdict.outcome != "complete" and verdict.violation is None and upstream is not None:
        if upstream.completed and upstream.status == 200 and upstream.fault is None and drain_began is None:
            return Verdict(
                verdict.outcome, f"upstream completed, the client got {verdict.outcome}: {_seen(result)}"
            )
    return verdict


def _refused(result: Call, records: list[GenRecord]) -> bool:
    """Refused by a closed listener: the connection, or (sent as the drain ended and the
    listener closed) reset or closed before a byte was read, the request never served."""
    failure = result.failure or ""
    if failure.startswith("connect:"):
        return True
    return failure in ("ConnectionResetError", "IncompleteReadError") and not result.body and not records


def _judge_unknown_model(result: Call, records: list[GenRecord]) -> Verdict:
    """Ollama's own 404, byte for byte, at once: upstream never sees the request."""
    if records:
        return Verdict("error:404", f"a model upstream does not list reached upstream: {_seen(result)}")
    message = f"model '{UNKNOWN_MODEL}' not found"
    if result.spec.openai:
        error = {"message": message, "type": "not_found_error", "param": None, "code": None}
        expected = json.dumps({"error": error}, separators=(",", ":")).encode() + b"\n"
    else:
        expected = json.dumps({"error": message}, separators=(",", ":")).encode()
    if (result.status, result.body) != (404, expected):
        return Verdict("wrong", f"an unknown model must get Ollama's 404 {expected!r}: {_seen(result)}")
    return Verdict("error:404")


def _lost_in_outage(result: Call) -> bool:
    """A generation failed because upstream could not be reached: it should have kept its place
    (every outage in a plan is far shorter than health.outage_grace)."""
    return result.spec.kind in ("generate", "chat", "openai") and b"cannot reach upstream" in result.body


def _judge_cut(result: Call, records: list[GenRecord]) -> Verdict:
    """A cut is a clear error, but only right when upstream broke off where no error fits."""
    wire, body = result.spec.wire, result.body
    if wire == "json" and result.status == 200 and _error_shape(body.lstrip(b"\n"), result.spec.openai):
        # The contract's non-streaming error after keep-alive: the body left unterminated.
        upstream = records[0] if records else None
        if upstream is not None and upstream.completed and upstream.status == 200 and upstream.fault is None:
            return Verdict("inband_error", f"upstream completed, the client got an error: {_seen(result)}")
        return Verdict("inband_error")
    if result.status is not None and result.status >= 400:
        return Verdict("cut", f"an error response was cut short: {_seen(result)}")
    if not records or records[0].completed:
        return Verdict("cut", f"cut though upstream completed (or was never asked): {_seen(result)}")
    if "content-length" in result.headers:
        return Verdict("cut")  # upstream framed the body itself: nothing may be added to it
    if wire == "json":
        fits = not body.strip()  # upstream's document had not begun
    else:
        fits = not body or body.endswith(b"\n\n" if wire == "sse" else b"\n")
    if fits:
        return Verdict("cut", f"cut where an in-band error fits: {_seen(result)}")
    return Verdict("cut")


def _judge_status(result: Call, records: list[GenRecord]) -> Verdict:
    spec, status = result.spec, result.status
    assert status is not None
    outcome = f"error:{status}"
    if not _error_shape(result.body, spec.openai):
        return Verdict(outcome, f"error status without exactly one JSON error body: {_seen(result)}")
    if status == 503 and "retry-after" not in result.headers:
        return Verdict(outcome, f"503 without Retry-After: {_seen(result)}")
    upstream = records[0] if records else None
    if upstream is not None and upstream.completed and upstream.status == 200 and upstream.fault is None:
        return Verdict(outcome, f"upstream completed, the client got an error status: {_seen(result)}")
    if status == 500 and not (upstream is not None and upstream.fault == "status"):
        return Verdict(outcome, f"500 that upstream did not send: {_seen(result)}")
    if status not in (500, 502, 503, 504):
        return Verdict(outcome, f"unexpected error status: {_seen(result)}")
    return Verdict(outcome)


def _judge_body(result: Call, tokens: int) -> Verdict:
    """A framed 200: its content must end complete, or with one in-band error."""
    spec, body = result.spec, result.body
    false_end = Verdict("false_end", f"a framed 200 that is neither complete nor an error: {_seen(result)}")
    if spec.wire == "json":
        try:
            data = json.loads(body.lstrip(b"\n"))
        except ValueError:
            return false_end
        if not isinstance(data, dict):
            return false_end
        if "error" in data:  # a whole error body under a 200 reads as an empty success
            return Verdict("false_end", f"a complete 200 whose body is an error: {_seen(result)}")
        if spec.kind == "tags":
            return Verdict("complete") if isinstance(data.get("models"), list) else false_end
        text = (
            data["choices"][0]["message"]["content"]
            if spec.openai
            else data.get("response") or data.get("message", {}).get("content", "")
        )
        done = spec.openai or data.get("done") is True
        return Verdict("complete") if done and len(text.split()) == tokens else false_end
    if spec.wire == "sse":
        events = body.split(b"\n\n")
        if events[-1] != b"":
            return false_end
        data = [e.removeprefix(b"data: ") for e in events[:-1] if not e.startswith(b":")]
        errors = [i for i, d in enumerate(data) if d.startswith(b'{"error"')]
        if errors == [len(data) - 1] and _error_shape(data[-1], openai=True):
            return Verdict("inband_error")
        if not errors and data and data[-1] == b"[DONE]" and len(data) == tokens + 2:
            return Verdict("complete")
        return false_end
    lines = body.split(b"\n")
    if lines[-1] != b"":
        return false_end
    try:
        parsed = [json.loads(line) for line in lines[:-1]]
    except ValueError:
        return false_end
    errors = [i for i, line in enumerate(parsed) if "error" in line]
    if errors == [len(parsed) - 1] and isinstance(parsed[-1]["error"], str):
        if not any(line.get("done") for line in parsed):
            return Verdict("inband_error")
    elif not errors and parsed and parsed[-1].get("done") is True:
        words = sum(1 for line in parsed if line.get("response") or line.get("message", {}).get("content"))
        if words == tokens and not any(line.get("done") for line in parsed[:-1]):
            return Verdict("complete")
    return false_end


def _error_shape(body: bytes, openai: bool) -> bool:
    """One JSON object with an error in the shape of its API."""
    try:
        data = json.loads(body)
    except ValueError:
        return False
    error = data.get("error") if isinstance(data, dict) else None
    if openai:
        return isinstance(error, dict) and isinstance(error.get("message"), str)
    return isinstance(error, str) and bool(error)


def _seen(result: Call) -> str:
    body = result.body if len(result.body) <= 300 else result.body[:150] + b"..." + result.body[-150:]
    return (
        f"{result.spec} status={result.status} framed={result.framed} failure={result.failure} "
        f"headers={ {k: v for k, v in result.headers.items() if k != 'date'} } body={body!r}"
    )
