"""The proxy's configuration: the only place that reads YAML.

Everything downstream receives a frozen, fully validated `Config`, so no other
module ever has to wonder whether a value is present, of the right type or in
range. Validation collects every problem before failing, because an operator
fixing a file wants the whole list in one `check-config` run, not one error per
attempt. Each problem names its YAML path so it can be found in the file.
"""

from __future__ import annotations

import difflib
import ipaddress
import json
import os
import re
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.ollama.names import canonical_model
from proxy.units import format_duration, format_size, kind_of, parse_duration, parse_size

__all__ = [
    "AdminConfig",
    "Config",
    "ConfigError",
    "HealthConfig",
    "HeartbeatConfig",
    "LimitsConfig",
    "ListenConfig",
    "MetricsConfig",
    "RESTART_ONLY",
    "RequestConfig",
    "TimeoutsConfig",
    "UpstreamConfig",
    "config_from_dict",
    "config_warnings",
    "load_config",
    "summary",
]


IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

#: Connections beyond the admitted and waiting ones that the default `listen.max_connections`
#: leaves room for: relayed requests (/api/tags, /api/ps), idle keep-alive connections, probes.
CONNECTION_HEADROOM = 1024
#: Cloudflare ends a proxied request that has been silent this long (its 524).
CLOUDFLARE_IDLE_TIMEOUT = 100.0


