"""The proxy keeps glibc's main heap from fragmenting (issue 8 item 12; "Soak" in docs/performance.md).

The soak showed RSS creeping while every Python-level count stayed flat: glibc's
dynamic mmap threshold had risen, and asyncio's 256 KiB read buffers were being
carved from the main heap. These tests pin the remedy where it lives: the start-up
hook fixes the threshold, the serve path runs it, and the systemd unit sets it too.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys

import pytest
import yaml

from proxy import memory

from .conftest import REPO, proxy_config, running_proxy

glibc = pytest.mark.skipif(not os.confstr("CS_GNU_LIBC_VERSION"), reason="the hook only acts on glibc")

#: In a fresh interpreter: raise glibc's dynamic threshold the way a freed large buffer does,
#: then say whether a 256 KiB block (asyncio's read size) still gets a mapping of its own.
_PROBE = """
import ctypes, sys
from proxy import memory
if sys.argv[1] == "tuned":
    print(memory.tune_malloc())
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = (ctypes.c_void_p,)
class Info(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                "arena ordblks smblks hblks hblkhd usmblks fsmblks uordblks fordblks keepcost".split()]
libc.mallinfo2.restype = Info
libc.free(libc.malloc(4 << 20))  # an mmapped block freed: glibc raises its threshold to 4 MiB
before = libc.mallinfo2().hblks
block = libc.malloc(256 << 10)
print("own mapping" if libc.mallinfo2().hblks == before + 1 else "main heap")
libc.free(block)
"""


def _probe(mode: str) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MALLOC_MMAP_THRESHOLD_", "GLIBC_TUNABLES")}
    done = subprocess.run(
        [sys.executable, "-c", _PROBE, mode], capture_output=True, text=True, cwd=REPO, env=env, timeout=30
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@glibc
def test_tuned_malloc_keeps_read_buffers_out_of_the_main_heap():
    # Without the hook, glibc's dynamic threshold sends the buffer to the main heap:
    # the mechanism behind the soak's creeping RSS.
    assert _probe("plain") == ["main heap"]
    line, where = _probe("tuned")
    assert line.startswith("malloc: glibc ") and line.endswith(
        f"mmap threshold fixed at {memory.MMAP_THRESHOLD} bytes (keeps the heap from fragmenting)"
    )
    assert where == "own mapping"


def test_an_operators_setting_in_the_environment_wins(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "65536")
    assert memory.tune_malloc() == "malloc: mmap threshold left to MALLOC_MMAP_THRESHOLD_ in the environment"
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_")
    monkeypatch.setenv("GLIBC_TUNABLES", "glibc.malloc.mmap_threshold=65536")
    assert memory.tune_malloc() == "malloc: mmap threshold left to GLIBC_TUNABLES in the environment"


@glibc
async def test_serve_logs_the_malloc_setting_once_at_start(sim, tmp_path, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(proxy_config(sim.url)))
    async with running_proxy(config) as started:
        lines = [line for line in started.log if "malloc: " in line]
    assert len(lines) == 1 and f"mmap threshold fixed at {memory.MMAP_THRESHOLD} bytes" in lines[0]


def test_systemd_unit_sets_the_threshold_before_the_interpreter_starts():
    unit = configparser.ConfigParser(strict=False, interpolation=None)
    unit.optionxform = str  # type: ignore[assignment,method-assign]  # systemd keys are case-sensitive
    unit.read_string((REPO / "docs" / "ollama-queue-proxy.service").read_text())
    assert unit["Service"]["Environment"] == f"MALLOC_MMAP_THRESHOLD_={memory.MMAP_THRESHOLD}"
