"""`logs.setup` and `logs.reapply`: `log.level` and `log.format` for every log line of the process."""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest

from proxy.config import LogConfig
from proxy.observe import logs


@pytest.fixture
def fresh_logging() -> Iterator[None]:
    """`logs.setup` changes process-wide state; put it back."""
    root, library = logging.getLogger(), logging.getLogger("aiohttp")
    handlers, levels = list(root.handlers), (root.level, library.level)
    try:
        yield
    finally:
        root.handlers[:] = handlers
        root.setLevel(levels[0])
        library.setLevel(levels[1])


def test_setup_applies_level_and_format_and_reapply_changes_them(fresh_logging) -> None:
    out = io.StringIO()
    logs.setup(LogConfig(level="info", format="json"), out)
    logs.setup(LogConfig(level="info", format="json"), out)  # once installed, never twice
    logging.getLogger("proxy.test").info("hello %s", "there")
    logging.getLogger("proxy.test").debug("hidden")
    logging.getLogger("aiohttp.server").info("hidden")
    assert [json.loads(line)["message"] for line in out.getvalue().splitlines()] == ["hello there"]
    assert logging.getLogger("aiohttp").level == logging.WARNING

    out.truncate(0), out.seek(0)
    logs.reapply(LogConfig(level="error", format="text"))
    logging.getLogger("proxy.test").warning("hidden")
    logging.getLogger("aiohttp.server").warning("hidden")
    logging.getLogger("proxy.test").error("shown")
    assert re.fullmatch(r"\S+ \S+ ERROR proxy.test: shown\n", out.getvalue())

    logs.reapply(LogConfig(level="debug", format="text"))
    assert logging.getLogger("aiohttp").level == logging.DEBUG


def test_reapply_without_setup_changes_nothing(fresh_logging) -> None:
    root = logging.getLogger()
    before = (list(root.handlers), root.level)
    logs.reapply(LogConfig(level="error", format="json"))
    assert (list(root.handlers), root.level) == before
