"""The wait queue: bounds, positions in the policy's order, and deadlines in arrival order."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from types import MappingProxyType

import pytest

from proxy.config import LimitsConfig
from proxy.errors import OwnerQueueFull, QueueFull
from proxy.scheduling.capacity import Claim
from proxy.scheduling.queue import WaitQueue
from proxy.scheduling.waiter import Waiter


def limits(max_queue: int = 100, queue_timeout: float = 60.0) -> LimitsConfig:
    return LimitsConfig(
        max_concurrent=1, max_queue=max_queue, queue_timeout=queue_timeout, models=MappingProxyType({})
    )


class NewestFirst:
    """A policy in the opposite of arrival order, counting how often it is walked."""

    def __init__(self) -> None:
        self.waiters: list[Waiter] = []
        self.walks = 0

    def added(self, waiter: Waiter) -> None:
        self.waiters.append(waiter)

    def removed(self, waiter: Waiter) -> None:
        self.waiters.remove(waiter)

    admitted = removed  # nothing to charge

    def order(self) -> Iterable[Waiter]:
        self.walks += 1
        return reversed(self.waiters)


def waiter(arrival: int, enqueued_at: float, model: str = "m:latest", client: str = "") -> Waiter:
    made = Waiter(Claim(model, client), arrival, enqueued_at)
    made.future = asyncio.get_running_loop().create_future()
    return made


async def test_positions_follow_the_policy_and_are_computed_once_per_change():
    policy = NewestFirst()
    queue = WaitQueue(policy, limits(), 0, on_expired=lambda waiter: None)
    now = asyncio.get_running_loop().time()
    waiters = [waiter(n, now) for n in range(3)]
    for each in waiters:
        queue.add(each)
    for _beat in range(5):  # every keep-alive beat asks
        assert [queue.position(each) for each in waiters] == [(3, 3), (2, 3), (1, 3)]
    assert policy.walks == 1
    queue.remove(waiters[2], admitted=True)
    assert queue.position(waiters[2]) is None
    assert [queue.position(each) for each in waiters[:2]] == [(2, 2), (1, 2)]
    assert policy.walks == 2
    queue.clear()


async def test_deadlines_run_out_in_arrival_order_whatever_the_policy_serves_first():
    expired: list[Waiter] = []
    all_expired = asyncio.Event()

    def on_expired(gone: Waiter) -> None:
        expired.append(gone)
        if len(expired) == 2:
            all_expired.set()

    queue = WaitQueue(NewestFirst(), limits(queue_timeout=30.0), 0, on_expired)
    now = asyncio.get_running_loop().time()
    oldest, older, newest = waiter(0, now - 60), waiter(1, now - 45), waiter(2, now)
    for each in (oldest, older, newest):
        queue.add(each)
    assert queue.in_order() == [newest, older, oldest]
    await asyncio.wait_for(all_expired.wait(), timeout=10)
    assert expired == [oldest, older]  # the policy's last are the first out: deadlines are by arrival
    assert queue.in_order() == [newest] and queue.position(newest) == (1, 1)
    assert queue.oldest() is newest
    queue.clear()


async def test_a_waiter_whose_task_is_gone_times_out_silently():
    told: list[Waiter] = []
    queue = WaitQueue(NewestFirst(), limits(queue_timeout=1.0), 0, told.append)
    gone = waiter(0, asyncio.get_running_loop().time() - 5)
    assert gone.future is not None
    gone.future.cancel()
    queue.add(gone)
    while gone in queue:
        await asyncio.sleep(0.01)
    assert told == [] and len(queue) == 0


async def test_bounds_on_joining():
    queue = WaitQueue(NewestFirst(), limits(max_queue=3), 2, on_expired=lambda waiter: None)
    now = asyncio.get_running_loop().time()
    queue.add(waiter(0, now, client="alice"))
    queue.add(waiter(1, now, client="alice"))
    queue.check_room(Claim("m:latest", "bob"), retry_after=lambda: 7)
    queue.check_room(Claim("m:latest"), retry_after=lambda: 7)  # no key: no per-key bound
    with pytest.raises(OwnerQueueFull) as mine:
        queue.check_room(Claim("m:latest", "alice"), retry_after=lambda: 7)
    assert mine.value.message == (
        "key 'alice' already has 2 requests waiting, access.max_queued_per_key=2; wait for them to finish"
    )
    assert mine.value.retry_after == 7
    queue.add(waiter(2, now, model="x:latest", client="bob"))
    with pytest.raises(QueueFull) as full:
        queue.check_room(Claim("m:latest", "carol"), retry_after=lambda: 9)
    assert "queue full: 3 requests waiting, max_queue=3" in full.value.message
    assert queue.by_model() == {"m:latest": 2, "x:latest": 1}
    assert queue.waiting_for("x:latest") == 1
    queue.configure(limits(max_queue=4), 0)  # raised bounds apply to the next newcomer
    queue.check_room(Claim("m:latest", "alice"), retry_after=lambda: 7)
    queue.clear()
    assert not queue.by_model()
