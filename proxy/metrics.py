"""Every metric in one registry.

Counters and histograms are bumped where events happen; the gauges that
describe the queue (depth, in flight, limit) are read from the admission state
at scrape time instead, so they are right at every moment and cannot drift
through a missed decrement.
"""

from __future__ import annotations

from collections import Counter as CounterType
from collections.abc import Iterable, Iterator
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, Metric

from .exchange import Exchange

#: Generations take minutes; the buckets must reach well past 300 s.
DURATION_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60,
    90, 120, 180, 240, 300, 450, 600, 900, 1800, 3600,
)  # fmt: skip
#: Distinct model names a client can create as labels before the rest become "other".
EXTRA_MODEL_LABELS = 50

REJECT_REASONS = (
    "queue_full", "queue_timeout", "bad_request", "too_large",
    "body_timeout", "unauthorized", "forbidden", "key_queue_full", "draining",
)  # fmt: skip
DISCONNECT_PHASES = ("queued", "running")
UPSTREAM_ERROR_KINDS = ("connect", "timeout", "reset", "status")


class QueueState(Protocol):
    """What the gauges need from admission (kept structural: metrics imports no stage)."""

    def running_by_model(self) -> CounterType[str]: ...
    def waiting_by_model(self) -> CounterType[str]: ...
    @property
    def max_concurrent(self) -> int: ...


class ModelLabels:
    """Bound the `model` label: configured models, then the first 50 others, then "other"."""

    def __init__(self, configured: Iterable[str], extra: int = EXTRA_MODEL_LABELS) -> None:
        self.configured = frozenset(configured)
        self._seen: set[str] = set()
        self._extra = extra
        self._overflowed = False

    def __call__(self, model: str) -> str:
        if not model or model in self.configured or model in self._seen:
            return model
        if len(self._seen) < self._extra:
            self._seen.add(model)
            return model
        self._overflowed = True
        return "other"

    def known(self) -> set[str]:
        """Every label handed out so far."""
        return self.configured | self._seen | ({"other"} if self._overflowed else set())


class Metrics:
    """The proxy's metrics, in a registry of their own (so tests can run many proxies)."""

    def __init__(self, configured_models: Iterable[str]) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.model_label = ModelLabels(configured_models)
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
        # Known series start at 0, so rate() and alerts work before the first event.
        for reason in REJECT_REASONS:
            self.rejected.labels(reason)
        for phase in DISCONNECT_PHASES:
            self.disconnects.labels(phase)
        for kind in UPSTREAM_ERROR_KINDS:
            self.upstream_errors.labels(kind)
        for result in ("success", "failure"):
            self.reloads.labels(result)

    def observe(self, ex: Exchange) -> None:
        """Count one finished request."""
        label = self.model_label(ex.model)
        self.requests.labels(ex.endpoint, label, str(ex.status)).inc()
        self.duration.labels(ex.endpoint, label).observe(ex.duration)

    def watch(self, queue: QueueState) -> None:
        """Publish the queue gauges, read from `queue` at every scrape."""
        self.registry.register(_QueueCollector(queue, self.model_label))

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
        yield GaugeMetricFamily(
            "ollama_proxy_max_concurrent", "Global limit on requests running upstream",
            value=self._queue.max_concurrent,
        )  # fmt: skip
