"""A simulated Ollama: a real aiohttp server on loopback that speaks Ollama's wire format.

It exists so the proxy can be tested, demonstrated and benchmarked without a GPU.
Three properties matter more than realism of the text it generates:

* Determinism. The bytes of every response are a pure function of the request path,
  the request body and the knobs, never of the clock or of chance, so a test can
  compare a response relayed by the proxy with one fetched directly, byte for byte.
  Durations in the answers are nominal values computed from the knobs.
* Instrumentation. Every generation request leaves a :class:`GenRecord`, and
  ``active``/``peak`` count generations in progress, so tests can assert what the
  proxy let through and when. :meth:`Simulator.wait_until` wakes on every change of
  these, so tests synchronise on events instead of sleeping.
* Prompt detection of the peer going away. The proxy promises to close the upstream
  connection within 100 ms of its client leaving; the simulator must notice that
  close while it is "loading" or between tokens. It runs with aiohttp's
  ``handler_cancellation=True``: when the transport reports the connection lost,
  aiohttp cancels the connection's task, which cancels the handler awaiting in it,
  and the handler stamps ``peer_closed_at`` from its ``except CancelledError``.

Run ``python -m proxy.simulator`` to serve it standalone, e.g. to try the proxy.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import hashlib
import json
import struct
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from proxy.ollama.names import canonical_model

__all__ = ["FAULTS", "GARBAGE", "GenRecord", "Simulator", "main"]

#: Accepted values of :attr:`Simulator.fault` besides ``None``.
FAULTS = frozenset({"die", "hang_headers", "hang_body", "status", "garbage", "garbage_body"})
#: What the ``"garbage"`` and ``"garbage_body"`` faults send: not HTTP, not JSON, not UTF-8,
#: and it ends mid-line, so a reader that expects any framing finds none.
GARBAGE = b'\x00\xff\xfe{"half": "a line\r\n\x1b[31m not json \xc3\x28'


# Fixed timestamps: a real clock would make responses differ between two identical requests.
CREATED_AT = "2024-01-01T00:00:00.000000Z"
MODIFIED_AT = "2024-01-01T00:00:00Z"
EXPIRES_AT = "2024-01-01T00:05:00Z"
CREATED_UNIX = 1704067200
VERSION = "0.12.0"

NDJSON = "application/x-ndjson"
SSE = "text/event-stream"
# Ollama's native handlers answer through gin's c.JSON ("application/json; charset=utf-8");
# its OpenAI layer sets a bare "application/json" and encodes with a trailing newline.
JSON_NATIVE = "application/json; charset=utf-8"
JSON_OPENAI = "application/json"

EMBEDDING_DIMENSIONS = 16
# Nominal time per prompt token, so prompt_eval_duration is plausible yet deterministic.
PROMPT_TOKEN_NS = 1_000_000
WORDS = (
    "lorem", "ipsum", "dolor", "sit", "amet", "consectetur", "adipiscing", "elit",
    "sed", "do", "eiusmod", "tempor", "incididunt", "ut", "labore", "magna",
)  # fmt: skip


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


@dataclass(frozen=True)
class _Knobs:
    """The knobs as they were when a request arrived: changing them never affects it."""

    tokens: int
    token_delay: float
    load_delay: float
    fault: str | None
    fault_after: int
    fault_status: int
    context_size: int


@dataclass(frozen=True)
class _Plan:
    """The body of a successful generation, decided before anything is written.

    When streaming, each of ``chunks`` is written separately, and the ``tokens`` chunks
    from ``first_token`` on are each preceded by ``token_delay``. When not streaming,
    ``chunks`` holds the one body, sent after ``tokens * token_delay`` of silence, as
    Ollama sends nothing of a non-streamed answer until it is complete.
    """

    content_type: str
    chunks: list[bytes]
    tokens: int
    first_token: int = 0
    streaming: bool = True


@dataclass(frozen=True)
class _Gen:
    """One parsed generation request and what it should produce."""

    path: str
    body: dict[str, Any]
    raw: bytes
    model: str
    knobs: _Knobs

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
        return " ".join(_text_of(self.body.get(key)) for key in keys).strip()

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


class Simulator:
    """A deterministic, instrumented stand-in for an Ollama server.

    Knobs are plain attributes, read when each request arrives, so a test can change
    them between requests. ``fault`` injects one failure into every generation request
    that arrives while it is set (other endpoints always answer normally):

    * ``"die"``: after ``fault_after`` body chunks, close the connection without
      finishing the body. The chunks already written are flushed first, so the peer
      deterministically receives exactly those. A non-streamed body is cut in half.
    * ``"hang_headers"``: after ``load_delay``, never send headers.
    * ``"hang_body"``: send headers and ``fault_after`` chunks (half of a non-streamed
      body), then go silent forever.
    * ``"status"``: after ``load_delay``, answer ``fault_status`` with an error body.
    * ``"garbage"``: after ``load_delay``, write :data:`GARBAGE` (not an HTTP response)
      and close the connection.
    * ``"garbage_body"``: after ``load_delay``, answer 200 with the content type the
      request expects and :data:`GARBAGE` as the whole body (chunked if it would stream).

    A fault that would come after the last chunk does not happen.
    """

    def __init__(
        self,
        *,
        models: Iterable[str] = ("llama3.2", "big", "small"),
        tokens: int = 8,
        token_delay: float = 0.0,
        load_delay: float = 0.0,
    ) -> None:
        self.models: set[str] = set(models)
        self.tokens = tokens
        self.token_delay = token_delay
        self.load_delay = load_delay
        self._fault: str | None = None
        self.fault_after = 2
        self.fault_status = 500
        # Length of the "context" array in /api/generate's final chunk (about 6 bytes an
        # entry), so a test can make that line larger than a proxy's line buffer.
        self.context_size = 0

        self.active = 0
        self.peak = 0
        self.records: list[GenRecord] = []

        self._change = asyncio.Event()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._closing = False
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def fault(self) -> str | None:
        """The fault to inject, checked on assignment: a misspelt fault would let a test pass vacuously."""
        return self._fault

    @fault.setter
    def fault(self, value: str | None) -> None:
        if value is not None and value not in FAULTS:
            raise ValueError(f"unknown fault {value!r}; expected None or one of {sorted(FAULTS)}")
        self._fault = value

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:54321``."""
        if self._url is None:
            raise RuntimeError("Simulator.start() has not been called")
        return self._url

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 picks a free port) and return the base URL.

        After close(), starting again on the same port is a restart, as of a crashed Ollama.
        """
        self._closing = False
        app = web.Application(client_max_size=1 << 30)  # Ollama takes large bodies (images)
        for path in _RENDERERS:
            app.router.add_post(path, self._generation)
        app.router.add_get("/", self._root)  # add_get also answers HEAD
        app.router.add_get("/api/version", self._version)
        app.router.add_get("/api/tags", self._tags)
        app.router.add_get("/api/ps", self._ps)
        app.router.add_post("/api/show", self._show)
        app.router.add_get("/v1/models", self._openai_models)
        # handler_cancellation: without it aiohttp lets a handler run on after its peer
        # has gone, and the simulator could not tell when the proxy closed upstream.
        # shutdown_timeout: close() cancels handlers itself; this only bounds stragglers.
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=0.5, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, host, port).start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self._url = (
            f"http://[{bound_host}]:{bound_port}"
            if ":" in bound_host
            else f"http://{bound_host}:{bound_port}"
        )
        return self._url

    async def close(self) -> None:
        """Stop serving at once, cutting off generations in progress, as a dying Ollama would.

        Handlers are cancelled and awaited here rather than left to aiohttp's shutdown,
        which would first wait for them (twice ``shutdown_timeout``) and then cancel
        them without waiting, so their records would still be open after close().
        """
        if self._runner is None:
            return
        self._closing = True
        for site in self._runner.sites:
            await site.stop()  # first, so no new generation starts while we cut the others off
        handlers = list(self._handlers)
        for task in handlers:
            task.cancel()
        await asyncio.gather(*handlers, return_exceptions=True)
        await self._runner.cleanup()
        self._runner = None

    def reset_peak(self) -> None:
        """Restart peak tracking from the current number of active generations."""
        self.peak = self.active
        self._changed()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 5.0) -> None:
        """Return once ``predicate()`` is true, re-checking it on every instrumentation change.

        Changes are: a generation starting or ending, its model becoming known, a body
        chunk written, the response completing, the peer closing, ``reset_peak()``.
        Raises TimeoutError if the predicate is still false after ``timeout`` seconds.
        """
        try:
            async with asyncio.timeout(timeout):
                while not predicate():
                    await self._change.wait()
        except TimeoutError:
            raise TimeoutError(
                f"condition not met within {timeout}s (active={self.active}, peak={self.peak}, "
                f"records={len(self.records)})"
            ) from None

    def _changed(self) -> None:
        """Wake every wait_until() so it re-checks its predicate."""
        self._change.set()
        self._change = asyncio.Event()

    def _knobs(self) -> _Knobs:
        return _Knobs(
            tokens=self.tokens,
            token_delay=self.token_delay,
            load_delay=self.load_delay,
            fault=self._fault,
            fault_after=self.fault_after,
            fault_status=self.fault_status,
            context_size=self.context_size,
        )

    def _known(self, model: str) -> bool:
        """Ollama treats a name without a tag as ``name:latest``."""
        return canonical_model(model) in {canonical_model(m) for m in self.models}

    # -- generation endpoints --------------------------------------------------------

    async def _generation(self, request: web.Request) -> web.StreamResponse:
        """Serve one generation request, keeping its record and the counters current."""
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        knobs = self._knobs()
        record = GenRecord(
            path=request.path, model="", started_at=loop.time(), headers=request.headers, fault=knobs.fault
        )
        self.records.append(record)
        self._handlers.add(task)
        self.active += 1
        self.peak = max(self.peak, self.active)
        self._changed()
        reply = _Reply(self, request, record)
        try:
            await self._generate(request, record, knobs, reply)
        except asyncio.CancelledError:
            # With handler_cancellation this is how the peer closing reaches us,
            # whether we were loading, between tokens or hanging on purpose.
            if not record.completed and not self._closing:
                record.peer_closed_at = loop.time()
            raise
        except ConnectionResetError:
            # A write found the transport closing before aiohttp cancelled us: the same
            # event seen from the writing side. Returning lets aiohttp drop the connection quietly.
            if not self._closing:
                record.peer_closed_at = loop.time()
        finally:
            record.ended_at = loop.time()
            self.active -= 1
            self._handlers.discard(task)
            self._changed()
        return reply.response

    async def _generate(self, request: web.Request, record: GenRecord, knobs: _Knobs, reply: _Reply) -> None:
        openai = request.path.startswith("/v1/")
        record.body = await request.read()
        try:
            body = json.loads(record.body, object_pairs_hook=_go_object)
        except ValueError as exc:  # also covers bodies that are not UTF-8
            message = "missing request body" if not record.body else f"invalid JSON body: {exc}"
            await reply.error(400, message, openai, "invalid_request_error")
            return
        if not isinstance(body, dict):
            await reply.error(400, "request body must be a JSON object", openai, "invalid_request_error")
            return
        model = body.get("model")
        if not isinstance(model, str) or not model:
            await reply.error(400, "model is required", openai)
            return
        record.model = model
        self._changed()
        if not self._known(model):
            # Ollama checks the model exists before it loads anything, so this is immediate.
            await reply.error(404, f"model '{model}' not found", openai, "not_found_error")
            return

        await asyncio.sleep(knobs.load_delay)
        if knobs.fault == "status":
            await reply.error(knobs.fault_status, "simulated failure", openai)
            return
        if knobs.fault == "hang_headers":
            await _forever()
        if knobs.fault == "garbage":
            await reply.garbage()
        gen = _Gen(path=request.path, body=body, raw=record.body, model=model, knobs=knobs)
        plan = _RENDERERS[request.path](gen)
        if knobs.fault == "garbage_body":
            await reply.start(200, plan.content_type, None if plan.streaming else len(GARBAGE))
            await reply.send(GARBAGE)
            await reply.finish()
            return
        await reply.play(plan, knobs)

    # -- other endpoints ---------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return _json_response({"version": VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        return _json_response({"models": [_model_entry(name) for name in self._model_names()]})

    async def _ps(self, request: web.Request) -> web.Response:
        """Models count as loaded once they have served a generation, as in Ollama."""
        used = {canonical_model(r.model) for r in self.records if r.model}
        loaded = []
        for name in self._model_names():
            if name in used:
                entry = {key: value for key, value in _model_entry(name).items() if key != "modified_at"}
                loaded.append(
                    {
                        **entry,
                        "expires_at": EXPIRES_AT,
                        "size_vram": _model_size(name),
                        "context_length": 4096,
                    }
                )
        return _json_response({"models": loaded})

    async def _show(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return _json_response({"error": f"invalid JSON body: {exc}"}, status=400)
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return _json_response({"error": "model is required"}, status=400)
        if not self._known(name):
            return _json_response({"error": f"model '{name}' not found"}, status=404)
        return _json_response(
            {
                "license": "",
                "modelfile": f"# Modelfile generated by the Ollama simulator\nFROM {canonical_model(name)}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": _details(),
                "model_info": {
                    "general.architecture": "llama",
                    "general.parameter_count": 3_212_749_888,
                    "llama.context_length": 131072,
                    "llama.embedding_length": EMBEDDING_DIMENSIONS,
                },
                "capabilities": ["completion", "embedding"],
                "modified_at": MODIFIED_AT,
            }
        )

    async def _openai_models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": CREATED_UNIX, "owned_by": "library"}
            for name in self._model_names()
        ]
        return _openai_json_response({"object": "list", "data": data})

    def _model_names(self) -> list[str]:
        return sorted({canonical_model(m) for m in self.models})


class _Reply:
    """Writes one generation response, keeping its GenRecord current with each step."""

    def __init__(self, sim: Simulator, request: web.Request, record: GenRecord) -> None:
        self._sim = sim
        self._request = request
        self._record = record
        # Exists from the start so the handler always has a response to return, even when
        # the peer vanished before anything was prepared (aiohttp then drops it quietly).
        self.response = web.StreamResponse()

    async def start(self, status: int, content_type: str, length: int | None = None) -> None:
        """Send the headers: StreamResponse sends them at prepare(), not with the first chunk."""
        self.response.set_status(status)
        self.response.content_type, _, charset = content_type.partition("; charset=")
        self.response.charset = charset or None
        if length is not None:
            self.response.content_length = length
        await self.response.prepare(self._request)
        self._record.status = status
        self._sim._changed()

    async def send(self, data: bytes) -> None:
        """Write one body chunk: each chunk is its own write, so a relay sees them apart."""
        await self.response.write(data)
        self._record.chunks += 1
        self._sim._changed()

    async def finish(self) -> None:
        await self.response.write_eof()
        self._record.completed = True
        self._sim._changed()

    async def whole(self, status: int, content_type: str, body: bytes) -> None:
        await self.start(status, content_type, len(body))
        await self.send(body)
        await self.finish()

    async def error(self, status: int, message: str, openai: bool, kind: str = "api_error") -> None:
        """Answer with Ollama's error shape, or its OpenAI layer's on /v1 paths."""
        if openai:
            error = {"message": message, "type": kind, "param": None, "code": None}
            await self.whole(status, JSON_OPENAI, _dumps({"error": error}) + b"\n")
        else:
            await self.whole(status, JSON_NATIVE, _dumps({"error": message}))

    async def play(self, plan: _Plan, knobs: _Knobs) -> None:
        """Write a planned body with simulated generation time, injecting a body fault if set."""
        faulty = knobs.fault in ("die", "hang_body")
        if plan.streaming:
            await self.start(200, plan.content_type)
            for index, chunk in enumerate(plan.chunks):
                if faulty and index == knobs.fault_after:
                    await self._fail(knobs.fault)
                    return
                if plan.first_token <= index < plan.first_token + plan.tokens:
                    await asyncio.sleep(knobs.token_delay)
                await self.send(chunk)
        else:
            await asyncio.sleep(knobs.token_delay * plan.tokens)
            (body,) = plan.chunks
            await self.start(200, plan.content_type, len(body))
            if faulty:
                await self.send(body[: len(body) // 2])
                await self._fail(knobs.fault)
                return
            await self.send(body)
        await self.finish()

    async def garbage(self) -> None:
        """Answer with bytes that are not HTTP, close, and wait for aiohttp to cancel us."""
        transport = self._request.transport
        assert transport is not None
        transport.write(GARBAGE)
        transport.close()
        self._record.completed = True  # all there is to send was written: not a peer closing early
        self._sim._changed()
        await _forever()

    async def _fail(self, fault: str | None) -> None:
        if fault == "hang_body":
            await _forever()
        # "die": close() flushes what was written, then sends FIN, so the peer gets exactly
        # the chunks so far and then a truncated body. (abort() could discard them.)
        self.response.force_close()
        transport = self._request.transport
        if transport is not None:
            transport.close()


# -- renderers: parsed request -> planned body -------------------------------------------


def _render_generate(gen: _Gen) -> _Plan:
    final: dict[str, Any] = {
        "model": gen.model,
        "created_at": CREATED_AT,
        "response": "",
        "done": True,
        "done_reason": gen.done_reason,
        "context": [(gen.seed + i) % 100_000 for i in range(gen.knobs.context_size)],
        **gen.metrics(),
    }
    words = gen.words
    if not gen.streams:
        final["response"] = "".join(words)
        return _Plan(JSON_NATIVE, [_dumps(final)], tokens=len(words), streaming=False)
    lines = [
        _ndjson({"model": gen.model, "created_at": CREATED_AT, "response": word, "done": False})
        for word in words
    ]
    return _Plan(NDJSON, [*lines, _ndjson(final)], tokens=len(words))


def _render_chat(gen: _Gen) -> _Plan:
    words = gen.words

    def message(content: str) -> dict[str, str]:
        return {"role": "assistant", "content": content}

    final = {
        "model": gen.model,
        "created_at": CREATED_AT,
        "message": message(""),
        "done_reason": gen.done_reason,
        "done": True,
        **gen.metrics(),
    }
    if not gen.streams:
        final["message"] = message("".join(words))
        return _Plan(JSON_NATIVE, [_dumps(final)], tokens=len(words), streaming=False)
    lines = [
        _ndjson({"model": gen.model, "created_at": CREATED_AT, "message": message(word), "done": False})
        for word in words
    ]
    return _Plan(NDJSON, [*lines, _ndjson(final)], tokens=len(words))


def _render_embed(gen: _Gen) -> _Plan:
    raw = gen.body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    metrics = gen.metrics()
    body = {
        "model": gen.model,
        "embeddings": [_embedding(_text_of(item)) for item in inputs],
        "total_duration": metrics["load_duration"] + metrics["prompt_eval_duration"],
        "load_duration": metrics["load_duration"],
        "prompt_eval_count": metrics["prompt_eval_count"],
    }
    return _Plan(JSON_NATIVE, [_dumps(body)], tokens=0, streaming=False)


def _render_embeddings(gen: _Gen) -> _Plan:
    return _Plan(JSON_NATIVE, [_dumps({"embedding": _embedding(gen.text)})], tokens=0, streaming=False)


def _render_openai_embeddings(gen: _Gen) -> _Plan:
    raw = gen.body.get("input")
    inputs = raw if isinstance(raw, list) else [raw]
    as_base64 = gen.body.get("encoding_format") == "base64"  # the openai client's default
    data = []
    for index, item in enumerate(inputs):
        vector = _embedding(_text_of(item))
        encoded: Any = (
            base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode() if as_base64 else vector
        )
        data.append({"object": "embedding", "embedding": encoded, "index": index})
    usage = {"prompt_tokens": gen.prompt_tokens, "total_tokens": gen.prompt_tokens}
    body = {"object": "list", "data": data, "model": gen.model, "usage": usage}
    return _Plan(JSON_OPENAI, [_dumps(body) + b"\n"], tokens=0, streaming=False)


def _usage(gen: _Gen) -> dict[str, int]:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": gen.count,
        "total_tokens": gen.prompt_tokens + gen.count,
    }


def _render_openai_chat(gen: _Gen) -> _Plan:
    return _render_openai_completion(gen, chat=True)


def _render_openai_text(gen: _Gen) -> _Plan:
    return _render_openai_completion(gen, chat=False)


def _render_openai_completion(gen: _Gen, *, chat: bool) -> _Plan:
    """/v1/chat/completions and /v1/completions, which differ only in naming."""
    words = gen.words
    head = {
        "id": f"chatcmpl-{gen.ident}" if chat else f"cmpl-{gen.ident}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": CREATED_UNIX,
        "model": gen.model,
        "system_fingerprint": "fp_ollama",
    }

    def choice(text: str, finish: str | None, *, delta: bool = True) -> dict[str, Any]:
        if not chat:
            return {"text": text, "index": 0, "finish_reason": finish}
        key = "delta" if delta else "message"
        return {"index": 0, key: {"role": "assistant", "content": text}, "finish_reason": finish}

    if not gen.streams:
        body = {
            **head,
            "object": "chat.completion" if chat else "text_completion",
            "choices": [choice("".join(words), gen.done_reason, delta=False)],
            "usage": _usage(gen),
        }
        return _Plan(JSON_OPENAI, [_dumps(body) + b"\n"], tokens=len(words), streaming=False)
    events = [_sse({**head, "choices": [choice(word, None)]}) for word in words]
    events.append(_sse({**head, "choices": [choice("", gen.done_reason)]}))
    options = gen.body.get("stream_options")
    if isinstance(options, dict) and options.get("include_usage") is True:
        events.append(_sse({**head, "choices": [], "usage": _usage(gen)}))
    events.append(b"data: [DONE]\n\n")
    return _Plan(SSE, events, tokens=len(words))


def _render_responses(gen: _Gen) -> _Plan:
    """A minimal OpenAI Responses API answer: one assistant message of output text."""
    words = gen.words
    text = "".join(words)
    message_id = f"msg_{gen.ident}"
    part = {"type": "output_text", "text": text, "annotations": []}
    item = {
        "type": "message",
        "id": message_id,
        "status": "completed",
        "role": "assistant",
        "content": [part],
    }
    response: dict[str, Any] = {
        "id": f"resp_{gen.ident}",
        "object": "response",
        "created_at": CREATED_UNIX,
        "status": "completed",
        "error": None,
        "incomplete_details": None,
        "instructions": gen.body.get("instructions"),
        "model": gen.model,
        "output": [item],
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": gen.prompt_tokens,
            "output_tokens": gen.count,
            "total_tokens": gen.prompt_tokens + gen.count,
        },
    }
    if gen.done_reason == "length":
        response["status"] = "incomplete"
        response["incomplete_details"] = {"reason": "max_output_tokens"}
    if not gen.streams:
        return _Plan(JSON_OPENAI, [_dumps(response) + b"\n"], tokens=len(words), streaming=False)

    where = {"item_id": message_id, "output_index": 0, "content_index": 0}
    pending = {**response, "status": "in_progress", "output": [], "usage": None, "incomplete_details": None}
    events: list[tuple[str, dict[str, Any]]] = [
        ("response.created", {"response": pending}),
        (
            "response.output_item.added",
            {"output_index": 0, "item": {**item, "status": "in_progress", "content": []}},
        ),
        ("response.content_part.added", {**where, "part": {**part, "text": ""}}),
        *(("response.output_text.delta", {**where, "delta": word, "logprobs": []}) for word in words),
        ("response.output_text.done", {**where, "text": text, "logprobs": []}),
        ("response.content_part.done", {**where, "part": part}),
        ("response.output_item.done", {"output_index": 0, "item": item}),
        (
            "response.completed" if response["status"] == "completed" else "response.incomplete",
            {"response": response},
        ),
    ]
    chunks = [
        f"event: {kind}\n".encode() + _sse({"type": kind, "sequence_number": number, **payload})
        for number, (kind, payload) in enumerate(events)
    ]
    return _Plan(SSE, chunks, tokens=len(words), first_token=3)


_RENDERERS: dict[str, Callable[[_Gen], _Plan]] = {
    "/api/generate": _render_generate,
    "/api/chat": _render_chat,
    "/api/embed": _render_embed,
    "/api/embeddings": _render_embeddings,
    "/v1/chat/completions": _render_openai_chat,
    "/v1/completions": _render_openai_text,
    "/v1/embeddings": _render_openai_embeddings,
    "/v1/responses": _render_responses,
}


# -- helpers -----------------------------------------------------------------------------


async def _forever() -> None:
    """Go silent until cancelled (by the peer closing, or by close())."""
    await asyncio.get_running_loop().create_future()


def _dumps(value: Any) -> bytes:
    """Compact JSON like Go's encoder, so sizes and framing resemble Ollama's."""
    # A lone surrogate from the request cannot be UTF-8; Go's encoder writes U+FFFD for it too.
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    return text.encode("utf-8", "surrogatepass").decode("utf-8", "replace").encode()


def _ndjson(value: Any) -> bytes:
    return _dumps(value) + b"\n"


def _sse(value: Any) -> bytes:
    return b"data: " + _dumps(value) + b"\n\n"


def _json_response(value: Any, status: int = 200) -> web.Response:
    return web.Response(body=_dumps(value), status=status, content_type="application/json", charset="utf-8")


def _openai_json_response(value: Any) -> web.Response:
    return web.Response(body=_dumps(value) + b"\n", content_type="application/json")


def _ns(seconds: float) -> int:
    return round(seconds * 1e9)


def _go_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """An object as Ollama's Go decoder fills its request structs: keys match
    case-insensitively (`"Model"` is `model`) and the last duplicate wins."""
    return {key.lower(): value for key, value in pairs}


def _text_of(value: Any) -> str:
    """All the text in a prompt, message list or content-part list, in order."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return " ".join(_text_of(item) for item in value)
    if isinstance(value, dict):
        return " ".join(_text_of(value.get(key)) for key in ("content", "text"))
    return ""


