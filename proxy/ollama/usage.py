"""Token counts and generation timings, read from the answer as it passes through.

Ollama reports what a generation cost only in its last words: the final
NDJSON line (`"done":true`) carries `prompt_eval_count`, `eval_count` and the
durations; its OpenAI layer puts `usage` in the JSON body, or in the last SSE
event when the client asked for `stream_options.include_usage`. A `Meter` is
fed each chunk *after* the relay has written it, so metering can never delay
or alter a byte, and it keeps no copy of the stream: only the bytes after the
last newline (the line still arriving), capped at `MAX_LINE`.

Parsing every line of a long stream would cost more than relaying it, so a
line is parsed only when it can be the final one: it contains one of the
markers in `_may_count`, as Ollama's Go encoder writes them (compact). A marker inside
generated text cannot match, since JSON escapes the quotes of a string's
content. A line longer than `MAX_LINE` (a batch of embeddings, a final line
with a long `context`) is not buffered; only its last `TAIL` bytes are kept,
and the counts, which Ollama writes after the big array, are picked from them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass

#: Longest line kept whole for json parsing.
MAX_LINE = 1 << 20
#: Of a longer line, the end kept to find the counts in.
TAIL = 4096
_FIELDS = frozenset(
    {
        "prompt_eval_count", "eval_count", "eval_duration", "load_duration",
        "prompt_tokens", "completion_tokens", "input_tokens", "output_tokens",
    }
)  # fmt: skip
#: A field as a key of an object, never inside a string: there its quotes would be escaped.
_FIELD = re.compile(rb'[{,]"(' + b"|".join(f.encode() for f in sorted(_FIELDS)) + rb')":(\d+)')


@dataclass(frozen=True, slots=True)
class Usage:
    """What one answer reported; None where it did not say."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    #: Ollama's eval_duration: time spent generating the completion tokens.
    eval_seconds: float | None = None
    #: Ollama's load_duration: time to have the model ready (small when it was loaded already).
    load_seconds: float | None = None

    @property
    def tokens_per_second(self) -> float | None:
        """Generation speed, as Ollama's own `--verbose` reports it ("eval rate")."""
        if not self.completion_tokens or not self.eval_seconds:
            return None
        return self.completion_tokens / self.eval_seconds


class Meter:
    """Watches one answer's bytes go by; `close()` says what it cost."""

    __slots__ = ("_clock", "_started", "_first", "_line", "_over", "_usage")

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self._started = clock()
        self._first: float | None = None
        # The line still arriving (its last TAIL bytes once over MAX_LINE); a bytearray
        # so that a line arriving in many small pieces is appended to, not copied each time.
        self._line = bytearray()
        self._over = False
        self._usage: Usage | None = None

    @property
    def first_byte(self) -> float | None:
        """Seconds from this meter's creation to the first body chunk; None if none came."""
        return None if self._first is None else self._first - self._started

    def feed(self, chunk: bytes) -> None:
        if self._first is None:
            self._first = self._clock()
        if self._usage is not None:
            return  # the counts are in; what follows (SSE's [DONE]) has none
        if self._over:
            # The over-long line ends at the first newline; only its tail was kept.
            nl = chunk.find(b"\n")
            if nl < 0:
                self._extend(chunk)
                return
            self._extend(chunk[:nl])
            self._end_line()
            if self._usage is not None:
                return
            chunk = chunk[nl + 1 :]
        end = chunk.rfind(b"\n")
        if end < 0:
            self._extend(chunk)
            return
        if self._line:
            complete: bytes | bytearray | None = self._line + chunk[: end + 1]
            self._line.clear()
            if not _may_count(complete):
                complete = None
        else:
            # Most chunks of a stream are whole lines without the counts: scan, copy nothing.
            complete = chunk[: end + 1] if _may_count(chunk) else None
        if complete is not None:
            for line in complete.split(b"\n"):
                self._parse(line)
                if self._usage is not None:
                    return
        if end + 1 < len(chunk):
            self._extend(chunk[end + 1 :])

    def close(self) -> Usage | None:
        """The answer has ended: read a last line that had no newline (Ollama's plain JSON bodies)."""
        if self._usage is None and self._over:
            self._end_line()
        elif self._usage is None and self._line:
            self._parse(self._line)
        self._line.clear()
        return self._usage

    def _extend(self, data: bytes) -> None:
        if not data:
            return
        self._line += data
        if self._over or len(self._line) > MAX_LINE:
            self._over = True
            del self._line[:-TAIL]

    def _end_line(self) -> None:
        """An over-long line ended: its head is gone, so take the counts from its tail."""
        self._usage = _from_tail(self._line)
        self._line.clear()
        self._over = False

    def _parse(self, line: bytes | bytearray) -> None:
        if len(line) > MAX_LINE:  # arrived in one chunk: read it as if it had come in pieces
            self._usage = _from_tail(line[-TAIL:])
            return
        if not _may_count(line):
            return
        if line.startswith(b"data:"):
            line = line[5:]
        try:
            obj = json.loads(line)
        except (ValueError, RecursionError):
            return
        if not isinstance(obj, dict):
            return
        fields = _ints(obj)
        nested = obj.get("response")  # /v1/responses streams usage inside response.completed
        for usage in (obj.get("usage"), nested.get("usage") if isinstance(nested, dict) else None):
            if isinstance(usage, dict):
                fields.update(_ints(usage))
        self._usage = _usage(fields, done=obj.get("done") is True)


def _may_count(data: bytes | bytearray) -> bool:
    """Whether `data` may hold a line with the counts; any other line is skipped unparsed."""
    return b'"done":true' in data or b'"usage":{' in data or b'"prompt_eval_count":' in data


def _from_tail(tail: bytes | bytearray) -> Usage | None:
    return _usage({m[1].decode(): int(m[2]) for m in _FIELD.finditer(tail)}, done=False)


def _ints(obj: dict[str, object]) -> dict[str, int]:
    return {
        key: value
        for key, value in obj.items()
        if key in _FIELDS and type(value) is int and value >= 0  # bool is not a count
    }


def _usage(fields: dict[str, int], *, done: bool) -> Usage | None:
    """Counts in either dialect; Ollama omits a zero field, so a final line lacking one means 0."""
    if "prompt_tokens" in fields or "input_tokens" in fields:
        return Usage(
            prompt_tokens=fields.get("prompt_tokens", fields.get("input_tokens")),
            completion_tokens=fields.get("completion_tokens", fields.get("output_tokens")),
        )
    if not done and "prompt_eval_count" not in fields and "eval_count" not in fields:
        return None
    zero = 0 if done else None
    eval_ns, load_ns = fields.get("eval_duration"), fields.get("load_duration")
    return Usage(
        prompt_tokens=fields.get("prompt_eval_count", zero),
        completion_tokens=fields.get("eval_count", zero),
        eval_seconds=eval_ns / 1e9 if eval_ns else None,
        load_seconds=load_ns / 1e9 if load_ns else None,
    )
