"""`ollama-queue-proxy demo`: the incident in miniature, for an operator deciding
whether to trust the proxy.

A burst of streaming requests against a slow model is what made Ollama fall
over; the demo replays one on loopback, through real HTTP, against the built-in
simulated Ollama, so it needs no GPU, no Ollama and no network. Everything it
reports is measured, not asserted: the peak comes from the simulator's own
count of generations in progress, the silences from each client's clock, the
heartbeats from the proxy's metric. The exit code says whether the proxy kept
its promises, so the demo doubles as a smoke test.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import logging
import shutil
import sys
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

import aiohttp

from proxy.config import config_from_dict
from proxy.server import Server
from proxy.sim import Simulator

REQUESTS = 10
MAX_CONCURRENT = 3
HEARTBEAT_INTERVAL = 1.0  # short, so keep-alive frames visibly flow
TOKENS = 20
TOKEN_DELAY = 0.12  # a slow model: 20 tokens take about 2.4 s
LOAD_DELAY = 0.3
MODEL = "llama3.2"
#: A stuck request must fail the demo, not hang it; well past the ~11 s the burst takes.
REQUEST_TIMEOUT = 25.0
REFRESH = 0.2  # seconds between redraws of the live view
PLAIN_EVERY = 5  # redraws per printed line when stdout is not a terminal
INTERRUPTED = 130  # the shell's code for a process ended by SIGINT

#: Their INFO lines (access log, "client gone", "serving on") would garble the view.
_NOISY_LOGGERS = ("proxy", "aiohttp")
_UP = "\x1b[{n}F"  # cursor to the start of the line n lines up
_CLEAR_EOL = "\x1b[K"


class Phase(enum.StrEnum):
    """Where a request stands, as its client sees it."""

    QUEUED = "queued"  # nothing but keep-alive frames (or silence) so far
    RUNNING = "running"  # tokens are arriving
    DONE = "done"  # the final `done: true` line arrived
    FAILED = "failed"


@dataclass
class Track:
    """One client's view of its request, built from the lines it receives."""

    number: int
    started_at: float
    phase: Phase = Phase.QUEUED
    tokens: int = 0
    keepalives: int = 0
    longest_silence: float = 0.0
    error: str = ""
    last_seen: float = field(init=False)

    def __post_init__(self) -> None:
        self.last_seen = self.started_at

    def receive(self, line: dict[str, Any], now: float) -> None:
        """Classify one NDJSON line and note how long the client waited for it."""
        self.longest_silence = max(self.longest_silence, now - self.last_seen)
        self.last_seen = now
        if "error" in line:
            self.fail(str(line["error"]))
        elif line.get("done") is True:
            self.phase = Phase.DONE
        elif line.get("response") == "" and self.tokens == 0:
            self.keepalives += 1
        else:
            self.tokens += 1
            self.phase = Phase.RUNNING

    def fail(self, reason: str) -> None:
        self.phase = Phase.FAILED
        self.error = reason


@dataclass(frozen=True)
class Snapshot:
    """The proxy's and the simulator's side at one moment, for the header line."""

    elapsed: float
    running: int
    waiting: int
    peak: int
    heartbeats: int


# -- formatting (pure) -------------------------------------------------------------------


def count(tracks: Sequence[Track], phase: Phase) -> int:
    return sum(track.phase is phase for track in tracks)


def header(snap: Snapshot) -> str:
    """The proxy's state: what an operator would read off /-/queue and /metrics."""
    return (
        f"{snap.elapsed:5.1f}s  slots {snap.running}/{MAX_CONCURRENT}  queued {snap.waiting}  "
        f"upstream peak {snap.peak}  heartbeats sent {snap.heartbeats}"
    )


