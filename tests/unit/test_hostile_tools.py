"""The pure parts of the hostile tools (testbed/hostile.py): packet pools, BPF programs, classifiers.

No root, no namespaces: the BPF programs are checked by a small interpreter of the few classic BPF
instructions they use, run over frames built with scapy, so a wrong jump shows here, not as a
capture that silently sees nothing in an end-to-end test.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPerror, TCPerror
from scapy.layers.l2 import ARP, Ether

from common.wire import Keys, Kind, seal
from testbed import hostile
from tests.packets import checksums_valid, rfc1071

CLIENT_MAC, DIST_MAC = "02:00:00:00:00:0a", "02:00:00:00:00:02"


def frame(layer) -> bytes:
    return bytes(Ether(src=DIST_MAC, dst=CLIENT_MAC) / layer)


def run_bpf(program, data: bytes, pkttype: int = hostile.PACKET_OUTGOING) -> int:
    """A classic BPF interpreter for the instructions testbed.hostile emits (what the kernel would return)."""
    a = x = pc = 0

    def load(offset: int, size: int) -> int | None:
        if offset == hostile.SKF_AD_PKTTYPE:
            return pkttype
        if offset + size > len(data):
            return None
        return int.from_bytes(data[offset:offset + size], "big")

    while True:
        code, jt, jf, k = program[pc]
        pc += 1
        if code in (hostile.LDH_ABS, hostile.LDB_ABS, hostile.LDW_ABS):
            value = load(k, {hostile.LDH_ABS: 2, hostile.LDB_ABS: 1, hostile.LDW_ABS: 4}[code])
            if value is None:
                return 0  # the kernel ends the program with 0 on an out-of-bounds load
            a = value
        elif code == hostile.LDXB_MSH:
            value = load(k, 1)
            if value is None:
                return 0
            x = 4 * (value & 0x0F)
        elif code in (hostile.LDH_IND, hostile.LDB_IND):
            value = load(x + k, 2 if code == hostile.LDH_IND else 1)
            if value is None:
                return 0
            a = value
        elif code == hostile.AND_K:
            a &= k
        elif code == hostile.JEQ_K:
            pc += jt if a == k else jf
        elif code == hostile.RET_K:
            return k
        else:
            raise AssertionError(f"instruction {code:#x} not modelled")


VIP, CLIENT, NODE = "203.0.113.1", "203.0.113.10", "198.51.100.12"


@pytest.mark.parametrize("name,layer,leaks", [
    ("vip to client tcp", IP(src=VIP, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA"), False),
    ("node source tcp", IP(src=NODE, dst=CLIENT) / TCP(sport=80, dport=40000, flags="SA"), True),
    ("node destination tcp", IP(src=CLIENT, dst=NODE) / TCP(sport=40000, dport=80), True),
    ("time exceeded quoting a node", IP(src="203.0.113.2", dst=CLIENT) / ICMP(type=11, code=0) /
     IPerror(src=CLIENT, dst=NODE, ttl=0) / TCPerror(sport=40000, dport=80), True),
    ("time exceeded quoting the vip", IP(src="203.0.113.2", dst=CLIENT) / ICMP(type=11, code=0) /
     IPerror(src=CLIENT, dst=VIP, ttl=0) / TCPerror(sport=40000, dport=80), False),
    ("echo reply from a node", IP(src=NODE, dst=CLIENT) / ICMP(type=0), True),
    ("udp from the distributor", IP(src="203.0.113.2", dst=CLIENT) / UDP(sport=8405, dport=9), False),
    ("arp for the vip", ARP(op=1, psrc=VIP, pdst=VIP, hwsrc=DIST_MAC), False),
    ("arp naming a lan address", ARP(op=2, psrc="198.51.100.1", pdst=CLIENT, hwsrc=DIST_MAC), True),
])
def test_leak_classifier_and_its_filter_agree_on_what_leaks(name, layer, leaks):
    data = frame(layer)
    assert (hostile.lan_leak(data) is not None) is leaks, hostile.lan_leak(data)
    # The kernel filter may pass more than leaks (Python decides), but never hide a leak.
    passed = run_bpf(hostile.leak_filter(), data) > 0
    assert passed or not leaks
    if name == "vip to client tcp":
        assert not passed, "the common frame must stay in the kernel"
    assert run_bpf(hostile.leak_filter(), data, pkttype=0) == 0, "only frames the host sends"


def test_udp_filter_selects_port_and_source():
    beat = frame(IP(src="198.51.100.2", dst="198.51.100.255") / UDP(sport=8406, dport=8406) / b"x")
    other_port = frame(IP(src="198.51.100.2", dst="198.51.100.255") / UDP(sport=8406, dport=8405) / b"x")
    other_source = frame(IP(src="198.51.100.3", dst="198.51.100.255") / UDP(sport=8406, dport=8406) / b"x")
    program = hostile.udp_filter(8406, source="198.51.100.2")
    assert run_bpf(program, beat, pkttype=1) > 0
    assert run_bpf(program, beat) == 0  # outgoing
    assert run_bpf(program, other_port, pkttype=1) == 0
    assert run_bpf(program, other_source, pkttype=1) == 0
    with_options = frame(IP(src="198.51.100.2", dst="198.51.100.255", options=b"\x01\x01\x01\x00") /
                         UDP(sport=1, dport=8406) / b"x")
    assert run_bpf(program, with_options, pkttype=1) > 0  # the UDP header is found past IP options


def test_udp_filter_by_wire_kind_keeps_heartbeats_and_leaves_sync_batches():
    keys = Keys({1: b"k" * 32})

    def datagram(kind, options=b""):
        return frame(IP(src="198.51.100.2", dst="198.51.100.255", options=options) / UDP(sport=8406, dport=8406) /
                     seal(keys, kind, "dist1", 1, 0.0, b""))

    program = hostile.udp_filter(8406, "198.51.100.2", wire_kind=hostile.DIST_HEARTBEAT_KIND)
    assert run_bpf(program, datagram(Kind.DIST_HEARTBEAT), pkttype=1) > 0
    assert run_bpf(program, datagram(Kind.DIST_HEARTBEAT, b"\x01\x01\x01\x00"), pkttype=1) > 0
    assert run_bpf(program, datagram(Kind.STATE_SYNC), pkttype=1) == 0


def test_spoofed_syn_pool_is_distinct_valid_and_never_uses_a_real_host_address():
    pool = hostile.spoofed_syn_pool(3000)
    assert len(pool) == 3000
    assert all(checksums_valid(p) for p in pool)
    flows = {(p[12:16], p[20:22]) for p in pool}
    assert len(flows) == 3000
    sources = {ipaddress.IPv4Address(p[12:16]) for p in pool}
    assert sources.isdisjoint({ipaddress.IPv4Address(a) for a in ("203.0.113.1", "203.0.113.2", "203.0.113.3",
                                                                   "203.0.113.10")})
    assert all(s in ipaddress.IPv4Network("203.0.113.0/24") for s in sources)
    assert {p[33] & 0x3F for p in pool} == {0x02}  # SYN only
    assert hostile.spoofed_syn_pool(50) == hostile.spoofed_syn_pool(50)  # seeded: runs are comparable


def test_malformed_kinds_are_27_distinct_packets():
    kinds = hostile.malformed_packets()
    assert len(kinds) == 27
    assert len({name for name, _ in kinds}) == 27
    assert len({packet for _, packet in kinds}) == 27
    by_name = dict(kinds)
    assert by_name["ihl 4"][0] == 0x44 and by_name["ipv6 version"][0] >> 4 == 6
    assert rfc1071(by_name["bad ip checksum"][:20]) != 0
    assert not checksums_valid(by_name["bad tcp checksum"])


def test_pace_sends_the_asked_count_at_the_asked_rate():
    sent = []
    report = hostile.pace(sent.append, [b"a", b"b", b"c"], rate=2000, seconds=0.25)
    assert report.sent == len(sent) == 500
    assert sent[:4] == [b"a", b"b", b"c", b"a"]
    assert report.rate == pytest.approx(2000, rel=0.2)
    with pytest.raises(ValueError, match="rate"):
        hostile.pace(sent.append, [b"a"], rate=0, seconds=1)
    with pytest.raises(ValueError, match="seconds"):
        hostile.pace(sent.append, [b"a"], rate=1, seconds=hostile.MAX_SECONDS + 1)


def test_replayed_frames_get_the_checksum_a_wire_would_carry():
    good = frame(IP(src="198.51.100.2", dst="198.51.100.255") / UDP(sport=8406, dport=8406) / b"heartbeat")
    partial = bytearray(good)
    partial[14 + 20 + 6:14 + 20 + 8] = b"\x12\x34"  # what a veth capture shows: the unfinished sum
    assert hostile.with_valid_checksums(bytes(partial)) == good
    tcp_good = frame(IP(src=CLIENT, dst=VIP) / TCP(sport=1, dport=80, flags="S"))
    tcp_partial = bytearray(tcp_good)
    tcp_partial[14 + 20 + 16] ^= 0xFF
    assert hostile.with_valid_checksums(bytes(tcp_partial)) == tcp_good
    arp = frame(ARP(op=1, psrc=VIP, pdst=VIP))
    assert hostile.with_valid_checksums(arp) == arp


def test_heartbeats_on_the_wire_are_told_apart_by_kind_and_sender():
    keys = Keys({1: b"k" * 32})

    def beat(kind, sender, at):
        data = seal(keys, kind, sender, 1, 0.0, b"")
        return hostile.Frame(at, False, frame(IP(src="198.51.100.2", dst="198.51.100.255") /
                                              UDP(sport=8406, dport=8406) / data))

    frames = [beat(Kind.DIST_HEARTBEAT, "dist1", 1.0), beat(Kind.STATE_SYNC, "dist1", 1.1),
              beat(Kind.DIST_HEARTBEAT, "dist1", 1.3), beat(Kind.DIST_HEARTBEAT, "dist2", 1.35),
              beat(Kind.DIST_HEARTBEAT, "dist1", 2.0)]
    times = hostile.heartbeat_times(frames, hostile.DIST_HEARTBEAT_KIND, sender="dist1")
    assert times == [1.0, 1.3, 2.0]
    assert hostile.largest_gap(times) == pytest.approx(0.7)
    assert hostile.largest_gap([]) == 0.0
    assert set(hostile.heartbeat_senders(frames, hostile.DIST_HEARTBEAT_KIND)) == {"dist1", "dist2"}


def test_arp_probe_is_an_rfc5227_probe_and_gratuitous_arps_are_recognised():
    probe = Ether(hostile.arp_probe_frame(VIP))
    assert probe[ARP].op == 1 and probe[ARP].psrc == "0.0.0.0" and probe[ARP].pdst == VIP
    assert probe.src == hostile.PROBE_MAC and probe.dst == "ff:ff:ff:ff:ff:ff"
    garp = hostile.Frame(5.0, False, bytes(Ether(src=DIST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                                           ARP(op=1, hwsrc=DIST_MAC, psrc=VIP, pdst=VIP)))
    request = hostile.Frame(6.0, False, bytes(Ether(src=DIST_MAC, dst="ff:ff:ff:ff:ff:ff") /
                                              ARP(op=1, hwsrc=DIST_MAC, psrc="203.0.113.2", pdst=VIP)))
    assert hostile.gratuitous_arps([garp, request], VIP) == [(5.0, DIST_MAC)]


def test_assembler_resolves_labels_and_refuses_long_jumps():
    program = hostile.assemble([(hostile.LDB_ABS, 0), (hostile.JEQ_K, 1, "yes", "no"), ("yes",),
                                (hostile.RET_K, 1), ("no",), (hostile.RET_K, 0)])
    assert program == [(hostile.LDB_ABS, 0, 0, 0), (hostile.JEQ_K, 0, 1, 1), (hostile.RET_K, 0, 0, 1),
                       (hostile.RET_K, 0, 0, 0)]
    assert run_bpf(program, b"\x01") == 1 and run_bpf(program, b"\x02") == 0
    far = [(hostile.JEQ_K, 0, "end", "end")] + [(hostile.AND_K, 0)] * 300 + [("end",), (hostile.RET_K, 0)]
    with pytest.raises(ValueError, match="out of range"):
        hostile.assemble(far)
    assert struct.calcsize("HBBI") == 8  # struct sock_filter
