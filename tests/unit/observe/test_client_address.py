"""Who a request came from: the peer, or the client a trusted proxy in front names."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import pytest
from multidict import CIMultiDict

from proxy.observe import accesslog

LOOPBACK = (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))


@dataclass
class Peer:
    """The two things `client_address` reads of a request."""

    remote: str | None
    headers: CIMultiDict[str]


def peer(remote: str | None, *headers: tuple[str, str]) -> Peer:
    return Peer(remote, CIMultiDict(headers))


@pytest.mark.parametrize(
    ("request_", "expected"),
    [
        (peer("127.0.0.1"), "127.0.0.1"),
        (peer("127.0.0.1", ("CF-Connecting-IP", "203.0.113.7")), "203.0.113.7"),
        (peer("127.0.0.5", ("CF-Connecting-IP", " 203.0.113.7 ")), "203.0.113.7"),
        # CF-Connecting-IP wins over X-Forwarded-For.
        (
            peer("127.0.0.1", ("X-Forwarded-For", "198.51.100.1"), ("CF-Connecting-IP", "203.0.113.7")),
            "203.0.113.7",
        ),
        # X-Forwarded-For from the right, across repeated headers: the nearest untrusted hop
        # (what the client wrote further left is its own claim), skipping trusted proxies.
        (peer("127.0.0.1", ("X-Forwarded-For", "198.51.100.1, 10.0.0.1")), "10.0.0.1"),
        (
            peer("127.0.0.1", ("X-Forwarded-For", "198.51.100.1"), ("X-Forwarded-For", "10.0.0.1")),
            "10.0.0.1",
        ),
        (peer("127.0.0.1", ("X-Forwarded-For", "203.0.113.9, 198.51.100.1, 127.0.0.2")), "198.51.100.1"),
        # Malformed CF header: X-Forwarded-For next; both malformed: the peer.
        (
            peer("127.0.0.1", ("CF-Connecting-IP", "evil"), ("X-Forwarded-For", "198.51.100.1")),
            "198.51.100.1",
        ),
        (
            peer("127.0.0.1", ("CF-Connecting-IP", "1.2.3"), ("X-Forwarded-For", "198.51.100.1, unknown")),
            "127.0.0.1",
        ),
        (peer("127.0.0.1", ("X-Forwarded-For", "203.0.113.7:443")), "127.0.0.1"),
        (peer("127.0.0.1", ("X-Forwarded-For", "")), "127.0.0.1"),
        (peer("127.0.0.1", ("CF-Connecting-IP", "fe80::1%eth0")), "127.0.0.1"),
        (peer("127.0.0.1", ("CF-Connecting-IP", "203.0.113.7\nlevel=ERROR")), "127.0.0.1"),
        # An untrusted peer's headers are its own claims.
        (
            peer("192.0.2.9", ("CF-Connecting-IP", "203.0.113.7"), ("X-Forwarded-For", "198.51.100.1")),
            "192.0.2.9",
        ),
        # IPv6: trusted ::1, normalised claims, IPv4-mapped peers on a dual-stack socket.
        (peer("::1", ("CF-Connecting-IP", "2001:DB8:0:0::1")), "2001:db8::1"),
        (peer("::1", ("X-Forwarded-For", "2001:db8::7, 127.0.0.1")), "2001:db8::7"),
        (peer("::ffff:127.0.0.1", ("CF-Connecting-IP", "203.0.113.7")), "203.0.113.7"),
        (peer("2001:db8::2", ("CF-Connecting-IP", "203.0.113.7")), "2001:db8::2"),
        (peer(None, ("CF-Connecting-IP", "203.0.113.7")), "unknown"),
    ],
)
def test_client_address(request_: Peer, expected: str) -> None:
    assert accesslog.client_address(request_, LOOPBACK) == expected


def test_client_address_trusts_only_the_configured_networks() -> None:
    claim = ("CF-Connecting-IP", "203.0.113.7")
    assert accesslog.client_address(peer("127.0.0.1", claim), ()) == "127.0.0.1"
    trusted = (ipaddress.ip_network("10.0.0.0/8"),)
    assert accesslog.client_address(peer("10.1.2.3", claim), trusted) == "203.0.113.7"
    assert accesslog.client_address(peer("127.0.0.1", claim), trusted) == "127.0.0.1"
