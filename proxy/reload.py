"""Changing the running config: SIGHUP, POST /-/reload and `--watch` all end in `Reloader.reload`.

A reload never half-applies: the new file is read and validated whole, and on
any problem the running config stays and every problem is logged. What is bound
when the listeners start (`RESTART_ONLY_KEYS`) keeps its running value and is
reported. The reloader does not know the parts that follow the config: its
`ConfigTarget` (the server, which owns them) applies a new config in one call.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import resource
from collections.abc import Coroutine
from typing import Literal, Protocol

from proxy.config import (
    RESTART_ONLY_KEYS,
    Config,
    ConfigError,
    FileStamp,
    config_warnings,
    load_config,
    stamp,
)

log = logging.getLogger("proxy")

#: How often `--watch` looks at the config file.
WATCH_INTERVAL = 1.0
#: File descriptors the process needs besides its connections: logs, the listeners, the upstream pool.
FD_RESERVE = 64

ReloadResult = Literal["success", "failure"]


class ConfigTarget(Protocol):
    """What a reload changes: the owner of the parts that follow the config."""

    @property
    def config(self) -> Config:
        """The config in force."""
        ...

    def apply(self, config: Config) -> None:
        """Put a validated config into effect, all parts at once."""
        ...

    def count_reload(self, result: ReloadResult) -> None:
        """Count one reload attempt (the `config_reloads_total` metric)."""
        ...


class Reloader:
    """Re-reads one config file on request, and with `watch` whenever it changes on disk."""

    def __init__(
        self,
        target: ConfigTarget,
        path: str | os.PathLike[str] | None,
        read_at: FileStamp | None = None,
    ) -> None:
        """`read_at` is the stamp of the file when the running config was read from it
        (`read_config`): `watch` compares against it, so a change written after that
        read is seen however late the watch starts. Without it, the file as it is
        when this reloader is made is the baseline."""
        self._target = target
        self._path = path
        self._read_at = read_at if read_at is not None or path is None else stamp(path)

    def reload(self) -> list[str]:
        """Re-read the config file; on any problem keep the old config and say why.

        Limits apply at once (waiting requests keep their place); timeouts,
        heartbeat, upstream and keys apply to requests that arrive from now on.
        What is bound when the listeners start is kept and reported.
        """
        if self._path is None:
            return ["no config file to reload (the proxy was started without one)"]
        try:
            new = load_config(self._path)
        except ConfigError as err:
            self._target.count_reload("failure")
            for problem in err.problems:
                log.error("reload failed, keeping the running config: %s", problem)
            return err.problems
        new, kept = keep_restart_only_keys(self._target.config, new)
        for key in kept:
            log.warning("reload: %s changed; it takes effect only after a restart", key)
        self._target.apply(new)
        self._target.count_reload("success")
        log.info(
            "config reloaded: max_concurrent=%d max_queue=%d models=%s",
            new.limits.max_concurrent, new.limits.max_queue, dict(new.limits.models) or "{}",
        )  # fmt: skip
        log_config_warnings(new)
        return []

    def watch(self, interval: float = WATCH_INTERVAL) -> Coroutine[None, None, None]:
        """Reload whenever the config file changes on disk (`--watch`).

        Polls the file's stat rather than using inotify: no dependency, works on
        every filesystem, and an editor's write-and-rename is seen as one change.
        The baseline is the file as it was read, so nothing written since is missed.
        """
        assert self._path is not None, "watch needs a config file"
        return self._watch(self._path, self._read_at, interval)

    async def _watch(self, path: str | os.PathLike[str], last: FileStamp | None, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            now = stamp(path)
            if now is None or now == last:
                continue  # missing for a moment while an editor replaces it
            last = now
            log.info("config file changed on disk: reloading %s", os.fspath(path))
            self.reload()


def keep_restart_only_keys(old: Config, new: Config) -> tuple[Config, list[str]]:
    """`new` with the values bound at start put back, and the names of those that differed."""
    kept: list[str] = []
    for key in RESTART_ONLY_KEYS:
        section, _, name = key.partition(".")
        if _value(new, key) == _value(old, key):
            continue
        kept.append(key)
        if name:
            inner = dataclasses.replace(getattr(new, section), **{name: _value(old, key)})
            new = dataclasses.replace(new, **{section: inner})
        else:
            new = dataclasses.replace(new, **{section: getattr(old, section)})
    return new, kept


def _value(config: Config, key: str) -> object:
    value: object = config
    for name in key.split("."):
        value = getattr(value, name)
    return value


def log_config_warnings(config: Config) -> None:
    """What `check-config` warns about, logged when a config takes effect (at start and
    on every reload), and whether this process may open enough files for the connection
    cap (which `check-config`, run from another shell, cannot know)."""
    for warning in config_warnings(config):
        log.warning("config: %s", warning)
    # Each running request holds two sockets (client, upstream); the rest, a few files.
    needed = 2 * config.max_connections + FD_RESERVE
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "config: listen.max_connections: %d connections need about %d file descriptors, and this "
            "process may open %d (ulimit -n): past that, accepting fails; raise LimitNOFILE "
            "or lower listen.max_connections",
            config.max_connections, needed, soft,
        )  # fmt: skip
