"""Every metric in one registry.

Counters and histograms are derived from a finished request's `Exchange`, in
one call (`Metrics.observe`), so they agree with its access log line. Only what
happens while a request waits is counted as it goes (keep-alive frames, and a
failed connection after which the request kept its place), since the request
may wait for minutes yet. The gauges that describe the queue (depth, in flight, limit) are read
from the admission state at scrape time instead, so they are right at every
moment and cannot drift through a missed decrement.

A little over 400 lines because the contract's families (requests, queue,
tokens, fair share, backends, cluster) are declared here together, one place
for every name and label an operator's dashboard reads.
"""

from __future__ import annotations

from collections import Counter as CounterType
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import NamedTuple, Protocol, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from proxy.config import LimitsConfig
from proxy.errors import ProxyError, UpstreamError
from proxy.observe.exchange import DISCONNECTS, Exchange, Outcome, Phase
from proxy.ollama.names import canonical_model
from proxy.ollama.usage import Usage

#: Generations take minutes; the buckets must reach well past 300 s.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60,
    90, 120, 180, 240, 300, 450, 600, 900, 1800, 3600,
)  # fmt: skip
#: Generation speed in tokens per second: from a big model on a CPU to a small one on a fast GPU.
RATE_BUCKETS = (1, 2, 5, 10, 15, 20, 30, 40, 60, 80, 100, 150, 200, 300, 500)
TOKEN_KINDS = ("prompt", "completion")
#: Longer names (real ones are far shorter) count as "other": a label is bounded in size too.
MAX_MODEL_LABEL = 200


_Failure = TypeVar("_Failure", bound=ProxyError)


def _failures(root: type[_Failure]) -> Iterator[type[_Failure]]:
    """Every error class below `root`, in the order they are defined: a new one in `errors.py`
    gets its series at 0 without being listed again here."""
    for kind in root.__subclasses__():
        yield kind
        yield from _failures(kind)


#: Every reason the handler refuses a request with, from the error classes that carry it.
REJECT_REASONS = tuple(
    dict.fromkeys(failure.reason for failure in _failures(ProxyError) if failure.rejection)
)
#: Every kind of upstream failure, from the error classes that carry it.
UPSTREAM_ERROR_KINDS = tuple(dict.fromkeys(failure.kind for failure in _failures(UpstreamError)))


class QueueState(Protocol):
    """What the gauges need from admission (kept structural: metrics imports no stage)."""

    def running_by_model(self) -> CounterType[str]: ...
    def waiting_by_model(self) -> CounterType[str]: ...
    def oldest_wait(self) -> float: ...
    def waiting_by_priority(self) -> Mapping[str, int]: ...
    @property
    def max_concurrent(self) -> int: ...
    @property
    def limits(self) -> LimitsConfig: ...
    @property
    def caps(self) -> Mapping[str, int]: ...


class ConnectionCounts(Protocol):
    """What the connection gauges need from the listen port's cap."""

    open: int
    refused: int
    limit: int


class ModelLabels:
    """Bound the `model` label: a model has its own only when the config names it or upstream
    lists it; every other name is "other".

    So the label set is the operator's (config, `ollama pull`), never a client's: junk
    names cannot use up labels that real models need. A listed model keeps its label
    after upstream drops it, so its series do not vanish mid-graph.
    """

    def __init__(
        self, configured: Iterable[str], listed: Callable[[str], bool] = lambda model: False
    ) -> None:
        self.configured = frozenset(configured)
        self._listed = listed
        self._seen: set[str] = set()
        self._overflowed = False

    def configure(self, models: Iterable[str]) -> None:
        """Add models named by a reloaded config; a label once handed out stays valid."""
        self.configured |= frozenset(models)
        self._seen -= self.configured

    def __call__(self, model: str) -> str:
        if not model or model in self.configured or model in self._seen:
            return model
        # A length bound too: one long name would be copied into every per-model series.
        if len(model) <= MAX_MODEL_LABEL and self._listed(model):
            self._seen.add(model)
            return model
        self._overflowed = True
        return "other"

    def known(self) -> set[str]:
        """Every label handed out so far."""
        return self.configured | self._seen | ({"other"} if self._overflowed else set())


