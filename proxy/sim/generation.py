"""One generation request as the simulator reads it, and what it should produce.

Everything here is a pure function of the request body and the knobs in force
when it arrived, never of the clock or of chance: that is what makes a response
relayed by the proxy comparable, byte for byte, with one fetched directly.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

# Nominal time per prompt token, so prompt_eval_duration is plausible yet deterministic.
PROMPT_TOKEN_NS = 1_000_000
WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "magna",
)  # fmt: skip


@dataclass(frozen=True)
class Knobs:
    """The knobs as they were when a request arrived: changing them never affects it."""

    tokens: int
    token_delay: float
    load_delay: float
    fault: str | None
    fault_after: int
    fault_status: int
    context_size: int


@dataclass(frozen=True)
class Generation:
    """One parsed generation request and what it should produce."""

    path: str
    body: dict[str, Any]
    raw: bytes
    model: str
    knobs: Knobs

    @property
    def text(self) -> str:
        """The prompt text, wherever this endpoint keeps it."""
        keys = {
            "/api/generate": ("system", "prompt"),
            "/api/chat": ("messages",),
            "/api/embed": ("input",),
            "/api/embeddings": ("prompt",),
            "/v1/chat/completions": ("messages",),
            "/v1/completions": ("prompt",),
            "/v1/embeddings": ("input",),
            "/v1/responses": ("instructions", "input"),
        }[self.path]
        return " ".join(text_of(self.body.get(key)) for key in keys).strip()

    @property
    def seed(self) -> int:
        """Derived from the prompt, so concurrent answers differ and a mix-up shows."""
        return zlib.crc32(self.text.encode("utf-8", "surrogatepass"))  # "\ud800" is valid escaped JSON

    @property
    def limit(self) -> int | None:
        """The request's own cap on generated tokens, if it sets one."""
        if self.path.startswith("/api/"):
            options = self.body.get("options")
            value = options.get("num_predict") if isinstance(options, dict) else None
        else:
            value = next(
                (
                    self.body[k]
                    for k in ("max_tokens", "max_completion_tokens", "max_output_tokens")
                    if k in self.body
                ),
                None,
            )
        return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None

    @property
    def count(self) -> int:
        limit = self.limit
        return self.knobs.tokens if limit is None else min(limit, self.knobs.tokens)

    @property
    def done_reason(self) -> str:
        return "length" if self.count < self.knobs.tokens else "stop"

    @property
    def words(self) -> list[str]:
        return [WORDS[(self.seed + i) % len(WORDS)] + " " for i in range(self.count)]

    @property
    def prompt_tokens(self) -> int:
        return len(self.text.split())

    @property
    def ident(self) -> str:
        """A stable id for OpenAI-style objects, derived from the request body."""
        return f"{zlib.crc32(self.raw):08x}"

    def metrics(self) -> dict[str, int]:
        """Ollama's timing fields, nominal and computed from the knobs (nanoseconds)."""
        load = _ns(self.knobs.load_delay)
        prompt = self.prompt_tokens * PROMPT_TOKEN_NS
        evaluation = _ns(self.count * self.knobs.token_delay)
        return {
            "total_duration": load + prompt + evaluation,
            "load_duration": load,
            "prompt_eval_count": self.prompt_tokens,
            "prompt_eval_duration": prompt,
            "eval_count": self.count,
            "eval_duration": evaluation,
        }

    @property
    def streams(self) -> bool:
        """Ollama's native API streams unless told not to; its OpenAI API only when asked."""
        if self.path.startswith("/api/"):
            return self.body.get("stream") is not False
        return self.body.get("stream") is True


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def go_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as Ollama's Go decoder fills its request structs: keys match
    case-insensitively (`"Model"` is `model`) and the last duplicate wins."""
    return {key.lower(): value for key, value in pairs}


def text_of(value: Any) -> str:
    """All the text in a prompt, message list or content-part list, in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(text_of(item) for item in value)
    if isinstance(value, dict):
        return " ".join(text_of(value.get(key)) for key in ("content", "text"))
    return ""


@dataclass
class GenRecord:
    """What the simulator saw of one generation request, for tests to assert on."""

    path: str
    model: str  # "" until the body is parsed, and if it names no model
    started_at: float  # loop.time() at handler entry
    ended_at: float | None = None  # loop.time() at handler exit
    # loop.time() when the peer closed the connection before the response was complete.
    peer_closed_at: float | None = None
    completed: bool = False  # the full response (success or error) was written
    status: int | None = None  # status sent, once headers have been sent
    fault: str | None = None  # the fault in force when the request arrived
    chunks: int = 0  # body writes made so far
    # Request headers and body as received (left out of repr to keep assertion output short).
    headers: Mapping[str, str] = field(default_factory=dict, repr=False)
    body: bytes = field(default=b"", repr=False)
