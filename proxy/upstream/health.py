"""What the proxy knows about upstream: up or down and since when, and the models it lists.

One `UpstreamHealth` per server, with one background task (`run`, started and
stopped with the listen app) that reads `GET /api/version` and `GET /api/tags`
every `health.interval`, each bounded by `health.timeout`, over the server's
client session.

Why it exists: when Ollama restarts, every request admitted into the gap
fails to connect, frees its slot at once and lets the next one fail the same
way, so a whole queue is lost in milliseconds. Instead a request that could not
connect reports it here (`keep_waiting`); the outage is noted at once, admission
is paused through the `Gate`, and the request goes back to its place. Probing
then decides: when upstream answers, admission resumes in arrival order; when
the outage outlasts `health.outage_grace`, every waiting request gets a 503.

"Reachable" means upstream answered `/api/version` with any status below 500
within the timeout: something that speaks HTTP is there. (`/-/ready` is
stricter and wants a 200.)

With several hosts each has one of these (`upstream.fleet`): failures count up to
`health.unhealthy_after`, and `/api/ps` says what is loaded. A little over 400
lines because probing, the lists it reads and the outage it decides are one
state machine, kept in one place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import aiohttp

from proxy.config import HealthConfig
from proxy.errors import ModelNotFound, ProxyError, UpstreamDown
from proxy.observe.logs import clip
from proxy.ollama.names import canonical_model
from proxy.units import format_duration

log = logging.getLogger("proxy.health")

#: Names the probes in Ollama's logs (and lets a test upstream tell them from relayed requests).
PROBE_USER_AGENT = "ollama-queue-proxy health probe"
#: A probe takes a fresh connection and closes it: it never holds a pooled connection upstream,
#: and never reads a stale one left from before a restart.
_PROBE_HEADERS = {"User-Agent": PROBE_USER_AGENT, "Connection": "close"}


class Gate(Protocol):
    """What the health component may do to admission (implemented by `Admission`)."""

    def pause(self) -> None: ...
    def resume(self) -> None: ...
    def fail_waiting(self, error: Callable[[], ProxyError]) -> int:
        """End every wait with `error()`; how many, or -1 if the gate judged it not yet time."""
        ...

    def fail_unlisted(self, unlisted: Callable[[str, float], bool]) -> int:
        """End with a 404 every wait whose model `unlisted(model, arrived)`; how many."""
        ...


@dataclass(frozen=True, slots=True)
class Probe:
    """One reading of `/api/version`: `ok` with upstream's version, or the reason it failed."""

    ok: bool
    status: int | None  # upstream's HTTP status, None when no answer came
    detail: str  # the version when ok, else what went wrong


