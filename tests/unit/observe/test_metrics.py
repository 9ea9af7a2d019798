"""Metrics from hand-built exchanges: every series a finished request moves, and the bounded
`model` label (configured, listed upstream, too long, other, reloaded)."""

from __future__ import annotations

import pytest

from proxy.errors import (
    BadRequest,
    ModelNotFound,
    QueueFull,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from proxy.observe.exchange import Outcome, Phase
from proxy.observe.metrics import MAX_MODEL_LABEL, REJECT_REASONS, UPSTREAM_ERROR_KINDS, Metrics, ModelLabels
from proxy.ollama.usage import Usage
from tests.support.exchanges import exchange


def value(metrics: Metrics, name: str, **labels: str) -> float:
    found = metrics.registry.get_sample_value(name, labels)
    return 0.0 if found is None else found


# --- ModelLabels -----------------------------------------------------------------


def test_a_configured_model_has_its_own_label_and_others_are_other() -> None:
    labels = ModelLabels({"llama3:latest"})
    assert labels("llama3:latest") == "llama3:latest"
    assert labels("") == ""
    assert labels.known() == {"llama3:latest"}
    assert labels("junk-from-a-client:latest") == "other"
    assert labels.known() == {"llama3:latest", "other"}


def test_a_model_upstream_lists_gets_a_label_and_keeps_it_after_upstream_drops_it() -> None:
    listed = {"qwen3:8b"}
    labels = ModelLabels((), listed.__contains__)
    assert labels("qwen3:8b") == "qwen3:8b"
    listed.clear()
    assert labels("qwen3:8b") == "qwen3:8b"  # its series do not vanish mid-graph
    assert labels.known() == {"qwen3:8b"}


def test_a_listed_name_past_the_length_bound_is_other() -> None:
    long_name = "m" * (MAX_MODEL_LABEL + 1)
    labels = ModelLabels((), lambda model: True)
    assert labels(long_name) == "other"
    assert labels("m" * MAX_MODEL_LABEL) == "m" * MAX_MODEL_LABEL


def test_a_reload_adds_configured_models_and_keeps_labels_handed_out() -> None:
    labels = ModelLabels({"a:latest"}, {"b:latest"}.__contains__)
    assert labels("b:latest") == "b:latest"
    labels.configure({"c:latest", "b:latest"})
    assert labels("c:latest") == "c:latest"
    assert labels("a:latest") == "a:latest"  # a label once handed out stays valid
    assert labels.known() == {"a:latest", "b:latest", "c:latest"}


def test_metrics_configure_reads_names_as_ollama_does_and_starts_their_token_series() -> None:
    metrics = Metrics(())
    metrics.configure({"Big": 1})
    assert metrics.model_label("big:latest") == "big:latest"
    assert (
        metrics.registry.get_sample_value(
            "ollama_proxy_tokens_total", {"model": "big:latest", "kind": "prompt"}
        )
        == 0
    )


# --- series at 0 ---------------------------------------------------------------


def test_known_series_start_at_zero() -> None:
    metrics = Metrics(("llama3:latest",))
    for reason in REJECT_REASONS:
        assert metrics.registry.get_sample_value("ollama_proxy_rejected_total", {"reason": reason}) == 0
    for kind in UPSTREAM_ERROR_KINDS:
        assert metrics.registry.get_sample_value("ollama_proxy_upstream_errors_total", {"kind": kind}) == 0
    for phase in ("queued", "running"):
        assert (
            metrics.registry.get_sample_value("ollama_proxy_client_disconnects_total", {"phase": phase}) == 0
        )


def test_reasons_and_kinds_are_the_error_classes_own() -> None:
    assert set(REJECT_REASONS) == {
        "queue_full", "queue_timeout", "bad_request", "too_large", "body_timeout", "unauthorized",
        "forbidden", "key_queue_full", "draining", "spool_failed", "upstream_down", "model_not_found",
        "cluster_down",
    }  # fmt: skip
    assert UPSTREAM_ERROR_KINDS == ("connect", "timeout", "reset", "status")


# --- Metrics.observe --------------------------------------------------------------


def test_a_generation_that_went_well() -> None:
    metrics = Metrics(("llama3:latest",))
    usage = Usage(prompt_tokens=26, completion_tokens=300, eval_seconds=10.0, load_seconds=2.5)
    metrics.observe(exchange(usage=usage, first_byte=0.75, duration=20.0))
    model = {"model": "llama3:latest"}
    assert value(metrics, "ollama_proxy_requests_total", endpoint="/api/chat", code="200", **model) == 1
    assert value(metrics, "ollama_proxy_request_duration_seconds_sum", endpoint="/api/chat", **model) == 20.0
    assert value(metrics, "ollama_proxy_key_requests_total", key="alice", code="200") == 1
    assert value(metrics, "ollama_proxy_queue_wait_seconds_sum", **model) == pytest.approx(12.3451)
    assert value(metrics, "ollama_proxy_time_to_first_token_seconds_sum", **model) == 0.75
    assert value(metrics, "ollama_proxy_tokens_total", kind="prompt", **model) == 26
    assert value(metrics, "ollama_proxy_tokens_total", kind="completion", **model) == 300
    assert value(metrics, "ollama_proxy_generation_tokens_per_second_sum", **model) == 30.0
    assert value(metrics, "ollama_proxy_model_load_seconds_sum", **model) == 2.5
    assert sum(value(metrics, "ollama_proxy_rejected_total", reason=r) for r in REJECT_REASONS) == 0
    assert (
        sum(value(metrics, "ollama_proxy_upstream_errors_total", kind=k) for k in UPSTREAM_ERROR_KINDS) == 0
    )


def test_what_a_request_did_not_reach_is_not_observed() -> None:
    metrics = Metrics(("llama3:latest",))
    metrics.observe(exchange(client="", waited=None, usage=None, first_byte=None))
    model = {"model": "llama3:latest"}
    assert value(metrics, "ollama_proxy_requests_total", endpoint="/api/chat", code="200", **model) == 1
    assert value(metrics, "ollama_proxy_queue_wait_seconds_count", **model) == 0
    assert value(metrics, "ollama_proxy_time_to_first_token_seconds_count", **model) == 0
    assert value(metrics, "ollama_proxy_generation_tokens_per_second_count", **model) == 0
    assert value(metrics, "ollama_proxy_key_requests_total", key="", code="200") == 0


@pytest.mark.parametrize("err", [QueueFull("full"), BadRequest("bad"), ModelNotFound("m")])
def test_a_refusal_counts_its_reason(err) -> None:
    metrics = Metrics(())
    ex = exchange(waited=None, usage=None)
    ex.fail(err)
    metrics.observe(ex)
    assert value(metrics, "ollama_proxy_rejected_total", reason=err.reason) == 1
    assert value(metrics, "ollama_proxy_key_requests_total", key="alice", code=str(err.status)) == 1
    assert (
        sum(value(metrics, "ollama_proxy_upstream_errors_total", kind=k) for k in UPSTREAM_ERROR_KINDS) == 0
    )


def test_every_upstream_failure_on_the_way_counts_once() -> None:
    """Two connects that failed while the request kept its place (counted at once), then the
    failure it ended with (counted when it ended)."""
    metrics = Metrics(())
    metrics.requeued(UpstreamUnreachable.kind)
    metrics.requeued(UpstreamUnreachable.kind)
    assert value(metrics, "ollama_proxy_upstream_errors_total", kind="connect") == 2
    ex = exchange()
    ex.fail(UpstreamTimeout("slow"))
    metrics.observe(ex)
    assert value(metrics, "ollama_proxy_upstream_errors_total", kind="connect") == 2
    assert value(metrics, "ollama_proxy_upstream_errors_total", kind="timeout") == 1
    assert sum(value(metrics, "ollama_proxy_rejected_total", reason=r) for r in REJECT_REASONS) == 0


def test_a_relayed_error_status_is_an_upstream_failure() -> None:
    metrics = Metrics(())
    metrics.observe(exchange(status=500, outcome=Outcome.UPSTREAM_STATUS, upstream_failure="status"))
    assert value(metrics, "ollama_proxy_upstream_errors_total", kind="status") == 1
    assert value(metrics, "ollama_proxy_requests_total", endpoint="/api/chat", model="other", code="500") == 1


@pytest.mark.parametrize("outcome", [Outcome.CLIENT_GONE, Outcome.CLIENT_STALLED])
@pytest.mark.parametrize("phase", list(Phase))
def test_a_client_that_left_counts_where_it_was(outcome, phase) -> None:
    metrics = Metrics(())
    metrics.observe(exchange(status=499, outcome=outcome, phase=phase))
    assert value(metrics, "ollama_proxy_client_disconnects_total", phase=phase.value) == 1
    assert sum(value(metrics, "ollama_proxy_client_disconnects_total", phase=p) for p in Phase) == 1


def test_a_request_cut_at_shutdown_is_no_disconnect() -> None:
    metrics = Metrics(())
    metrics.observe(exchange(status=503, outcome=Outcome.SHUTDOWN))
    assert sum(value(metrics, "ollama_proxy_client_disconnects_total", phase=p) for p in Phase) == 0
    assert sum(value(metrics, "ollama_proxy_rejected_total", reason=r) for r in REJECT_REASONS) == 0


def test_an_unlisted_model_is_observed_as_other() -> None:
    metrics = Metrics(("llama3:latest",))
    metrics.observe(exchange(model="unknown:latest", first_byte=0.5))
    assert value(metrics, "ollama_proxy_time_to_first_token_seconds_count", model="other") == 1
    assert value(metrics, "ollama_proxy_tokens_total", model="other", kind="prompt") == 26
    assert value(metrics, "ollama_proxy_tokens_total", model="unknown:latest", kind="prompt") == 0
