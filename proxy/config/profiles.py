"""The scheduling part of a config: `scheduling.*`, and the long form of `access.keys` entries.

Kept apart from `validate` (which holds the table of every other key) because
a long-form key entry is read twice: `validate` takes its `key` like a short
entry's, and this module its scheduling fields, so `AccessConfig.keys` keeps
its plain name -> key shape for everything that authenticates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType

from proxy.config.schema import COSTS, FAIRNESS_MODES, PRIORITIES, KeyProfile, SchedulingConfig
from proxy.units import kind_of

_PROFILE_FIELDS = ("key", "priority", "weight", "max_queued", "max_running")
_HEADER_NAME = frozenset("!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")


def key_of(entry: object) -> object:
    """The key of an `access.keys` entry, short (the key itself) or long (`{key: ...}`)."""
    return entry.get("key") if isinstance(entry, dict) else entry


def _count(value: object, path: str, problems: list[str]) -> int | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        problems.append(f"{path}: must be a whole number, 0 or more (got {value!r})")
        return None
    return value


def _profile(entry: dict[object, object], path: str, problems: list[str]) -> KeyProfile:
    fields: dict[str, object] = {}
    for name, value in entry.items():
        where = f"{path}.{name}"
        if name not in _PROFILE_FIELDS:
            problems.append(f"{where}: unknown key (valid keys: {', '.join(_PROFILE_FIELDS)})")
        elif name == "priority":
            if value not in PRIORITIES:
                problems.append(f"{where}: must be one of {', '.join(PRIORITIES)} (got {value!r})")
            else:
                fields["priority"] = value
        elif name == "weight":
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            if not ok or not math.isfinite(value) or value <= 0:  # type: ignore[arg-type]
                problems.append(f"{where}: must be a number above 0, such as 1 or 2.5 (got {value!r})")
            else:
                fields["weight"] = float(value)  # type: ignore[arg-type]
        elif name in ("max_queued", "max_running"):
            fields[name] = _count(value, where, problems)
    if "key" not in entry:
        problems.append(f"{path}.key: missing; a long-form entry needs its key (key: sk-...)")
    return KeyProfile(**fields)  # type: ignore[arg-type]


def check_profiles(access: object, problems: list[str]) -> Mapping[str, KeyProfile]:
    """The long-form entries of raw `access.keys`, by key name (their `key` is checked by `validate`)."""
    keys = access.get("keys") if isinstance(access, dict) else None
    if not isinstance(keys, dict):
        return MappingProxyType({})
    profiles = {
        name: _profile(entry, f"access.keys.{name}", problems)
        for name, entry in keys.items()
        if isinstance(entry, dict)
    }
    return MappingProxyType(profiles)  # type: ignore[arg-type]


def check_scheduling(value: object, path: str, problems: list[str]) -> SchedulingConfig:
    """`scheduling`: fairness, cost and priority_header, every problem by its YAML path."""
    if value is None:
        return SchedulingConfig()
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping (got {kind_of(value)})")
        return SchedulingConfig()
    fields: dict[str, str] = {}
    for name, item in value.items():
        where = f"{path}.{name}"
        if name == "fairness":
            header = isinstance(item, str) and item.startswith("header:")
            name_ok = header and item[7:] and set(item[7:]) <= _HEADER_NAME  # type: ignore[index]
            if item in FAIRNESS_MODES or name_ok:
                fields["fairness"] = item  # type: ignore[assignment]
            else:
                problems.append(
                    f"{where}: must be one of key, ip, none, or header:NAME such as header:X-User-Id (got {item!r})"
                )
        elif name == "cost":
            if item in COSTS:
                fields["cost"] = item  # type: ignore[assignment]
            else:
                problems.append(f"{where}: must be one of {', '.join(COSTS)} (got {item!r})")
        elif name == "priority_header":
            if item is None or item == "":
                fields["priority_header"] = ""
            elif isinstance(item, str) and set(item) <= _HEADER_NAME:
                fields["priority_header"] = item
            else:
                problems.append(f'{where}: must be a header name such as X-Priority, or "" (got {item!r})')
        else:
            problems.append(f"{where}: unknown key (valid keys: fairness, cost, priority_header)")
    return SchedulingConfig(**fields)
