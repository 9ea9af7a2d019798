"""The fleet as one Ollama: listings merged from every healthy backend, and where the
other relayed paths go.

`GET /api/tags`, `/api/ps` and `/v1/models` answer the union of the healthy
backends' answers, one entry per model name (as Ollama compares names), the first
backend in config order winning; a backend that fails to answer is left out, and
when none answers the request is relayed as it was, so the client sees upstream's
own error.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import aiohttp

from proxy.ollama.names import canonical_model

#: Path -> (the list's key, the entry's name field).
MERGED = {"/api/tags": ("models", "name"), "/api/ps": ("models", "name"), "/v1/models": ("data", "id")}


async def merged(
    session: aiohttp.ClientSession, urls: Sequence[str], path: str, timeout: float
) -> dict[str, Any] | None:
    """The union of `path`'s answers from `urls`, each read within `timeout`; None if none answered."""
    key, field = MERGED[path]
    answers = await asyncio.gather(*(_read(session, url + path, timeout) for url in urls))
    base: dict[str, Any] | None = None
    entries: dict[str, object] = {}
    for data in answers:
        if not isinstance(data, dict) or not isinstance(data.get(key), list):
            continue
        base = dict(data) if base is None else base
        for entry in data[key]:
            name = entry.get(field) if isinstance(entry, dict) else None
            if isinstance(name, str):
                entries.setdefault(canonical_model(name), entry)
    if base is not None:
        base[key] = list(entries.values())
    return base


async def _read(session: aiohttp.ClientSession, url: str, timeout: float) -> object:
    try:
        async with asyncio.timeout(timeout):
            async with session.get(url) as resp:
                return await resp.json(content_type=None) if resp.status == 200 else None
    except (TimeoutError, aiohttp.ClientError, OSError, ValueError):
        return None


def shown_model(body: bytes) -> str | None:
    """The model a `POST /api/show` body names (`model`, or the older `name`), canonical."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    name = (data.get("model") or data.get("name")) if isinstance(data, dict) else None
    return canonical_model(name) if isinstance(name, str) and name else None
