"""What a configuration is: frozen dataclasses whose defaults are the documented defaults.

Everything downstream receives a frozen, fully validated `Config`, so no other
module ever has to wonder whether a value is present, of the right type or in
range. Nothing here reads files or YAML: `validate` builds these from parsed
YAML, `load` reads the file.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

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


def empty_mapping() -> Mapping[str, Any]:
    # A factory because dataclasses refuse an unhashable default, and a
    # read-only view so a shared Config cannot be changed behind its owner's back.
    return MappingProxyType({})


@dataclass(frozen=True, slots=True)
class BackendConfig:
    """One Ollama host of a fleet (`backends.NAME`): where it is and what it may run at once.

    `max_concurrent` has no default in YAML (a host's capacity cannot be guessed);
    `models` caps single models on this host, below its own `max_concurrent`.
    """

    url: str = "http://127.0.0.1:11434"
    max_concurrent: int = 1
    models: Mapping[str, int] = field(default_factory=empty_mapping)


#: The name of the one backend that `upstream.url` alone stands for.
DEFAULT_BACKEND = "default"


@dataclass(frozen=True, slots=True)
class LimitsConfig:
    """Admission limits; `models` caps individual models below the global limit."""

    max_concurrent: int = 3
    max_queue: int = 100
    queue_timeout: float = 600.0
    models: Mapping[str, int] = field(default_factory=empty_mapping)


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
    #: Consecutive failures (a probe, or a connect error on a real request) that take a backend out.
    unhealthy_after: int = 2


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


PRIORITIES = ("high", "normal", "low")
FAIRNESS_MODES = ("key", "ip", "none")  # and "header:NAME"
COSTS = ("tokens", "requests")


@dataclass(frozen=True, slots=True)
class KeyProfile:
    """How one key's requests are scheduled: the long form of an `access.keys` entry."""

    priority: str = "normal"
    #: Its share of the slots within its priority, against other clients' weights.
    weight: float = 1.0
    #: Requests it may have waiting; None follows `access.max_queued_per_key`.
    max_queued: int | None = None
    #: Its requests running at once; 0 means no cap of its own.
    max_running: int = 0


@dataclass(frozen=True, slots=True)
class SchedulingConfig:
    """Who goes first: strict priorities, and a fair share within each by tokens or requests."""

    #: key, ip, header:NAME or none: who shares the slots fairly.
    fairness: str = "key"
    cost: str = "tokens"
    #: A request may lower its own priority with this header; "" ignores it.
    priority_header: str = "X-Priority"


@dataclass(frozen=True, slots=True)
class AccessConfig:
    """Who may use the listen port, and for what.

    `keys` maps a key's name (what logs and metrics show) to the key itself;
    it holds the inline keys and those read from `keys_file`, so the rest of
    the proxy never reads files or the environment. Never in a repr.
    """

    admin_endpoints: str = "deny"
    keys: Mapping[str, str] = field(default_factory=empty_mapping, repr=False)
    keys_file: str = ""
    max_queued_per_key: int = 0
    #: Scheduling settings of the keys given in the long form, by key name (the others: defaults).
    profiles: Mapping[str, KeyProfile] = field(default_factory=empty_mapping)
    #: Browser origins allowed to call: "default" (Ollama's own list), "*", "null", or scheme://host[:port].
    cors_origins: tuple[str, ...] = ("default",)


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    """Where Prometheus scrapes, on the admin port."""

    path: str = "/metrics"


CLUSTER_DOWN_MODES = ("local", "refuse")


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """Several proxies sharing one set of limits through Redis (docs/cluster.md); "" keeps them here."""

    redis: str = ""
    #: Key prefix, so several fleets can share one Redis.
    prefix: str = "oqp"
    #: A running request's hold on a shared slot, renewed every lease/3: a dead proxy's slots return after it.
    lease: float = 15.0
    #: Redis unreachable: "local" serves on with this proxy's share of each limit; "refuse" answers 503.
    on_redis_down: str = "local"


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
    scheduling: SchedulingConfig = field(default_factory=SchedulingConfig)
    #: Several Ollama hosts by name; empty means the one host of `upstream.url` (see `fleet`).
    backends: Mapping[str, BackendConfig] = field(default_factory=empty_mapping)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)

    @property
    def fleet(self) -> Mapping[str, BackendConfig]:
        """The backends in force, in config order: `backends`, or else one named `default`
        at `upstream.url` that may run everything `limits` allows."""
        if self.backends:
            return self.backends
        url, limits = self.upstream.url, self.limits
        return MappingProxyType({DEFAULT_BACKEND: BackendConfig(url, limits.max_concurrent)})

    @property
    def max_connections(self) -> int:
        """The connection cap in force: `listen.max_connections`, or if unset, one that
        follows the limits, so raising `limits.max_queue` alone lets that many clients
        wait (a fixed cap below it would refuse them with 503 before they could queue)."""
        if self.listen.max_connections is not None:
            return self.listen.max_connections
        return self.limits.max_queue + self.limits.max_concurrent + CONNECTION_HEADROOM


class ConfigError(Exception):
    """A config that cannot be used, with every reason at once.

    `problems` holds one line per problem ("yaml.path: what is wrong (got X)")
    so the CLI and the reload logger can print them as they are.
    """

    problems: list[str]

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


#: What is bound when the listeners start, as YAML paths: a reload keeps the running value
#: and says that the change needs a restart. Declared here, at the bottom of the house,
#: so that the reloader and the listener that binds these values read one list.
RESTART_ONLY_KEYS: tuple[str, ...] = (
    "listen",
    "admin",
    "metrics",
    "request.max_header_size",
    "request.header_timeout",
    "cluster",
)
