"""Whether there is room: the capacity ledger, and its in-process implementation.

The scheduler asks two separate questions: *who* goes next (the policy) and
*whether there is room* for them (this ledger). Keeping the count behind a small
protocol lets it move out of the process later (several proxies sharing one
limit through Redis, with leases) without the queue or the policy noticing.

So the protocol allows an answer that is not ready at once: `take` returns
either a `bool` (a local count knows immediately, and answering in the same
step keeps a grant and the release that made room atomic) or an awaitable of
one (a remote count needs a round trip). The scheduler handles both.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Protocol, TypeVar

from proxy.config import BackendConfig, LimitsConfig
from proxy.ollama.names import canonical_model


@dataclass(frozen=True, slots=True)
class Claim:
    """What a slot is taken for: every limit that applies is looked up from it.

    `backend` names the Ollama host the slot is on (empty: the scheduler routes
    nowhere, only the fleet-wide limits apply); `client` is there for limits per client.
    """

    #: The model as Ollama compares names (`canonical_model`), so one cap covers every spelling.
    model: str
    #: Who asked (a client key's name; empty without keys).
    client: str = ""
    #: The backend (`backends.NAME`) the slot is taken on; its own limits apply too.
    backend: str = ""


class CapacityLedger(Protocol):
    """Counts the slots taken against every limit that applies to a claim."""

    @property
    def caps(self) -> Mapping[str, int]:
        """Per-model caps by canonical model name (for estimates and the queue page)."""
        ...

    def take(self, claim: Claim) -> bool | Awaitable[bool]:
        """Count a slot for `claim` only if every limit that applies has room: all or nothing."""
        ...

    def give(self, claim: Claim) -> Awaitable[None] | None:
        """Give back a slot `take` granted for `claim`."""
        ...

    def full(self) -> bool:
        """No claim could be granted now, whatever its model: lets a dispatch pass stop early.

        A hint: answering False when unsure only costs a longer pass.
        """
        ...

    def on_room(self, callback: Callable[[], None]) -> None:
        """Call `callback` whenever room may have appeared (a slot given back, limits raised)."""
        ...

    def configure(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        """Apply new limits, and the backends' own when given (slots already taken stay taken),
        then report room: they may have risen."""
        ...


def model_caps(limits: LimitsConfig) -> dict[str, int]:
    """The per-model caps keyed as Ollama compares model names: the one place they are computed."""
    return {canonical_model(name): cap for name, cap in limits.models.items()}


def backend_limits(backends: Mapping[str, BackendConfig]) -> dict[str, tuple[int, dict[str, int]]]:
    """Each backend's `max_concurrent` and its model caps by canonical name."""
    return {
        name: (backend.max_concurrent, {canonical_model(model): cap for model, cap in backend.models.items()})
        for name, backend in backends.items()
    }


class LedgerLimits:
    """What every ledger keeps alike, counted here or in Redis: the limits it counts
    against (the global one, the per-model caps, each backend's own) and who to tell
    when room may have appeared."""

    def __init__(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        self._max_concurrent = limits.max_concurrent
        self._caps = model_caps(limits)
        self._backends = backend_limits(backends or {})
        self._listeners: list[Callable[[], None]] = []

    @property
    def caps(self) -> Mapping[str, int]:
        return self._caps

    def on_room(self, callback: Callable[[], None]) -> None:
        self._listeners.append(callback)

    def configure(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        self._max_concurrent = limits.max_concurrent
        self._caps = model_caps(limits)
        if backends is not None:
            self._backends = backend_limits(backends)
        self._room()

    def _room(self) -> None:
        for listener in self._listeners:
            listener()


class LocalLedger(LedgerLimits):
    """The global `max_concurrent`, the per-model caps and each backend's own limits,
    counted in this process. A claim that names a backend this ledger does not know
    (removed by a reload) gets no slot; one naming none is held to the fleet-wide limits."""

    def __init__(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        super().__init__(limits, backends)
        self._taken = 0
        self._by_model: Counter[str] = Counter()
        self._by_backend: Counter[str] = Counter()
        self._by_backend_model: Counter[tuple[str, str]] = Counter()

    def __repr__(self) -> str:
        return f"<LocalLedger taken={self._taken}/{self._max_concurrent} caps={self._caps}>"

    def take(self, claim: Claim) -> bool:
        if self._taken >= self._max_concurrent:
            return False
        cap = self._caps.get(claim.model)
        if cap is not None and self._by_model[claim.model] >= cap:
            return False
        if claim.backend and not self._backend_room(claim):
            return False
        self._taken += 1
        self._by_model[claim.model] += 1
        if claim.backend:
            self._by_backend[claim.backend] += 1
            self._by_backend_model[claim.backend, claim.model] += 1
        return True

    def _backend_room(self, claim: Claim) -> bool:
        limits = self._backends.get(claim.backend)
        if limits is None:
            return False
        most, caps = limits
        cap = caps.get(claim.model)
        if self._by_backend[claim.backend] >= most:
            return False
        return cap is None or self._by_backend_model[claim.backend, claim.model] < cap

    def give(self, claim: Claim) -> None:
        self._taken -= 1
        _decrement(self._by_model, claim.model)
        if claim.backend:
            _decrement(self._by_backend, claim.backend)
            _decrement(self._by_backend_model, (claim.backend, claim.model))
        self._room()

    def full(self) -> bool:
        return self._taken >= self._max_concurrent


_K = TypeVar("_K")


def _decrement(counter: Counter[_K], key: _K) -> None:
    counter[key] -= 1
    if not counter[key]:
        del counter[key]
