"""`ollama-queue-proxy demo` as an operator runs it, and its progress line."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from proxy.demo import Phase, Snapshot, Track, progress_line

REPO = Path(__file__).resolve().parents[2]


def test_demo_queues_the_burst_keeps_clients_alive_and_exits_0():
    # Slow (~11 s): the real command, end to end, stdout a pipe as in CI.
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo"], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"requests completed\s+10/10", result.stdout), output
    assert re.search(r"upstream peak\s+3 at once", result.stdout), output
    heartbeats = re.search(r"heartbeats sent\s+(\d+)\n", result.stdout)
    assert heartbeats and int(heartbeats.group(1)) > 0, output
    assert "\x1b[" not in output  # not a terminal: plain lines only
    assert "Traceback" not in output


def test_progress_line_reports_the_proxy_and_the_clients_on_one_line():
    tracks = [Track(number, started_at=0.0) for number in (1, 2, 3)]
    tracks[0].phase, tracks[0].tokens = Phase.DONE, 20
    tracks[1].phase, tracks[1].tokens, tracks[1].keepalives = Phase.RUNNING, 5, 2
    tracks[2].keepalives = 3
    snap = Snapshot(elapsed=4.04, running=1, waiting=1, peak=3, heartbeats=6)

    line = progress_line(snap, tracks)

    assert line == (
        "  4.0s  slots 1/3  queued 1  upstream peak 3  heartbeats sent 6  |  "
        "done 1/3  failed 0  tokens 25/60  keep-alives received 5"
    )
    assert "\n" not in line and "\x1b" not in line


def test_fleet_demo_fails_over_with_no_failed_request_and_exits_0():
    result = subprocess.run(
        [sys.executable, "-m", "proxy", "demo", "--fleet"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert re.search(r"requests completed\s+16/16", result.stdout), output
    failed_over = re.search(r"failed over\s+(\d+)", result.stdout)
    assert failed_over and int(failed_over.group(1)) > 0, output
    assert re.search(r"#2\s+qwen3\s+gpu-b\s+done", result.stdout), output  # only gpu-b has qwen3
    assert len(re.findall(r"backend gpu-a down", result.stderr)) == 1, output  # one line per change
    assert "Traceback" not in output
