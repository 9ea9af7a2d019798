"""Turning parsed YAML into a `Config`, collecting every problem by its YAML path.

Validation collects every problem before failing, because an operator fixing a
file wants the whole list in one `check-config` run, not one error per attempt.
Each problem names its YAML path so it can be found in the file.

A little under 500 lines: the checks are small and alike, and the table that
maps every YAML key to its check (`_CONFIG`) reads best next to them (the
fleet's checks need the same section helpers, so they live here too).
"""

from __future__ import annotations

import difflib
import importlib.util
import ipaddress
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

from proxy.config.keys import merge_keys, resolve_key
from proxy.config.profiles import check_profiles, check_scheduling, key_of
from proxy.config.schema import (
    CLUSTER_DOWN_MODES,
    LOG_FORMATS,
    LOG_LEVELS,
    AccessConfig,
    AdminConfig,
    BackendConfig,
    ClusterConfig,
    Config,
    ConfigError,
    HealthConfig,
    HeartbeatConfig,
    IPNetwork,
    LimitsConfig,
    ListenConfig,
    LogConfig,
    MetricsConfig,
    RequestConfig,
    TimeoutsConfig,
    UpstreamConfig,
    empty_mapping,
)
from proxy.ollama.names import canonical_model
from proxy.units import kind_of, parse_duration, parse_size

# A check takes (value, yaml path, problems), returns the converted value and
# appends a line to `problems` for each thing wrong. Its return value is only
# used when `problems` stays empty, so a failing check may return anything.

_Check = Callable[[object, str, list[str]], Any]


class _Invalid(Exception):
    """Raised by a converter with the requirement the value failed."""


def show(value: object) -> str:
    """Render the offending value for a "(got X)" suffix, in YAML spelling.

    Containers are named by type: dumping a whole section into one line would
    bury the message.
    """
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, str):
        text = json.dumps(value, ensure_ascii=False)
        return text if len(text) <= 80 else text[:76] + '..."'
    if isinstance(value, int | float):
        return str(value)
    return kind_of(value)


def _join(path: str, key: object) -> str:
    name = key if isinstance(key, str) and key else show(key)
    return f"{path}.{name}" if path else name


def _scalar(convert: Callable[[object], Any]) -> _Check:
    """Turn a converter that raises `_Invalid(requirement)` into a check."""

    def check(value: object, path: str, problems: list[str]) -> Any:
        try:
            return convert(value)
        except _Invalid as err:
            problems.append(f"{path}: {err} (got {show(value)})")
            return None

    return check


def _integer(minimum: int, maximum: int | None = None) -> _Check:
    requirement = (
        f"must be an integer >= {minimum}"
        if maximum is None
        else f"must be an integer from {minimum} to {maximum}"
    )

    def convert(value: object) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Invalid(requirement)
        if value < minimum or (maximum is not None and value > maximum):
            raise _Invalid(requirement)
        return value

    return _scalar(convert)


def _duration(*, allow_zero: bool) -> _Check:
    requirement = (
        "must be a duration >= 0, such as 0, 30s or 2m"
        if allow_zero
        else "must be a duration > 0, such as 250ms, 30s, 5m or 1h"
    )

    def convert(value: object) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            raise _Invalid(requirement) from None
        if seconds == 0 and not allow_zero:
            raise _Invalid(requirement)
        return seconds

    return _scalar(convert)


def _to_size(value: object) -> int:
    requirement = "must be a size >= 1 byte, such as 1048576, 512KiB or 64MiB"
    try:
        size = parse_size(value)
    except ValueError:
        raise _Invalid(requirement) from None
    if size < 1:
        raise _Invalid(requirement)
    return size