def progress_line(snap: Snapshot, tracks: Sequence[Track]) -> str:
    """One line of progress for logs and pipes, where a redrawn board would be noise."""
    tokens = sum(track.tokens for track in tracks)
    keepalives = sum(track.keepalives for track in tracks)
    return (
        f"{header(snap)}  |  done {count(tracks, Phase.DONE)}/{len(tracks)}  "
        f"failed {count(tracks, Phase.FAILED)}  tokens {tokens}/{len(tracks) * TOKENS}  "
        f"keep-alives received {keepalives}"
    )


def row(track: Track) -> str:
    """One request's line on the live board."""
    filled = min(track.tokens, TOKENS)
    bar = "#" * filled + "." * (TOKENS - filled)
    line = (
        f"  #{track.number:<2} {track.phase:<8} [{bar}] {track.tokens:2}/{TOKENS} tokens  "
        f"{track.keepalives:2} keep-alive"
    )
    return f"{line}  {track.error[:60]}" if track.error else line


def board(snap: Snapshot, tracks: Sequence[Track]) -> list[str]:
    return [header(snap), *(row(track) for track in tracks)]


def summary(snap: Snapshot, tracks: Sequence[Track]) -> str:
    """The closing numbers and what they mean, for someone deciding whether to trust it."""
    silence = max(track.longest_silence for track in tracks)
    done = count(tracks, Phase.DONE)
    lines = [
        "",
        "Summary",
        f"  requests completed   {done}/{len(tracks)}",
        f"  upstream peak        {snap.peak} at once (max_concurrent {MAX_CONCURRENT})",
        f"  longest silence      {silence:.2f} s seen by any client "
        f"(heartbeat.interval {HEARTBEAT_INTERVAL:g} s)",
        f"  heartbeats sent      {snap.heartbeats}",
        f"  total time           {snap.elapsed:.1f} s",
    ]
    if not problems(snap, tracks):  # the moral holds only if the run bore it out
        lines += [
            "",
            f"Without the proxy, {len(tracks)} requests would have hit Ollama at once; with it, "
            f"Ollama never ran more than {snap.peak}, the rest waited their turn, and no waiting "
            f"client went more than {silence:.1f} s without a byte, so none gave up.",
        ]
    return "\n".join(lines)


def problems(snap: Snapshot, tracks: Sequence[Track]) -> list[str]:
    """Why the demo failed, one line each; empty when the proxy kept its promises."""
    found = [f"request #{t.number} failed: {t.error}" for t in tracks if t.phase is not Phase.DONE]
    if snap.peak > MAX_CONCURRENT:
        found.append(f"upstream peak {snap.peak} exceeded max_concurrent {MAX_CONCURRENT}")
    return found


# -- output ------------------------------------------------------------------------------


class View:
    """The live progress display: a board redrawn in place on a terminal, a
    progress line about once a second anywhere else (CI logs, pipes), where
    cursor movement would only leave escape codes in the log."""

    def __init__(self, out: TextIO) -> None:
        self._out = out
        self._live = out.isatty()
        self._drawn = 0  # lines of the board on screen, to move back over
        self._ticks = 0

    def show(self, snap: Snapshot, tracks: Sequence[Track], *, final: bool = False) -> None:
        if self._live:
            self._redraw(board(snap, tracks))
        elif final or self._ticks % PLAIN_EVERY == 0:
            self._out.write(progress_line(snap, tracks) + "\n")
        self._ticks += 1
        self._out.flush()

    def _redraw(self, lines: list[str]) -> None:
        # A line that wrapped would take two rows and throw off the move back up.
        width = shutil.get_terminal_size().columns - 1
        if self._drawn:
            self._out.write(_UP.format(n=self._drawn))
        self._out.write("".join(f"{line[:width]}{_CLEAR_EOL}\n" for line in lines))
        self._drawn = len(lines)


# -- the run -----------------------------------------------------------------------------


def run_demo() -> int:
    """Run the demo; exit code 0 when every request completed within the limit."""
    return run_narrated(_demo)


