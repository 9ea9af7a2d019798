"""What happened to one request: the facts that metrics and the access log both read.

The handler fills one `Exchange` as the request lives and hands it over once,
when the request has ended, so the two observers can never disagree about a
request's model, outcome or timings.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Status recorded for a client that left before its response ended (nginx's convention).
CLIENT_GONE = 499


@dataclass(slots=True, eq=False)
class Exchange:
    method: str
    path: str
    client: str
    #: Wall-clock arrival (for the log line) and loop time (for durations).
    arrived: float
    started: float
    endpoint: str = "other"
    model: str = ""
    #: The client key's name; "" when keys are off or before authentication.
    owner: str = ""
    status: int = CLIENT_GONE
    #: ok, upstream_status, client_gone, client_stalled, shutdown, upstream_error, or a rejection reason.
    outcome: str = "client_gone"
    #: Where a request was when it ended early: queued or running.
    phase: str = "running"
    waited: float | None = None
    sent: int = 0
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    duration: float = 0.0
