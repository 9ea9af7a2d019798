"""The load generator: its own process, so its CPU is never the measured process's.

`python -m bench.load SPEC_JSON` runs one workload and talks to the bench over
stdout: `mark NAME` lines at the edges of the measured window (the bench samples
process CPU and memory when it reads one) and a last `result JSON` line.

It speaks HTTP/1.1 over raw asyncio protocols on keep-alive connections and
parses only what it needs to find where a response ends (Content-Length, or
the chunked terminator), because an HTTP client library would cost more CPU
per request than the proxy under test on this 2-core machine. Streamed NDJSON
lines are counted by their `}\\n` ending, which compact JSON has nowhere else.
"""

from __future__ import annotations

import asyncio
import json
import re
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length: *(\d+)")
_CHUNKED_END = b"\r\n0\r\n\r\n"
_LINE_END = b"}\n"


class Conn(asyncio.Protocol):
    """One connection; whatever reads it sets `sink` to receive the bytes."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.sink: Callable[[bytes], None] = lambda data: None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.sink(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.lost.done():
            self.lost.set_result(None)

    def send(self, data: bytes) -> None:
        assert self.transport is not None
        self.transport.write(data)


async def connect(host: str, port: int) -> Conn:
    _, conn = await asyncio.get_running_loop().create_connection(Conn, host, port)
    return conn


class Whole:
    """Collects one response and resolves `done` with its status once it is complete."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need = -1  # total length when Content-Length framed; -2 when chunked
        self.status = 0
        self.done: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    def feed(self, data: bytes) -> None:
        self.buf += data
        if self.need == -1:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            head = bytes(self.buf[:end]).lower()
            self.status = int(head[9:12])
            match = _CONTENT_LENGTH.search(head)
            self.need = end + 4 + int(match[1]) if match else -2
        finished = len(self.buf) >= self.need if self.need >= 0 else self.buf.endswith(_CHUNKED_END)
        if finished and not self.done.done():
            self.done.set_result(self.status)


def request_bytes(method: str, path: str, port: int, body: bytes = b"") -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
    if body or method == "POST":
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + body


def chat_body(tag: str) -> bytes:
    return json.dumps({"model": "llama3.2", "messages": [{"role": "user", "content": tag}]}).encode()


def mark(name: str) -> None:
    print(f"mark {name}", flush=True)


class Window:
    """The measured stretch of a run: marks its edges and says whether a moment is inside."""

    def __init__(self, warmup: float, seconds: float) -> None:
        now = time.monotonic()
        self.start = now + warmup
        self.end = self.start + seconds
        loop = asyncio.get_running_loop()
        loop.call_later(warmup, mark, "start")
        loop.call_later(warmup + seconds, mark, "end")

    def inside(self, moment: float) -> bool:
        return self.start <= moment < self.end


def percentiles(values: list[float]) -> dict[str, float]:
    if not values:
        return {"n": 0}
    ordered = sorted(values)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {
        "n": len(ordered),
        "p50": at(0.50),
        "p99": at(0.99),
        "max": ordered[-1],
        "mean": statistics.fmean(ordered),
    }


# -- workloads ------------------------------------------------------------------------


