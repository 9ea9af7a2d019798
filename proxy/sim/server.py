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

Run ``python -m proxy.sim`` to serve it standalone, e.g. to try the proxy. This module is
the server and its instrumentation; `generation` reads a request, `wire` renders the
answer and `faults` writes it, breaking it when told to.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Iterable
from typing import Any

from aiohttp import web

from proxy.ollama.names import canonical_model
from proxy.sim.faults import FAULTS, GARBAGE, Reply, forever
from proxy.sim.generation import Generation, GenRecord, Knobs, go_object
from proxy.sim.wire import (
    CREATED_UNIX,
    EMBEDDING_DIMENSIONS,
    EXPIRES_AT,
    MODIFIED_AT,
    RENDERERS,
    VERSION,
    details,
    json_response,
    model_entry,
    model_size,
    openai_json_response,
)


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

        #: Models held in memory at once (0: no limit); loading another evicts the least recently used.
        self.max_loaded = 0
        #: Seconds a generation waits while its model is loaded into memory (a "swap").
        self.swap_delay = 0.0
        #: Models loaded into memory since start: each time a generation found its model not loaded.
        self.swaps = 0
        self._loaded: dict[str, None] = {}  # canonical names, least recently used first

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
        for path in RENDERERS:
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

    async def refuse(self) -> None:
        """Stop accepting connections while the generations in progress finish, as a host
        taken out of service does (`close` is the crash: it cuts them off too)."""
        if self._runner is not None:
            for site in self._runner.sites:
                await site.stop()
            if self._runner.server is not None:
                # Busy connections close after their answer, idle keep-alive ones now (as
                # Go's http.Server.Shutdown does): a pooled one must not take a new request.
                self._runner.server.pre_shutdown()
                busy = {task.get_name() for task in self._handlers}
                for conn in self._runner.server.connections:
                    if conn.transport is not None and str(id(conn.transport)) not in busy:
                        conn.transport.close()

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

    def _knobs(self) -> Knobs:
        return Knobs(
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
        task.set_name(str(id(request.transport)))  # so `refuse` knows the connection is busy
        self._handlers.add(task)
        self.active += 1
        self.peak = max(self.peak, self.active)
        self._changed()
        reply = Reply(self._changed, request, record)
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

    async def _generate(self, request: web.Request, record: GenRecord, knobs: Knobs, reply: Reply) -> None:
        openai = request.path.startswith("/v1/")
        record.body = await request.read()
        try:
            body = json.loads(record.body, object_pairs_hook=go_object)
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

        await self._load(canonical_model(model))
        await asyncio.sleep(knobs.load_delay)
        if knobs.fault == "status":
            await reply.error(knobs.fault_status, "simulated failure", openai)
            return
        if knobs.fault == "hang_headers":
            await forever()
        if knobs.fault == "garbage":
            await reply.garbage()
        gen = Generation(path=request.path, body=body, raw=record.body, model=model, knobs=knobs)
        plan = RENDERERS[request.path](gen)
        if knobs.fault == "garbage_body":
            await reply.start(200, plan.content_type, None if plan.streaming else len(GARBAGE))
            await reply.send(GARBAGE)
            await reply.finish()
            return
        await reply.play(plan, knobs)

    async def _load(self, model: str) -> None:
        """Have `model` in memory: a use of a loaded one only refreshes it; another is a swap,
        evicting the least recently used past `max_loaded`, and costs `swap_delay`."""
        if model in self._loaded:
            self._loaded[model] = self._loaded.pop(model)
            return
        self.swaps += 1
        self._loaded[model] = None
        while self.max_loaded and len(self._loaded) > self.max_loaded:
            del self._loaded[next(iter(self._loaded))]
        self._changed()
        if self.swap_delay:
            await asyncio.sleep(self.swap_delay)

    @property
    def loaded(self) -> list[str]:
        """Canonical names of the models in memory, least recently used first (what /api/ps lists)."""
        return list(self._loaded)

    # -- other endpoints ---------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.Response(text="Ollama is running")

    async def _version(self, request: web.Request) -> web.Response:
        return json_response({"version": VERSION})

    async def _tags(self, request: web.Request) -> web.Response:
        return json_response({"models": [model_entry(name) for name in self.model_names()]})

    async def _ps(self, request: web.Request) -> web.Response:
        """The models in memory: loaded by a generation, until evicted past `max_loaded`."""
        loaded = []
        for name in self.model_names():
            if name in self._loaded:
                entry = {key: value for key, value in model_entry(name).items() if key != "modified_at"}
                loaded.append(
                    {
                        **entry,
                        "expires_at": EXPIRES_AT,
                        "size_vram": model_size(name),
                        "context_length": 4096,
                    }
                )
        return json_response({"models": loaded})

    async def _show(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return json_response({"error": f"invalid JSON body: {exc}"}, status=400)
        name = (body.get("model") or body.get("name")) if isinstance(body, dict) else None
        if not isinstance(name, str) or not name:
            return json_response({"error": "model is required"}, status=400)
        if not self._known(name):
            return json_response({"error": f"model '{name}' not found"}, status=404)
        return json_response(
            {
                "license": "",
                "modelfile": f"# Modelfile generated by the Ollama simulator\nFROM {canonical_model(name)}\n",
                "parameters": "",
                "template": "{{ .Prompt }}",
                "details": details(),
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
            for name in self.model_names()
        ]
        return openai_json_response({"object": "list", "data": data})

    def model_names(self) -> list[str]:
        return sorted({canonical_model(m) for m in self.models})
