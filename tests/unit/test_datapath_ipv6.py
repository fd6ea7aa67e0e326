"""The raw sender: IPv6 packets leave through the AF_INET6 socket, to the address in their header."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6

from distributor.datapath import RawSender


class FakeSocket:
    def __init__(self, fail=False):
        self.sent = []
        self.fail = fail

    def sendto(self, packet, address):
        if self.fail:
            raise OSError(101, "Network is unreachable")
        self.sent.append((packet, address))


def sender(sock4, sock6, no_ipv6=""):
    raw = RawSender.__new__(RawSender)  # no raw sockets in a unit test (they need CAP_NET_RAW)
    raw._sock, raw._sock6, raw._no_ipv6, raw.sent, raw.failed = sock4, sock6, no_ipv6, 0, 0
    return raw


def test_the_first_nibble_picks_the_socket_and_the_header_the_destination():
    four, six = FakeSocket(), FakeSocket()
    raw = sender(four, six)
    rst6 = bytes(IPv6(src="2001:db8:203::1", dst="2001:db8:203::10") / TCP(sport=80, dport=40000, flags="R"))
    rst4 = bytes(IP(src="203.0.113.1", dst="203.0.113.10") / TCP(sport=80, dport=40000, flags="R"))
    raw.send(rst6)
    raw.send(rst4)
    assert six.sent == [(rst6, ("2001:db8:203::10", 0))] and four.sent == [(rst4, ("203.0.113.10", 0))]
    assert (raw.sent, raw.failed) == (2, 0)


def test_without_an_ipv6_socket_or_route_an_ipv6_packet_is_counted_as_failed(caplog):
    packet = bytes(IPv6(src="2001:db8:203::1", dst="2001:db8:203::10") / TCP())
    raw = sender(FakeSocket(), None, "no IPv6 raw socket on this host (Address family not supported by protocol)")
    raw.send(packet)
    raw2 = sender(FakeSocket(), FakeSocket(fail=True))
    raw2.send(packet)
    assert (raw.failed, raw2.failed) == (1, 1)
    assert "no IPv6 raw socket on this host" in caplog.text and "2001:db8:203::10" in caplog.text
