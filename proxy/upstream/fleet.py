"""Several Ollama hosts as one: each backend's health, where a generation runs, and the
outage rules for the fleet as a whole.

Each backend has its own `UpstreamHealth` (one probe task each, over the server's
session): up or down after `health.unhealthy_after` failures in a row, the models
it lists (`/api/tags`) and has loaded (`/api/ps`). The fleet is the `Router` the
scheduler asks where a slot may go: healthy backends that list the model (or whose
list is not known yet), with room under their own `max_concurrent`, those that have
the model loaded first, then the most free, then in turn. Admission is paused only
when no backend is up; part one's outage grace then runs for the fleet as a whole.

`upstream.url` alone is a fleet of one, named `default`, so there is one code path.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

import aiohttp

from proxy.config import BackendConfig, Config
from proxy.errors import ModelNotFound, ProxyError
from proxy.observe.metrics import BackendGauges
from proxy.upstream.health import Gate, Probe, UpstreamHealth

log = logging.getLogger("proxy.health")


class _FleetGate:
    """What each backend's health may do to admission, judged for the fleet as a whole:
    pause only when no backend is up, fail the waiters only when every backend's grace ran out."""

    def __init__(self, fleet: Fleet, gate: Gate) -> None:
        self._fleet = fleet
        self._gate = gate

    def pause(self) -> None:
        if not self._fleet.any_up():
            self._gate.pause()

    def resume(self) -> None:
        if self._fleet.any_up():
            self._gate.resume()  # a backend came back or joined: room on it, so a pass runs

    def fail_waiting(self, error: Callable[[], ProxyError]) -> int:
        if not self._fleet.outage_over():
            return -1
        return self._gate.fail_waiting(error)

    def fail_unlisted(self, unlisted: Callable[[str, float], bool]) -> int:
        return self._gate.fail_unlisted(self._fleet.unlisted)  # another backend may list it


