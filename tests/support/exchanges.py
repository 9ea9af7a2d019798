"""A finished request built by hand, for the observers' unit tests (metrics, access log)."""

from __future__ import annotations

from proxy.observe.exchange import Exchange, Outcome
from proxy.ollama.usage import Usage


def exchange(**changes: object) -> Exchange:
    """A streamed chat that went well; `changes` set any field."""
    ex = Exchange(
        method="POST",
        path="/api/chat",
        address="203.0.113.7",
        arrived=1795510862.123456,  # 2026-11-24T09:01:02.123Z
        started=0.0,
        endpoint="/api/chat",
        model="llama3:latest",
        client="alice",
        status=200,
        outcome=Outcome.OK,
        waited=12.3451,
        sent=10342,
        usage=Usage(prompt_tokens=26, completion_tokens=301),
        duration=98.7649,
    )
    for name, value in changes.items():
        setattr(ex, name, value)
    return ex
