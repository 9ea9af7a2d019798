"""The exchange: what one request's failure records for both observers."""

from __future__ import annotations

from proxy.errors import QueueFull, UpstreamReset
from proxy.observe.exchange import Outcome
from tests.support.exchanges import exchange


def test_a_failure_records_status_outcome_and_reason_for_both_observers() -> None:
    refused = exchange()
    refused.fail(QueueFull("full"))
    assert (refused.status, refused.outcome, refused.outcome_text) == (503, Outcome.REJECTED, "queue_full")
    failed = exchange()
    failed.fail(UpstreamReset("reset"))
    assert (failed.status, failed.outcome_text, failed.upstream_failure) == (502, "upstream_error", "reset")
