"""`python -m bench soak`, in seconds: it drives churn and prints its table and summary.

The real soak runs for 30 minutes (docs/performance.md, "Soak"); this checks the
command works, the churn does what it says (one request in five hung up on
mid-answer, none failing) and every row carries the proxy's own figures.
"""

from __future__ import annotations

import math
import re

import pytest

from bench import soak

ROW = re.compile(r"^ *(\d+\.\d) +(\d+) +(\d+) +(\d+) +(\d+\.\d\d) +(\d+\.\d\d) +(\d+) +(\d+\.\d)$")


def test_a_short_soak_prints_rss_and_fds_over_time(capsys: pytest.CaptureFixture[str]):
    argv = ["--minutes", "0.05", "--interval", "0.7", "--clients", "6", "--limit", "2"]
    assert soak.main([*argv, "--env", "MALLOC_MMAP_THRESHOLD_=131072"]) == 0
    lines = capsys.readouterr().out.splitlines()

    assert lines[0].startswith("soak: 6 clients, limit 2, 1 in 5 leaving mid-answer, 0.05 min; ")
    assert "proxy: MALLOC_MMAP_THRESHOLD_=131072;" in lines[0]
    assert lines[1] == soak.HEADER
    rows = [ROW.match(line) for line in lines[2:-1]]
    assert all(rows) and len(rows) >= 4, lines
    figures = [tuple(float(x) for x in row.groups()) for row in rows if row]
    assert [f[0] for f in figures] == sorted(f[0] for f in figures)  # minutes go forward
    assert all(f[4] > 10 and f[6] > 0 for f in figures)  # a Python process's RSS, its fds
    assert figures[-1][7] > 0  # the proxy's CPU seconds

    summary = re.fullmatch(
        r"summary: (\d+) requests \((\d+) left mid-answer, 0 errors\) in [\d.]+ min; "
        r"RSS [\d.]+ MiB at [\d.]+ min, [\d.]+ MiB at [\d.]+ min; "
        r"slope [+-]\d+ KiB/min from minute [\d.]+, [+-]\d+ over the second half; "
        r"heap [\d.]+ -> [\d.]+ MiB; fds \d+ -> \d+; CPU [\d.]+ ms per request",
        lines[-1],
    )
    assert summary, lines[-1]
    requests, left = int(summary[1]), int(summary[2])
    assert requests > 10
    assert left == math.ceil(requests / 5)  # requests 0, 5, 10, ... left; every one got a token first


def test_slope_is_the_least_squares_fit_in_kib_per_minute():
    def at(minutes: float, rss_kib: float) -> soak.Sample:
        return soak.Sample(minutes, 0, 0, 0, int(rss_kib * 1024), 0, 0, 0.0)

    assert soak.slope_kib_per_minute([at(5, 1000), at(10, 1100), at(15, 1200)]) == pytest.approx(20)
    assert soak.slope_kib_per_minute([at(5, 1000)]) == 0