def _to_host(value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Invalid("must be a non-empty string")
    return value


def _to_path(value: object) -> str:
    if not isinstance(value, str):
        raise _Invalid('must be a file path, or "" for none')
    return value


def _to_bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise _Invalid("must be true or false")
    return value


def _to_url(value: object) -> str:
    """Accept an http(s) base URL, optionally with a path prefix (Ollama behind
    another proxy), and drop one trailing slash so callers can append paths."""
    requirement = "must be an http:// or https:// URL with a host, such as http://127.0.0.1:11434"
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise _Invalid(requirement)
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 -- evaluated only to reject a malformed port
    except ValueError:
        raise _Invalid(requirement) from None
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise _Invalid(requirement)
    if "?" in value or "#" in value:
        raise _Invalid("must not have a query or fragment")
    return value.removesuffix("/")


def _to_redis_url(value: object) -> str:
    """ "" (no cluster), or a URL redis-py opens: redis://, rediss:// (TLS) or unix://."""
    requirement = 'must be "" or a URL such as redis://127.0.0.1:6379/0 (or rediss://, unix://)'
    if not isinstance(value, str) or any(c.isspace() for c in value):
        raise _Invalid(requirement)
    if value and urlsplit(value).scheme.lower() not in ("redis", "rediss", "unix"):
        raise _Invalid(requirement)
    return value


def _to_prefix(value: object) -> str:
    if not isinstance(value, str) or not value or any(c.isspace() or c == "*" for c in value):
        raise _Invalid("must be a non-empty name without spaces or *, such as oqp")
    return value


def _needs_redis_package(cluster: ClusterConfig, problems: list[str]) -> None:
    """`cluster.redis` set without redis-py: said here, so `check-config` and the start say it alike."""
    if cluster.redis and importlib.util.find_spec("redis") is None:
        problems.append(
            "cluster.redis: needs the redis package, which is not installed: "
            "pip install 'ollama-queue-proxy[redis]'"
        )


def _to_metrics_path(value: object) -> str:
    if not isinstance(value, str) or not value.startswith("/"):
        raise _Invalid('must be a path starting with "/"')
    if value.startswith("/-/"):
        raise _Invalid('must not be under "/-/", which holds the proxy\'s own endpoints')
    return value


def _check_models(value: object, path: str, problems: list[str]) -> Mapping[str, int]:
    """Per-model caps: each name checked on its own line so every bad entry shows.

    Names are compared as Ollama compares them (`names.canonical_model`):
    two spellings of one model would otherwise leave one cap silently unused.
    """
    if value is None:
        return empty_mapping()
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping of model name to cap (got {show(value)})")
        return empty_mapping()
    cap = _integer(1)
    models: dict[str, int] = {}
    spelled: dict[str, str] = {}
    for name, limit in value.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: model names must be non-empty strings (got {show(name)})")
            continue
        canonical = canonical_model(name)
        first = spelled.setdefault(canonical, name)
        if first != name:
            problems.append(
                f"{_join(path, name)}: the same model as {_join(path, first)} "
                f"(Ollama reads both as {canonical}); keep one cap"
            )
        models[name] = cap(limit, _join(path, name), problems)
    return MappingProxyType(models)


def _or_auto(check: _Check) -> _Check:
    """`check`, except that `auto` (or null) asks for the computed default."""

    def or_auto(value: object, path: str, problems: list[str]) -> Any:
        return None if value is None or value == "auto" else check(value, path, problems)

    return or_auto


def _choice(*options: str) -> _Check:
    def convert(value: object) -> str:
        if value not in options:
            raise _Invalid("must be one of " + ", ".join(options))
        return str(value)

    return _scalar(convert)


def _to_networks(value: object) -> tuple[IPNetwork, ...]:
    requirement = "must be a list of IP addresses or networks, such as [127.0.0.1, 10.0.0.0/8]"
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _Invalid(requirement)
    try:
        return tuple(ipaddress.ip_network(item.strip(), strict=False) for item in items)
    except ValueError:
        raise _Invalid(requirement) from None


def _to_origins(value: object) -> tuple[str, ...]:
    """Origins as a browser sends them in `Origin`, with at most one `*` (any run of characters)."""
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(item, str) for item in items):
        raise _Invalid('must be a list of origins, such as [default, "https://app.example.com"]')
    origins = []
    for item in items:
        origin = item.strip().lower()
        if origin not in ("default", "*", "null"):
            scheme, sep, rest = origin.partition("://")
            if not sep or not scheme or not rest or any(c.isspace() for c in origin) or origin.count("*") > 1:
                raise _Invalid(
                    f"{item!r} is not an origin: write scheme://host[:port] (one * may stand for any part), "
                    'or "default", "*" or "null"'
                )
            if "/" in rest or "?" in rest or "#" in rest:
                raise _Invalid(
                    f"{item!r} has a path: an origin is scheme://host[:port], with no trailing slash"
                )
        origins.append(origin)
    return tuple(origins)


