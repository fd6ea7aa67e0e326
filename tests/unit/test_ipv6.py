"""IPv6 services in the packet core (rewrite and kernel modes): input bytes -> verdict and bytes.

Every expected packet is built by scapy from scratch, with its own checksums, and the checksums of
what the interposer hands back are verified by an independent RFC 1071 sum over the IPv6
pseudo-header (RFC 8200 section 8.1), so the incremental patches are checked twice.
"""

from __future__ import annotations

import ipaddress
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import TCP
from scapy.layers.inet6 import (ICMPv6DestUnreach, ICMPv6EchoRequest, ICMPv6PacketTooBig, ICMPv6TimeExceeded, IPv6,
                                IPv6ExtHdrFragment, IPv6ExtHdrHopByHop, IPv6ExtHdrRouting)
from scapy.packet import Raw

from distributor import checksum
from distributor.balancer import Policy
from distributor.conntable import ConnectionTable, TcpState
from distributor.reroute import (ACCEPT, DROP, BackendSpec, ConnectionOpened, ForgetInConntrack, Interposer, Mode, Reason,
                                 SendPacket, ServiceSpec, END_MARK, probe_for)
from distributor.synauth import SynAuth
from tests.packets import rfc1071

VIP6 = "2001:db8:203::1"
CLIENT6 = "2001:db8:203::10"
ROUTER6 = "2001:db8:7::1"  # a router on the client's side
INSIDE6 = "2001:db8:198::fe"  # a router on the cluster LAN
WEB6 = {"web1": "2001:db8:198::11", "web2": "2001:db8:198::12"}
VIP4, WEB4 = "203.0.113.1", {"web1": "198.51.100.11", "web2": "198.51.100.12"}


def tcp6(src, dst, sport, dport, flags="A", payload=b"", seq=1000, ack=2000, options=(), hlim=64, window=8192) -> bytes:
    layer = IPv6(src=src, dst=dst, hlim=hlim) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack,
                                                     options=list(options), window=window)
    return bytes(layer / Raw(payload) if payload else layer)


def tcp6_valid(packet: bytes) -> bool:
    """The TCP checksum over the IPv6 pseudo-header verifies (and the payload length is the packet's)."""
    segment = packet[40:]
    if struct.unpack("!H", packet[4:6])[0] != len(segment):
        return False
    pseudo = packet[8:40] + struct.pack("!IxxxB", len(segment), 6)
    return rfc1071(pseudo + segment) == 0


def icmp6_valid(packet: bytes) -> bool:
    message = packet[40:]
    return rfc1071(packet[8:40] + struct.pack("!IxxxB", len(message), 58) + message) == 0


def spec6(backend_port=80, nodes=("web1", "web2"), policy=Policy.ROUND_ROBIN, name="web6") -> ServiceSpec:
    backends = tuple(BackendSpec(n, ipaddress.IPv6Address(WEB6[n]), backend_port) for n in nodes)
    return ServiceSpec(name, ipaddress.IPv6Address(VIP6), 80, policy, backends)


def spec4() -> ServiceSpec:
    backends = tuple(BackendSpec(n, ipaddress.IPv4Address(a), 80) for n, a in WEB4.items())
    return ServiceSpec("web", ipaddress.IPv4Address(VIP4), 80, Policy.ROUND_ROBIN, backends)


def make(mode=Mode.REWRITE, backend_port=80, capacity=100, dual=False, syn_auth=None) -> Interposer:
    services = [spec4(), spec6(backend_port)] if dual else [spec6(backend_port)]
    return Interposer(services, ConnectionTable(capacity), mode, syn_auth=syn_auth)


