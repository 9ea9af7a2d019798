"""Where a slot is taken: the seam between the scheduler and the fleet of backends.

The scheduler asks *who* goes next (the policy), *whether there is room* (the
ledger) and, with several Ollama hosts, *where*: a `Router` names the backends a
model may run on, best first. The scheduler then asks the ledger for a slot on
each in turn and keeps the first it grants, so the fleet-wide limits, the
backend's own `max_concurrent` and its model caps are checked in one place.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol


class Router(Protocol):
    """Names the backends that may run a model now, best first (implemented by the fleet)."""

    def candidates(self, model: str, running: Mapping[str, int]) -> Sequence[str]:
        """Healthy backends that list `model` (canonical) and have room by `running`
        (slots held per backend here), in the order they should be tried."""
        ...