async def small_requests(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` connections each sending one request after another."""
    host, port = spec["host"], spec["port"]
    payload = request_bytes(spec["method"], spec["path"], port, spec.get("body", "").encode())
    conns = [await connect(host, port) for _ in range(spec["concurrency"])]
    window = Window(spec["warmup"], spec["seconds"])
    latencies: list[float] = []
    errors = 0

    async def worker(conn: Conn) -> None:
        nonlocal errors
        while (sent := time.monotonic()) < window.end:
            whole = Whole()
            conn.sink = whole.feed
            conn.send(payload)
            await asyncio.wait((whole.done, conn.lost), return_when=asyncio.FIRST_COMPLETED)
            if not whole.done.done():
                raise RuntimeError(f"connection closed mid-response after {bytes(whole.buf[:300])!r}")
            status = whole.done.result()
            done = time.monotonic()
            errors += status != 200
            if window.inside(sent):
                latencies.append(done - sent)

    await asyncio.gather(*(worker(conn) for conn in conns))
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return {
        "rps": len(latencies) / spec["seconds"],
        "latency": percentiles(latencies),
        "errors": errors,
    }


async def streams(spec: dict[str, Any]) -> dict[str, Any]:
    """`concurrency` connections each streaming one /api/chat answer after another."""
    host, port = spec["host"], spec["port"]
    payload = request_bytes("POST", "/api/chat", port, chat_body("stream"))
    conns = [await connect(host, port) for _ in range(spec["concurrency"])]
    window = Window(spec["warmup"], spec["seconds"])
    counted = 0
    answers = 0

    async def worker(conn: Conn) -> None:
        nonlocal answers
        while time.monotonic() < window.end:
            done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            tail = b""

            def feed(data: bytes, done: asyncio.Future[None] = done) -> None:
                nonlocal tail, counted
                lines = data.count(_LINE_END) + (tail.endswith(b"}") and data.startswith(b"\n"))
                if window.inside(time.monotonic()):
                    counted += lines
                tail = (tail + data[-7:])[-7:]
                if tail == _CHUNKED_END and not done.done():
                    done.set_result(None)

            conn.sink = feed
            conn.send(payload)
            await asyncio.wait((done, conn.lost), return_when=asyncio.FIRST_COMPLETED)
            if conn.lost.done():
                raise RuntimeError("the server closed a streaming connection")
            answers += 1

    await asyncio.gather(*(worker(conn) for conn in conns))
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    return {"chunks": counted, "chunks_per_s": counted / spec["seconds"], "answers": answers}


async def waiters(spec: dict[str, Any]) -> dict[str, Any]:
    """Open `count` streaming requests that will wait, and time the frames each receives."""
    host, port, count = spec["host"], spec["port"], spec["count"]
    arrivals: list[list[float]] = [[] for _ in range(count)]
    conns: list[Conn] = []

    def sink(index: int) -> Callable[[bytes], None]:
        def feed(data: bytes) -> None:
            now = time.monotonic()
            arrivals[index].extend([now] * data.count(_LINE_END))

        return feed

    batch = spec.get("batch", 100)
    for first in range(0, count, batch):
        opened = await asyncio.gather(*(connect(host, port) for _ in range(first, min(count, first + batch))))
        for offset, conn in enumerate(opened):
            conn.sink = sink(first + offset)
            conn.send(request_bytes("POST", "/api/chat", port, chat_body(f"wait-{first + offset}")))
        conns.extend(opened)
    mark("sent")
    await asyncio.sleep(spec["seconds"])
    mark("end")
    lost = sum(conn.lost.done() for conn in conns)
    for conn in conns:
        assert conn.transport is not None
        conn.transport.close()
    interval = spec.get("interval", 0.0)
    late = [b - a - interval for times in arrivals for a, b in zip(times, times[1:], strict=False)]
    return {
        "frames": sum(map(len, arrivals)),
        "silent": sum(not times for times in arrivals),
        "lost": lost,
        "lateness": percentiles(late),
    }


async def disconnects(spec: dict[str, Any]) -> dict[str, Any]:
    """Start streams, and hang up on each once it flows; report when each was closed."""
    host, port = spec["host"], spec["port"]
    closed: dict[str, float] = {}
    numbers = iter(range(spec["count"]))

    async def worker() -> None:
        for number in numbers:
            tag = f"cut-{number}"
            conn = await connect(host, port)
            flowing: asyncio.Future[None] = asyncio.get_running_loop().create_future()

            def feed(data: bytes, flowing: asyncio.Future[None] = flowing) -> None:
                if _LINE_END in data and not flowing.done():
                    flowing.set_result(None)

            conn.sink = feed
            conn.send(request_bytes("POST", "/api/chat", port, chat_body(tag)))
            await asyncio.wait_for(flowing, 10)
            await asyncio.sleep(spec["hold"])
            assert conn.transport is not None
            closed[tag] = time.monotonic()
            conn.transport.close()
            await asyncio.wait_for(conn.lost, 10)
            await asyncio.sleep(spec["pause"])

    await asyncio.gather(*(worker() for _ in range(spec["workers"])))
    return {"closed": closed}


WORKLOADS = {
    "requests": small_requests,
    "streams": streams,
    "waiters": waiters,
    "disconnects": disconnects,
}


def main() -> None:
    spec = json.loads(sys.argv[1])
    result = asyncio.run(asyncio.wait_for(WORKLOADS[spec["kind"]](spec), spec["timeout"]))
    print("result " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