def established(ip: Interposer, sport=40000, node="web1", backend_port=80) -> None:
    reason, out, extra = ip.decide(tcp6(CLIENT6, VIP6, sport, 80, "S", seq=1, ack=0), 0.0)
    assert reason is Reason.NEW_CONNECTION
    assert out == tcp6(CLIENT6, WEB6[node], sport, backend_port, "S", seq=1, ack=0)
    assert tcp6_valid(out) and isinstance(extra[0], ConnectionOpened)
    assert ip.decide(tcp6(WEB6[node], CLIENT6, backend_port, sport, "SA", seq=5000, ack=2), 0.001)[:2] == (Reason.TO_CLIENT, None)
    assert ip.decide(tcp6(CLIENT6, VIP6, sport, 80, "A", seq=2, ack=5001), 0.002)[0] is Reason.TO_BACKEND


# -- rewrite mode ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend_port", [80, 8080])
@pytest.mark.parametrize("payload_len", [0, 1, 3, 1220, 1440])
def test_client_segments_are_rewritten_to_the_node_with_a_valid_checksum_on_both_paths(backend_port, payload_len):
    ip = make(backend_port=backend_port)
    established(ip, backend_port=backend_port)
    key = tcp6(CLIENT6, VIP6, 40000, 80)[8:44]
    assert ip.table.get(key).state is TcpState.ESTABLISHED
    payload = bytes((i * 13 + 5) & 0xFF for i in range(payload_len))
    for flags in ("PA", "FA"):  # the inline path (PA) and the full one (FA)
        forward = tcp6(CLIENT6, VIP6, 40000, 80, flags, payload, seq=77, ack=99,
                       options=[("Timestamp", (1, 2)), ("NOP", None), ("NOP", None)])
        reason, out, _ = ip.decide(forward, 1.0)
        assert reason is Reason.TO_BACKEND
        assert out == tcp6(CLIENT6, WEB6["web1"], 40000, backend_port, flags, payload, seq=77, ack=99,
                           options=[("Timestamp", (1, 2)), ("NOP", None), ("NOP", None)])
        assert tcp6_valid(out)


def test_checksums_stay_right_across_many_ports_and_sequence_numbers():
    ip = make(capacity=4000, backend_port=8080)
    for sport in range(1024, 1024 + 2000):
        packet = tcp6(CLIENT6, VIP6, sport, 80, "S", seq=sport * 7919 & 0xFFFFFFFF, ack=0)
        _, out, _ = ip.decide(packet, 0.0)
        node = ip.table.get(packet[8:44]).backend.name
        assert out == tcp6(CLIENT6, WEB6[node], sport, 8080, "S", seq=sport * 7919 & 0xFFFFFFFF, ack=0)


def test_a_dual_stack_interposer_serves_both_families_from_one_table():
    ip = make(dual=True)
    established(ip)
    from tests.packets import tcp
    reason, out, _ = ip.decide(tcp("203.0.113.10", VIP4, 40000, 80, "S", seq=1, ack=0), 0.0)
    assert reason is Reason.NEW_CONNECTION and out == tcp("203.0.113.10", WEB4["web1"], 40000, 80, "S", seq=1, ack=0)
    assert len(ip) == 2
    assert {len(key) for key, _ in ip.open_connections()} == {12, 36}


def test_node_answers_are_followed_and_the_connection_ends_at_both_fins():
    ip = make()
    established(ip)
    assert ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "FA", seq=2, ack=5001), 1.0)[0] is Reason.TO_BACKEND
    reason, out, extra = ip.decide(tcp6(WEB6["web1"], CLIENT6, 80, 40000, "FA", seq=5001, ack=3), 1.1)
    assert (reason, out) == (Reason.TO_CLIENT, None)
    assert ip.services[0].balancer.outstanding(0) == 0


