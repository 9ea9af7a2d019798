"""A real headless Chromium for the status page's tests, installed on first use.

CI is a fresh Debian machine running as root, so the page must be exercised
there rather than skipped: a missing browser is installed with apt, and when
that cannot work the tests fail with a message saying what to do.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
import zlib
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
#: Each browser run and each apt step is bounded; a hung browser must not hang the suite.
RUN_TIMEOUT = 60.0
INSTALL_TIMEOUT = 600.0
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
)


class BrowserUnavailable(RuntimeError):
    """Chromium is missing and could not be installed here."""


def ensure_chromium() -> str:
    """Return the path of Chromium, installing Debian's package when it is missing.

    `apt-get update` runs only when a plain install fails, as package lists are
    usually fresh on CI images and updating them costs time and network.
    """
    found = shutil.which("chromium") or (CHROMIUM if os.access(CHROMIUM, os.X_OK) else None)
    if found:
        return found
    if os.geteuid() != 0:
        raise BrowserUnavailable(
            f"{CHROMIUM} is missing and installing it needs root: run `apt-get install -y chromium`"
        )
    if shutil.which("apt-get") is None:
        raise BrowserUnavailable(f"{CHROMIUM} is missing and there is no apt-get to install it with")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    install = ["apt-get", "install", "-y", "--no-install-recommends", "chromium"]
    if _run(install, env) != 0:
        _run(["apt-get", "update"], env)
        if _run(install, env) != 0:
            raise BrowserUnavailable("`apt-get install -y chromium` failed; see the output above")
    if not os.access(CHROMIUM, os.X_OK):
        raise BrowserUnavailable(f"the chromium package installed, yet {CHROMIUM} is not there")
    return CHROMIUM


def _run(argv: list[str], env: dict[str, str]) -> int:
    try:
        return subprocess.run(argv, env=env, timeout=INSTALL_TIMEOUT, check=False).returncode
    except subprocess.TimeoutExpired:
        return -1


def run_chromium(chromium: str, url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """One headless run against `url` with a throwaway profile, so runs never share state."""
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        return subprocess.run(
            [chromium, *FLAGS, f"--user-data-dir={profile}", *args, url],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            check=False,
        )


def png_colours(path: Path) -> set[bytes]:
    """The distinct pixel values of an 8-bit, non-interlaced PNG (what Chromium writes).

    A tiny decoder with zlib so the check needs no imaging dependency.
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        if kind == b"IHDR":
            header = body
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    width, height, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", header)
    assert depth == 8 and interlace == 0, (depth, interlace)
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(idat)
    stride = width * channels
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for row in range(height):
        start = row * (stride + 1)
        kind, line = raw[start], bytearray(raw[start + 1 : start + 1 + stride])
        _unfilter(kind, line, previous, channels)
        colours.update(bytes(line[i : i + channels]) for i in range(0, stride, channels))
        previous = line
    return colours


def _unfilter(kind: int, line: bytearray, previous: bytearray, bpp: int) -> None:
    for i in range(len(line)):
        left = line[i - bpp] if i >= bpp else 0
        up = previous[i]
        if kind == 1:
            line[i] = (line[i] + left) & 0xFF
        elif kind == 2:
            line[i] = (line[i] + up) & 0xFF
        elif kind == 3:
            line[i] = (line[i] + (left + up) // 2) & 0xFF
        elif kind == 4:
            corner = previous[i - bpp] if i >= bpp else 0
            p = left + up - corner
            pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
            predictor = left if pa <= pb and pa <= pc else up if pb <= pc else corner
            line[i] = (line[i] + predictor) & 0xFF
