"""Kernel mode's conntrack adapter: 36-byte IPv6 keys become AF_INET6 tuples, asked on an AF_INET6 socket."""

from __future__ import annotations

import asyncio
import ipaddress
import socket

import pytest

from distributor.conntrack import Conntrack

CLIENT6, VIP6 = "2001:db8:203::10", "2001:db8:203::1"
KEY6 = ipaddress.IPv6Address(CLIENT6).packed + ipaddress.IPv6Address(VIP6).packed + (40000).to_bytes(2, "big") \
    + (80).to_bytes(2, "big")
KEY4 = bytes([203, 0, 113, 10, 203, 0, 113, 1]) + (40000).to_bytes(2, "big") + (80).to_bytes(2, "big")


def test_a_36_byte_key_is_an_ipv6_tuple_and_a_12_byte_one_an_ipv4_tuple():
    six = Conntrack._tuple(KEY6)
    assert (six.family, six.saddr, six.daddr, six.proto, six.sport, six.dport) == (
        socket.AF_INET6, CLIENT6, VIP6, socket.IPPROTO_TCP, 40000, 80)
    four = Conntrack._tuple(KEY4)
    assert (four.family, four.saddr, four.daddr, four.sport, four.dport) == (
        socket.AF_INET, "203.0.113.10", "203.0.113.1", 40000, 80)
    with pytest.raises(ValueError, match="12 bytes .* or 36"):
        Conntrack._tuple(KEY6[:20])


class FakeSocket:
    def __init__(self, family, known):
        self.family = family
        self.known = known
        self.asked = []

    async def entry(self, command, tuple_orig):
        from pyroute2.netlink.exceptions import NetlinkError

        self.asked.append((command, tuple_orig.family, tuple_orig.saddr))
        if tuple_orig.saddr not in self.known:
            raise NetlinkError(2)
        return [object()]


def test_each_key_is_asked_on_its_familys_socket():
    conntrack = Conntrack(ipv6=True)
    four, six = FakeSocket(socket.AF_INET, {"203.0.113.10"}), FakeSocket(socket.AF_INET6, {CLIENT6})
    conntrack._sockets = {socket.AF_INET: four, socket.AF_INET6: six}
    other6 = bytes(16) + KEY6[16:]
    alive, gone = asyncio.run(conntrack.confirm((KEY4, KEY6, other6)))
    assert alive == (KEY4, KEY6) and gone == (other6,)
    assert asyncio.run(conntrack.forget(KEY6)) is True
    assert four.asked == [("get", socket.AF_INET, "203.0.113.10")]
    assert six.asked[-1] == ("del", socket.AF_INET6, CLIENT6) and all(f == socket.AF_INET6 for _, f, _ in six.asked)
