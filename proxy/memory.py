"""Keep glibc's main heap from fragmenting over months: a fixed 128 KiB mmap threshold.

asyncio reads every socket with `recv(256 KiB)` and then shrinks the bytes
object to what arrived. glibc serves a 256 KiB request with mmap at first, but
its *dynamic* mmap threshold rises to the size of the first such block freed,
and from then on those buffers are carved from the main heap and shrunk in
place; the small leftovers pin the heap, and the proxy's RSS crept up for as
long as it ran (see "Soak" in docs/performance.md). Fixing the threshold at
glibc's own initial value, 128 KiB, turns the dynamic adjustment off: every
large buffer gets its own mapping and goes back to the kernel when freed.

`tune_malloc` does that through `mallopt` at start-up, which is what
`MALLOC_MMAP_THRESHOLD_=131072` in the environment does; an operator's own
setting in the environment wins. Where the C library is not glibc (musl,
macOS) it does nothing; under an LD_PRELOADed jemalloc the call only sets up
glibc's allocator, which then goes unused.
"""

from __future__ import annotations

import ctypes
import os

#: mallopt's parameter number for the mmap threshold, from glibc's <malloc.h>.
M_MMAP_THRESHOLD = -3
#: glibc's default initial threshold; fixing it is what stops the dynamic adjustment.
MMAP_THRESHOLD = 128 * 1024


def tune_malloc() -> str:
    """Fix glibc's mmap threshold unless the environment already set one; say what was done.

    The result is the text of the one log line the caller writes.
    """
    if "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return "malloc: mmap threshold left to MALLOC_MMAP_THRESHOLD_ in the environment"
    if "glibc.malloc.mmap_threshold" in os.environ.get("GLIBC_TUNABLES", ""):
        return "malloc: mmap threshold left to GLIBC_TUNABLES in the environment"
    try:
        libc_version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError):
        libc_version = None
    if not libc_version:
        return "malloc: not glibc; left as it is"
    mallopt = ctypes.CDLL(None).mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    if mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        return f"malloc: {libc_version} refused mmap threshold {MMAP_THRESHOLD}; left as it is"
    return f"malloc: {libc_version} mmap threshold fixed at {MMAP_THRESHOLD} bytes (keeps the heap from fragmenting)"
