"""Large request bodies wait on disk, not in memory, and `Expect: 100-continue` is honoured.

A body over `request.spool_above` is written, as it arrives, to an unnamed
0600 file in `request.spool_dir`; it must reach upstream byte for byte, the
file must be gone on every path, and the proxy's memory must not grow with the
bodies waiting. Files are found the way an operator would: the process's open
descriptors that point into the spool directory (the file has no name there).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest

from proxy.config import ConfigError, config_from_dict, describe_spool_dir, summary
from proxy.edge.body import Body
from proxy.sim import Simulator
from tests.support import MakeProxy, eventually, hold_the_slot, proxy_config, release, running_proxy

MiB = 1024 * 1024


def spooled_fds(directory: Path, pid: int | str = "self") -> list[str]:
    """The process's descriptors (as /proc links) open on files in `directory`; an unnamed
    file there still shows as `directory/#inode (deleted)`."""
    found = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        link = f"/proc/{pid}/fd/{fd}"
        try:
            if os.readlink(link).startswith(f"{directory}/"):
                found.append(link)
        except FileNotFoundError:
            continue  # closed while we looked (listdir's own descriptor, say)
    return found


def generate_body(size: int, seed: bytes = b"") -> bytes:
    """A JSON generate request of exactly `size` bytes, its prompt varied so that a byte
    out of place upstream would show in the hash."""
    head, tail = b'{"model":"llama3.2","stream":false,"prompt":"', b'"}'
    pad = size - len(head) - len(tail)
    digest = hashlib.sha256(seed).hexdigest().encode()
    return head + (digest * (pad // len(digest) + 1))[:pad] + tail


def spool_sections(spool: Path, **request: object) -> dict:
    return {
        "limits": {"max_concurrent": 1},
        "request": {"spool_above": "64KiB", "spool_dir": str(spool), **request},
    }


async def post(http: aiohttp.ClientSession, url: str, body: bytes) -> tuple[int, bytes]:
    async with http.post(
        url + "/api/generate", data=body, headers={"Content-Type": "application/json"}
    ) as resp:
        return resp.status, await resp.read()


async def test_a_spooled_body_waits_in_an_unnamed_private_file_and_arrives_byte_exact(
    sim: Simulator, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await make_proxy(**spool_sections(tmp_path))
    holder = await hold_the_slot(sim, http, proxy)
    bodies = [generate_body(MiB + n, seed=bytes([n])) for n in range(3)]
    small = generate_body(1000)
    waiting = [asyncio.create_task(post(http, proxy.listen_url, body)) for body in [*bodies, small]]
    await eventually(lambda: len(spooled_fds(tmp_path)) == 3, timeout=20)
    assert os.listdir(tmp_path) == []  # no name to find, nothing left if the process dies
    assert [stat.S_IMODE(os.stat(link).st_mode) for link in spooled_fds(tmp_path)] == [0o600] * 3
    await release(holder)
    results = await asyncio.wait_for(asyncio.gather(*waiting), 30)
    assert [status for status, _ in results] == [200] * 4
    received = {hashlib.sha256(r.body).hexdigest() for r in sim.records[1:]}
    assert received == {hashlib.sha256(body).hexdigest() for body in [*bodies, small]}
    assert spooled_fds(tmp_path) == []


Path_ = Callable[[Simulator, aiohttp.ClientSession, str, bytes, Path], Awaitable[None]]


async def _queued_then_client_leaves(
    sim: Simulator, http: aiohttp.ClientSession, url: str, body: bytes, spool: Path
) -> None:
    leaving = asyncio.create_task(post(http, url, body))
    await eventually(lambda: len(spooled_fds(spool)) == 1, timeout=20)
    leaving.cancel()
    await asyncio.gather(leaving, return_exceptions=True)


async def _upstream_fails(
    sim: Simulator, http: aiohttp.ClientSession, url: str, body: bytes, spool: Path
) -> None:
    sim.fault, sim.fault_status = "status", 500
    assert (await post(http, url, body))[0] == 500


async def _upstream_dies(
    sim: Simulator, http: aiohttp.ClientSession, url: str, body: bytes, spool: Path
) -> None:
    sim.fault = "die"
    # Upstream's 200 was relayed before it died: the cut shows as a broken body.
    with pytest.raises(aiohttp.ClientPayloadError):
        await post(http, url, body)


async def _too_large_while_streaming_in(
    sim: Simulator, http: aiohttp.ClientSession, url: str, body: bytes, spool: Path
) -> None:
    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: refused only once past max_body
        for offset in range(0, len(body), 64 * 1024):
            yield body[offset : offset + 64 * 1024]

    with contextlib.suppress(aiohttp.ClientOSError):  # the 413 may close the socket under our upload
        async with http.post(url + "/api/generate", data=chunked()) as resp:
            assert resp.status == 413


async def _bad_json(sim: Simulator, http: aiohttp.ClientSession, url: str, body: bytes, spool: Path) -> None:
    assert (await post(http, url, body[:-1]))[0] == 400


@pytest.mark.parametrize(
    "path",
    [_queued_then_client_leaves, _upstream_fails, _upstream_dies, _too_large_while_streaming_in, _bad_json],
    ids=lambda f: f.__name__.strip("_"),
)
async def test_the_spool_file_is_closed_on_every_path(
    sim: Simulator, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path, path: Path_
) -> None:
    proxy = await make_proxy(**spool_sections(tmp_path, max_body="1MiB"))
    holder = await hold_the_slot(sim, http, proxy) if path is _queued_then_client_leaves else None
    body = generate_body(MiB if path is not _too_large_while_streaming_in else 2 * MiB)
    try:
        await asyncio.wait_for(path(sim, http, proxy.listen_url, body, tmp_path), 30)
        await eventually(lambda: spooled_fds(tmp_path) == [], timeout=10)
    finally:
        if holder is not None:
            await release(holder)


async def test_a_body_that_cannot_be_spooled_gets_503_and_the_reason_is_logged(
    make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    spool = tmp_path / "spool"
    spool.mkdir()
    proxy = await make_proxy(**spool_sections(spool))
    spool.rmdir()  # gone after the config was checked: a full or unmounted disk looks alike
    async with http.post(proxy.listen_url + "/api/generate", data=generate_body(MiB)) as resp:
        status, answer, retry = resp.status, await resp.read(), resp.headers.get("Retry-After")
    assert (status, retry) == (503, "10")
    assert json.loads(answer) == {"error": "the proxy cannot hold this request body now; retry later"}
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("spool failed")]
    assert str(spool) in line and "request.spool_dir" in line
    assert (await post(http, proxy.listen_url, generate_body(1000)))[0] == 200  # small bodies are unaffected


async def test_a_spooled_body_cut_at_shutdown_leaves_no_file(
    sim: Simulator, make_proxy: MakeProxy, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    proxy = await make_proxy(**spool_sections(tmp_path), shutdown_grace="100ms")
    holder = await hold_the_slot(sim, http, proxy)
    waiting = asyncio.create_task(post(http, proxy.listen_url, generate_body(MiB)))
    await eventually(lambda: len(spooled_fds(tmp_path)) == 1, timeout=20)
    await asyncio.wait_for(proxy.stop(), 20)
    assert spooled_fds(tmp_path) == []
    status, answer = await asyncio.wait_for(waiting, 20)
    assert (status, b"shutdown_grace" in answer) == (503, True)
    await release(holder)


async def test_the_proxy_does_not_grow_with_the_bodies_waiting(
    sim: Simulator, http: aiohttp.ClientSession, tmp_path: Path
) -> None:
    """20 waiting requests of 8 MiB (160 MiB of bodies) cost the process little memory.

    Measured on `python -m proxy`, the process an operator runs, from its RSS."""
    count, size = 20, 8 * MiB
    spool = tmp_path / "spool"
    spool.mkdir()
    config = tmp_path / "config.yaml"
    sections = {"limits": {"max_concurrent": 1, "max_queue": 50}, "request": {"spool_dir": str(spool)}}
    config.write_text(json.dumps(proxy_config(sim.url, **sections)))
    async with running_proxy(config) as proxy:
        pid = proxy.proc.pid
        sim.load_delay = 60
        holder = asyncio.create_task(post(http, proxy.listen, generate_body(1000)))
        await sim.wait_until(lambda: sim.active == 1, timeout=20)
        sim.load_delay = 0
        before = _rss(pid)
        body = generate_body(size)
        waiting = [asyncio.create_task(post(http, proxy.listen, body)) for _ in range(count)]
        await eventually(lambda: queue_depth(http, proxy.admin, count), timeout=60)
        growth = _rss(pid) - before
        assert growth < count * size / 4, (
            f"RSS grew {growth / MiB:.0f} MiB for {count * size / MiB:.0f} MiB waiting"
        )
        assert len(spooled_fds(spool, pid)) == count
        for task in [*waiting, holder]:
            task.cancel()
        await asyncio.gather(*waiting, holder, return_exceptions=True)
        await eventually(lambda: spooled_fds(spool, pid) == [], timeout=20)


async def queue_depth(http: aiohttp.ClientSession, admin: str, expected: int) -> bool:
    async with http.get(admin + "/metrics") as resp:
        text = await resp.text()
    depth = sum(
        float(line.split()[-1]) for line in text.splitlines() if line.startswith("ollama_proxy_queue_depth{")
    )
    return depth == expected


def _rss(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    match = re.search(r"VmRSS:\s+(\d+) kB", status)
    assert match
    return int(match.group(1)) * 1024


async def test_a_spooled_body_can_be_sent_again(sim: Simulator, http: aiohttp.ClientSession) -> None:
    """A request re-sent after a failed connect sends the same bytes: each attempt gets its own payload."""
    data = generate_body(3 * MiB + 7)
    file = tempfile.TemporaryFile(buffering=0)
    file.write(data)
    with Body(file=file, size=len(data)) as body:
        assert body.read() == data
        for _ in range(2):
            async with http.post(sim.url + "/api/generate", data=body.payload()) as resp:
                assert resp.status == 200
                await resp.read()
    assert file.closed
    assert [r.body == data for r in sim.records] == [True, True]
    assert [r.headers.get("Content-Length") for r in sim.records] == [str(len(data))] * 2


# -- Expect: 100-continue -----------------------------------------------------------------------


async def _expect(url: str, head: str) -> bytes:
    """Send only the head of a request that asks `Expect: 100-continue`; the first response line."""
    host, port = url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(head.encode())
        async with asyncio.timeout(10):
            return await reader.readline()
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("sections", "headers", "first_line"),
    [
        ({"request": {"max_body": "1KiB"}}, "Content-Length: 2048\r\n", b"HTTP/1.1 413 Request Entity Too Large\r\n"),
        ({"access": {"keys": {"ci": "sk-right"}}}, "Content-Length: 20\r\nAuthorization: Bearer sk-wrong\r\n",
         b"HTTP/1.1 401 Unauthorized\r\n"),
        ({}, "Content-Length: 20\r\n", b"HTTP/1.1 100 Continue\r\n"),
    ],
    ids=["too-large", "bad-key", "accepted"],
)  # fmt: skip
async def test_100_continue_is_sent_only_to_a_body_the_proxy_will_read(
    make_proxy: MakeProxy, sections: dict, headers: str, first_line: bytes
) -> None:
    proxy = await make_proxy(**sections)
    head = f"POST /api/generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n{headers}\r\n"
    assert await _expect(proxy.listen_url, head) == first_line


async def test_after_100_continue_the_body_is_relayed(make_proxy: MakeProxy, sim: Simulator) -> None:
    proxy = await make_proxy()
    body = b'{"model":"llama3.2","stream":false}'
    host, port = proxy.listen_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"POST /api/generate HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
            f"Content-Length: {len(body)}\r\n\r\n".encode()
        )
        async with asyncio.timeout(10):
            assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            assert (await reader.readline()).startswith(b"HTTP/1.1 200 ")
    finally:
        writer.close()
    assert sim.records[0].body == body


async def test_an_unknown_expectation_gets_417(make_proxy: MakeProxy) -> None:
    proxy = await make_proxy()
    head = "POST /api/generate HTTP/1.1\r\nHost: x\r\nExpect: something-else\r\nContent-Length: 2\r\n\r\n"
    assert (await _expect(proxy.listen_url, head)).startswith(b"HTTP/1.1 417 ")


# -- config -------------------------------------------------------------------------------------


def test_spool_settings_are_checked_and_shown(tmp_path: Path) -> None:
    (tmp_path / "spool").mkdir()
    config = config_from_dict({"request": {"spool_above": "1MiB", "spool_dir": "spool"}}, base=str(tmp_path))
    assert (config.request.spool_above, config.request.spool_dir) == (MiB, str(tmp_path / "spool"))
    shown = summary(config)
    assert re.search(
        rf"request\.spool_above\s+1 MiB \(larger bodies wait in a file in request\.spool_dir "
        rf"{re.escape(str(tmp_path / 'spool'))}\)\n",
        shown,
    )
    with pytest.raises(ConfigError) as err:
        config_from_dict({"request": {"spool_dir": "nowhere", "spool_above": "lots"}}, base=str(tmp_path))
    assert any(
        p.startswith(f"request.spool_dir: {tmp_path}/nowhere is not a directory") for p in err.value.problems
    )
    assert any(p.startswith("request.spool_above:") for p in err.value.problems)


def test_the_summary_warns_when_bodies_would_be_spooled_to_ram(tmp_path: Path) -> None:
    mounts = tmp_path / "mounts"
    mounts.write_text(f"/dev/vda / ext4 rw 0 0\ntmpfs {tmp_path}/ram tmpfs rw 0 0\n")
    (tmp_path / "ram").mkdir()
    (tmp_path / "ramdisk").mkdir()  # a name that merely starts like the tmpfs mount point
    assert "WARNING: a tmpfs" in describe_spool_dir(str(tmp_path / "ram"), str(mounts))
    assert describe_spool_dir(str(tmp_path / "ramdisk"), str(mounts)) == str(tmp_path / "ramdisk")
