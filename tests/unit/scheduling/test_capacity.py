"""The in-process capacity ledger: all or nothing, names as Ollama compares them, room reported."""

from __future__ import annotations

from types import MappingProxyType

from proxy.config import LimitsConfig
from proxy.scheduling.capacity import Claim, LocalLedger, model_caps


def limits(max_concurrent: int = 2, **models: int) -> LimitsConfig:
    return LimitsConfig(max_concurrent=max_concurrent, models=MappingProxyType(models))


def test_caps_are_keyed_by_the_canonical_model_name():
    assert model_caps(limits(**{"Llama3": 1, "qwen:7b": 2})) == {"llama3:latest": 1, "qwen:7b": 2}


def test_a_capped_model_is_refused_without_using_a_global_slot():
    ledger = LocalLedger(limits(max_concurrent=3, big=1))
    big, small = Claim("big:latest"), Claim("small:latest", "alice")
    assert ledger.take(big) is True
    assert ledger.take(big) is False  # its cap is full...
    assert ledger.take(small) is True  # ...and the refusal took nothing from the global count
    assert ledger.take(small) is True
    assert ledger.full()
    assert ledger.take(Claim("other:latest")) is False


def test_giving_back_and_raising_limits_report_room():
    ledger = LocalLedger(limits(max_concurrent=1))
    reports: list[str] = []
    ledger.on_room(lambda: reports.append("room"))
    claim = Claim("m:latest")
    assert ledger.take(claim) is True
    assert ledger.take(claim) is False
    ledger.give(claim)
    assert reports == ["room"] and not ledger.full()
    assert ledger.take(claim) is True
    ledger.configure(limits(max_concurrent=2))
    assert reports == ["room", "room"]
    assert ledger.take(claim) is True  # the raised limit applies at once


def test_lowering_a_limit_keeps_what_was_taken():
    ledger = LocalLedger(limits(max_concurrent=2))
    claim = Claim("m:latest")
    assert ledger.take(claim) and ledger.take(claim)
    ledger.configure(limits(max_concurrent=1, m=1))
    assert ledger.full() and ledger.take(claim) is False
    ledger.give(claim)
    assert ledger.take(claim) is False  # still one taken: at the new limit
    ledger.give(claim)
    assert ledger.take(claim) is True
    assert "taken=1/1" in repr(ledger)