@pytest.mark.parametrize("name,packet,reason", [
    ("truncated", tcp6(CLIENT6, VIP6, 40000, 80, "S")[:50], Reason.TRUNCATED),
    ("payload length longer than the copy", tcp6(CLIENT6, VIP6, 40000, 80, "PA", b"x" * 10)[:-1], Reason.TRUNCATED),
    ("hop-by-hop header", bytes(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrHopByHop() / TCP(sport=40000, dport=80, flags="S")),
     Reason.EXTENSION_HEADERS),
    ("routing header", bytes(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrRouting(addresses=[WEB6["web2"]])
                             / TCP(sport=40000, dport=80, flags="S")), Reason.EXTENSION_HEADERS),
    ("fragment", bytes(IPv6(src=CLIENT6, dst=VIP6) / IPv6ExtHdrFragment() / TCP(sport=40000, dport=80, flags="S")),
     Reason.FRAGMENT),
    ("SYN+FIN", tcp6(CLIENT6, VIP6, 40000, 80, "SF"), Reason.BAD_FLAGS),
    ("data offset 4", bytes(IPv6(src=CLIENT6, dst=VIP6) / TCP(sport=40000, dport=80, flags="S", dataofs=4)),
     Reason.BAD_TCP_HEADER),
    ("hop limit 1", tcp6(CLIENT6, VIP6, 40000, 80, "S", hlim=1), Reason.TTL_EXPIRED),
    ("mid-stream, unknown", tcp6(CLIENT6, VIP6, 40000, 80, "A"), Reason.UNKNOWN_FLOW),
    ("an unknown node reply", tcp6(WEB6["web1"], CLIENT6, 80, 40000, "A"), Reason.UNKNOWN_REPLY),
])
def test_malformed_and_refused_ipv6_packets_are_dropped_by_reason_and_leave_the_table_alone(name, packet, reason):
    ip = make()
    got, out, extra = ip.decide(packet, 0.0)
    assert (got, got.verdict, out) == (reason, DROP, None), name
    assert len(ip) == 0


def test_packets_for_no_service_pass_untouched():
    ip = make()
    assert ip.decide(tcp6(CLIENT6, "2001:db8:203::99", 40000, 80, "S"), 0.0)[:2] == (Reason.NOT_SERVICE, None)
    assert ip.decide(tcp6(CLIENT6, VIP6, 40000, 443, "S"), 0.0)[:2] == (Reason.NOT_SERVICE, None)


def test_an_expired_flow_gets_ipv6_resets_to_both_ends():
    ip = make()
    established(ip)
    ip.expire(10_000.0)
    assert len(ip) == 0
    reason, out, extra = ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "PA", b"late", seq=50, ack=6000), 10_001.0)
    assert reason is Reason.EXPIRED_FLOW and out is None
    to_client, to_node = (e.packet for e in extra)
    assert to_client == tcp6(VIP6, CLIENT6, 80, 40000, "R", seq=6000, ack=0, window=0)
    assert to_node == tcp6(CLIENT6, WEB6["web1"], 40000, 80, "R", seq=50, ack=0, window=0)
    assert tcp6_valid(to_client) and tcp6_valid(to_node)


def test_checksum_crafts_an_ipv6_segment_scapy_agrees_with():
    src, dst = ipaddress.IPv6Address(VIP6).packed, ipaddress.IPv6Address(CLIENT6).packed
    packet = checksum.tcp_segment(src, dst, 80, 40000, 7, 9, 0x14, window=0)
    assert packet == bytes(IPv6(src=VIP6, dst=CLIENT6, hlim=64) / TCP(sport=80, dport=40000, seq=7, ack=9, flags="RA", window=0))


def test_syn_cookies_challenge_and_verify_an_ipv6_client():
    auth = SynAuth(b"k" * 32, threshold=1)
    auth.always = True
    ip = make(syn_auth=auth)
    reason, _, extra = ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=1, ack=0), 0.0)
    assert reason is Reason.SYN_CHALLENGED
    challenge = extra[0].packet
    parsed = IPv6(challenge)
    assert tcp6_valid(challenge) and parsed.src == VIP6 and parsed.dst == CLIENT6 and parsed[TCP].flags == "SA"
    answer = tcp6(CLIENT6, VIP6, 40000, 80, "R", seq=parsed[TCP].ack, ack=0)
    assert ip.decide(answer, 0.1)[0] is Reason.SYN_VERIFIED
    assert ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=1, ack=0), 1.0)[0] is Reason.NEW_CONNECTION


