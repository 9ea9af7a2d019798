"""The capacity ledger shared by several proxies: slots are leases in Redis.

Several proxies in front of one Ollama must enforce one `max_concurrent` between
them, or together they let N times the load onto the GPU. Counters that only go
up and down leak when a proxy dies between the two; so a slot here is a *lease*:
a member of a sorted set per limit (`<prefix>:lease:global`, `…:model:<name>`)
whose score is its expiry, read from the Redis server's clock (`TIME`), never a
proxy's. Taking a slot is one Lua script over every limit that applies to the
claim (reap the expired, check every count, add to all or to none); giving it
back is another (remove, then publish on `<prefix>:room`, which wakes the
waiters of every proxy). A running request's leases are renewed every lease/3;
a proxy killed with SIGKILL stops renewing, and its slots come back within one
`lease`. The scripts take a list of (limit key, cap) pairs, so a new kind of
limit (per backend, per client key) is one more pair, not a new script.

Each proxy also keeps a heartbeat (`<prefix>:peers`, scored by expiry) with its
limits, so every proxy knows how many are alive (its share of each limit when
Redis is down) and warns when their limits differ.

Redis down: `local` serves on, this proxy admitting up to its share of each limit
(limit ÷ proxies last seen alive, at least 1), counted from the slots it holds;
`refuse` raises `ClusterDown` (503) for every request that needs a new slot.
Running requests finish either way. When Redis answers again the proxy
re-registers and writes a lease for every request it runs (forced: they are
running upstream, and the ledger must say so; new admissions wait until the
counts are back under the limits).

It is longer than the house's ~400 lines because the ledger, its failure modes
(down, back, forgotten) and its background work share one state (the leases held,
written or not) that no other class may read; the Lua scripts live apart in
`redis_scripts`.

Only this module imports redis-py, and only `Server` imports this module, when
`cluster.redis` is set: without it the optional dependency is never needed.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import os
import socket
import uuid
from collections import Counter
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as BrokenConnection
from redis.exceptions import RedisError

from proxy.config import BackendConfig, ClusterConfig, LimitsConfig
from proxy.errors import ClusterDown
from proxy.scheduling import redis_scripts as scripts
from proxy.scheduling.capacity import Claim, LedgerLimits
from proxy.units import format_duration

log = logging.getLogger("proxy.cluster")

#: How often a proxy looks for room even without a message (the safety net under pub/sub).
POLL_INTERVAL = 1.0
#: One Redis command's bound: past it, Redis counts as down.
COMMAND_TIMEOUT = 2.0
#: Connections to Redis at most: calls beyond wait their turn (within COMMAND_TIMEOUT).
POOL_SIZE = 32
#: How often a proxy that lost Redis tries it again.
RETRY_INTERVAL = 0.5
#: How often a proxy says it is alive and counts the others (at most lease/3): the peer count
#: is each proxy's share of the limits should Redis go down, so it must not lag by long.
HEARTBEAT_INTERVAL = 1.0
#: After Redis returns, how long a proxy still keeps to its share (at least `cluster.lease`): the
#: others that lost Redis too need up to one retry (and a timed-out command) to write their
#: running requests back, later on a loaded machine.
REJOIN_WINDOW = 2 * RETRY_INTERVAL + COMMAND_TIMEOUT


class Forgotten(RedisError):
    """Redis answers but has lost this proxy's registration (and so its leases)."""


def _text(value: bytes | str | None) -> str:
    return value.decode() if isinstance(value, bytes) else value or ""


