"""Where the proxy's log lines go and what they look like: `log.level` and `log.format`.

One handler on the root logger, writing to stderr (journald, Docker and systemd
collect it from there), so every logger of the process, ours and the
libraries', comes out in one format. `setup` installs it when `serve` starts;
`reapply` changes level and format in place on a reload, and does nothing in a
process that never called `setup` (tests that run a `Server` in-process keep
pytest's own logging untouched).

A record may carry two extras, used by the access log: `log_line`, a function
that makes the whole text line from the record's time as text (so that the line
is only built when it is written as text), and `log_fields`, top-level fields of
the JSON object.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import TextIO

from proxy.config import LogConfig

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
#: aiohttp's loggers are chatty below WARNING; only `log.level: debug` lets that through.
_LIBRARY_LOGGERS = ("aiohttp",)


#: The most of one client-controlled field (a model name, a path) that a log line shows.
FIELD_CHARS = 200


def clip(text: str, limit: int = FIELD_CHARS) -> str:
    """`text` cut to `limit` characters, with how much was cut: `abc…(+1048376 bytes)`.

    Every client-controlled field on its way to a log line goes through here, so
    a 1 MB model name costs the log 200 characters, not a megabyte per line.
    The count is in UTF-8 bytes, as the client sent them.
    """
    if len(text) <= limit:
        return text
    cut = len(text[limit:].encode("utf-8", "surrogatepass"))
    return f"{text[:limit]}\u2026(+{cut} bytes)"


class IsoTime:
    """RFC 3339 UTC with milliseconds, e.g. 2026-11-24T09:01:02.123Z: sorts as text, parses everywhere.

    Each formatter owns one: it remembers the last second it wrote, since most
    lines share their second with the one before.
    """

    def __init__(self) -> None:
        self._second: datetime | None = None
        self._prefix = ""

    def __call__(self, seconds: float) -> str:
        moment = datetime.fromtimestamp(seconds, UTC)
        whole = moment.replace(microsecond=0)
        if whole != self._second:
            self._second, self._prefix = whole, whole.strftime("%Y-%m-%dT%H:%M:%S.")
        return f"{self._prefix}{moment.microsecond // 1000:03d}Z"


class TextFormatter(logging.Formatter):
    """The classic one-line format; a record with its own `log_line` is written as that line."""

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)
        self._time = IsoTime()

    def format(self, record: logging.LogRecord) -> str:
        line = getattr(record, "log_line", None)
        if callable(line):
            return str(line(self._time(record.created)))
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, then the record's `log_fields`.

    ASCII-only, so a client-controlled value (a path, a model name) can neither
    break the line nor smuggle terminal escapes into the log.
    """

    def __init__(self) -> None:
        super().__init__()
        self._time = IsoTime()

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": self._time(record.created),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "log_fields", None)
        if isinstance(fields, dict):
            entry.update(fields)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, separators=(",", ":"))


class _ProxyHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Marks the handler `setup` installed, so `reapply` finds it and a second `setup` replaces nothing."""


def setup(config: LogConfig, stream: TextIO | None = None) -> None:
    """Send every log record of the process to `stream` (stderr) as `config` says."""
    root = logging.getLogger()
    if _installed() is None:
        root.addHandler(_ProxyHandler(stream or sys.stderr))
    reapply(config)


def reapply(config: LogConfig) -> None:
    """Apply a reloaded `log` section; a no-op unless `setup` ran in this process."""
    handler = _installed()
    if handler is None:
        return
    level = _LEVELS[config.level]
    handler.setFormatter(JsonFormatter() if config.format == "json" else TextFormatter())
    logging.getLogger().setLevel(level)
    for name in _LIBRARY_LOGGERS:
        logging.getLogger(name).setLevel(level if level == logging.DEBUG else max(level, logging.WARNING))


def _installed() -> _ProxyHandler | None:
    return next((h for h in logging.getLogger().handlers if isinstance(h, _ProxyHandler)), None)
