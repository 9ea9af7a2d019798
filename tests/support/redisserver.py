"""A real `redis-server` on a loopback port, for the tests of the shared ledger.

Without redis-server those tests skip, except in CI (`CI=true`), where that is a
failure: `.ci/run` installs it (Debian's redis-server package).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket

import pytest
import redis.asyncio as redis
from redis.exceptions import RedisError

from tests.support import eventually

REDIS_SERVER = shutil.which("redis-server")


#: Marks a test (or, as `pytestmark`, a module) that needs redis-server: skipped without it,
#: before its fixtures start, except in CI, where a missing server must fail.
needs_redis_server = pytest.mark.skipif(
    REDIS_SERVER is None and os.environ.get("CI") != "true",
    reason="redis-server is not installed (apt-get install redis-server)",
)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class RedisServer:
    """A real redis-server on a loopback port, which a test may kill and start again on that port."""

    def __init__(self) -> None:
        self.port = _free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        assert REDIS_SERVER is not None, "redis-server is required in CI: apt-get install redis-server"
        self.proc = await asyncio.create_subprocess_exec(
            REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        client = redis.Redis.from_url(self.url)
        try:

            async def answers() -> bool:
                try:
                    return bool(await client.ping())
                except (RedisError, OSError):
                    return False

            await eventually(answers, timeout=15)
        finally:
            await client.aclose()

    async def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            await self.kill()

    async def leases(self, prefix: str = "oqp") -> dict[str, int]:
        """Every lease set's live member count (expired members are not counted)."""
        client = redis.Redis.from_url(self.url)
        try:
            seconds, micros = await client.time()
            now = seconds * 1000 + micros // 1000
            keys = [key async for key in client.scan_iter(f"{prefix}:lease:*")]
            return {key.decode(): await client.zcount(key, now, "+inf") for key in keys}
        finally:
            await client.aclose()