class Metrics:
    """The proxy's metrics, in a registry of their own (so tests can run many proxies)."""

    def __init__(
        self, configured_models: Iterable[str], listed: Callable[[str], bool] = lambda model: False
    ) -> None:
        """`listed` says whether upstream lists a (canonical) model name, for its label."""
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_label = ModelLabels(configured_models, listed)
        r = self.registry
        self.requests = Counter(
            "ollama_proxy_requests", "Requests answered, by endpoint, model and HTTP status "
            "(for failures reported in-band after a keep-alive 200: the status the error carries)",
            ["endpoint", "model", "code"], registry=r,
        )  # fmt: skip
        self.queue_wait = Histogram(
            "ollama_proxy_queue_wait_seconds", "Time from arrival to admission upstream",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.duration = Histogram(
            "ollama_proxy_request_duration_seconds", "Time from arrival to the last byte, queue included",
            ["endpoint", "model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.rejected = Counter(
            "ollama_proxy_rejected", "Requests refused by the proxy itself", ["reason"], registry=r
        )
        self.disconnects = Counter(
            "ollama_proxy_client_disconnects", "Clients that went away before their response ended",
            ["phase"], registry=r,
        )  # fmt: skip
        self.heartbeats = Counter(
            "ollama_proxy_heartbeats", "Keep-alive frames sent to waiting clients", registry=r
        )
        self.upstream_errors = Counter(
            "ollama_proxy_upstream_errors", "Upstream failures, by kind", ["kind"], registry=r
        )
        self.reloads = Counter(
            "ollama_proxy_config_reloads", "Config reloads, by result", ["result"], registry=r
        )
        self.key_requests = Counter(
            "ollama_proxy_key_requests", "Requests answered, by client key name (access.keys) and status",
            ["key", "code"], registry=r,
        )  # fmt: skip
        self.client_cost = Counter(
            "ollama_proxy_client_cost",
            "Cost charged to fair-share clients (tokens or requests, as scheduling.cost says), by key "
            "name with scheduling.fairness: key, else one label 'other'",
            ["client"], registry=r,
        )  # fmt: skip
        self.backend_requests = Counter(
            "ollama_proxy_backend_requests", "Requests sent to a backend (backends.NAME), by status",
            ["backend", "code"], registry=r,
        )  # fmt: skip
        # What the generations themselves reported (see usage.py).
        self.tokens = Counter(
            "ollama_proxy_tokens", "Tokens upstream reported: prompt (evaluated) and completion (generated)",
            ["model", "kind"], registry=r,
        )  # fmt: skip
        self.first_token = Histogram(
            "ollama_proxy_time_to_first_token_seconds",
            "Streamed generations: time from admission to the first body bytes from upstream "
            "(model load and prompt evaluation included, queue wait excluded)",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens_per_second = Histogram(
            "ollama_proxy_generation_tokens_per_second",
            "Generation speed upstream reported (eval_count / eval_duration; Ollama's native API only)",
            ["model"], buckets=RATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_load = Histogram(
            "ollama_proxy_model_load_seconds",
            "Ollama's load_duration per request: small for a model already loaded, long for a cold load",
            ["model"], buckets=DURATION_BUCKETS, registry=r,
        )  # fmt: skip
        # Known series start at 0, so rate() and alerts work before the first event.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for phase in Phase:
            self.disconnects.labels(phase)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        for result in ("success", "failure"):
            self.reloads.labels(result)
        self._start_token_series(self.model_label.configured)

    def configure(self, models: Iterable[str]) -> None:
        """Make the models of a reloaded config configured labels (names as written in the config)."""
        names = {canonical_model(name) for name in models}
        self.model_label.configure(names)
        self._start_token_series(names)

    def _start_token_series(self, models: Iterable[str]) -> None:
        for model in models:
            for kind in TOKEN_KINDS:
                self.tokens.labels(model, kind)

    def observe(self, ex: Exchange) -> None:
        """Count one finished request: everything but its keep-alive frames."""
        label = self.model_label(ex.model)
        self.requests.labels(ex.endpoint, label, str(ex.status)).inc()
        self.duration.labels(ex.endpoint, label).observe(ex.duration)
        if ex.client:  # a name from the config: the label set is bounded by it
            self.key_requests.labels(ex.client, str(ex.status)).inc()
        if ex.backend:  # a name from the config too
            self.backend_requests.labels(ex.backend, str(ex.status)).inc()
        if ex.outcome is Outcome.REJECTED:
            self.rejected.labels(ex.rejection).inc()
        elif ex.outcome in DISCONNECTS:
            self.disconnects.labels(ex.phase).inc()
        if ex.cost:
            self.client_cost.labels(ex.cost_label).inc(ex.cost)
        if ex.upstream_failure:
            self.upstream_errors.labels(ex.upstream_failure).inc()
        if ex.waited is not None:
            self.queue_wait.labels(label).observe(ex.waited)
        if ex.first_byte is not None:
            self.first_token.labels(label).observe(ex.first_byte)
        if (usage := ex.usage) is not None:
            self._observe_usage(label, usage)

    def requeued(self, kind: str) -> None:
        """Count at once the upstream failure (`UpstreamError.kind`) that sent an admitted request
        back to its place in the queue: during an outage it may wait up to `health.outage_grace`,
        and the connect errors must show (and alert) while it does."""
        self.upstream_errors.labels(kind).inc()

    def _observe_usage(self, label: str, usage: Usage) -> None:
        for kind, count in (("prompt", usage.prompt_tokens), ("completion", usage.completion_tokens)):
            if count:
                self.tokens.labels(label, kind).inc(count)
        if (rate := usage.tokens_per_second) is not None:
            self.tokens_per_second.labels(label).observe(rate)
        if usage.load_seconds is not None:
            self.model_load.labels(label).observe(usage.load_seconds)

    def watch(self, queue: QueueState) -> None:
        """Publish the queue gauges, read from `queue` at every scrape."""
        self.registry.register(_QueueCollector(queue, self.model_label))

    def watch_connections(self, connections: ConnectionCounts) -> None:
        """Publish the listen port's connection counts, read at every scrape."""
        self.registry.register(_ConnectionCollector(connections))

    def watch_upstream(self, up: Callable[[], bool | None]) -> None:
        """Publish whether upstream answers its probes, read at every scrape."""
        self.registry.register(_UpstreamCollector(up))

    def watch_backends(self, backends: Callable[[], Iterable[BackendGauges]]) -> None:
        """Publish each backend's health, slots held and limit, read at every scrape."""
        self.registry.register(_BackendCollector(backends))

    def watch_cluster(self, cluster: ClusterCounts) -> None:
        """Publish the shared ledger's state (`cluster.redis`), read at every scrape."""
        self.registry.register(_ClusterCollector(cluster))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _QueueCollector:
    def __init__(self, queue: QueueState, model_label: ModelLabels) -> None:
        self._queue = queue
        self._label = model_label

    def describe(self) -> list[Metric]:
        return []  # collected live; nothing to check at registration

    def collect(self) -> Iterator[Metric]:
        depth = GaugeMetricFamily("ollama_proxy_queue_depth", "Requests waiting for a slot", labels=["model"])
        in_flight = GaugeMetricFamily(
            "ollama_proxy_in_flight", "Requests holding a slot (running upstream)", labels=["model"]
        )
        for family, counts in (
            (depth, self._queue.waiting_by_model()),
            (in_flight, self._queue.running_by_model()),
        ):
            # Every model seen so far stays at 0 when idle rather than vanishing,
            # so graphs and sums see it drop (the label set is bounded anyway).
            by_label = dict.fromkeys(self._label.known(), 0)
            for model, n in counts.items():
                label = self._label(model)
                by_label[label] = by_label.get(label, 0) + n
            for label, n in sorted(by_label.items()):
                family.add_metric([label], n)
            yield family
        by_priority = GaugeMetricFamily(
            "ollama_proxy_queue_depth_by_priority",
            "Requests waiting for a slot, by priority",
            labels=["priority"],
        )
        for priority, n in self._queue.waiting_by_priority().items():
            by_priority.add_metric([priority], n)
        yield by_priority
        yield GaugeMetricFamily(
            "ollama_proxy_max_concurrent", "Global limit on requests running upstream",
            value=self._queue.max_concurrent,
        )  # fmt: skip
        yield GaugeMetricFamily(
            "ollama_proxy_max_queue", "Requests allowed to wait (limits.max_queue); the next gets 503",
            value=self._queue.limits.max_queue,
        )  # fmt: skip
        caps = GaugeMetricFamily(
            "ollama_proxy_queue_limit", "Per-model cap on requests running upstream (limits.models)",
            labels=["model"],
        )  # fmt: skip
        by_label = {self._label(model): cap for model, cap in self._queue.caps.items()}
        by_label.pop("other", None)  # a cap is one model's; past the label bound there is no name to show
        for label, cap in sorted(by_label.items()):
            caps.add_metric([label], cap)
        yield caps
        yield GaugeMetricFamily(
            "ollama_proxy_oldest_wait_seconds", "How long the request at the head of the queue has waited",
            value=self._queue.oldest_wait(),
        )  # fmt: skip


class ClusterCounts(Protocol):
    """What the metrics read of the ledger shared through Redis."""

    up: bool
    peers: int
    fallbacks: int


class _ClusterCollector:
    def __init__(self, cluster: ClusterCounts) -> None:
        self._cluster = cluster

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self._cluster
        yield GaugeMetricFamily(
            "ollama_proxy_cluster_up", "1 while Redis, which holds the shared slots, answers", value=int(c.up)
        )
        yield GaugeMetricFamily(
            "ollama_proxy_cluster_peers",
            "Proxies alive sharing the limits (this one included)",
            value=c.peers,
        )
        yield CounterMetricFamily(
            "ollama_proxy_cluster_fallbacks",
            "Times Redis became unreachable and this proxy fell back to cluster.on_redis_down",
            value=c.fallbacks,
        )


class _UpstreamCollector:
    def __init__(self, up: Callable[[], bool | None]) -> None:
        self._up = up

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "ollama_proxy_upstream_up",
            "1 while upstream answers its health probes (or has not been probed yet), 0 during an outage",
            value=0 if self._up() is False else 1,
        )


class BackendGauges(NamedTuple):
    """One backend at scrape time."""

    name: str
    up: bool
    in_flight: int
    max_concurrent: int


class _BackendCollector:
    def __init__(self, backends: Callable[[], Iterable[BackendGauges]]) -> None:
        self._backends = backends

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily(
            "ollama_proxy_backend_up",
            "1 while the backend is in rotation (not yet probed counts), 0 once health.unhealthy_after "
            "failures in a row took it out",
            labels=["backend"],
        )
        in_flight = GaugeMetricFamily(
            "ollama_proxy_backend_in_flight", "Requests holding a slot on the backend", labels=["backend"]
        )
        most = GaugeMetricFamily(
            "ollama_proxy_backend_max_concurrent", "The backend's own limit (backends.NAME.max_concurrent)",
            labels=["backend"],
        )  # fmt: skip
        for backend in self._backends():
            up.add_metric([backend.name], 1 if backend.up else 0)
            in_flight.add_metric([backend.name], backend.in_flight)
            most.add_metric([backend.name], backend.max_concurrent)
        yield from (up, in_flight, most)


class _ConnectionCollector:
    def __init__(self, connections: ConnectionCounts) -> None:
        self._connections = connections

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        c = self._connections
        yield GaugeMetricFamily(
            "ollama_proxy_connections", "Client connections open on the listen port", value=c.open
        )
        yield GaugeMetricFamily(
            "ollama_proxy_max_connections",
            "Cap on client connections (listen.max_connections)",
            value=c.limit,
        )
        yield CounterMetricFamily(
            "ollama_proxy_connections_refused",
            "Connections refused with 503 because listen.max_connections were open",
            value=c.refused,
        )
