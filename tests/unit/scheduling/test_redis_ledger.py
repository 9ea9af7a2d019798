"""The shared ledger (`RedisLedger`) against a real redis-server, in this process: the
cases where timing across proxies decides, driven through the ledger's public calls.

Without redis-server these skip, except in CI (`CI=true`), where that is a failure.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import redis.asyncio as redis

from proxy.config import ClusterConfig, LimitsConfig
from proxy.scheduling import redis_scripts
from proxy.scheduling.capacity import Claim
from proxy.scheduling.redis_ledger import RedisLedger, connect
from tests.support import eventually
from tests.support.redisserver import RedisServer, needs_redis_server

pytestmark = needs_redis_server

PREFIX = "oqp"


@contextlib.asynccontextmanager
async def ledger(url: str, max_concurrent: int, lease: float = 3.0) -> AsyncIterator[RedisLedger]:
    """A ledger as the server runs one: attached, registered, its background work running."""
    cluster = ClusterConfig(redis=url, prefix=PREFIX, lease=lease, on_redis_down="local")
    book = RedisLedger(cluster, LimitsConfig(max_concurrent=max_concurrent))
    client = connect(url)
    book.attach(client)
    await book.start()
    task = asyncio.create_task(book.run())
    try:
        yield book
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.aclose()


async def score(client: redis.Redis, member: str) -> float | None:
    return await client.zscore(f"{PREFIX}:lease:global", member)


async def test_take_run_twice_for_one_member_takes_one_slot(redis_server: RedisServer) -> None:
    """A call whose connection broke is retried; the first run may have taken the slot."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        take = client.register_script(redis_scripts.TAKE)
        await client.zadd(f"{PREFIX}:peers", {"p1": 2**40})
        keys = [f"{PREFIX}:peers", f"{PREFIX}:lease:global"]
        # (outcome, slots taken): taken; the same member again: taken, still one; another: full.
        assert await take(keys=keys, args=[3000, "p1:1", "p1", 1]) == [0, 1]
        assert await take(keys=keys, args=[3000, "p1:1", "p1", 1]) == [0, 1]
        assert await take(keys=keys, args=[3000, "p1:2", "p1", 1]) == [1, 1]
        assert await client.zcard(f"{PREFIX}:lease:global") == 1
    finally:
        await client.aclose()


async def test_a_lease_given_back_during_a_renewal_is_not_written_again(redis_server: RedisServer) -> None:
    """Renewal walks the held leases one round trip at a time; one given back meanwhile
    must stay gone, or it holds a slot for nobody until it expires."""
    many = 150
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with ledger(redis_server.url, max_concurrent=many + 1) as book:
            claim, last = Claim("a"), Claim("z")
            for _ in range(many):
                assert await book.take(claim)
            assert await book.take(last)  # renewed after all the others
            first, final = f"{book.id}:1", f"{book.id}:{many + 1}"
            before, last_before = await score(client, first), await score(client, final)

            async def renewing() -> bool:
                return await score(client, first) != before

            await eventually(renewing, timeout=5)
            gives = [book.give(claim) for _ in range(many)]
            await asyncio.gather(*(give for give in gives if give is not None))
            assert book.view.fallbacks == 0  # 150 calls at once wait for a connection, not "Redis down"

            async def renewed_all() -> bool:
                return await score(client, final) != last_before

            await eventually(renewed_all, timeout=5)
            assert await redis_server.leases() == {f"{PREFIX}:lease:global": 1}  # only `last`'s
    finally:
        await client.aclose()


async def test_a_proxy_back_before_its_peer_keeps_room_for_what_the_peer_ran(
    redis_server: RedisServer,
) -> None:
    """Redis restarts empty. Proxy A returns; B, which ran 3 of the limit of 4, has not
    written its leases back (here: never will). Redis counts only A's, so A must count B's
    itself while it rejoins: one slot for A in all, not its share of 2 (which made 5)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with ledger(redis_server.url, max_concurrent=4) as a:
            async with ledger(redis_server.url, max_concurrent=4) as b:
                for _ in range(3):
                    assert await b.take(Claim("m"))

                async def b_reported_three() -> bool:
                    said = await client.hget(f"{PREFIX}:peer-limits", b.id)
                    return said is not None and json.loads(said)["running"] == 3

                await eventually(b_reported_three, timeout=5)
                a_was = await client.zscore(f"{PREFIX}:peers", a.id)

                async def a_heard_it() -> bool:  # A's next heartbeat reads B's report
                    return await client.zscore(f"{PREFIX}:peers", a.id) != a_was

                await eventually(a_heard_it, timeout=5)
            # B's background work has stopped: it writes nothing back when Redis returns.
            await redis_server.kill()
            assert await a.take(Claim("m"))  # Redis down: A's share, less what B ran (at least 1)
            assert not a.view.up
            await redis_server.start()
            await eventually(lambda: a.view.up, timeout=10)
            assert not await a.take(Claim("m"))  # Redis answers: the limit, with B's 3 counted
            # B never returns: once the rejoin is over (`lease`), A has the whole limit again.
            await eventually(lambda: a.take(Claim("m")), timeout=10)
    finally:
        await client.aclose()


async def test_the_share_while_redis_is_down_starts_from_the_last_count_seen(
    redis_server: RedisServer,
) -> None:
    """B takes 3 of the limit of 4 just after A's heartbeat; A's own take then answers that
    Redis counts 4. When Redis goes down a moment later, A's share is the 1 slot left, not
    the 2 its heartbeat would give (a second old, from before B's takes)."""
    client = redis.Redis.from_url(redis_server.url)
    try:
        async with (
            ledger(redis_server.url, max_concurrent=4) as a,
            ledger(redis_server.url, max_concurrent=4) as b,
        ):
            a_was = await client.zscore(f"{PREFIX}:peers", a.id)

            async def a_heartbeat() -> bool:
                return await client.zscore(f"{PREFIX}:peers", a.id) != a_was

            await eventually(a_heartbeat, timeout=5)  # the next is a second away
            for _ in range(3):
                assert await b.take(Claim("m"))
            assert await a.take(Claim("m"))  # its answer: 4 taken, 3 of them elsewhere
            await redis_server.kill()
            assert not await a.take(Claim("m"))  # Redis down: max(1, min(4 // 2, 4 - 3)) = 1, held
            assert not a.view.up
    finally:
        await client.aclose()
