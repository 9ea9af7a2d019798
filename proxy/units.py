"""Durations, sizes and counts as operators read and write them: parsed from
config.yaml, spelled back the same way in every message and log line."""

from __future__ import annotations

import math
import re

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}  # "ms" divides instead, see below
_DURATION_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*(ms|s|m|h)?", re.IGNORECASE)
_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
}
_SIZE_RE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]i?b|b)?", re.IGNORECASE)
_DURATION_FORMS = "a number of seconds or a string such as 250ms, 30s, 5m or 1h"
_SIZE_FORMS = "a number of bytes or a string such as 512KiB or 64MiB"


def parse_duration(value: object) -> float:
    """Return a duration in seconds from a number of seconds or a string such
    as "250ms", "30s", "5m", "1h" (a bare number string means seconds).

    Bools are refused although Python treats them as ints: `timeout: yes` is a
    mistake, not one second.
    """
    if isinstance(value, bool):
        raise ValueError(f"a duration must be {_DURATION_FORMS}, not a boolean")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int too large for a float
            raise ValueError("a duration must be finite") from None
    elif isinstance(value, str):
        match = _DURATION_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a duration; use {_DURATION_FORMS}")
        number, unit = match.groups()
        if unit is None:
            seconds = float(number)
        elif unit.lower() == "ms":
            seconds = float(number) / 1000  # division keeps "250ms" exactly 0.25
        else:
            seconds = float(number) * _DURATION_UNITS[unit.lower()]
    else:
        raise ValueError(f"a duration must be {_DURATION_FORMS}, not {kind_of(value)}")
    if not math.isfinite(seconds):
        raise ValueError("a duration must be finite")
    if seconds < 0:
        raise ValueError("a duration must not be negative")
    return seconds


def parse_size(value: object) -> int:
    """Return a size in bytes from a number of bytes or a string such as
    "512KiB", "64MiB", "1GiB", "500KB" (units are case-insensitive; KB/MB/GB
    are powers of 1000, KiB/MiB/GiB powers of 1024).

    Fractional strings ("1.5GiB") are rounded to the nearest byte; a bare
    fractional number is refused because a byte count is whole.
    """
    if isinstance(value, bool):
        raise ValueError(f"a size must be {_SIZE_FORMS}, not a boolean")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        match = _SIZE_RE.fullmatch(value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a size; use {_SIZE_FORMS}")
        number, unit = match.groups()
        size = round(float(number) * _SIZE_UNITS[(unit or "b").lower()])
    else:
        raise ValueError(f"a size must be {_SIZE_FORMS}, not {kind_of(value)}")
    if size < 0:
        raise ValueError("a size must not be negative")
    return size


def kind_of(value: object) -> str:
    """Name a YAML value's type the way YAML users would."""
    if value is None:
        return "null"
    if isinstance(value, dict):
        return "mapping"
    if isinstance(value, list):
        return "list"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, str):
        return "string"
    return type(value).__name__


def format_duration(seconds: float) -> str:
    """Spell a duration the way it would be written in config.yaml."""

    def number(x: float) -> str:
        return f"{x:.3f}".rstrip("0").rstrip(".")

    if seconds and seconds % 3600 == 0:
        return f"{number(seconds / 3600)}h"
    if seconds and seconds % 60 == 0:
        return f"{number(seconds / 60)}m"
    if seconds == 0 or seconds >= 1:
        return f"{number(seconds)}s"
    return f"{number(seconds * 1000)}ms"


_SIZE_DISPLAY = (
    ("GiB", 1024**3),
    ("MiB", 1024**2),
    ("KiB", 1024),
    ("GB", 1000**3),
    ("MB", 1000**2),
    ("KB", 1000),
)


def format_size(size: int) -> str:
    """The largest unit that divides the size exactly, so nothing is rounded away."""
    for unit, factor in _SIZE_DISPLAY:
        if size % factor == 0:
            return f"{size // factor} {unit}"
    return f"{size} B"


def counted(count: int, noun: str, plural: str = "") -> str:
    """`count` and `noun`, the noun plural unless the count is one: "1 request", "3 requests".

    `plural` is for nouns that do not just add an "s" ("1 entry", "2 entries").
    """
    return f"{count} {noun if count == 1 else plural or noun + 's'}"