class UpstreamHealth:
    """Up or down, the models upstream lists, and the outage's effect on the queue."""

    def __init__(self, config: HealthConfig, url: str, gate: Gate) -> None:
        self._config = config
        self._url = url
        self._gate = gate
        self._session: aiohttp.ClientSession | None = None
        #: None until the first probe or failed connection says otherwise.
        self._up: bool | None = None
        self._since = 0.0  # loop time of the last change of `_up`
        self._grace_over = False
        self._grace_timer: asyncio.TimerHandle | None = None
        #: The last probe's or connection's failure, kept after recovery for the queue page.
        self.last_error = ""
        self.version = ""
        #: Canonical names upstream lists; None while unknown (never read, or not Ollama's answer).
        self._models: frozenset[str] | None = None
        self._models_at = -math.inf  # loop time the list's request was sent
        self._tags: asyncio.Task[None] | None = None
        self._tags_sent = -math.inf
        self._probe: asyncio.Task[Probe] | None = None
        self._wake = asyncio.Event()
        #: Failures in a row (probes, or connections of real requests) since the last good probe.
        self._failures = 0
        #: Canonical names of the models loaded (`/api/ps`); None while unknown.
        self._loaded: frozenset[str] | None = None
        #: Names this host in log lines ("upstream" for the one backend of `upstream.url`).
        self.name = "upstream"

    def configure(self, config: HealthConfig, url: str) -> None:
        """Apply a reloaded config; a new upstream URL is unknown until probed."""
        self._config = config
        if url != self._url:
            self._url = url
            self._models, self._models_at = None, -math.inf
            self._wake.set()
        if self._up is False:
            self._arm_grace()

    # -- views ---------------------------------------------------------------------

    @property
    def up(self) -> bool | None:
        """True or False once known; None before the first probe."""
        return self._up

    def down_for(self) -> float:
        """Seconds the current outage has lasted; 0 while up."""
        return asyncio.get_running_loop().time() - self._since if self._up is False else 0.0

    @property
    def models(self) -> frozenset[str] | None:
        """Canonical names of the models upstream lists, or None while unknown."""
        return self._models

    def view(self) -> dict[str, object]:
        """For `/-/queue`: what the proxy knows of upstream now."""
        return {
            "up": self._up,
            "down_for": round(self.down_for(), 3),
            "version": self.version,
            "last_error": self.last_error,
            "models": None if self._models is None else sorted(self._models),
        }

    def lists(self, model: str) -> bool:
        """Upstream's last list has `model` (a canonical name)."""
        return self._models is not None and model in self._models

    def lacks(self, model: str, since: float) -> bool:
        """Up, and a list read after `since` (loop time) does not have `model` (canonical)."""
        return (
            self._up is True
            and self._models is not None
            and self._models_at >= since
            and model not in self._models
        )

    def may_run(self, model: str) -> bool:
        """Healthy (or not probed yet) and listing `model`, or with a list not known yet.

        A backend that failed since its last good probe (but not yet `unhealthy_after`
        times) is passed over until the probe that failure woke has answered: a request
        that could not connect then goes elsewhere, or waits that one probe, rather than
        hitting the same refusal again.
        """
        if self._up is False or self._failures:
            return False
        return self._models is None or model in self._models

    def loaded(self, model: str) -> bool:
        """`/api/ps` last said `model` (canonical) is loaded."""
        return self._loaded is not None and model in self._loaded

    @property
    def loaded_models(self) -> frozenset[str] | None:
        return self._loaded

    def note_loaded(self, model: str) -> None:
        """A generation for `model` was sent here: it is loaded now, until `/api/ps` says otherwise."""
        self._loaded = frozenset({model} | (self._loaded or frozenset()))

    # -- what a request asks -------------------------------------------------------

    def refuse_newcomer(self) -> None:
        """Raise the 503 while upstream is known down and waiting would not help."""
        if self._up is False and self._grace_over:
            raise self._outage_error()

    async def check_model(self, model: str, arrived: float) -> None:
        """Raise Ollama's 404 if upstream does not have `model`.

        A list read before the request `arrived` (loop time) may predate a pull, so
        it is read again first (one read shared by everyone asking at once), unless
        upstream is down: then nothing can have been pulled, and the last list
        stands (as it does when the read fails). An unknown list refuses nothing:
        upstream then answers for itself.
        """
        key = canonical_model(model)
        if self._models is None or key in self._models:
            return
        if self._models_at < arrived and self._up is not False:
            await self._refresh_tags(arrived)
            if self._models is None or key in self._models:
                return
        raise ModelNotFound(model)

    def _answer_unlisted(self) -> None:
        """A fresh list: requests that arrived during an outage, for a model it does not
        have, get Ollama's 404 now (checked at arrival, they would have got it then)."""
        if failed := self._gate.fail_unlisted(self.lacks):
            log.info(
                "%s lists none of the models %d waiting requests asked for: answered 404", self.name, failed
            )

    def keep_waiting(self, error: str) -> bool:
        """A request could not connect (upstream never received it): note the outage at
        once, and say whether the request should go back to the queue (True) or fail now."""
        self._went_down(error)
        return self._config.outage_grace > 0 and not self._grace_over

    def suspect(self) -> None:
        """Upstream broke a running request: probe now rather than at the next interval."""
        self._wake.set()

    # -- probing -------------------------------------------------------------------

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Probe now, then every `health.interval` (at once when woken), until cancelled."""
        self._session = session
        try:
            while True:
                self._wake.clear()
                await self.probe()
                if self._up:
                    await self._refresh_tags(asyncio.get_running_loop().time())
                    self._answer_unlisted()
                    await self._read_ps()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._config.interval):
                        await self._wake.wait()
        finally:
            self._cancel_grace()
            for task in (self._probe, self._tags):
                if task is not None:
                    task.cancel()

    async def probe(self) -> Probe:
        """Read `/api/version` now (joining a read already under way) and act on the result."""
        if self._probe is None:
            self._probe = asyncio.get_running_loop().create_task(self._read_version())
            self._probe.add_done_callback(self._probed)
        return await asyncio.shield(self._probe)

    def _probed(self, task: asyncio.Task[Probe]) -> None:
        self._probe = None
        if task.cancelled() or task.exception() is not None:
            return
        result = task.result()
        reachable = result.status is not None and result.status < 500
        if reachable:
            if result.ok:
                self.version = result.detail
            self._came_up()
        else:
            self._went_down(result.detail)

    async def _read_version(self) -> Probe:
        assert self._session is not None, "run() has not started"
        url = self._url
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._session.get(url + "/api/version", headers=_PROBE_HEADERS) as resp:
                    if resp.status != 200:
                        return Probe(
                            False, resp.status, f"upstream {url} answered /api/version with {resp.status}"
                        )
                    data = await resp.json(content_type=None)
        except TimeoutError:
            limit = format_duration(self._config.timeout)
            return Probe(
                False, None, f"upstream {url} did not answer /api/version within health.timeout={limit}"
            )
        except (aiohttp.ClientError, OSError) as exc:
            return Probe(
                False, None, f"upstream {url} not answering /api/version: {str(exc) or type(exc).__name__}"
            )
        except ValueError:
            return Probe(False, 200, f"upstream {url} answered /api/version with a body that is not JSON")
        version = data.get("version") if isinstance(data, dict) else None
        return Probe(True, 200, version if isinstance(version, str) else "unknown")

    async def _refresh_tags(self, after: float) -> None:
        """Have a list whose read began at or after `after`: join the read under way if it
        began late enough, else start one (after it, since reads must not overlap)."""
        for _ in range(2):
            if self._models_at >= after:
                return
            task = self._tags
            if task is None:
                self._tags_sent = asyncio.get_running_loop().time()
                task = self._tags = asyncio.get_running_loop().create_task(self._read_tags(self._tags_sent))
                task.add_done_callback(self._tags_read)
            joined_late = self._tags_sent < after
            with contextlib.suppress(Exception):
                await asyncio.shield(task)
            if not joined_late:
                return

    def _tags_read(self, task: asyncio.Task[None]) -> None:
        self._tags = None
        if not task.cancelled():
            task.exception()  # logged in _read_tags; mark seen

    async def _read_tags(self, sent: float) -> None:
        assert self._session is not None, "run() has not started"
        url = self._url
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._session.get(url + "/api/tags", headers=_PROBE_HEADERS) as resp:
                    if resp.status != 200:
                        log.warning(
                            "upstream %s answered /api/tags with %d; model list unknown", url, resp.status
                        )
                        self._set_models(None, sent)
                        return
                    data = await resp.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            # Keep the last list: a failed read says nothing about which models exist.
            log.info(
                "could not read upstream's models from %s/api/tags: %s", url, str(exc) or type(exc).__name__
            )
            return
        self._set_models(_model_names(data), sent)

    async def _read_ps(self) -> None:
        """What `/api/ps` says is loaded (routing prefers a host that has the model in memory);
        a failed read keeps the last answer, which only costs a less apt choice."""
        assert self._session is not None, "run() has not started"
        try:
            async with asyncio.timeout(self._config.timeout):
                async with self._session.get(self._url + "/api/ps", headers=_PROBE_HEADERS) as resp:
                    data = await resp.json(content_type=None) if resp.status == 200 else None
        except (TimeoutError, aiohttp.ClientError, OSError, ValueError) as exc:
            log.debug("could not read %s/api/ps: %s", self._url, str(exc) or type(exc).__name__)
            return
        loaded = _model_names(data)
        if loaded != self._loaded and loaded is not None:
            names = ", ".join(clip(name) for name in sorted(loaded)[:20]) or "none"
            log.info("%s loaded models: %s", self.name, clip(names, 1000))
        self._loaded = loaded

    def _set_models(self, models: frozenset[str] | None, sent: float) -> None:
        if models != self._models:
            # Upstream's names are bounded in the log like a client's: each, and the line.
            names = ", ".join(clip(name) for name in sorted(models)[:20]) if models is not None else ""
            log.info(
                "upstream models: %s", "unknown" if models is None else clip(f"{len(models)} ({names})", 1000)
            )
        self._models, self._models_at = models, sent

    # -- outage bookkeeping ----------------------------------------------------------

    def _went_down(self, error: str) -> None:
        self.last_error = error
        self._wake.set()  # probe at once, then every interval
        self._failures += 1
        if self._up is False:
            return
        if self._up is True and self._failures < self._config.unhealthy_after:
            log.info(
                "%s failed %d of health.unhealthy_after=%d times in a row: %s",
                self.name, self._failures, self._config.unhealthy_after, error,
            )  # fmt: skip
            return
        self._up, self._since, self._grace_over = False, asyncio.get_running_loop().time(), False
        self._gate.pause()
        log.warning(
            "%s down: %s; while nothing can serve them, waiting requests keep their place "
            "for up to health.outage_grace=%s",
            self.name, error, format_duration(self._config.outage_grace),
        )  # fmt: skip
        self._arm_grace()

    def _came_up(self) -> None:
        suspected, self._failures = self._failures, 0
        if self._up is True:
            if suspected:
                self._gate.resume()  # back in rotation: a pass may send waiters here again
            return
        was_down = self._up is False
        outage = self.down_for()
        self._up, self._since, self._grace_over = True, asyncio.get_running_loop().time(), False
        self._cancel_grace()
        if was_down:
            log.info(
                "%s up again after %.1fs (version %s): admitting waiting requests",
                self.name, outage, self.version,
            )  # fmt: skip
        else:
            log.info("%s up (version %s)", self.name, self.version or "unknown")
        self._gate.resume()

    def _arm_grace(self) -> None:
        self._cancel_grace()
        if self._grace_over:
            return
        loop = asyncio.get_running_loop()
        self._grace_timer = loop.call_at(self._since + self._config.outage_grace, self._end_grace)

    def _cancel_grace(self) -> None:
        if self._grace_timer is not None:
            self._grace_timer.cancel()
            self._grace_timer = None

    def _end_grace(self) -> None:
        self._grace_timer = None
        self._grace_over = True
        failed = self._gate.fail_waiting(self._outage_error)
        if failed < 0:
            return  # another backend still serves: nothing waits for this one
        log.warning(
            "upstream outage outlasted health.outage_grace=%s: %d waiting requests answered 503; "
            "new requests get 503 until upstream answers",
            format_duration(self._config.outage_grace), failed,
        )  # fmt: skip

    def _outage_error(self) -> UpstreamDown:
        down = self.down_for()
        return UpstreamDown(
            f"upstream (Ollama) has been unreachable for {down:.0f}s; retry once it is back",
            retry_after=max(1, math.ceil(self._config.interval)),
        )


def _model_names(data: object) -> frozenset[str] | None:
    """Canonical names from Ollama's /api/tags answer; None if it is not that shape."""
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        return None
    names: set[str] = set()
    for entry in data["models"]:
        if isinstance(entry, dict):
            names.update(
                canonical_model(entry[k]) for k in ("name", "model") if isinstance(entry.get(k), str)
            )
    return frozenset(names)
