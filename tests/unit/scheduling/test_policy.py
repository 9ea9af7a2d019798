"""First come, first served: arrival order, ties broken by arrival, a request sent back keeps its place."""

from __future__ import annotations

from proxy.scheduling.capacity import Claim
from proxy.scheduling.policy import Fifo
from proxy.scheduling.waiter import Waiter


def waiter(arrival: int, enqueued_at: float = 0.0) -> Waiter:
    return Waiter(Claim("m:latest"), arrival, enqueued_at)


def test_fifo_serves_in_arrival_order_even_when_clocks_tie():
    policy = Fifo()
    waiters = [waiter(n, enqueued_at=5.0) for n in range(4)]  # one clock reading for all
    for each in waiters:
        policy.added(each)
    assert list(policy.order()) == waiters


def test_a_waiter_sent_back_goes_to_its_arrival_place():
    policy = Fifo()
    first, second, third = waiter(0), waiter(1), waiter(2)
    for each in (first, second, third):
        policy.added(each)
    policy.admitted(first)
    assert list(policy.order()) == [second, third]
    policy.added(first)  # could not connect: back at the head
    assert list(policy.order()) == [first, second, third]


def test_removed_and_admitted_waiters_leave_the_order():
    policy = Fifo()
    waiters = [waiter(n) for n in range(3)]
    for each in waiters:
        policy.added(each)
    policy.removed(waiters[1])
    policy.admitted(waiters[0])
    policy.removed(waiters[1])  # twice is harmless: a timeout and a cancellation can race
    assert list(policy.order()) == [waiters[2]]
    assert repr(policy) == "<Fifo waiting=1>"