def _stop_if_cancelled() -> None:
    """End a background loop whose cancellation was swallowed: on Python 3.11, `wait_for`
    and `asyncio.timeout` (which redis-py's reads use) can lose a `cancel()` that races
    an answer or their own deadline (fixed in 3.12), and a `while True` would then keep
    the server's stop waiting forever. The request stays counted in `cancelling()`."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def connect(url: str) -> aioredis.Redis:
    """A client that fails fast (short timeouts, no backoff): a Redis that does not
    answer must turn into the `on_redis_down` mode within a second, not stall admissions.

    Calls beyond `POOL_SIZE` wait for a connection (redis-py's default pool instead fails
    the 101st concurrent call with "Too many connections", which read as Redis down when
    a burst of requests ended together).

    A broken connection is retried once, at once, on a new one: after Redis restarts,
    every pooled connection still points at the old server and fails on first use, and
    taking that for "Redis is down" flips a proxy into `local` while its peers admit
    through Redis, which together let more than the limit through. Every script is safe
    to run twice (`TAKE` answers "taken" for a member it already holds). A timeout is
    not retried: it is what a Redis that is really gone looks like.
    """
    pool = aioredis.BlockingConnectionPool.from_url(
        url,
        max_connections=POOL_SIZE,
        timeout=COMMAND_TIMEOUT,
        socket_connect_timeout=COMMAND_TIMEOUT,
        socket_timeout=COMMAND_TIMEOUT,
        retry=Retry(NoBackoff(), 1, supported_errors=(BrokenConnection,)),
        health_check_interval=0,
    )
    return aioredis.Redis.from_pool(pool)


@dataclass(eq=False, slots=True)
class _Lease:
    """One held slot: its member name and the sets (one per limit) it is counted in."""

    member: str
    keys: list[str]
    #: Found gone on renewal once already (logged and counted once, however often it recurs).
    lost: bool = False
    #: Known to be in Redis; False once Redis went away (it may come back empty), or taken locally.
    written: bool = False
    #: Given back: a renewal already under way must not write it again.
    given: bool = False


@dataclass
class ClusterView:
    """What the metrics and the queue page show of the cluster."""

    up: bool = False
    peers: int = 1
    fallbacks: int = 0
    leases_lost: int = 0
    #: Slots taken across every proxy, by limit key, as last counted.
    running: dict[str, int] = field(default_factory=dict)


class RedisLedger(LedgerLimits):
    """The `CapacityLedger` whose counts live in Redis, shared by every proxy with the same prefix.

    `attach` gives it the client the server owns; `run` is its background work
    (heartbeat, renewals, pub/sub, reconnecting), which the server starts and cancels.
    """

    def __init__(self, cluster: ClusterConfig, limits: LimitsConfig) -> None:
        super().__init__(limits)  # the backends' limits come with `configure`
        self._cluster = cluster
        #: Each access key's own `max_running`, by key name (`limit_clients` gives them).
        self._client_caps: Mapping[str, int] = {}
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self._seq = itertools.count(1)
        self._held: dict[Claim, list[_Lease]] = {}
        self._held_by_model: Counter[str] = Counter()
        self._held_total = 0
        #: Leases given back while Redis was down: removed when it answers again.
        self._orphans: list[_Lease] = []
        #: The last take refused for the global limit: a pass may stop early until room is reported.
        self._global_full = False
        self._limits_seen: set[str] = set()
        #: Registered once: a later heartbeat that finds this proxy new means Redis forgot it.
        self._registered = False
        #: Slots each other proxy held at its last heartbeat (for the budget while Redis is down).
        self._peer_running: dict[str, int] = {}
        self._peers_heard_at = -math.inf
        #: Slots the others held by the count in this proxy's last take's or give's answer, and
        #: when: under load much fresher than a heartbeat, so the share while Redis is down
        #: starts from what the others ran a moment before, not up to a second before.
        self._others_counted = (-math.inf, 0)
        #: Loop time until which admissions through Redis also keep to this proxy's share.
        self._rejoin_until = 0.0
        self._client: aioredis.Redis | None = None
        self.view = ClusterView()
        p = cluster.prefix
        self._channel = f"{p}:room"
        self._peers_keys = [f"{p}:peers", f"{p}:peer-limits"]
        self._scripts: dict[str, Any] = {}
        #: Gives under way, so a clean stop waits for them before the client closes.
        self._giving: set[asyncio.Task[Any]] = set()

    def __repr__(self) -> str:
        state = "up" if self.view.up else f"down ({self._cluster.on_redis_down})"
        return f"<RedisLedger {self.id} redis {state} held={self._held_total} peers={self.view.peers}>"

    # -- the CapacityLedger protocol ---------------------------------------------

    def take(self, claim: Claim) -> Awaitable[bool]:
        return self._take(claim)

    def give(self, claim: Claim) -> Awaitable[None] | None:
        leases = self._held[claim]
        lease = leases.pop()
        lease.given = True
        if not leases:
            del self._held[claim]
        self._held_total -= 1
        self._held_by_model[claim.model] -= 1
        if not self._held_by_model[claim.model]:
            del self._held_by_model[claim.model]
        if not self.view.up:
            self._orphans.append(lease)
            self._room()
            return None
        return self._give(lease)

    def full(self) -> bool:
        if self.view.up:
            return self._global_full
        if self._cluster.on_redis_down == "refuse":
            return False  # let a pass reach the waiters, to refuse them
        return self._held_total >= self._global_budget()

    def configure(self, limits: LimitsConfig, backends: Mapping[str, BackendConfig] | None = None) -> None:
        self._global_full = False
        super().configure(limits, backends)

    def limit_clients(self, caps: Mapping[str, int]) -> None:
        """Lease each access key's `max_running` across every proxy too (key name -> cap).

        The dispatcher of each proxy holds a key to its cap in that process; this makes
        the cap the cluster's, so a key with `max_running: 2` runs 2 in all, not 2 per proxy.
        """
        self._client_caps = dict(caps)
        self._room()

    # -- the limits a claim is counted against -----------------------------------

    def limits_of(self, claim: Claim) -> list[tuple[str, int]] | None:
        """(limit key, cap) for every limit that applies to `claim`: global, per model, the
        client's `max_running`, then the claim's backend and its cap for the model; None for a backend this ledger does
        not know (removed by a reload): no slot there.

        The one place to add a kind of limit: the scripts take however many pairs there
        are, all or nothing.
        """
        p = self._cluster.prefix
        pairs = [(f"{p}:lease:global", self._max_concurrent)]
        cap = self._caps.get(claim.model)
        if cap is not None:
            pairs.append((f"{p}:lease:model:{claim.model}", cap))
        if (client_cap := self._client_caps.get(claim.client)) is not None:
            pairs.append((f"{p}:lease:client:{claim.client}", client_cap))
        if claim.backend:
            backend = self._backends.get(claim.backend)
            if backend is None:
                return None
            running, caps = backend
            pairs.append((f"{p}:lease:backend:{claim.backend}", running))
            if (model_cap := caps.get(claim.model)) is not None:
                pairs.append((f"{p}:lease:backend:{claim.backend}:model:{claim.model}", model_cap))
        return pairs

    # -- talking to Redis ---------------------------------------------------------

    def attach(self, client: aioredis.Redis) -> None:
        """Use `client` (owned and closed by the server) from now on."""
        self._client = client
        self._scripts = {
            name: client.register_script(source)
            for name, source in (
                ("take", scripts.TAKE), ("give", scripts.GIVE), ("renew", scripts.RENEW),
                ("heartbeat", scripts.HEARTBEAT), ("count", scripts.COUNT),
            )
        }  # fmt: skip

    async def _call(self, script: str, keys: list[str], args: list[Any]) -> Any:
        return await asyncio.wait_for(self._scripts[script](keys=keys, args=args), COMMAND_TIMEOUT)

    async def _take(self, claim: Claim) -> bool:
        pairs = self.limits_of(claim)
        if pairs is None:
            return False
        if self.view.up and self._rejoining() and not self._within_share(claim):
            return False  # room is reported when a slot comes back here, or when the rejoin ends
        lease = _Lease(f"{self.id}:{next(self._seq)}", [key for key, _ in pairs])
        written: _Lease | None = None
        if self.view.up and self._client is not None:
            try:
                refused, taken = await self._call(
                    "take",
                    [self._peers_keys[0], *lease.keys],
                    [self._lease_ms, lease.member, self.id, *(c for _, c in pairs)],
                )
            except (RedisError, OSError, TimeoutError) as err:
                written = lease  # Redis may have run the script before the reply was lost
                self._went_down(err)
            else:
                if refused == -1:  # as if it had been down: write everything back first
                    self._went_down(Forgotten("it no longer knows this proxy: restarted, flushed or stalled"))
                elif refused:
                    self._counted(taken)
                    self._global_full = self._global_full or refused == 1
                    return False
                elif self._rejoining() and not self._within_share(claim):  # another take won meanwhile
                    await self._give(lease)
                    return False
                else:
                    lease.written = True
                    self._keep(claim, lease)
                    self._counted(taken)
                    return True
        if self._cluster.on_redis_down == "refuse" or not self._within_share(claim):
            if written is not None:
                self._orphans.append(written)  # removed when Redis answers again, else it expires
        if self._cluster.on_redis_down == "refuse":
            raise ClusterDown(
                "the proxies' shared slot ledger (Redis) is unreachable; retry shortly",
                retry_after=max(1, round(self._cluster.lease / 3)),
                detail=f"cluster.redis {self._cluster.redis} is unreachable and cluster.on_redis_down is refuse",
            )
        if not self._within_share(claim):
            return False
        self._keep(claim, lease)
        return True

    def _within_share(self, claim: Claim) -> bool:
        """This proxy's share of every limit has room for `claim` (Redis down, or just back)."""
        if self._held_total >= self._global_budget():
            return False
        cap = self._caps.get(claim.model)
        return cap is None or self._held_by_model[claim.model] < self._share(cap)

    def _rejoining(self) -> bool:
        return asyncio.get_running_loop().time() < self._rejoin_until

    async def _give(self, lease: _Lease) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._giving.add(task)
        try:
            taken = await self._call("give", lease.keys, [lease.member, self._channel, self.id])
        except (RedisError, OSError, TimeoutError) as err:
            self._orphans.append(lease)
            self._went_down(err)
        else:
            self._counted(taken)
        finally:
            self._giving.discard(task)
        self._room()  # our own waiters need no round trip through pub/sub

    def _keep(self, claim: Claim, lease: _Lease) -> None:
        self._held.setdefault(claim, []).append(lease)
        self._held_total += 1
        self._held_by_model[claim.model] += 1

    def _counted(self, taken: int) -> None:
        """Redis's global count just now, of which this proxy's own are the rest."""
        self._others_counted = (asyncio.get_running_loop().time(), max(0, int(taken) - self._held_total))

    def _share(self, limit: int) -> int:
        return max(1, limit // max(1, self.view.peers))

    def _global_budget(self) -> int:
        """Slots this proxy may hold while Redis is down or just back: its share of
        `max_concurrent`, and no more than the others left free when last seen (a proxy caught
        holding more than its share keeps it until its requests end, so the others must not
        count on theirs). At least 1 while Redis is down, as the contract says; none beyond
        the limit once Redis answers, where the limit is promised."""
        others = sum(self._peer_running.values())
        counted_at, counted = self._others_counted
        if counted_at > self._peers_heard_at and not (self.view.up and self._rejoining()):
            others = counted  # fresher; but not while rejoining: Redis's counts miss the peers not back yet
        room = min(self._share(self._max_concurrent), self._max_concurrent - others)
        return room if self.view.up else max(1, room)

    @property
    def _lease_ms(self) -> int:
        return round(self._cluster.lease * 1000)

    # -- state changes, logged once each -------------------------------------------

    def _went_down(self, err: BaseException) -> None:
        if not self.view.up:
            return
        self.view.up = False
        self.view.fallbacks += 1
        self._unwritten()
        mode = self._cluster.on_redis_down
        what = (
            f"serving on with this proxy's share of each limit (max_concurrent {self._global_budget()} "
            f"of {self._max_concurrent}, {self.view.peers} proxies last seen)"
            if mode == "local"
            else "refusing requests that need a new slot with 503"
        )
        log.warning(
            "cluster: redis %s unreachable (%s): %s; %d running requests finish",
            self._cluster.redis, type(err).__name__ if not str(err) else err, what, self._held_total,
        )  # fmt: skip
        self._room()  # refuse: end the waits now; local: admit up to the share

    async def _came_back(self) -> None:
        """Redis answers again: write every running request's lease, re-register, forget the orphans.

        Leases first, registration after: a peer that sees this proxy registered may rely on
        Redis counting its running requests.
        """
        self._rejoin_until = asyncio.get_running_loop().time() + max(REJOIN_WINDOW, self._cluster.lease)
        assert self._client is not None
        # Idle pooled connections to the server that went away sit in CLOSE_WAIT until used: close them.
        await self._client.connection_pool.disconnect(inuse_connections=False)
        self._unwritten()  # an earlier attempt may have written them to a Redis that went away again
        await self._write_back()
        await self._heartbeat()
        while self._orphans:
            lease = self._orphans[-1]
            await self._call("give", lease.keys, [lease.member, self._channel, self.id])
            self._orphans.pop()
        await self._write_back()  # what was admitted locally during the awaits above
        self.view.up = True  # no await since the last check: nothing admitted locally is left out
        self._global_full = False
        log.info(
            "cluster: redis %s answers again: registered as %s with %d running requests, %d proxies alive",
            self._cluster.redis, self.id, self._held_total, self.view.peers,
        )  # fmt: skip
        self._room()

    def _unwritten(self) -> None:
        """Redis may have lost every lease this proxy holds: none counts as written any more."""
        for leases in self._held.values():
            for lease in leases:
                lease.written = False

    async def _write_back(self) -> None:
        """Write a lease for every running request Redis may not know, until none is left
        (requests admitted locally during the writes must be counted too)."""
        while unwritten := [lease for leases in self._held.values() for lease in leases if not lease.written]:
            for lease in unwritten:
                await self._call("renew", lease.keys, [self._lease_ms, lease.member])
                lease.written = True

    async def _heartbeat(self, leaving: bool = False) -> None:
        """Say this proxy is alive, with its limits and running count; learn the others'."""
        limits = {"max_concurrent": self._max_concurrent, "models": dict(self._caps)}
        mine = json.dumps({"limits": limits, "running": self._held_total}, sort_keys=True)
        reply = await self._call(
            "heartbeat", self._peers_keys, [self.id, self._lease_ms, "" if leaving else mine]
        )
        if reply[0] and self.view.up and self._registered and not leaving:
            raise Forgotten("it no longer knew this proxy: restarted, flushed or stalled")
        self._registered = True
        pairs = reply[1:]
        peers = {
            _text(peer): json.loads(_text(value) or "{}")
            for peer, value in zip(pairs[::2], pairs[1::2], strict=True)
        }
        alive = max(1, len(peers))
        if self._rejoining():  # the others may not have re-registered yet: keep the share small
            alive = max(alive, self.view.peers)
        if alive != self.view.peers:
            log.info("cluster: %d proxies alive (was %d)", alive, self.view.peers)
            self.view.peers = alive
        running = {name: int(peer.get("running", 0)) for name, peer in peers.items() if name != self.id}
        if self._rejoining():
            # A peer seen before the outage that has not re-registered yet is not in Redis's
            # counts: it still runs what it ran, and may have admitted up to its share meanwhile.
            share = self._share(self._max_concurrent)
            for name, was in self._peer_running.items():
                running.setdefault(name, max(was, share))
        self._peer_running = running
        self._peers_heard_at = asyncio.get_running_loop().time()
        seen = {json.dumps(peer["limits"], sort_keys=True) for peer in peers.values() if "limits" in peer}
        if len(seen) > 1 and seen != self._limits_seen:
            log.warning(
                "cluster: the proxies sharing prefix %s have different limits (%s): each admits by its own, "
                "so the lowest holds only for its own requests; give every proxy the same limits",
                self._cluster.prefix, "; ".join(sorted(seen)),
            )  # fmt: skip
        self._limits_seen = seen

    async def _renew(self) -> None:
        for lease in [lease for leases in self._held.values() for lease in leases]:
            if lease.given:  # given back during an earlier renewal's await: writing it would leak it
                continue
            gone = await self._call("renew", lease.keys, [self._lease_ms, lease.member])
            if gone and not lease.lost:
                lease.lost = True
                self.view.leases_lost += 1
                log.warning(
                    "cluster: lease %s was gone on renewal (reaped after a stall longer than lease %s, or "
                    "Redis lost it): written again, the request keeps running",
                    lease.member,
                    format_duration(self._cluster.lease),
                )

    async def refresh(self) -> dict[str, int]:
        """Count the slots taken across the cluster, by limit key (for the queue page)."""
        p = self._cluster.prefix
        keys = [f"{p}:lease:global", *(f"{p}:lease:model:{model}" for model in self._caps)]
        if self.view.up:
            try:
                counts = await self._call("count", keys, [])
            except (RedisError, OSError, TimeoutError) as err:
                self._went_down(err)
            else:
                self.view.running = {
                    key.removeprefix(f"{p}:lease:"): int(n) for key, n in zip(keys, counts, strict=True)
                }
        return self.view.running

    # -- the background work --------------------------------------------------------

    async def run(self) -> None:
        """Heartbeat and renew every lease/3, reconnect when Redis returns; listen for room."""
        listener = asyncio.create_task(self._listen(), name="cluster room listener")
        loop = asyncio.get_running_loop()
        try:
            renew_every = self._cluster.lease / 3
            tick = min(HEARTBEAT_INTERVAL, renew_every)
            renewed = loop.time()
            while True:
                _stop_if_cancelled()
                await asyncio.sleep(tick if self.view.up else RETRY_INTERVAL)
                try:
                    if not self.view.up:
                        await self._came_back()
                        renewed = loop.time()
                        continue
                    if self._rejoin_until and not self._rejoining():
                        self._rejoin_until = 0.0
                        self._room()  # back to the whole limit: waiters held to the share may go
                    await self._heartbeat()
                    if loop.time() - renewed >= renew_every - tick / 2:
                        await self._renew()
                        renewed = loop.time()
                except (RedisError, OSError, TimeoutError) as err:
                    self._went_down(err)
        finally:
            listener.cancel()
            await asyncio.gather(listener, return_exceptions=True)

    async def start(self) -> None:
        """Register before the listeners open, so the first admissions already count across the cluster."""
        try:
            await self._heartbeat()
        except (RedisError, OSError, TimeoutError) as err:
            self.view.up = True  # so that the change is logged and counted once
            self._went_down(err)
            return
        self.view.up = True
        log.info(
            "cluster: registered as %s on redis %s (prefix %s, lease %s, on_redis_down %s), %d proxies alive",
            self.id, self._cluster.redis, self._cluster.prefix, format_duration(self._cluster.lease),
            self._cluster.on_redis_down, self.view.peers,
        )  # fmt: skip

    async def _listen(self) -> None:
        """Room reported by any proxy (pub/sub), and a slow poll in case a message was missed."""
        assert self._client is not None
        while True:
            pubsub = self._client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self._channel)
                while True:
                    _stop_if_cancelled()
                    message = await pubsub.get_message(timeout=POLL_INTERVAL)
                    if message is None or message.get("data") != self.id.encode():
                        self._global_full = False
                        self._room()
            except (RedisError, OSError, TimeoutError):
                _stop_if_cancelled()
                await asyncio.sleep(RETRY_INTERVAL)
            finally:
                await pubsub.aclose()

    async def leave(self) -> None:
        """Deregister (at a clean stop, after the drain): the others' shares grow at once."""
        if self._giving:
            await asyncio.wait(self._giving, timeout=COMMAND_TIMEOUT)
        if self.view.up and self._client is not None:
            try:
                await self._heartbeat(leaving=True)
            except (RedisError, OSError, TimeoutError):
                pass  # the heartbeat expires on its own
