"""`python -m bench routing`: what choosing a backend adds to each request, in-process.

Each request takes a slot and gives it back through the real scheduler
(`Admission`, `LocalLedger`), without a router (one upstream, part one) and with
the fleet's router over 2 and 20 backends (each `max_concurrent` 4, the model
loaded on a quarter of them). Slots are taken in waves that fill the fleet, so
the router sorts backends with every count of free slots. The difference per
request is the routing's cost; a real request's own cost (HTTP in and out,
relaying) is some hundreds of microseconds, which is what it should be set against.
"""

from __future__ import annotations

import asyncio
import sys
import time

from proxy.config import config_from_dict
from proxy.scheduling.admission import Admission
from proxy.upstream.fleet import Fleet

REQUESTS = 20_000
MODEL = "llama3.2"


async def _per_request(backends: int, requests: int = REQUESTS) -> float:
    """Seconds per request (slot taken and given back); 0 backends: no router."""
    if backends:
        data = {
            "backends": {
                f"b{i}": {"url": f"http://127.0.0.1:{10000 + i}", "max_concurrent": 4}
                for i in range(backends)
            }
        }
    else:
        data = {"limits": {"max_concurrent": 8}}
    config = config_from_dict(data)
    admission = Admission(config.limits, backends=config.fleet if backends else None)
    if backends:
        fleet = Fleet(config, admission)
        admission.route(fleet)
        for i in range(0, backends, 4):
            member = fleet.member(f"b{i}")
            assert member is not None
            member.note_loaded(f"{MODEL}:latest")
    wave = config.limits.max_concurrent
    started = time.perf_counter()
    done = 0
    while done < requests:
        slots = [admission.slot(MODEL) for _ in range(wave)]
        for slot in slots:
            await slot.__aenter__()
        for slot in slots:
            await slot.__aexit__(None, None, None)
        done += wave
    return (time.perf_counter() - started) / done


def main(argv: list[str] | None = None) -> int:
    """`[REQUESTS]`: how many requests each run makes (default 20000)."""
    argv = sys.argv[1:] if argv is None else argv
    requests = int(argv[0]) if argv else REQUESTS

    async def measure() -> dict[int, float]:
        return {n: min([await _per_request(n, requests) for _ in range(3)]) for n in (0, 2, 20)}

    results = asyncio.run(measure())
    base = results[0]
    print(f"per request, best of 3 runs of {requests} (slot taken and given back):")
    for n, seconds in results.items():
        label = "no router (one upstream)" if n == 0 else f"router over {n} backends"
        added = "" if n == 0 else f"  (+{(seconds - base) * 1e6:.1f} µs for routing)"
        print(f"  {label:<26} {seconds * 1e6:6.1f} µs{added}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
