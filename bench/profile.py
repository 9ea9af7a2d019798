"""Read py-spy's raw (collapsed) stacks: where the proxy's CPU time goes, in percent.

Three views of one profile: self time per function; inclusive time of the
proxy's own functions; and each sample put in one bucket (the first frame from
the leaf up that belongs to a bucket decides), which says what a change to
the proxy could save at most.
"""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LINE_NO = re.compile(r":\d+\)$")
#: Frames under every sample: they say nothing.
_ENTRY = frozenset({"proxy/__main__.py", "proxy/cli.py", "bench/uvloop_proxy.py"})
#: (bucket, function-name prefixes, file prefixes); checked in order for each frame.
BUCKETS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("waiting in epoll", ("EpollSelector.select",), ()),
    ("socket send (transport.write)", ("_SelectorSocketTransport.write",), ()),
    ("socket receive", ("_SelectorSocketTransport._read_ready",), ()),
    ("logging (access log and others)", (), ("logging/", "aiohttp/web_log.py")),
    ("prometheus_client", (), ("prometheus_client/",)),
    ("aiohttp client (upstream request/response)", (), ("aiohttp/client", "aiohttp/connector.py")),
    (
        "aiohttp streams and payloads",
        (),
        ("aiohttp/streams.py", "aiohttp/payload.py", "aiohttp/http_writer.py"),
    ),
    ("aiohttp server (parse, dispatch, respond)", (), ("aiohttp/",)),
    ("multidict/yarl (headers, URLs)", (), ("multidict/", "yarl/")),
    ("proxy code itself", (), ("proxy/",)),
    ("asyncio (tasks, timers, loop)", (), ("asyncio/", "selectors.py")),
)


def _parse(raw: str) -> tuple[str, str]:
    """`func (pkg/file.py:123)` -> (`func`, `pkg/file.py`)."""
    name, _, where = raw.partition(" (")
    return name, _LINE_NO.sub("", where).rstrip(")")


def _bucket(name: str, path: str) -> str | None:
    for bucket, names, paths in BUCKETS:
        if name.startswith(names) if names else path.startswith(paths):
            return bucket
    return None


def summary(path: Path, top: int = 12) -> str:
    own: Counter[str] = Counter()
    ours: Counter[str] = Counter()
    buckets: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = [_parse(f) for f in stack.split(";") if f]
        n = int(count)
        samples += n
        if frames:
            name, where = frames[-1]
            own[f"{name} ({where})"] += n
        for name, where in {f for f in frames if f[1].startswith("proxy/") and f[1] not in _ENTRY}:
            ours[f"{name} ({where})"] += n
        buckets[next((b for f in reversed(frames) if (b := _bucket(*f))), "other")] += n
    if not samples:
        return "  (no samples)"
    lines = [f"  {samples} samples. By bucket:"]
    lines += [f"    {n / samples:6.1%}  {name}" for name, n in buckets.most_common()]
    lines.append("  Self time, top functions:")
    lines += [f"    {n / samples:6.1%}  {name}" for name, n in own.most_common(top)]
    lines.append("  Inclusive time of the proxy's functions:")
    lines += [f"    {n / samples:6.1%}  {name}" for name, n in ours.most_common(top)]
    return "\n".join(lines)
