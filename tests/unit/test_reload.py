"""Tests for proxy.reload: what a reload keeps, and that `--watch` misses no change."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from proxy.config import RESTART_ONLY_KEYS, Config, config_from_dict, read_config
from proxy.reload import Reloader, ReloadResult, keep_restart_only_keys


class RecordingTarget:
    """A `ConfigTarget` that records what a reload applies and counts, and says when it applied."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.results: list[ReloadResult] = []
        self.applied = asyncio.Event()

    def apply(self, config: Config) -> None:
        self.config = config
        self.applied.set()

    def count_reload(self, result: ReloadResult) -> None:
        self.results.append(result)


def write_config(path: Path, **limits: object) -> Path:
    path.write_text(json.dumps({"limits": limits}), encoding="utf-8")
    return path


async def watch_until_applied(reloader: Reloader, target: RecordingTarget) -> None:
    watcher = asyncio.create_task(reloader.watch(interval=0.01))
    try:
        async with asyncio.timeout(10):
            await target.applied.wait()
    finally:
        watcher.cancel()
        await asyncio.gather(watcher, return_exceptions=True)


async def test_watch_sees_a_change_written_between_the_read_and_the_start_of_the_watch(tmp_path) -> None:
    """The window that made `--watch` miss a change on a loaded machine: the baseline used to
    be the file's stat when the watch started, after the load, so a change written in
    between was taken as the baseline and never reloaded."""
    path = write_config(tmp_path / "config.yaml", max_concurrent=2)
    config, read_at = read_config(path)
    # In the window, deterministically: after the read, before the reloader or its watch exist.
    # (A different size, so the change shows even within the filesystem's clock tick.)
    write_config(path, max_concurrent=12)
    target = RecordingTarget(config)
    reloader = Reloader(target, path, read_at)

    await watch_until_applied(reloader, target)

    assert target.config.limits.max_concurrent == 12
    assert target.results == ["success"]


async def test_watch_reloads_a_change_after_a_failed_one(tmp_path) -> None:
    path = write_config(tmp_path / "config.yaml", max_concurrent=2)
    config, read_at = read_config(path)
    target = RecordingTarget(config)
    reloader = Reloader(target, path, read_at)
    path.write_text("limits: [broken", encoding="utf-8")
    assert reloader.reload() != []
    write_config(path, max_concurrent=3)

    await watch_until_applied(reloader, target)

    assert target.config.limits.max_concurrent == 3
    assert target.results[0] == "failure"


def test_reload_without_a_file_says_so_and_counts_nothing() -> None:
    target = RecordingTarget(Config())
    assert Reloader(target, None).reload() == ["no config file to reload (the proxy was started without one)"]
    assert target.results == []


def test_restart_only_keys_keep_their_running_values_and_are_named() -> None:
    old = Config()
    new = config_from_dict(
        {
            "listen": {"port": 1},
            "metrics": {"path": "/m"},
            "request": {"header_timeout": "1s", "max_body": 1024},
            "limits": {"max_concurrent": 9},
        }
    )
    kept, names = keep_restart_only_keys(old, new)
    assert names == ["listen", "metrics", "request.header_timeout"]
    assert (kept.listen, kept.metrics, kept.request.header_timeout) == (old.listen, old.metrics, 10.0)
    assert (kept.request.max_body, kept.limits.max_concurrent) == (1024, 9)  # reloadable: applied


def test_every_restart_only_key_names_a_field() -> None:
    for key in RESTART_ONLY_KEYS:
        value: object = Config()
        for name in key.split("."):
            value = getattr(value, name)
