"""A client that goes away frees its slot and its upstream socket at once, in every phase."""

from __future__ import annotations

import asyncio
import json
import random
import re
import socket

import aiohttp
import psutil
import pytest
from aiohttp import web

from tests.support import eventually, proxy_config, running_proxy, sample, scrape, serving

REQUEST = {"model": "llama3.2", "prompt": "tell me a long story"}


async def open_stream(http: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    return await http.post(url + "/api/generate", json=REQUEST)


async def test_disconnect_while_running_closes_upstream_within_100ms_and_admits_the_next(
    sim, make_proxy, http
):
    sim.tokens, sim.token_delay = 200, 0.02
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "10s"})
    loop = asyncio.get_running_loop()
    first = await open_stream(http, proxy.listen_url)
    await first.content.readline()  # a token: upstream is generating for us
    waiting = asyncio.create_task(open_stream(http, proxy.listen_url))
    await eventually(lambda: proxy.state.admission.waiting_total == 1)

    gone_at = loop.time()
    first.close()  # the visitor goes away mid-generation
    record = sim.records[0]
    await sim.wait_until(lambda: record.peer_closed_at is not None)
    assert record.peer_closed_at - gone_at < 0.1
    assert not record.completed

    await sim.wait_until(lambda: len(sim.records) == 2)  # the next one was admitted
    second = await waiting
    assert second.status == 200
    second.close()
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_client_disconnects_total", phase="running") >= 1


async def test_disconnect_while_upstream_loads_closes_upstream_within_100ms(sim, make_proxy, http):
    sim.load_delay = 30  # Ollama is loading the model: no headers yet
    proxy = await make_proxy(heartbeat={"interval": "10s"})
    loop = asyncio.get_running_loop()
    request = asyncio.create_task(open_stream(http, proxy.listen_url))
    await sim.wait_until(lambda: sim.active == 1)
    gone_at = loop.time()
    request.cancel()
    await asyncio.gather(request, return_exceptions=True)
    await sim.wait_until(lambda: sim.records[0].peer_closed_at is not None)
    assert sim.records[0].peer_closed_at - gone_at < 0.1
    assert proxy.state.admission.running_total == 0


async def test_disconnect_while_queued_leaves_the_queue_at_once_and_never_reaches_upstream(
    sim, make_proxy, http
):
    sim.load_delay = 30
    proxy = await make_proxy(limits={"max_concurrent": 1}, heartbeat={"interval": "10s"})
    holder = asyncio.create_task(open_stream(http, proxy.listen_url))
    await sim.wait_until(lambda: sim.active == 1)
    queued = asyncio.create_task(open_stream(http, proxy.listen_url))
    admission = proxy.state.admission
    await eventually(lambda: admission.waiting_total == 1)

    loop = asyncio.get_running_loop()
    gone_at = loop.time()
    queued.cancel()
    await asyncio.gather(queued, return_exceptions=True)
    await eventually(lambda: admission.waiting_total == 0, timeout=1)
    assert loop.time() - gone_at < 0.1
    metrics = await scrape(http, proxy)
    assert sample(metrics, "ollama_proxy_queue_depth", model="llama3.2:latest") == 0
    assert sample(metrics, "ollama_proxy_client_disconnects_total", phase="queued") == 1
    assert (
        sample(
            metrics,
            "ollama_proxy_requests_total",
            endpoint="/api/generate",
            model="llama3.2:latest",
            code="499",
        )
        == 1
    )

    holder.cancel()
    await asyncio.gather(holder, return_exceptions=True)
    await sim.wait_until(lambda: sim.active == 0)
    assert len(sim.records) == 1  # the queued request never reached upstream


async def test_client_gone_mid_upload_holds_nothing(sim, make_proxy):
    proxy = await make_proxy()
    host, port = proxy.listen_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(
        b"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b'Content-Length: 1000\r\n\r\n{"model": "llama3.2", '
    )
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    # Nothing to await on the proxy's side but its own bookkeeping: bounded poll.
    await eventually(lambda: not proxy.state.admission.waiting_total)
    assert proxy.state.admission.running_total == 0
    assert sim.records == []


