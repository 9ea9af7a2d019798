"""`python -m bench.bodies [--count 100] [--mib 60] [--spool-above SIZE]`: the proxy's memory
while `count` requests with bodies of `mib` MiB wait for the one slot.

The figure behind `request.spool_above`: bodies held in memory cost the process
their size each, spooled ones almost nothing. `--spool-above 64MiB` holds them
in memory, as the proxy did before spooling. Prints the proxy's resident memory
idle, with every request waiting, and its peak (VmHWM).
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from proxy.sim import Simulator

from .servers import Server, proxy

MiB = 1024 * 1024
#: Generous: on 2 shared cores, 100 bodies of 60 MiB take minutes to arrive.
_TIMEOUT = 900.0


async def measure(count: int, mib: int, spool_above: str) -> dict[str, int]:
    """RSS idle, RSS with `count` bodies waiting, and peak RSS, in bytes."""
    sim = Simulator()
    await sim.start()
    sim.load_delay = _TIMEOUT  # the first request holds the slot: the others wait
    request = {
        "max_body": "64MiB",
        "body_timeout": "15m",
        "header_timeout": "15m",
        "spool_above": spool_above,
    }
    session = aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=_TIMEOUT), connector=aiohttp.TCPConnector(limit=0)
    )
    try:
        with tempfile.TemporaryDirectory() as workdir:
            async with session, proxy(sim.url, Path(workdir), request=request, max_concurrent=1) as server:
                idle = server.rss()
                url = f"http://127.0.0.1:{server.port}/api/generate"
                head, tail = b'{"model":"llama3.2","prompt":"', b'"}'
                body = head + b"a" * (mib * MiB - len(head) - len(tail)) + tail

                async def post() -> None:
                    async with session.post(
                        url, data=body, headers={"Content-Type": "application/json"}
                    ) as resp:
                        await resp.read()

                tasks = [asyncio.create_task(post())]
                await sim.wait_until(lambda: sim.active == 1, timeout=60)
                tasks += [asyncio.create_task(post()) for _ in range(count)]
                try:
                    await _until_waiting(session, server, count, tasks)
                    return {"idle": idle, "waiting": server.rss(), "peak": _peak(server)}
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        await sim.close()


async def _until_waiting(
    session: aiohttp.ClientSession, server: Server, count: int, tasks: list[asyncio.Task[None]]
) -> None:
    deadline = time.monotonic() + _TIMEOUT
    while time.monotonic() < deadline:
        async with session.get(f"http://127.0.0.1:{server.admin_port}/metrics") as resp:
            text = await resp.text()
        depth = sum(
            float(line.split()[-1])
            for line in text.splitlines()
            if line.startswith("ollama_proxy_queue_depth{")
        )
        if depth >= count:
            return
        if all(task.done() for task in tasks[1:]):
            failed = {repr(task.exception()) for task in tasks if task.done() and task.exception()}
            raise RuntimeError(f"requests ended instead of waiting: {failed}")
        await asyncio.sleep(0.5)  # a poll of another process's gauge, not synchronisation
    raise TimeoutError(f"{count} requests were not all waiting within {_TIMEOUT:.0f}s")


def _peak(server: Server) -> int:
    status = Path(f"/proc/{server.procs[0].pid}/status").read_text()
    match = re.search(r"VmHWM:\s+(\d+) kB", status)
    return int(match.group(1)) * 1024 if match else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bodies", description=__doc__)
    parser.add_argument("--count", type=int, default=100, help="requests waiting (default 100)")
    parser.add_argument("--mib", type=int, default=60, help="body size in MiB, at most 63 (default 60)")
    parser.add_argument("--spool-above", default="256KiB", help="request.spool_above (default 256KiB)")
    args = parser.parse_args(argv)
    found = asyncio.run(measure(args.count, args.mib, args.spool_above))
    print(
        f"{args.count} waiting x {args.mib} MiB, spool_above {args.spool_above}: proxy RSS idle "
        f"{found['idle'] / MiB:.0f} MiB, waiting {found['waiting'] / MiB:.0f} MiB, peak {found['peak'] / MiB:.0f} MiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