def test_a_refused_syn_moves_to_another_node_in_rewrite_mode():
    ip = make()
    syn = tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=100, ack=0)
    ip.decide(syn, 0.0)
    reason, out, extra = ip.decide(tcp6(WEB6["web1"], CLIENT6, 80, 40000, "RA", seq=0, ack=101), 0.01)
    assert reason is Reason.NODE_REFUSED and out is None
    sent = [e.packet for e in extra if isinstance(e, SendPacket)]
    assert sent == [tcp6(CLIENT6, WEB6["web2"], 40000, 80, "S", seq=100, ack=0)]


# -- ICMPv6 errors (rewrite mode) --------------------------------------------------------------------
def response6(src: str, sport: int = 80) -> bytes:
    return tcp6(src, CLIENT6, sport, 40000, "PA", b"y" * 1300, seq=5001, ack=2)


@pytest.mark.parametrize("backend_port", [80, 8080])
@pytest.mark.parametrize("cut", [None, 48, 56], ids=["whole", "IPv6 header and 8 bytes", "cut before the checksum"])
def test_packet_too_big_about_a_response_goes_to_the_node_that_sent_it(backend_port, cut):
    ip = make(backend_port=backend_port)
    established(ip, backend_port=backend_port)
    quoted = response6(VIP6)[:cut]
    error = bytes(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    reason, out, extra = ip.decide(error, 1.0)
    assert (reason, reason.verdict, extra) == (Reason.ICMP_TO_NODE, ACCEPT, None)
    expected_quote = response6(WEB6["web1"], backend_port)[:cut]
    assert out == bytes(IPv6(src=ROUTER6, dst=WEB6["web1"]) / ICMPv6PacketTooBig(mtu=1280) / Raw(expected_quote))
    assert icmp6_valid(out)
    if cut is None:
        assert tcp6_valid(out[48:])


def test_destination_unreachable_and_time_exceeded_about_responses_reach_the_node_too():
    ip = make()
    established(ip)
    for layer in (ICMPv6DestUnreach(code=1), ICMPv6TimeExceeded()):
        error = bytes(IPv6(src=ROUTER6, dst=VIP6) / layer / Raw(response6(VIP6)))
        reason, out, _ = ip.decide(error, 1.0)
        assert reason is Reason.ICMP_TO_NODE and icmp6_valid(out)
        assert IPv6(out).dst == WEB6["web1"]


def test_packet_too_big_about_a_segment_sent_to_a_node_goes_to_the_client_from_the_vip():
    ip = make(backend_port=8080)
    established(ip, backend_port=8080)
    quoted = tcp6(CLIENT6, WEB6["web1"], 40000, 8080, "PA", b"z" * 1400, seq=2, ack=5001)
    error = bytes(IPv6(src=INSIDE6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / Raw(quoted))
    reason, out, _ = ip.decide(error, 1.0)
    assert reason is Reason.ICMP_TO_CLIENT
    expected = tcp6(CLIENT6, VIP6, 40000, 80, "PA", b"z" * 1400, seq=2, ack=5001)
    assert out == bytes(IPv6(src=VIP6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / Raw(expected))
    assert icmp6_valid(out) and tcp6_valid(out[48:])


def test_other_errors_about_a_node_and_errors_about_no_connection_are_dropped():
    ip = make()
    established(ip)
    to_node = tcp6(CLIENT6, WEB6["web1"], 40000, 80, "PA", b"z" * 100, seq=2, ack=5001)
    unreachable = bytes(IPv6(src=INSIDE6, dst=CLIENT6) / ICMPv6DestUnreach() / Raw(to_node))
    assert ip.decide(unreachable, 1.0)[:2] == (Reason.ICMP_UNKNOWN, None)
    stranger = tcp6(VIP6, CLIENT6, 80, 40999, "PA", b"y" * 100)
    assert ip.decide(bytes(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(stranger)), 1.0)[:2] == (
        Reason.ICMP_UNKNOWN, None)
    fragment_quote = bytes(IPv6(src=CLIENT6, dst=WEB6["web1"]) / IPv6ExtHdrFragment(offset=100) / Raw(b"q" * 64))
    assert ip.decide(bytes(IPv6(src=INSIDE6, dst=CLIENT6) / ICMPv6PacketTooBig(mtu=1280) / Raw(fragment_quote)),
                     1.0)[0] is Reason.ICMP_UNKNOWN


def test_echo_and_errors_about_others_pass_untouched():
    ip = make()
    assert ip.decide(bytes(IPv6(src=CLIENT6, dst=VIP6) / ICMPv6EchoRequest()), 0.0)[:2] == (Reason.NOT_TCP, None)
    other = tcp6("2001:db8:5::1", CLIENT6, 80, 40000, "PA", b"y" * 100)
    assert ip.decide(bytes(IPv6(src=ROUTER6, dst="2001:db8:5::1") / ICMPv6PacketTooBig() / Raw(other)), 0.0)[:2] == (
        Reason.NOT_SERVICE, None)


def test_mangled_icmpv6_never_raises():
    ip = make()
    established(ip)
    base = bytes(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(response6(VIP6)))
    for cut in range(0, len(base), 7):
        ip.decide(base[:cut], 1.0)
    for offset in range(0, 120):
        mangled = bytearray(base)
        mangled[offset] ^= 0xA5
        ip.decide(bytes(mangled), 1.0)


# -- kernel mode ------------------------------------------------------------------------------------
def test_kernel_mode_marks_an_ipv6_syn_and_forgets_an_unanswered_one():
    ip = make(Mode.KERNEL)
    syn = tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=9, ack=0)
    reason, out, _ = ip.decide(syn[:60], 0.0)  # kernel mode copies the headers only
    assert reason is Reason.NEW_CONNECTION and out == ip.services[0].backends[0].mark
    reason, out, extra = ip.decide(syn[:60], 1.0)  # retransmitted, unanswered: dropped, forgotten by conntrack
    assert reason is Reason.SYN_UNANSWERED and out is None
    assert [e for e in extra if isinstance(e, ForgetInConntrack)][0].keys == (syn[8:44],)


def test_kernel_mode_ends_an_ipv6_connection_at_its_first_fin_and_probes_from_the_vip():
    ip = make(Mode.KERNEL)
    syn = tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=9, ack=0)
    ip.decide(syn, 0.0)
    conn = ip.table.get(syn[8:44])
    probe = probe_for(conn)
    assert tcp6_valid(probe) and IPv6(probe).src == VIP6 and IPv6(probe).dst == CLIENT6
    reason, out, extra = ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "FA", seq=10, ack=1), 1.0)
    assert (reason, out) == (Reason.CONNECTION_END, END_MARK)


