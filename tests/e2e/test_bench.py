"""The benchmark's smallest run: every row of its report gets a figure.

nginx takes part when it is installed (the bench installs it only when run as
`python -m bench`); without it, the rows compared with nginx say n/a.
"""

from __future__ import annotations

import dataclasses
import math

from bench import report
from bench.run import SMALLEST, run
from bench.servers import nginx_binary

#: Rows with a direct (no proxy in between) figure to compare with.
DIRECT = (
    "latency p50",
    "latency p99",
    "requests/s",
    "streamed chunks/s",
    "upstream close p50",
    "upstream close p99",
)
TARGETS = {
    "GET /api/tags c=1 added latency p50": "<= 0.25 ms",
    "POST /api/show c=1 added latency p50": "<= 0.25 ms",
    "GET /api/tags c=32 requests/s": ">= 0.75x nginx",
    "POST /api/show c=32 requests/s": ">= 0.75x nginx",
    "CPU per 1,000 streamed chunks": "<= 1.3x nginx",
    "RSS per waiting client": "<= 10 KiB",
    "heartbeat lateness p99": "< 50 ms",
    "disconnect to upstream close p99": "< 20 ms",
}


async def test_smallest_run_reports_every_figure() -> None:
    with_nginx = nginx_binary() is not None
    results = await run(dataclasses.replace(SMALLEST, nginx=with_nginx))

    assert results.servers == (["direct", "nginx", "proxy"] if with_nginx else ["direct", "proxy"])
    rows = report.rows(results)
    assert len(rows) == 30
    for row in rows:
        assert math.isfinite(row.values["proxy"]), row.figure
        if row.figure.endswith(DIRECT) and not row.added:
            assert math.isfinite(row.values["direct"]), row.figure
    assert {row.figure: row.target for row in rows if row.target} == TARGETS
    verdicts = {row.figure: row.verdict() for row in rows if row.target}
    assert set(verdicts.values()) <= ({"PASS", "FAIL"} if with_nginx else {"PASS", "FAIL", "n/a"})

    by_name = {row.figure: row for row in rows}
    assert by_name["streamed chunks/s (100 streams)"].values["proxy"] > 0
    assert by_name["GET /api/tags c=32 requests/s"].values["proxy"] > 0
    waiting = next(note for note in results.notes if "waiting:" in note)
    assert f"queue depth reached {SMALLEST.waiters}" in waiting
    assert "0 clients without a frame, 0 connections lost" in waiting
    text = report.table(results)
    assert all(figure in text for figure in by_name)


async def test_fairness_bench_shows_tokens_share_and_a_cheap_release() -> None:
    from bench import fair
    from proxy.sim import Simulator

    sim = Simulator(tokens=200, token_delay=0.002)
    await sim.start()
    try:
        shares = {}
        for name in ("none", "cost: tokens"):
            served = await fair.long_vs_short(sim, fair.SETTINGS[name], each=4)
            shares[name] = fair.jain([float(v) for v in fair.backlogged_tokens(served).values()])
    finally:
        await sim.close()
    assert shares["none"] < 0.6 < shares["cost: tokens"], shares
    costs = await fair.release_cost(waiters=2_000, clients=200, releases=20)
    assert set(costs) == {"first come, first served", "fair share"} and all(c > 0 for c in costs.values())


def test_routing_bench_measures_each_fleet_size(capsys) -> None:
    from bench import routing

    assert routing.main(["400"]) == 0
    out = capsys.readouterr().out
    assert "no router (one upstream)" in out
    assert "router over 2 backends" in out and "router over 20 backends" in out