def _loopback() -> tuple[IPNetwork, ...]:
    return (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass(frozen=True, slots=True)
class ListenConfig:
    """Where apps and the tunnel connect."""

    host: str = "127.0.0.1"
    port: int = 11435
    #: Client connections open at once; the next one is refused before its request is read.
    #: None (`auto` in YAML): room for every admitted and waiting request plus headroom
    #: (`Config.max_connections`).
    max_connections: int | None = None
    #: Peers (cloudflared, a load balancer) whose CF-Connecting-IP / X-Forwarded-For name the client.
    trusted_proxies: tuple[IPNetwork, ...] = field(default_factory=_loopback)


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """Where /metrics and /-/* are served: kept off the listen port so that a
    tunnel pointed at `listen` cannot expose them."""

    host: str = "127.0.0.1"
    port: int = 11436


@dataclass(frozen=True, slots=True)
class UpstreamConfig:
    """The Ollama server; stored without a trailing slash so paths can be
    appended directly."""

    url: str = "http://127.0.0.1:11434"


def _empty_mapping() -> Mapping[str, Any]:
    # A factory because dataclasses refuse an unhashable default, and a
    # read-only view so a shared Config cannot be changed behind its owner's back.
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Admission limits; `models` caps individual models below the global limit."""

    max_concurrent: int = 3
    max_queue: int = 100
    queue_timeout: float = 600.0
    models: Mapping[str, int] = field(default_factory=_empty_mapping)


@dataclass(frozen=True, slots=True)
class TimeoutsConfig:
    """Timeouts in seconds: upstream's, and how long a client may leave our writes unread."""

    connect: float = 10.0
    #: Longest silence between a streamed answer's chunks (and before its headers).
    read: float = 300.0
    #: A non-streamed answer is silent until it is whole, so it gets a bound on its whole time instead.
    generation: float = 1800.0
    #: A client whose TCP window stays full this long is cut off, so its slot (and the GPU) go free.
    write: float = 60.0


@dataclass(frozen=True, slots=True)
class HeartbeatConfig:
    """How often a waiting client hears from the proxy, in seconds."""

    interval: float = 15.0
    non_streaming: bool = True


@dataclass(frozen=True, slots=True)
class HealthConfig:
    """How the proxy watches upstream, and how long waiting requests wait out an outage (seconds)."""

    #: Period of the background probe (/api/version, /api/tags).
    interval: float = 5.0
    #: One probe's bound: a probe that takes longer counts as upstream down.
    timeout: float = 2.0
    #: While upstream is unreachable, waiting requests keep their place this long; then 503.
    outage_grace: float = 30.0


@dataclass(frozen=True, slots=True)
class RequestConfig:
    """How request bodies and headers are bounded, and where large bodies wait."""

    max_body: int = 64 * 1024 * 1024
    #: The whole body must arrive within this; a trickling client is cut off before it queues.
    body_timeout: float = 60.0
    #: The request line and each header line; longer ones get 400 (aiohttp's own limit is 8190).
    max_header_size: int = 8 * 1024
    #: Before the headers are complete; an idle keep-alive connection has the same bound.
    header_timeout: float = 10.0
    #: A larger body waits for its slot in a private temporary file, not in the process's memory.
    spool_above: int = 256 * 1024
    #: Where spooled bodies go; "" is the system's temporary directory ($TMPDIR, else /tmp).
    spool_dir: str = ""


LOG_LEVELS = ("debug", "info", "warning", "error")
LOG_FORMATS = ("text", "json")


@dataclass(frozen=True, slots=True)
class LogConfig:
    """How the proxy logs: one line per event, as text or JSON (for log shippers)."""

    level: str = "info"
    format: str = "text"


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may use the listen port, and for what.

    `keys` maps a key's name (what logs and metrics show) to the key itself;
    it holds the inline keys and those read from `keys_file`, so the rest of
    the proxy never reads files or the environment. Never in a repr.
    """

    admin_endpoints: str = "deny"
    keys: Mapping[str, str] = field(default_factory=_empty_mapping, repr=False)
    keys_file: str = ""
    max_queued_per_key: int = 0
    #: Browser origins allowed to call: "default" (Ollama's own list), "*", "null", or scheme://host[:port].
    cors_origins: tuple[str, ...] = ("default",)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where Prometheus scrapes, on the admin port."""

    path: str = "/metrics"


@dataclass(frozen=True, slots=True)
class Config:
    """The whole effective configuration; `Config()` is the documented default."""

    listen: ListenConfig = field(default_factory=ListenConfig)
    admin: AdminConfig = field(default_factory=AdminConfig)
    upstream: UpstreamConfig = field(default_factory=UpstreamConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    timeouts: TimeoutsConfig = field(default_factory=TimeoutsConfig)
    heartbeat: HeartbeatConfig = field(default_factory=HeartbeatConfig)
    request: RequestConfig = field(default_factory=RequestConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    log: LogConfig = field(default_factory=LogConfig)
    access: AccessConfig = field(default_factory=AccessConfig)
    shutdown_grace: float = 30.0
    health: HealthConfig = field(default_factory=HealthConfig)

    @property
    def max_connections(self) -> int:
        """The connection cap in force: `listen.max_connections`, or if unset, one that
        follows the limits, so raising `limits.max_queue` alone lets that many clients
        wait (a fixed cap below it would refuse them with 503 before they could queue)."""
        if self.listen.max_connections is not None:
            return self.listen.max_connections
        return self.limits.max_queue + self.limits.max_concurrent + CONNECTION_HEADROOM


#: What is bound when the listeners start, so a reload keeps the running value and warns: whole
#: sections, or `section.field`. The request keys are the listen port's parser limits
#: (`edge.listener.handler_options`), given to aiohttp once; a test holds the two together.
RESTART_ONLY: tuple[str, ...] = (
    "listen",
    "admin",
    "metrics",
    "request.max_header_size",
    "request.header_timeout",
)


class ConfigError(Exception):
    """A config that cannot be used, with every reason at once.

    `problems` holds one line per problem ("yaml.path: what is wrong (got X)")
    so the CLI and the reload logger can print them as they are.
    """

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


# --- Validation -------------------------------------------------------------
#
# A check takes (value, yaml path, problems), returns the converted value and
# appends a line to `problems` for each thing wrong. Its return value is only
# used when `problems` stays empty, so a failing check may return anything.

_Check = Callable[[object, str, list[str]], Any]


class _Invalid(Exception):
    """Raised by a converter with the requirement the value failed."""


def _show(value: object) -> str:
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
    name = key if isinstance(key, str) and key else _show(key)
    return f"{path}.{name}" if path else name


def _scalar(convert: Callable[[object], Any]) -> _Check:
    """Turn a converter that raises `_Invalid(requirement)` into a check."""

    def check(value: object, path: str, problems: list[str]) -> Any:
        try:
            return convert(value)
        except _Invalid as err:
            problems.append(f"{path}: {err} (got {_show(value)})")
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
        return _empty_mapping()
    if not isinstance(value, dict):
        problems.append(f"{path}: must be a mapping of model name to cap (got {_show(value)})")
        return _empty_mapping()
    cap = _integer(1)
    models: dict[str, int] = {}
    spelled: dict[str, str] = {}
    for name, limit in value.items():
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: model names must be non-empty strings (got {_show(name)})")
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


_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
#: What an `Authorization: Bearer` token may hold (RFC 6750's b64token).
_KEY_SHAPE = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


def _resolve_key(value: object, path: str, problems: list[str]) -> str | None:
    """A key, with a whole-value `${VAR}` reference read from the environment,
    so secrets can stay out of the file."""
    if not isinstance(value, str) or not value:
        problems.append(f"{path}: must be a non-empty string (got {kind_of(value)})")
        return None
    reference = _ENV_REFERENCE.fullmatch(value)
    if reference:
        value = os.environ.get(reference.group(1), "")
        if not value:
            problems.append(f"{path}: environment variable {reference.group(1)} is not set or empty")
            return None
    if not _KEY_SHAPE.fullmatch(value):
        # Never echo the key itself: the message ends up in logs.
        problems.append(f"{path}: a key may hold only letters, digits and -._~+/ (and trailing =)")
        return None
    return value


def _check_keys(value: object, path: str, problems: list[str]) -> Mapping[str, str]:
    """`{name: key}`, or a plain list of keys named by their place (`keys[0]`)."""
    if value is None:
        return _empty_mapping()
    if isinstance(value, list):
        entries = [(f"keys[{i}]", key, f"{path}[{i}]") for i, key in enumerate(value)]
    elif isinstance(value, dict):
        entries = [(name, key, _join(path, name)) for name, key in value.items()]
    else:
        problems.append(f"{path}: must be a mapping of name to key, or a list of keys (got {_show(value)})")
        return _empty_mapping()
    keys: dict[str, str] = {}
    for name, key, where in entries:
        if not isinstance(name, str) or not name.strip():
            problems.append(f"{path}: key names must be non-empty strings (got {_show(name)})")
            continue
        resolved = _resolve_key(key, where, problems)
        if resolved is not None:
            keys[name] = resolved
    return MappingProxyType(keys)


def _read_keys_file(path: str, problems: list[str]) -> dict[str, str]:
    """One key per line, optionally preceded by its name (`alice KEY`); `#` starts a comment."""
    where = "access.keys_file"
    try:
        with open(path, encoding="utf-8") as file:
            lines = file.read().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        problems.append(f"{where}: cannot read {path}: {reason}")
        return {}
    keys: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) > 2:
            problems.append(f"{where}: {path} line {number}: expected KEY or NAME KEY")
            continue
        name = fields[0] if len(fields) == 2 else f"{os.path.basename(path)}:{number}"
        resolved = _resolve_key(fields[-1], f"{where}: {path} line {number}", problems)
        if resolved is not None:
            keys[name] = resolved
    return keys


def _merge_keys(access: AccessConfig, base: str, problems: list[str]) -> AccessConfig:
    """Add the keys file to the inline keys; a name or key given twice is a mistake."""
    keys = dict(access.keys)
    if access.keys_file:
        for name, key in _read_keys_file(os.path.join(base, access.keys_file), problems).items():
            if name in keys:
                problems.append(f"access.keys_file: the name {name!r} is also used in access.keys")
            keys[name] = key
    if len(set(keys.values())) != len(keys):
        problems.append("access.keys: two names share one key; give every client its own key")
    return replace(access, keys=MappingProxyType(keys))


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
            problems.append(f"{path}: must be a mapping (got {_show(value)})")
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


def config_from_dict(data: object, source: str = "config", base: str = ".") -> Config:
    """Validate parsed YAML into a `Config`, raising one `ConfigError` that
    lists every problem. `source` names the whole document (usually the file)
    in the one problem that has no YAML path: a top level that is not a mapping.
    A relative `access.keys_file` or `request.spool_dir` is found from `base` (the config file's folder).
    """
    if data is not None and not isinstance(data, dict):
        raise ConfigError([f"{source}: must be a mapping (got {_show(data)})"])
    problems: list[str] = []
    config: Config = _CONFIG(data, "", problems)
    if config.access is not None:
        config = replace(config, access=_merge_keys(config.access, base, problems))
    if config.request is not None and config.request.spool_dir:
        config = replace(config, request=_spool_dir(config.request, base, problems))
    if _same_socket(config):
        problems.append(
            f"admin.port: must differ from listen.port on the same host (got {config.admin.port})"
        )
    if problems:
        raise ConfigError(problems)
    return config


def config_warnings(config: Config) -> list[str]:
    """Settings that are valid but will not do what the operator meant, one line each,
    naming the keys. `check-config` prints them (and still exits 0); the proxy logs
    them at start and on every reload."""
    warnings: list[str] = []
    limits, listen = config.limits, config.listen
    wanted = limits.max_queue + limits.max_concurrent
    if listen.max_connections is not None and listen.max_connections < wanted:
        warnings.append(
            f"listen.max_connections: {listen.max_connections} is below limits.max_queue + "
            f"limits.max_concurrent ({limits.max_queue} + {limits.max_concurrent} = {wanted}): "
            f"past {listen.max_connections} connections clients get 503 before they can queue; "
            f"raise it to at least {wanted} or remove it to follow the limits"
        )
    if config.heartbeat.interval >= CLOUDFLARE_IDLE_TIMEOUT:
        warnings.append(
            f"heartbeat.interval: {format_duration(config.heartbeat.interval)} is at or above "
            f"Cloudflare's {format_duration(CLOUDFLARE_IDLE_TIMEOUT)} idle timeout: behind a "
            "Cloudflare tunnel a waiting client is cut off with 524; use 15s to 90s"
        )
    return warnings


# --- Reading the file -------------------------------------------------------


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys: plain YAML keeps the last one
    silently, so a second `limits:` block would quietly discard the first."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` may legitimately repeat keys it overrides
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark)
            except TypeError:
                continue  # unhashable key: SafeLoader reports it below
            if first is not key_node.start_mark:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {_show(key)} (first at line {first.line + 1})",
                    key_node.start_mark,
                )
        return super().construct_mapping(node, deep=deep)