def test_dsr_mode_refuses_ipv6():
    ip = Interposer([spec6(policy=Policy.MAGLEV)], ConnectionTable(100), Mode.DSR)
    assert ip.decide(tcp6(CLIENT6, VIP6, 40000, 80, "S"), 0.0)[:2] == (Reason.BAD_IP_HEADER, None)


# -- replication: IPv6 keys beside IPv4 ones ----------------------------------------------------------
def test_ipv6_connections_replicate_beside_ipv4_ones_and_the_replica_forwards_them_after_a_takeover():
    from backup.sync import SyncReceiver, SyncSender
    from common.wire import SyncBatch
    from distributor.reroute import ConnectionEnded
    from tests.packets import tcp

    active, replica, sender = make(dual=True, capacity=10_000), make(dual=True, capacity=10_000), SyncSender()
    receiver = SyncReceiver(replica)

    def feed(packet, now=0.0):
        reason, out, extra = active.decide(packet, now)
        for effect in extra or ():
            if isinstance(effect, ConnectionOpened):
                sender.opened(effect.conn.key, effect.conn.backend.index)
            elif isinstance(effect, ConnectionEnded):
                sender.ended(effect.conn.key)
        return reason

    for port in range(41000, 41300):  # mixed, so batches hold records of both sizes
        assert feed(tcp6(CLIENT6, VIP6, port, 80, "S", seq=1, ack=0)) is Reason.NEW_CONNECTION
        assert feed(tcp("203.0.113.10", VIP4, port, 80, "S", seq=1, ack=0)) is Reason.NEW_CONNECTION
    feed(tcp6(CLIENT6, VIP6, 41000, 80, "R", seq=2, ack=0), 1.0)
    payloads = sender.live_batches()
    assert all(len(p) <= SyncBatch._HEAD.size + SyncBatch.MAX_BYTES for p in payloads)
    assert len(payloads) > 600 * 15 // SyncBatch.MAX_BYTES  # more datagrams than IPv4 records alone would take
    for payload in payloads:
        assert receiver.receive(SyncBatch.unpack(payload), 1.0)
    assert receiver.missing() == []
    opened = {key: index for key, index in active.open_connections()}
    assert {key: index for key, index in replica.open_connections()} == opened and len(opened) == 599
    # The replica, now active, forwards a replicated IPv6 connection's next segment to its node.
    key = tcp6(CLIENT6, VIP6, 41007, 80)[8:44]
    node = active.table.get(key).backend.name
    reason, out, _ = replica.decide(tcp6(CLIENT6, VIP6, 41007, 80, "A", seq=2, ack=5001), 2.0)
    assert reason is Reason.TO_BACKEND and out == tcp6(CLIENT6, WEB6[node], 41007, 80, "A", seq=2, ack=5001)
    # A snapshot of the same table, cut by size, carries both kinds whole.
    snapshot = SyncSender()
    snapshot.request_snapshot()
    chunks = snapshot.snapshot_batches(1000, active.open_connections, active.open_backend)
    records = [r for chunk in chunks for r in SyncBatch.unpack(chunk).records]
    assert {r.key: r.backend for r in records} == opened
    assert SyncBatch.unpack(chunks[0]).flags & SyncBatch.SNAPSHOT_START
    assert SyncBatch.unpack(chunks[-1]).flags & SyncBatch.SNAPSHOT_END