@pytest.fixture
async def proxy_process(sim, tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text(
        json.dumps(
            proxy_config(
                sim.url,
                limits={"max_concurrent": 3, "max_queue": 200},
                heartbeat={"interval": "100ms"},
                health={"interval": "1h"},  # no probe's own connection in the fd counts below
            )
        )
    )
    async with running_proxy(config) as started:
        # The first probe and the reads of the model lists (/api/tags, then /api/ps) are done.
        await started.log_line(r"upstream loaded models: ")
        yield started


def _sockets(pid: int) -> list:
    return psutil.Process(pid).net_connections(kind="tcp")


async def test_hundred_random_aborts_leave_no_close_wait_and_no_leaked_fd(sim, proxy_process, http):
    proc, listen, admin = proxy_process.proc, proxy_process.listen, proxy_process.admin
    sim.tokens, sim.token_delay = 10, 0.02
    upstream_port = int(sim.url.rsplit(":", 1)[1])
    idle_fds = psutil.Process(proc.pid).num_fds()
    rng = random.Random(20261124)
    host, port = listen.removeprefix("http://").split(":")

    async def visitor(i: int) -> None:
        """Send a streaming request, read for a random while, then vanish (FIN or RST)."""
        reader, writer = await asyncio.open_connection(host, int(port))
        body = json.dumps({**REQUEST, "prompt": f"story {i}"}).encode()
        writer.write(
            b"POST /api/generate HTTP/1.1\r\nHost: proxy\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
        )
        if i % 5 == 0:
            # Every fifth leaves right after its first token: a mid-stream abort however slow the machine.
            seen = b""
            while not re.search(rb'"response":"[^"]', seen) and (chunk := await reader.read(65536)):
                seen = seen[-64:] + chunk
        else:
            try:
                async with asyncio.timeout(rng.uniform(0.0, 0.6)):
                    while await reader.read(65536):
                        pass
            except TimeoutError:
                pass
        if rng.random() < 0.5:
            writer.transport.abort()  # RST
        else:
            writer.close()  # FIN
            await writer.wait_closed()

    await asyncio.gather(*(visitor(i) for i in range(100)))

    async def drained() -> bool:
        if sim.active:
            return False
        conns = _sockets(proc.pid)
        return not any(c.status == psutil.CONN_CLOSE_WAIT for c in conns) and all(
            c.status in (psutil.CONN_LISTEN, psutil.CONN_ESTABLISHED) for c in conns
        )

    await eventually(drained, timeout=10)
    conns = _sockets(proc.pid)
    assert not [c for c in conns if c.status == psutil.CONN_CLOSE_WAIT]
    listening = [c for c in conns if c.status == psutil.CONN_LISTEN]
    pooled = [c for c in conns if c.status == psutil.CONN_ESTABLISHED]
    assert len(listening) == 2
    # What stays open is only keep-alive connections to upstream, never more than the slots.
    assert all(c.raddr.port == upstream_port for c in pooled) and len(pooled) <= 3
    assert psutil.Process(proc.pid).num_fds() == idle_fds + len(pooled)

    async with http.get(admin + "/metrics") as resp:
        text = await resp.text()
    assert re.search(r'^ollama_proxy_in_flight\{model="llama3.2:latest"\} 0\.0$', text, re.M)
    assert re.search(r'^ollama_proxy_queue_depth\{model="llama3.2:latest"\} 0\.0$', text, re.M)
    gone = sum(1 for r in sim.records if r.peer_closed_at is not None)
    assert gone >= 20  # the run really did abort generations mid-stream
    assert sim.peak <= 3


async def test_a_client_that_stops_reading_is_cut_off_and_frees_its_slot(make_proxy, http):
    closed = asyncio.Event()
    served = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        """An upstream that streams NDJSON as fast as it may, until the proxy lets go."""
        nonlocal served
        served += 1
        response = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await response.prepare(request)
        if served > 1:  # the next request, once the slot is free: a short, whole answer
            await response.write(b'{"done":true}\n')
            return response
        line = b'{"response":"' + b"x" * 1000 + b'","done":false}\n'
        try:
            while True:
                await response.write(line * 64)
        except (ConnectionResetError, asyncio.CancelledError):
            closed.set()
            raise

    app = web.Application()
    app.router.add_post("/api/generate", endless)
    async with serving(app, handler_cancellation=True) as upstream:
        proxy = await make_proxy(upstream, limits={"max_concurrent": 1}, timeouts={"write": "0.5s"})
        host, port = proxy.listen_url.removeprefix("http://").split(":")
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.setblocking(False)
        await loop.sock_connect(sock, (host, int(port)))
        try:
            body = json.dumps({"model": "llama3.2", "prompt": "never read"}).encode()
            head = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n\r\n"
            await loop.sock_sendall(sock, head.encode() + body)  # ...and then never read
            started = loop.time()
            await asyncio.wait_for(closed.wait(), 10)
            assert loop.time() - started < 5  # buffers fill in moments, then 0.5 s of stall
            await eventually(lambda: proxy.state.admission.running_total == 0)
        finally:
            sock.close()

        # The slot went to the next request, which is served whole.
        async with http.post(proxy.listen_url + "/api/generate", json={"model": "llama3.2"}) as resp:
            assert resp.status == 200 and await resp.read() == b'{"done":true}\n'
        metrics = await scrape(http, proxy)
        assert sample(metrics, "ollama_proxy_client_disconnects_total", phase="running") == 1