def _embedding(text: str) -> list[float]:
    """A fixed-size vector that depends only on the text."""
    return [((zlib.crc32(f"{i}:{text}".encode()) % 2001) - 1000) / 1000 for i in range(EMBEDDING_DIMENSIONS)]


def _model_size(name: str) -> int:
    return 1_000_000_000 + zlib.crc32(name.encode()) % 1_000_000_000


def _details() -> dict[str, Any]:
    return {
        "parent_model": "",
        "format": "gguf",
        "family": "llama",
        "families": ["llama"],
        "parameter_size": "3.2B",
        "quantization_level": "Q4_K_M",
    }


def _model_entry(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "model": name,
        "modified_at": MODIFIED_AT,
        "size": _model_size(name),
        "digest": hashlib.sha256(name.encode()).hexdigest(),
        "details": _details(),
    }


# -- standalone --------------------------------------------------------------------------


async def _serve(args: argparse.Namespace) -> None:
    sim = Simulator(
        models=[m for m in args.models.split(",") if m],
        tokens=args.tokens,
        token_delay=args.token_delay,
        load_delay=args.load_delay,
    )
    url = await sim.start(args.host, args.port)
    print(
        f"simulated Ollama listening on {url} (models: {', '.join(sim._model_names())}); Ctrl-C to stop",
        flush=True,
    )
    try:
        await _forever()
    finally:
        await sim.close()


def main(argv: list[str] | None = None) -> None:
    """Serve a simulated Ollama until interrupted, for trying the proxy without a GPU."""
    parser = argparse.ArgumentParser(prog="python -m proxy.simulator", description=main.__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=11434, help="0 picks a free port (default: %(default)s)")
    parser.add_argument(
        "--models", default="llama3.2,big,small", help="comma-separated (default: %(default)s)"
    )
    parser.add_argument("--tokens", type=int, default=8, help="tokens per answer (default: %(default)s)")
    parser.add_argument(
        "--token-delay", type=float, default=0.05, help="seconds per token (default: %(default)s)"
    )
    parser.add_argument(
        "--load-delay", type=float, default=0.0, help="seconds before headers (default: %(default)s)"
    )
    try:
        asyncio.run(_serve(parser.parse_args(argv)))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