def test_a_sync_batch_refuses_keys_of_other_sizes_and_damaged_records():
    from common.wire import OPEN, SyncBatch, SyncRecord
    with pytest.raises(ValueError, match="12 \\(IPv4\\) or 36 \\(IPv6\\)"):
        SyncBatch(1, 0, [SyncRecord(OPEN, b"x" * 20, 0)]).pack()
    payload = SyncBatch(1, 0, [SyncRecord(OPEN, b"6" * 36, 3), SyncRecord(OPEN, b"4" * 12, 1)]).pack()
    assert [(len(r.key), r.backend) for r in SyncBatch.unpack(payload).records] == [(36, 3), (12, 1)]
    assert SyncBatch.unpack(payload[:-1]) is None
    assert SyncBatch.unpack(payload + b"\x01") is None


# -- the distributor core with a dual-stack service --------------------------------------------------
def test_a_node_added_by_a_reload_joins_both_halves_of_a_dual_stack_service_and_keeps_its_ipv4_identity():
    from backup.failover import InstallRules
    from common.sansio import CommandDone, Log
    from distributor.core import DistributorCore, Reconfigure
    from tests.playbook import Playbook

    web6 = dict(WEB6, web3="2001:db8:198::13")
    web4 = dict(WEB4, web3="198.51.100.13")

    def services(nodes):
        return (ServiceSpec("web", ipaddress.IPv4Address(VIP4), 80, Policy.ROUND_ROBIN,
                            tuple(BackendSpec(n, ipaddress.IPv4Address(web4[n]), 80) for n in nodes)),
                ServiceSpec("web6", ipaddress.IPv6Address(VIP6), 80, Policy.ROUND_ROBIN,
                            tuple(BackendSpec(n, ipaddress.IPv6Address(web6[n]), 80) for n in nodes)))

    core = DistributorCore("dist1", Mode.REWRITE, services(("web1", "web2")), 100, node_addresses=web4)
    core.start(0.0, 0.0)
    assert core.nodes() == {"web1": WEB4["web1"], "web2": WEB4["web2"]}  # control traffic is IPv4
    play = Playbook(core, keep=(Log,))
    play(Reconfigure(services(("web1", "web2", "web3")), None, 1.0, web4))
    assert not play.logged("cannot put")
    (rules,) = play.of(InstallRules)
    assert {(s.name, b.address) for s in rules.layout for b in s.backends if b.address.endswith("13")} == {
        ("web", "198.51.100.13"), ("web6", "2001:db8:198::13")}
    play(CommandDone(rules, 1.1))
    assert core.nodes()["web3"] == "198.51.100.13"
    placed = set()
    for port in range(42000, 42006):
        reason, out, _ = core.interposer.decide(tcp6(CLIENT6, VIP6, port, 80, "S", seq=1, ack=0), 2.0)
        placed.add(IPv6(out).dst)
    assert placed == set(web6.values())