def _check_keys(value: object, path: str, problems: list[str]) -> Mapping[str, str]:
    """`{name: key}`, or a plain list of keys named by their place (`keys[0]`)."""
    if value is None:
        return empty_mapping()
    if isinstance(value, list):
        entries = [(f"keys[{i}]", key, f"{path}[{i}]") for i, key in enumerate(value)]
    elif isinstance(value, dict):
        entries = [(name, key, _join(path, name)) for name, key in value.items()]
    else:
        problems.append(f"{path}: must be a mapping of name to key, or a list of keys (got {show(value)})")
        return empty_mapping()
    keys: dict[str, str] = {}
    for name, key, where in entries:
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: key names must be non-empty strings (got {show(name)})")
            continue
        if isinstance(key, dict):  # the long form: its other fields are checked by check_profiles
            key, where = key_of(key), f"{where}.key"
            if key is None:
                continue
        resolved = resolve_key(key, where, problems)
        if resolved is not None:
            keys[name] = resolved
    return MappingProxyType(keys)


def _spool_dir(request: RequestConfig, base: str, problems: list[str]) -> RequestConfig:
    """Resolve `request.spool_dir` from `base` and check now that files can be made there,
    rather than at the first large body."""
    path = os.path.join(base, request.spool_dir)
    if not os.path.isdir(path):
        problems.append(f"request.spool_dir: {path} is not a directory; create it or leave spool_dir empty")
    elif not os.access(path, os.W_OK | os.X_OK):
        problems.append(
            f"request.spool_dir: cannot create files in {path}; make it writable by the proxy's user"
        )
    return replace(request, spool_dir=path)


def _unknown_key(path: str, key: object, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(key), valid, n=1)
    hint = f"did you mean {close[0]}?" if close else f"valid keys: {', '.join(valid)}"
    return f"{_join(path, key)}: unknown key ({hint})"


def _section(cls: type, checks: dict[str, _Check]) -> _Check:
    """A check for a mapping whose keys are exactly `checks`; missing keys keep
    the dataclass default. An empty section (`limits:` with everything
    commented out) reads as null and means all defaults."""

    def check(value: object, path: str, problems: list[str]) -> Any:
        if value is None:
            return cls()
        if not isinstance(value, dict):
            problems.append(f"{path}: must be a mapping (got {show(value)})")
            return None
        fields = {}
        for key, item in value.items():
            key_check = checks.get(key) if isinstance(key, str) else None
            if key_check is None:
                problems.append(_unknown_key(path, key, list(checks)))
            else:
                fields[key] = key_check(item, _join(path, key), problems)
        return cls(**fields)

    return check


_port = _integer(0, 65535)
_host = _scalar(_to_host)
_backend = _section(
    BackendConfig, {"url": _scalar(_to_url), "max_concurrent": _integer(1), "models": _check_models}
)


def _check_backends(value: object, path: str, problems: list[str]) -> Mapping[str, BackendConfig]:
    """`{name: {url, max_concurrent, models}}`: each host's own limits, `max_concurrent` required
    (a host's capacity cannot be guessed, and a wrong guess overloads or idles a GPU)."""
    if value is None:
        return empty_mapping()
    if not isinstance(value, dict):
        problems.append(
            f"{path}: must be a mapping of backend name to {{url, max_concurrent, models}} (got {show(value)})"
        )
        return empty_mapping()
    backends: dict[str, BackendConfig] = {}
    urls: dict[str, str] = {}
    for name, entry in value.items():
        where = _join(path, name)
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: backend names must be non-empty strings (got {show(name)})")
            continue
        if isinstance(entry, dict) and "max_concurrent" not in entry:
            problems.append(f"{where}.max_concurrent: required: how many generations this host runs at once")
        if isinstance(entry, dict) and "url" not in entry:
            problems.append(f"{where}.url: required: the host's Ollama, such as http://10.0.0.5:11434")
        backend = _backend(entry, where, problems)
        if isinstance(backend, BackendConfig):
            first = urls.setdefault(backend.url, name)
            if first != name:
                problems.append(
                    f"{where}.url: the same host as {_join(path, first)} ({backend.url}); keep one"
                )
            backends[name] = backend
    return MappingProxyType(backends)


