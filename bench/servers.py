"""The processes under measurement: the proxy and nginx, each on free loopback ports.

Each runs as its own process so psutil can read its CPU time and resident
memory apart from the load generator's and the simulator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import yaml

REPO = Path(__file__).resolve().parent.parent
_START_TIMEOUT = 30.0
_STOP_TIMEOUT = 10.0


@dataclass
class Server:
    """Something the load generator talks to; `procs` are what its cost is read from."""

    name: str
    port: int
    admin_port: int = 0
    procs: list[psutil.Process] = field(default_factory=list)

    def cpu(self) -> float:
        """User plus system CPU seconds of every process of this server, children included."""
        return sum(_cpu(p) for p in self._tree())

    def rss(self) -> int:
        return sum(_rss(p) for p in self._tree())

    def _tree(self) -> list[psutil.Process]:
        procs = list(self.procs)
        for proc in self.procs:
            with contextlib.suppress(psutil.Error):
                procs.extend(proc.children(recursive=True))
        return procs


def _cpu(proc: psutil.Process) -> float:
    try:
        times = proc.cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def _rss(proc: psutil.Process) -> int:
    try:
        return proc.memory_info().rss
    except psutil.Error:
        return 0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def wait_listening(port: int, proc: asyncio.subprocess.Process, log: Path) -> None:
    """Until `port` accepts a connection; fails early, with the log, if the process died."""
    deadline = time.monotonic() + _START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.returncode is not None:
            raise RuntimeError(f"exited with {proc.returncode} before listening:\n{log.read_text()[-2000:]}")
        with contextlib.suppress(OSError):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        await asyncio.sleep(0.05)
    raise RuntimeError(f"not listening on {port} after {_START_TIMEOUT}s:\n{log.read_text()[-2000:]}")


async def _stop(proc: asyncio.subprocess.Process) -> None:
    if proc.returncode is None:
        proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), _STOP_TIMEOUT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


@contextlib.asynccontextmanager
async def _running(
    server: Server, proc: asyncio.subprocess.Process, log: Path, *ports: int
) -> AsyncIterator[None]:
    """Wait until `proc` listens on `ports`, count its CPU and memory as `server`'s; stop it after."""
    try:
        for port in ports:
            await wait_listening(port, proc, log)
        server.procs.append(psutil.Process(proc.pid))
        yield
    finally:
        await _stop(proc)


def proxy_config(upstream: str, port: int, admin_port: int, **limits: object) -> dict:
    """A proxy config for the bench; `limits` override limits.* keys."""
    return {
        "listen": {"host": "127.0.0.1", "port": port, "max_connections": 20000},
        "admin": {"host": "127.0.0.1", "port": admin_port},
        "upstream": {"url": upstream},
        "limits": {"max_concurrent": 256, "max_queue": 1000, **limits},
        "shutdown_grace": "1s",
    }


@contextlib.asynccontextmanager
async def proxy(
    upstream: str,
    workdir: Path,
    *,
    uvloop: bool = False,
    heartbeat: float | None = None,
    request: dict[str, object] | None = None,
    env: Mapping[str, str] | None = None,
    module: str | None = None,
    cluster: dict[str, object] | None = None,
    **limits: object,
) -> AsyncIterator[Server]:
    """`python -m proxy` (or under uvloop) with a generated config; logs go to a file.

    `request` sets request.* keys; `env` is added to the process's environment (a malloc
    setting or LD_PRELOAD to measure); `module` runs another launcher of the proxy instead,
    e.g. `bench.buffered_proxy`.
    """
    name = "proxy+uvloop" if uvloop else "proxy"
    server = Server(name, free_port(), free_port())
    config = proxy_config(upstream, server.port, server.admin_port, **limits)
    if heartbeat is not None:
        config["heartbeat"] = {"interval": heartbeat}
    if request is not None:
        config["request"] = request
    if cluster is not None:
        config["cluster"] = cluster
    path = workdir / f"{name}-{server.port}.yaml"
    path.write_text(yaml.safe_dump(config))
    log = path.with_suffix(".log")
    command = [sys.executable, "-m", module or ("bench.uvloop_proxy" if uvloop else "proxy")]
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            *command, "--config", str(path), cwd=REPO, stdout=sink, stderr=sink, env={**os.environ, **(env or {})},
        )  # fmt: skip
    async with _running(server, proc, log, server.port, server.admin_port):
        yield server


@contextlib.asynccontextmanager
async def simulator(workdir: Path, *, tokens: int, token_delay: float) -> AsyncIterator[Server]:
    """`python -m proxy.sim` in a process of its own, so the proxy's memory is read alone."""
    server = Server("simulator", free_port())
    log = workdir / f"simulator-{server.port}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "proxy.sim", "--port", str(server.port),
            "--tokens", str(tokens), "--token-delay", str(token_delay),
            cwd=REPO, stdout=sink, stderr=sink,
        )  # fmt: skip
    async with _running(server, proc, log, server.port):
        yield server


@contextlib.asynccontextmanager
async def floor(upstream: str, workdir: Path) -> AsyncIterator[Server]:
    """`bench/floor.py`: a bare aiohttp relay, the floor under any aiohttp proxy's costs."""
    server = Server("aiohttp-floor", free_port())
    log = workdir / f"floor-{server.port}.log"
    with log.open("wb") as sink:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.floor",
            upstream,
            str(server.port),
            cwd=REPO,
            stdout=sink,
            stderr=sink,
        )
    async with _running(server, proc, log, server.port):
        yield server


NGINX_CONF = """\
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile 40000;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
{user}
events {{ worker_connections 20000; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
    keepalive_requests 1000000;
    upstream ollama {{
        server {upstream};
        keepalive 256;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://ollama;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 600s;
        }}
    }}
}}
"""


def nginx_binary() -> str | None:
    return shutil.which("nginx") or next(
        (p for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx") if os.access(p, os.X_OK)), None
    )


def install_nginx() -> str | None:
    """Debian's nginx, installed when missing (the bench's only system dependency)."""
    if found := nginx_binary():
        return found
    if shutil.which("apt-get") is None or os.geteuid() != 0:
        return None
    print("nginx is missing: apt-get install -y nginx ...", file=sys.stderr, flush=True)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "nginx"]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL, check=False).returncode:
            return None
    return nginx_binary()


@contextlib.asynccontextmanager
async def nginx(binary: str, upstream_hostport: str, workdir: Path) -> AsyncIterator[Server]:
    """nginx as a plain reverse proxy, one worker, in the foreground."""
    server = Server("nginx", free_port())
    home = workdir / "nginx"
    home.mkdir(exist_ok=True)
    conf = home / "nginx.conf"
    user = "user root;" if os.geteuid() == 0 else ""
    conf.write_text(NGINX_CONF.format(dir=home, user=user, upstream=upstream_hostport, port=server.port))
    log = home / "error.log"
    log.touch()
    proc = await asyncio.create_subprocess_exec(
        binary, "-p", str(home), "-c", str(conf), "-e", str(log),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )  # fmt: skip
    async with _running(server, proc, log, server.port):
        yield server