class Fleet:
    """Every backend's health, and the `Router` the scheduler asks where a slot may go."""

    def __init__(self, config: Config, gate: Gate) -> None:
        self._gate = _FleetGate(self, gate)
        self._health_config = config.health
        self._backends: dict[str, BackendConfig] = dict(config.fleet)
        self._members = {name: self._member(name, backend) for name, backend in self._backends.items()}
        #: Every URL a backend has had: a removed backend's running requests still find theirs.
        self._urls = {name: backend.url for name, backend in self._backends.items()}
        self._turn = 0
        self._changed = asyncio.Event()

    def _member(self, name: str, backend: BackendConfig) -> UpstreamHealth:
        member = UpstreamHealth(self._health_config, backend.url, self._gate)
        member.name = "upstream" if len(self._backends) == 1 and name == "default" else f"backend {name}"
        return member

    def __repr__(self) -> str:
        states = ", ".join(f"{name}={member.up}" for name, member in self._members.items())
        return f"<Fleet {states}>"

    # -- the fleet as a whole ----------------------------------------------------

    def any_up(self) -> bool:
        return any(member.up is not False for member in self._members.values())

    def outage_over(self) -> bool:
        """No backend is up and each has been down for at least `health.outage_grace`."""
        grace = self._health_config.outage_grace
        return all(m.up is False and m.down_for() >= grace - 0.001 for m in self._members.values())

    @property
    def up(self) -> bool | None:
        """True while a backend is up, False while all are down, None before any is probed."""
        states = [member.up for member in self._members.values()]
        if True in states:
            return True
        return None if None in states else False

    def lists(self, model: str) -> bool:
        """Some backend's last list has `model` (canonical)."""
        return any(member.lists(model) for member in self._members.values())

    @property
    def models(self) -> frozenset[str] | None:
        """The union of the lists known so far; None while no backend's list is known."""
        known = [member.models for member in self._members.values() if member.models is not None]
        return frozenset().union(*known) if known else None

    def names(self) -> list[str]:
        """The backends in config order."""
        return list(self._members)

    def member(self, name: str) -> UpstreamHealth | None:
        return self._members.get(name)

    def url(self, backend: str) -> str:
        """Where a slot granted on `backend` sends its request (also once it was removed)."""
        return self._urls[backend]

    def first_healthy(self) -> str:
        """The first backend in config order that is up (or not probed yet); else the first."""
        for name, member in self._members.items():
            if member.up is not False:
                return name
        return next(iter(self._members))

    def healthy_urls(self) -> list[str]:
        """The URLs of the backends up (or not probed yet), in config order."""
        return [self._urls[name] for name, member in self._members.items() if member.up is not False]

    def for_model(self, model: str | None) -> str:
        """A healthy backend that lists `model` (for `/api/show`); else the first healthy."""
        for name, member in self._members.items():
            if model is not None and member.up is not False and member.lists(model):
                return name
        return self.first_healthy()

    def view(self, running: Mapping[str, int]) -> dict[str, object]:
        """For `/-/queue`: each backend's health, slots and models."""
        backends = {}
        for name, member in self._members.items():
            loaded = member.loaded_models
            backends[name] = {
                "url": self._backends[name].url,
                "running": running.get(name, 0),
                "max_concurrent": self._backends[name].max_concurrent,
                "loaded": None if loaded is None else sorted(loaded),
                **member.view(),
            }
        first = self._members[self.first_healthy()].view()  # part one's fields, for one upstream
        return {**first, "up": self.up, "backends": backends}

    def gauges(self, running: Mapping[str, int]) -> list[BackendGauges]:
        """Each backend for /metrics: in rotation, slots held, its limit."""
        return [
            BackendGauges(
                name, member.up is not False, running.get(name, 0), self._backends[name].max_concurrent
            )
            for name, member in self._members.items()
        ]

    # -- the router ------------------------------------------------------------

    def candidates(self, model: str, running: Mapping[str, int]) -> Sequence[str]:
        """Backends that may run `model` now, best first: loaded there, then most free, then
        (a tie the contract leaves open) the fewest models loaded, so a model new to the fleet
        goes where it evicts nothing, then in turn."""
        fitting = []
        count = len(self._members)
        for index, (name, member) in enumerate(self._members.items()):
            free = self._backends[name].max_concurrent - running.get(name, 0)
            if free > 0 and member.may_run(model):
                crowd = len(member.loaded_models or ())
                fitting.append((not member.loaded(model), -free, crowd, (index - self._turn) % count, name))
        self._turn = (self._turn + 1) % max(1, count)
        return [entry[-1] for entry in sorted(fitting)]

    # -- what a request asks ---------------------------------------------------

    def sent(self, backend: str, model: str) -> None:
        """A generation for `model` goes to `backend`: Ollama loads it there, so the next one
        for it prefers that host before `/api/ps` is read again (which then corrects this)."""
        member = self._members.get(backend)
        if member is not None:
            member.note_loaded(model)

    def refuse_newcomer(self) -> None:
        """Raise the 503 once no backend has answered for `health.outage_grace`."""
        if self.outage_over():
            for member in self._members.values():
                member.refuse_newcomer()

    def unlisted(self, model: str, since: float) -> bool:
        """No healthy backend lists `model` (canonical), each by a list read after `since`;
        as `check_model` judges, backends known down do not count."""
        healthy = [member for member in self._members.values() if member.up is not False]
        return bool(healthy) and all(member.lacks(model, since) for member in healthy)

    async def check_model(self, model: str, arrived: float) -> None:
        """Raise Ollama's 404 if no healthy backend lists `model` (each re-reads a stale list
        first, as for one upstream). With no healthy backend the outage rules apply instead."""
        healthy = [member for member in self._members.values() if member.up is not False]
        if not healthy:
            return
        answers = await asyncio.gather(
            *(member.check_model(model, arrived) for member in healthy), return_exceptions=True
        )
        if all(isinstance(answer, ModelNotFound) for answer in answers):
            raise ModelNotFound(model)

    def keep_waiting(self, error: str, backend: str, model: str) -> bool:
        """A request for `model` on `backend` could not connect: count it there; True if it
        should go back to its place, because another backend may run it now or (as part one's
        outage rules say) one may come back within `health.outage_grace`."""
        member = self._members.get(backend)
        waits = member.keep_waiting(error) if member is not None else self._health_config.outage_grace > 0
        others = (each for name, each in self._members.items() if name != backend)
        return waits or any(each.may_run(model) for each in others)

    def suspect(self, backend: str) -> None:
        member = self._members.get(backend)
        if member is not None:
            member.suspect()

    async def probe(self) -> Probe:
        """Probe every backend now; ok when one answers (the first such in config order)."""
        probes = await asyncio.gather(*(member.probe() for member in self._members.values()))
        for probe in probes:
            if probe.ok:
                return probe
        return probes[0] if len(probes) == 1 else Probe(False, None, "; ".join(p.detail for p in probes))

    # -- life ------------------------------------------------------------------

    def configure(self, config: Config) -> None:
        """Apply a reload: new backends join (unknown until probed), removed ones take no new
        requests (their running requests finish), changed ones follow their new URL."""
        self._health_config = config.health
        self._backends = dict(config.fleet)
        members = {}
        for name, backend in self._backends.items():
            member = self._members.get(name)
            if member is None:
                member = self._member(name, backend)
                log.info(
                    "backend %s joined: %s, max_concurrent=%d", name, backend.url, backend.max_concurrent
                )
            members[name] = member
            member.configure(config.health, backend.url)
            self._urls[name] = backend.url
        for name in self._members.keys() - members.keys():
            log.info("backend %s removed: it takes no new requests; its running requests finish", name)
        self._members = members
        self._changed.set()

    async def run(self, session: aiohttp.ClientSession) -> None:
        """One probe task per backend, following reloads, until cancelled."""
        tasks: dict[UpstreamHealth, asyncio.Task[None]] = {}
        try:
            while True:
                self._changed.clear()
                current = set(self._members.values())
                for member in tasks.keys() - current:
                    tasks.pop(member).cancel()
                for member in current - tasks.keys():
                    tasks[member] = asyncio.create_task(member.run(session), name=f"probe {member.name}")
                await self._changed.wait()
                # The backends changed: pause if none left is up (a removed one may have been
                # the last), else let a pass send waiters to the new ones.
                self._gate.pause()
                self._gate.resume()
        finally:
            for task in tasks.values():
                task.cancel()
            await asyncio.gather(*tasks.values(), return_exceptions=True)