def run_narrated(demo: Callable[[TextIO], Coroutine[None, None, int]]) -> int:
    """Run a demo that narrates on stdout, with the proxy's INFO lines held back; its exit code."""
    try:
        with _quiet_logs():
            return asyncio.run(demo(sys.stdout))
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return INTERRUPTED


@contextlib.contextmanager
def _quiet_logs() -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=False):
            logger.setLevel(level)


async def _demo(out: TextIO) -> int:
    async with contextlib.AsyncExitStack() as stack:
        sim = Simulator(tokens=TOKENS, token_delay=TOKEN_DELAY, load_delay=LOAD_DELAY)
        await sim.start()
        stack.push_async_callback(sim.close)
        server = Server(config_from_dict(_config(sim.url)))
        await server.start()
        stack.push_async_callback(server.stop)
        _introduce(out, sim, server)
        snap, tracks = await _burst(server, sim, View(out))
    out.write(summary(snap, tracks) + "\n")
    out.flush()  # before any failure lines on stderr, so they come last
    found = problems(snap, tracks)
    for problem in found:
        print(f"demo failed: {problem}", file=sys.stderr)
    return 1 if found else 0


def _config(upstream: str) -> dict[str, Any]:
    return {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"host": "127.0.0.1", "port": 0},
        "upstream": {"url": upstream},
        "limits": {"max_concurrent": MAX_CONCURRENT},
        "heartbeat": {"interval": HEARTBEAT_INTERVAL},
        "shutdown_grace": 1,  # everything has finished by then; on Ctrl-C, do not linger
    }


def _introduce(out: TextIO, sim: Simulator, server: Server) -> None:
    out.write(
        f"simulated Ollama on {sim.url}: {TOKENS} tokens at {TOKEN_DELAY:g} s each, "
        f"{LOAD_DELAY:g} s to load\n"
        f"proxy on {server.listen_url}: max_concurrent {MAX_CONCURRENT}, "
        f"heartbeat.interval {HEARTBEAT_INTERVAL:g}s\n"
        f"sending {REQUESTS} concurrent streaming /api/generate requests through the proxy...\n\n"
    )
    out.flush()


async def _burst(server: Server, sim: Simulator, view: View) -> tuple[Snapshot, list[Track]]:
    """Send every request at once and keep the view fresh until all have ended."""
    loop = asyncio.get_running_loop()
    began = loop.time()
    tracks = [Track(number, began) for number in range(1, REQUESTS + 1)]

    def snapshot() -> Snapshot:
        admission = server.state.admission
        beats = server.state.metrics.registry.get_sample_value("ollama_proxy_heartbeats_total")
        return Snapshot(
            loop.time() - began, admission.running_total, admission.waiting_total,
            sim.peak, int(beats or 0),
        )  # fmt: skip

    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        clients = [asyncio.create_task(_generate(session, server.listen_url, t)) for t in tracks]
        try:
            while not all(client.done() for client in clients):
                view.show(snapshot(), tracks)
                await asyncio.wait(clients, timeout=REFRESH)
        finally:
            for client in clients:
                client.cancel()
    final = snapshot()
    view.show(final, tracks, final=True)
    return final, tracks


async def _generate(session: aiohttp.ClientSession, base: str, track: Track) -> None:
    """One streaming client, reading its answer line by line as an app would."""
    body = {"model": MODEL, "prompt": f"request {track.number}: tell me a story"}
    loop = asyncio.get_running_loop()
    try:
        async with session.post(f"{base}/api/generate", json=body) as resp:
            if resp.status != 200:
                track.fail(f"HTTP {resp.status}: {(await resp.text()).strip()}")
                return
            async for raw in resp.content:
                if raw.strip():
                    track.receive(json.loads(raw), loop.time())
    except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
        track.fail(f"{type(exc).__name__}: {exc}")
        return
    if track.phase is not Phase.DONE and not track.error:
        track.fail("the stream ended without a final done line")