def test_a_node_added_at_run_time_cannot_join_an_ipv6_service():
    from distributor.admin import AdminOp, AdminRequest, LayoutView, validate
    layout = LayoutView({"web1": WEB4["web1"]}, {"web": {"web1"}, "web6": {"web1"}}, {"round-robin"}, {},
                        {VIP4, VIP6}, {"web6"})

    def add(service):
        args = {"node": "web9", "address": "198.51.100.19", "services": {service: {"port": 80}}}
        return validate(AdminRequest(1, AdminOp.ADD_NODE, args, "admin", 0.0, 0.0), layout)

    refusal = add("web6")
    assert refusal is not None and refusal[0] == 400 and "IPv6 VIP" in refusal[1] and "address6" in refusal[1]
    assert add("web") is None


# -- hostile input: any bytes, IPv6-shaped, in both modes ---------------------------------------------
_SEEDS = [tcp6(CLIENT6, VIP6, 40000, 80, "S", seq=1, ack=0), tcp6(CLIENT6, VIP6, 40000, 80, "PA", b"abc"),
          tcp6(WEB6["web1"], CLIENT6, 80, 40000, "SA"), tcp6(WEB6["web1"], CLIENT6, 80, 40000, "RA", seq=0, ack=2),
          bytes(IPv6(src=ROUTER6, dst=VIP6) / ICMPv6PacketTooBig(mtu=1280) / Raw(response6(VIP6)[:120]))]
ipv6_bytes = st.one_of(
    st.binary(max_size=100).map(lambda b: b"\x60" + b),
    st.builds(lambda base, pos, value: base[:pos] + bytes([value]) + base[pos + 1:],
              st.sampled_from(_SEEDS), st.integers(0, 100), st.integers(0, 255)),
    st.builds(lambda base, cut: base[:cut], st.sampled_from(_SEEDS), st.integers(0, 140)),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(ipv6_bytes, max_size=25), st.sampled_from([Mode.REWRITE, Mode.KERNEL]))
def test_any_ipv6_shaped_bytes_get_a_verdict_and_keep_the_counts_consistent(packets, mode):
    ip = make(mode, capacity=4)
    for i, packet in enumerate(packets):
        reason, out, _ = ip.decide(packet, float(i))
        assert reason.verdict in (ACCEPT, DROP)
        if mode is Mode.REWRITE:
            assert out is None or (reason.verdict == ACCEPT and isinstance(out, bytes) and len(out) == len(packet))
    ip.expire(10_000.0)
    open_per_backend = [0, 0]
    for conn in ip.table:
        if conn.is_open:
            open_per_backend[conn.backend.index] += 1
    assert open_per_backend == [ip.services[0].balancer.outstanding(i) for i in range(2)]
    assert sum(ip.counts) == len(packets)