def _yaml_problem(err: Exception) -> str:
    """One line for a YAML failure: PyYAML's own message spans several lines
    and quotes the source, which would break the one-line-per-problem output."""
    if isinstance(err, yaml.MarkedYAMLError):
        mark = err.problem_mark or err.context_mark
        if mark is not None:
            reason = err.problem or err.context
            return f"invalid YAML at line {mark.line + 1}, column {mark.column + 1}: {reason}"
    return "invalid YAML: " + " ".join(str(err).split())


def load_config(path: str | os.PathLike[str]) -> Config:
    """Read and validate a config file. Every failure, including a missing or
    unreadable file, is a `ConfigError` with a line the CLI can print as is, so
    an operator never sees a traceback for a config mistake."""
    name = os.fspath(path)
    try:
        with open(path, "rb") as file:
            raw = file.read()
    except FileNotFoundError:
        raise ConfigError([f"{name}: no such file; create it or pass --config PATH"]) from None
    except IsADirectoryError:
        raise ConfigError([f"{name}: is a directory, not a config file"]) from None
    except OSError as err:
        raise ConfigError([f"{name}: cannot read: {err.strerror or err}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise ConfigError([f"{name}: not UTF-8 text (bad byte on line {line})"]) from None
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 -- a SafeLoader subclass
    except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. a date like 2024-13-45
        raise ConfigError([f"{name}: {_yaml_problem(err)}"]) from None
    return config_from_dict(data, source=name, base=os.path.dirname(os.path.abspath(name)))


# --- Summary ----------------------------------------------------------------


def _format_address(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"{shown}:{port}" if port else f"{shown}:0 (any free port)"


def _describe_max_connections(config: Config) -> str:
    if config.listen.max_connections is not None:
        return str(config.max_connections)
    return f"{config.max_connections} (limits.max_queue + limits.max_concurrent + {CONNECTION_HEADROOM})"


def describe_spool_dir(spool_dir: str, mounts: str = "/proc/mounts") -> str:
    """The directory, and a warning when it is in RAM: spooled bodies would then cost memory
    after all (a tmpfs /tmp is common; `TMPDIR=/var/tmp` or a spool_dir on disk avoids it)."""
    path = spool_dir or tempfile.gettempdir()
    shown = path if spool_dir else f"{path} (the system's)"
    try:
        with open(mounts, encoding="utf-8") as file:
            table = [line.split() for line in file]
    except OSError:
        return shown  # not Linux: no mount table to read
    real = os.path.realpath(path)
    points = [(row[1], row[2]) for row in table if len(row) > 2]
    inside = [
        (point, kind) for point, kind in points if real == point or real.startswith(point.rstrip("/") + "/")
    ]
    if inside and max(inside, key=lambda found: len(found[0]))[1] in ("tmpfs", "ramfs"):
        return f"{shown}; WARNING: a tmpfs, so spooled bodies stay in RAM: set request.spool_dir to a disk"
    return shown


def _describe_keys(access: AccessConfig) -> str:
    if not access.keys:
        return "none (no authentication on the listen port)"
    per_key = f", at most {access.max_queued_per_key} waiting per key" if access.max_queued_per_key else ""
    return f"{len(access.keys)} ({', '.join(access.keys)}){per_key}"


def _describe_origins(origins: tuple[str, ...]) -> str:
    if not origins:
        return "none (every cross-origin browser request gets 403)"
    if "*" in origins:
        return "* (any origin)"
    ollamas = "default (Ollama's own: localhost, 127.0.0.1 and 0.0.0.0 on any port, app, file, tauri, vscode)"
    return ", ".join(ollamas if origin == "default" else origin for origin in origins)


def _describe_grace(grace: float) -> str:
    if not grace:
        return "0s (no waiting: 502 when upstream cannot be reached, 503 while it is down)"
    return f"{format_duration(grace)} (waiting requests wait for an unreachable upstream, then 503)"


def summary(config: Config) -> str:
    """The effective limits, one per line and labelled by YAML path, so what
    `check-config` prints can be matched against the file at a glance."""
    limits = config.limits
    queue = f"{limits.max_queue} waiting, then 503" if limits.max_queue else "0 (503 when all slots are busy)"
    non_streaming = "true" if config.heartbeat.non_streaming else "false (streaming requests only)"
    admin = _format_address(config.admin.host, config.admin.port)
    rows = [
        ("listen", _format_address(config.listen.host, config.listen.port)),
        ("listen.max_connections", _describe_max_connections(config)),
        ("admin", f"{admin}  ({config.metrics.path} and /-/*)"),
        ("upstream.url", config.upstream.url),
        ("limits.max_concurrent", f"{limits.max_concurrent} generation requests at once"),
        ("limits.max_queue", queue),
        ("limits.queue_timeout", format_duration(limits.queue_timeout)),
    ]
    if limits.models:
        rows += [(f"limits.models.{name}", f"{cap} at once") for name, cap in limits.models.items()]
    else:
        rows.append(("limits.models", "none (only the global limit)"))
    rows += [
        ("timeouts.connect", format_duration(config.timeouts.connect)),
        ("timeouts.read", format_duration(config.timeouts.read)),
        ("timeouts.generation", f"{format_duration(config.timeouts.generation)} per non-streaming answer"),
        ("timeouts.write", format_duration(config.timeouts.write)),
        ("heartbeat.interval", format_duration(config.heartbeat.interval)),
        ("heartbeat.non_streaming", non_streaming),
        ("request.max_body", format_size(config.request.max_body)),
        ("request.body_timeout", format_duration(config.request.body_timeout)),
        (
            "request.spool_above",
            f"{format_size(config.request.spool_above)} (larger bodies wait in a file in "
            f"request.spool_dir {describe_spool_dir(config.request.spool_dir)})",
        ),
        ("log", f"{config.log.format}, level {config.log.level}"),
        ("access.admin_endpoints", config.access.admin_endpoints),
        ("access.keys", _describe_keys(config.access)),
        ("access.cors_origins", _describe_origins(config.access.cors_origins)),
        ("shutdown_grace", format_duration(config.shutdown_grace)),
        (
            "health",
            f"probe every {format_duration(config.health.interval)} (timeout "
            f"{format_duration(config.health.timeout)}); outage_grace {_describe_grace(config.health.outage_grace)}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in rows)
