"""What happened to one request: the facts that metrics and the access log both read.

The handler fills one `Exchange` as the request lives and hands it over once,
when the request has ended, so the two observers can never disagree about a
request's model, outcome, failures or timings. The handler records facts only;
which counter or log field a fact becomes is the observers' business.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from proxy.errors import ProxyError, UpstreamError
from proxy.ollama.usage import Usage

#: Status recorded for a client that left before its response ended (nginx's convention).
CLIENT_GONE = 499


class Phase(StrEnum):
    """Where a request was when it ended early (the `phase` of a disconnect)."""

    QUEUED = "queued"
    RUNNING = "running"


class Outcome(StrEnum):
    """How a request ended, as the access log's `outcome` shows it (a refusal shows its reason)."""

    OK = "ok"
    #: Upstream answered an error status, relayed as it was.
    UPSTREAM_STATUS = "upstream_status"
    CLIENT_GONE = "client_gone"
    CLIENT_STALLED = "client_stalled"
    SHUTDOWN = "shutdown"
    UPSTREAM_ERROR = "upstream_error"
    #: The proxy refused the request itself; `Exchange.rejection` says why.
    REJECTED = "rejected"


#: The outcomes of a client that left before its response ended.
DISCONNECTS = frozenset({Outcome.CLIENT_GONE, Outcome.CLIENT_STALLED})


@dataclass(slots=True, eq=False)
class Exchange:
    method: str
    path: str
    #: The peer's address, or the one a trusted proxy in front names (`client_address`).
    address: str
    #: Wall-clock arrival (for the log line) and loop time (for durations).
    arrived: float
    started: float
    endpoint: str = "other"
    model: str = ""
    #: Who asked: the client key's name; "" when keys are off or before authentication.
    client: str = ""
    #: Who it shares the slots fairly as (`scheduling.fairness`), and its priority; "" before known.
    party: str = ""
    priority: str = ""
    #: Cost charged to its party (tokens or requests), and the bounded metrics label for it.
    cost: float = 0.0
    cost_label: str = "other"
    #: The backend (`backends.NAME`) the request was sent to; "" if it never was.
    backend: str = ""
    status: int = CLIENT_GONE
    outcome: Outcome = Outcome.CLIENT_GONE
    #: The refusal's reason (`ProxyError.reason`) when the outcome is `REJECTED`.
    rejection: str = ""
    phase: Phase = Phase.RUNNING
    #: Time in the queue until the admission that ran upstream; None if none did.
    waited: float | None = None
    #: The upstream failure the request ended with (`UpstreamError.kind`, "status" for an
    #: error status relayed as it was); "" if none. A failed connection after which the
    #: request kept its place is counted as it happens (`Metrics.requeued`), not here.
    upstream_failure: str = ""
    #: What the generation reported of itself (see `usage.Meter`).
    usage: Usage | None = None
    #: Streamed generations: from admission to upstream's first body bytes.
    first_byte: float | None = None
    sent: int = 0
    duration: float = 0.0

    def fail(self, err: ProxyError) -> None:
        """Record the failure the request ended with."""
        self.status = err.status
        if isinstance(err, UpstreamError):
            self.outcome, self.upstream_failure = Outcome.UPSTREAM_ERROR, err.kind
        else:
            self.outcome, self.rejection = Outcome.REJECTED, err.reason

    @property
    def outcome_text(self) -> str:
        """The access log's `outcome`: a refusal shows its reason (`queue_full`, `unauthorized`...)."""
        return self.rejection if self.outcome is Outcome.REJECTED else self.outcome.value

    @property
    def prompt_tokens(self) -> int | None:
        return self.usage.prompt_tokens if self.usage else None

    @property
    def completion_tokens(self) -> int | None:
        return self.usage.completion_tokens if self.usage else None