_CONFIG = _section(
    Config,
    {
        "listen": _section(
            ListenConfig,
            {
                "host": _host,
                "port": _port,
                "max_connections": _or_auto(_integer(1)),
                "trusted_proxies": _scalar(_to_networks),
            },
        ),
        "admin": _section(AdminConfig, {"host": _host, "port": _port}),
        "upstream": _section(UpstreamConfig, {"url": _scalar(_to_url)}),
        "limits": _section(
            LimitsConfig,
            {
                "max_concurrent": _integer(1),
                "max_queue": _integer(0),
                "queue_timeout": _duration(allow_zero=False),
                "models": _check_models,
            },
        ),
        "timeouts": _section(
            TimeoutsConfig,
            {
                "connect": _duration(allow_zero=False),
                "read": _duration(allow_zero=False),
                "generation": _duration(allow_zero=False),
                "write": _duration(allow_zero=False),
            },
        ),
        "heartbeat": _section(
            HeartbeatConfig,
            {"interval": _duration(allow_zero=False), "non_streaming": _scalar(_to_bool)},
        ),
        "request": _section(
            RequestConfig,
            {
                "max_body": _scalar(_to_size),
                "body_timeout": _duration(allow_zero=False),
                "max_header_size": _scalar(_to_size),
                "header_timeout": _duration(allow_zero=False),
                "spool_above": _scalar(_to_size),
                "spool_dir": _scalar(_to_path),
            },
        ),
        "metrics": _section(MetricsConfig, {"path": _scalar(_to_metrics_path)}),
        "log": _section(LogConfig, {"level": _choice(*LOG_LEVELS), "format": _choice(*LOG_FORMATS)}),
        "access": _section(
            AccessConfig,
            {
                "admin_endpoints": _choice("deny", "allow"),
                "keys": _check_keys,
                "keys_file": _scalar(_to_path),
                "max_queued_per_key": _integer(0),
                "cors_origins": _scalar(_to_origins),
            },
        ),
        "shutdown_grace": _duration(allow_zero=True),
        "health": _section(
            HealthConfig,
            {
                "interval": _duration(allow_zero=False),
                "timeout": _duration(allow_zero=False),
                "outage_grace": _duration(allow_zero=True),
                "unhealthy_after": _integer(1),
            },
        ),
        "scheduling": check_scheduling,
        "backends": _check_backends,
        "cluster": _section(
            ClusterConfig,
            {
                "redis": _scalar(_to_redis_url),
                "prefix": _scalar(_to_prefix),
                "lease": _duration(allow_zero=False),
                "on_redis_down": _choice(*CLUSTER_DOWN_MODES),
            },
        ),
    },
)

_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::"})


def _same_socket(config: Config) -> bool:
    """Whether admin would bind where listen does. A wildcard host overlaps
    every host on that port, and binding there would fail anyway."""
    listen, admin = config.listen, config.admin
    if listen is None or admin is None or None in (listen.host, listen.port, admin.host, admin.port):
        return False  # something here is invalid and already reported
    if admin.port == 0 or admin.port != listen.port:
        return False
    hosts = {listen.host, admin.host}
    return len(hosts) == 1 or bool(hosts & _WILDCARD_HOSTS)


def _fleet_limits(config: Config, data: dict[Any, Any], problems: list[str]) -> Config:
    """`upstream.url` or `backends`, not both; with backends, `limits.max_concurrent`
    defaults to the fleet's sum (a cap the fleet could not reach would idle its GPUs)."""
    if not config.backends or config.limits is None:
        return config
    upstream = data.get("upstream")
    if isinstance(upstream, dict) and "url" in upstream:
        problems.append(
            "upstream.url: give either upstream.url (one Ollama) or backends (several), not both; "
            "move this host under backends"
        )
    limits = data.get("limits")
    if isinstance(limits, dict) and limits.get("max_concurrent") is not None:
        return config
    total = sum(backend.max_concurrent or 0 for backend in config.backends.values())
    return replace(config, limits=replace(config.limits, max_concurrent=max(1, total)))


def config_from_dict(data: object, source: str = "config", base: str = ".") -> Config:
    """Validate parsed YAML into a `Config`, raising one `ConfigError` that
    lists every problem. `source` names the whole document (usually the file)
    in the one problem that has no YAML path: a top level that is not a mapping.
    A relative `access.keys_file` or `request.spool_dir` is found from `base` (the config file's folder).
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{source}: must be a mapping (got {show(data)})"])
    problems: list[str] = []
    config: Config = _CONFIG(data, "", problems)
    if config.access is not None:
        config = replace(config, access=merge_keys(config.access, base, problems))
        profiles = check_profiles(data.get("access") if data else None, problems)
        config = replace(config, access=replace(config.access, profiles=profiles))
    if config.request is not None and config.request.spool_dir:
        config = replace(config, request=_spool_dir(config.request, base, problems))
    if isinstance(data, dict):
        config = _fleet_limits(config, data, problems)
    if config.cluster is not None:
        _needs_redis_package(config.cluster, problems)
    if _same_socket(config):
        problems.append(
            f"admin.port: must differ from listen.port on the same host (got {config.admin.port})"
        )
    if problems:
        raise ConfigError(problems)
    return config
