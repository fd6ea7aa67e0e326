"""IPv6 floating addresses: claimed without DAD, announced by unsolicited neighbour advertisements (RFC 4861)."""

from __future__ import annotations

import asyncio
import ipaddress
import struct

from backup.takeover import IFA_F_NODAD, AddressOwner, FloatingAddress, _na_frame

from tests.packets import rfc1071

MAC = "02:00:00:00:00:0a"
VIP6 = "2001:db8:203::1"


def test_the_neighbour_advertisement_frame_is_rfc_4861_unsolicited():
    from scapy.layers.inet6 import ICMPv6ND_NA, ICMPv6NDOptDstLLAddr, IPv6
    from scapy.layers.l2 import Ether

    frame = _na_frame(MAC, VIP6)
    parsed = Ether(frame)
    assert parsed.dst == "33:33:00:00:00:01" and parsed.src == MAC and parsed.type == 0x86DD
    ip = parsed[IPv6]
    assert (ip.src, ip.dst, ip.hlim, ip.nh, ip.plen) == (VIP6, "ff02::1", 255, 58, 32)
    na = parsed[ICMPv6ND_NA]
    assert (na.type, na.code, na.R, na.S, na.O, na.tgt) == (136, 0, 1, 0, 1, VIP6)
    assert parsed[ICMPv6NDOptDstLLAddr].type == 2 and parsed[ICMPv6NDOptDstLLAddr].lladdr == MAC
    # The bytes as they leave: R, S, O are the three high bits of the first flags byte (R=1 S=0 O=1: 0xa0).
    icmp = frame[14 + 40:]
    assert len(icmp) == 32 and icmp[0] == 136 and icmp[1] == 0 and icmp[4] == 0xA0 and icmp[5:8] == b"\0\0\0"
    assert icmp[8:24] == ipaddress.IPv6Address(VIP6).packed
    assert icmp[24:26] == b"\x02\x01" and icmp[26:32] == bytes.fromhex(MAC.replace(":", ""))
    # The ICMPv6 checksum, computed here over the pseudo-header (RFC 8200 section 8.1): the sum checks to 0xFFFF.
    pseudo = (ipaddress.IPv6Address(VIP6).packed + ipaddress.IPv6Address("ff02::1").packed
              + struct.pack("!I3xB", len(icmp), 58))
    assert rfc1071(pseudo + icmp) == 0  # the checksum verifies (RFC 1071)


class FakeIpr:
    def __init__(self):
        self.calls = []

    async def addr(self, command, **kwargs):
        self.calls.append((command, kwargs))


def test_ipv6_addresses_are_claimed_without_dad_and_ipv4_ones_as_before():
    owner = AddressOwner([FloatingAddress(ipaddress.ip_interface("203.0.113.1/32"), "ext0"),
                          FloatingAddress(ipaddress.ip_interface(f"{VIP6}/64"), "ext0")])
    owner._ipr = FakeIpr()
    owner._index = {"ext0": 7}
    asyncio.run(owner.claim(1.0))
    assert owner._ipr.calls == [
        ("replace", {"index": 7, "address": "203.0.113.1", "prefixlen": 32, "valid_lft": 1, "preferred_lft": 1}),
        ("replace", {"index": 7, "address": VIP6, "prefixlen": 64, "valid_lft": 1, "preferred_lft": 1,
                     "flags": IFA_F_NODAD})]
    assert IFA_F_NODAD == 0x02


class FakeSocket:
    def __init__(self):
        self.sent = []

    def send(self, frame):
        self.sent.append(frame)

    def close(self):
        pass


def test_announce_sends_the_advertisements_beside_the_gratuitous_arps_garp_count_times():
    arp, nd = FakeSocket(), FakeSocket()
    owner = AddressOwner([], garp_count=3)
    owner._frames = [(arp, "ext0", b"arp", "gratuitous ARP"), (nd, "ext0", b"na", "a neighbour advertisement")]
    owner.announce()
    assert arp.sent == [b"arp"] * 3 and nd.sent == [b"na"] * 3 and owner.announcements == 1
