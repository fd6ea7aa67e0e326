"""Packet rewrite tables: input bytes -> expected verdict and bytes."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from distributor.balancer import Policy
from distributor.conntable import ConnectionTable, TcpState
from distributor.reroute import ACCEPT, DROP, BackendSpec, ConnectionEnded, ConnectionOpened, Interposer, Reason, SendPacket, ServiceSpec
from tests.packets import CLIENT, VIP, WEB, checksums_valid, record_route, tcp, udp

MSS_SACK_TS_WS = [("MSS", 1460), ("SAckOK", b""), ("Timestamp", (123456, 0)), ("NOP", None), ("WScale", 7)]


def service_spec(policy=Policy.ROUND_ROBIN, backend_port=80, nodes=("web1", "web2")) -> ServiceSpec:
    backends = tuple(BackendSpec(n, ipaddress.IPv4Address(WEB[n]), backend_port) for n in nodes)
    return ServiceSpec("web", ipaddress.IPv4Address(VIP), 80, policy, backends)


def make(policy=Policy.ROUND_ROBIN, capacity=100, backend_port=80, nodes=("web1", "web2")):
    return Interposer([service_spec(policy, backend_port, nodes)], ConnectionTable(capacity))


def handshake(ip, sport=40000, node="web1", now=0.0):
    verdict, out = ip.handle(tcp(CLIENT, VIP, sport, 80, "S", seq=1), now)
    assert verdict == ACCEPT and out is not None
    assert out == tcp(CLIENT, WEB[node], sport, 80, "S", seq=1)
    return out


# (name, packet, expected verdict, expected reason)
MALFORMED = [
    ("empty", b"", DROP, Reason.TRUNCATED),
    ("19 bytes", tcp(CLIENT, VIP, 40000, 80, "S")[:19], DROP, Reason.TRUNCATED),
    ("header cut", tcp(CLIENT, VIP, 40000, 80, "S")[:30], DROP, Reason.TRUNCATED),
    ("payload cut", tcp(CLIENT, VIP, 40000, 80, "PA", b"x" * 100)[:-1], DROP, Reason.TRUNCATED),
    ("IP version 5", bytes([0x55]) + tcp(CLIENT, VIP, 40000, 80, "S")[1:], DROP, Reason.BAD_IP_HEADER),
    ("IPv6 version over an IPv4 header", bytes([0x60]) + tcp(CLIENT, VIP, 40000, 80, "S")[1:], DROP, Reason.TRUNCATED),
    ("ihl 4", bytes([0x44]) + tcp(CLIENT, VIP, 40000, 80, "S")[1:], DROP, Reason.BAD_IP_HEADER),
    ("ip options", tcp(CLIENT, VIP, 40000, 80, "S", ip={"options": record_route()}), DROP, Reason.IP_OPTIONS),
    ("more fragments", tcp(CLIENT, VIP, 40000, 80, "S", ip={"flags": "MF"}), DROP, Reason.FRAGMENT),
    ("fragment offset", tcp(CLIENT, VIP, 40000, 80, "PA", b"abc", ip={"frag": 100}), DROP, Reason.FRAGMENT),
    ("syn+fin", tcp(CLIENT, VIP, 40000, 80, "SF"), DROP, Reason.BAD_FLAGS),
    ("syn+rst", tcp(CLIENT, VIP, 40000, 80, "SR"), DROP, Reason.BAD_FLAGS),
    ("no flags", tcp(CLIENT, VIP, 40000, 80, ""), DROP, Reason.BAD_FLAGS),
    ("fin without ack", tcp(CLIENT, VIP, 40000, 80, "F"), DROP, Reason.BAD_FLAGS),
    ("psh only", tcp(CLIENT, VIP, 40000, 80, "P", b"data"), DROP, Reason.BAD_FLAGS),
    ("mid-stream unknown", tcp(CLIENT, VIP, 40000, 80, "PA", b"GET /"), DROP, Reason.UNKNOWN_FLOW),
    ("syn+ack to vip", tcp(CLIENT, VIP, 40000, 80, "SA"), DROP, Reason.UNKNOWN_FLOW),
    ("rst to vip unknown", tcp(CLIENT, VIP, 40000, 80, "R"), DROP, Reason.UNKNOWN_FLOW),
    ("reply unknown", tcp(WEB["web1"], CLIENT, 80, 40000, "SA"), DROP, Reason.UNKNOWN_REPLY),
    ("other port", tcp(CLIENT, VIP, 40000, 443, "S"), ACCEPT, Reason.NOT_SERVICE),
    ("other address", tcp(CLIENT, "203.0.113.99", 40000, 80, "S"), ACCEPT, Reason.NOT_SERVICE),
    ("udp to vip", udp(CLIENT, VIP, 5000, 80), ACCEPT, Reason.NOT_TCP),
]


def _bad_offset(doff: int) -> bytes:
    packet = bytearray(tcp(CLIENT, VIP, 40000, 80, "S"))
    packet[32] = (doff << 4) | (packet[32] & 0x0F)
    return bytes(packet)


MALFORMED += [
    ("data offset 4", _bad_offset(4), DROP, Reason.BAD_TCP_HEADER),
    ("data offset past end", _bad_offset(15), DROP, Reason.BAD_TCP_HEADER),
]


@pytest.mark.parametrize("name,packet,verdict,reason", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_malformed_and_foreign_packets_get_a_counted_verdict_and_leave_the_table_alone(name, packet, verdict, reason):
    ip = make()
    assert ip.handle(packet, 0.0) == (verdict, None)
    assert ip.count(reason) == 1
    assert len(ip.table) == 0
    assert all(ip.services[0].balancer.outstanding(i) == 0 for i in range(2))


def test_syn_is_rewritten_to_the_chosen_backend_with_valid_checksums():
    ip = make()
    out = handshake(ip)
    assert checksums_valid(out)
    assert ip.count(Reason.NEW_CONNECTION) == 1
    assert ip.services[0].balancer.outstanding(0) == 1


@pytest.mark.parametrize("payload_len", [0, 1, 2, 3, 511, 1447, 1448])
@pytest.mark.parametrize("options", [(), MSS_SACK_TS_WS[2:3], MSS_SACK_TS_WS], ids=["no-opts", "ts", "all-opts"])
@pytest.mark.parametrize("established", [False, True], ids=["handshake", "established-fast-path"])
def test_client_packets_rewrite_exactly_node_packets_go_on_unchanged(payload_len, options, established):
    ip = make()
    handshake(ip)
    if established:  # the client's ACK: later segments take Interposer.decide's inline path
        ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 0.5)
        assert ip.table.get(tcp(CLIENT, VIP, 40000, 80, "A")[12:24]).state is TcpState.ESTABLISHED
    payload = bytes((i * 7 + 3) & 0xFF for i in range(payload_len))
    forward = tcp(CLIENT, VIP, 40000, 80, "PA", payload, options=options, seq=77, ack=99)
    verdict, out = ip.handle(forward, 1.0)
    assert verdict == ACCEPT
    assert out == tcp(CLIENT, WEB["web1"], 40000, 80, "PA", payload, options=options, seq=77, ack=99)
    assert checksums_valid(out)

    # The node's packet is accepted as it is: the kernel's stateless rule gives it the VIP (rules.py).
    reply = tcp(WEB["web1"], CLIENT, 80, 40000, "FPA", payload, options=options, seq=5, ack=6)
    assert ip.decide(reply, 1.0)[:2] == (Reason.TO_CLIENT, None)


def test_backend_on_another_port_gets_the_port_rewritten_and_its_answers_are_followed():
    ip = make(backend_port=8080)
    verdict, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    assert out == tcp(CLIENT, WEB["web1"], 40000, 8080, "S")
    assert ip.decide(tcp(WEB["web1"], CLIENT, 8080, 40000, "SA"), 0.0)[:2] == (Reason.TO_CLIENT, None)
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 0.1)  # established: the inline path rewrites ports too
    assert ip.handle(tcp(CLIENT, VIP, 40000, 80, "PA", b"GET /"), 0.2)[1] == tcp(CLIENT, WEB["web1"], 40000, 8080, "PA", b"GET /")


def test_checksum_results_match_full_recomputation_for_many_addresses_and_ids():
    # Sweep IP ids and ports so the incremental update meets carries and the
    # 0x0000 / 0xFFFF corner; scapy's full recomputation is the reference.
    ip = make(capacity=3000)
    for sport in range(1024, 1024 + 3000):
        fields = {"id": sport * 211 & 0xFFFF}
        packet = tcp(CLIENT, VIP, sport, 80, "S", seq=sport * 7919, ip=fields)
        _, out = ip.handle(packet, 0.0)
        backend = ip.table.get(packet[12:24]).backend
        assert out == tcp(CLIENT, WEB[backend.name], sport, 80, "S", seq=sport * 7919, ip=fields)


def test_every_packet_of_a_connection_goes_to_the_backend_chosen_at_its_syn():
    ip = make()
    handshake(ip, 40000, "web1")
    handshake(ip, 40001, "web2")
    for _ in range(5):
        _, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 1.0)
        assert out[16:20] == bytes(map(int, WEB["web1"].split(".")))
        _, out = ip.handle(tcp(CLIENT, VIP, 40001, 80, "A"), 1.0)
        assert out[16:20] == bytes(map(int, WEB["web2"].split(".")))


def test_retransmitted_syn_goes_to_the_same_backend_and_is_not_counted_twice():
    # Sooner than any client's RTO (SYN_RETRY_MIN): no evidence against the node (test_passive_health.py).
    ip = make()
    handshake(ip, 40000, "web1")
    _, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S", seq=1), 0.3)
    assert out == tcp(CLIENT, WEB["web1"], 40000, 80, "S", seq=1)
    assert ip.services[0].balancer.outstanding(0) == 1
    assert len(ip.table) == 1


def test_full_lifecycle_releases_the_backend_once():
    ip = make()
    handshake(ip)
    ip.handle(tcp(WEB["web1"], CLIENT, 80, 40000, "SA"), 0.1)
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 0.2)
    conn = ip.table.get(tcp(CLIENT, VIP, 40000, 80, "A")[12:24])
    assert conn.state is TcpState.ESTABLISHED
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "FA"), 0.3)
    assert conn.state is TcpState.FIN_WAIT
    assert ip.services[0].balancer.outstanding(0) == 1
    ip.handle(tcp(WEB["web1"], CLIENT, 80, 40000, "FA"), 0.4)
    assert conn.state is TcpState.CLOSING
    assert ip.services[0].balancer.outstanding(0) == 0
    verdict, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 0.5)  # the last ACK still passes
    assert verdict == ACCEPT and out is not None
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "R"), 0.6)
    assert ip.services[0].balancer.outstanding(0) == 0


def test_rst_from_backend_ends_the_connection():
    ip = make()
    handshake(ip)
    verdict, out = ip.handle(tcp(WEB["web1"], CLIENT, 80, 40000, "RA"), 0.1)
    assert verdict == ACCEPT and out is None
    assert ip.services[0].balancer.outstanding(0) == 0


def test_syn_reusing_a_finished_4_tuple_opens_a_new_connection():
    ip = make()
    handshake(ip, 40000, "web1")
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "R"), 0.1)
    _, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.2)
    assert out == tcp(CLIENT, WEB["web2"], 40000, 80, "S")  # round-robin moved on
    assert len(ip.table) == 1
    assert ip.services[0].balancer.outstanding(1) == 1


def test_full_table_refuses_new_connections_but_serves_existing_ones():
    ip = make(capacity=2)
    handshake(ip, 40000, "web1")
    handshake(ip, 40001, "web2")
    for port in (40000, 40001):
        ip.handle(tcp(CLIENT, VIP, port, 80, "A"), 0.05)  # established: not evictable
    assert ip.handle(tcp(CLIENT, VIP, 40002, 80, "S"), 0.1) == (DROP, None)
    assert ip.count(Reason.TABLE_FULL) == 1
    assert [ip.services[0].balancer.outstanding(i) for i in range(2)] == [1, 1]
    verdict, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "PA", b"GET /"), 0.2)
    assert verdict == ACCEPT and out is not None
    # A finished connection makes room at once.
    ip.handle(tcp(CLIENT, VIP, 40001, 80, "R"), 0.3)
    verdict, _ = ip.handle(tcp(CLIENT, VIP, 40002, 80, "S"), 0.4)
    assert verdict == ACCEPT
    assert len(ip.table) == 2


def test_a_syn_flood_cannot_lock_clients_out_the_oldest_half_open_entry_makes_room():
    ip = make(capacity=100)
    spoofed = [tcp(f"203.0.113.{100 + i % 100}", VIP, 1024 + i, 80, "S") for i in range(1000)]
    legit = 0
    for i, syn in enumerate(spoofed):
        assert ip.decide(syn, i * 0.001)[0] is Reason.NEW_CONNECTION
        if i % 50 == 49:  # a real client now and then: its handshake completes
            port = 50000 + i
            reason, _, _ = ip.decide(tcp(CLIENT, VIP, port, 80, "S"), i * 0.001)
            assert reason is Reason.NEW_CONNECTION
            ip.decide(tcp(CLIENT, VIP, port, 80, "A"), i * 0.001)
            legit += 1
    assert ip.count(Reason.TABLE_FULL) == 0 and len(ip.table) == 100
    assert ip.table.evicted_half_open == 1000 + legit - 100
    established = [c for c in ip.table if c.state is TcpState.ESTABLISHED]
    assert len(established) == legit  # every real client kept its connection
    balancer = ip.services[0].balancer
    assert balancer.outstanding(0) + balancer.outstanding(1) == 100  # evictions were released


def test_no_eligible_backend_refuses_the_syn():
    ip = make()
    ip.set_node_available("web1", False)
    ip.set_node_available("web2", False)
    assert ip.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0) == (DROP, None)
    assert ip.count(Reason.NO_BACKEND) == 1


def test_idle_connections_expire_and_release_their_backend():
    ip = make()
    handshake(ip)
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 1.0)
    assert ip.expire(1.0 + 899) == []
    (ended,) = ip.expire(1.0 + 900)
    assert isinstance(ended, ConnectionEnded) and ended.conn.key == tcp(CLIENT, VIP, 40000, 80, "A")[12:24]
    assert len(ip.table) == 0
    assert ip.services[0].balancer.outstanding(0) == 0
    assert ip.handle(tcp(CLIENT, VIP, 40000, 80, "A"), 902.0) == (DROP, None)


def test_several_services_each_with_their_own_nodes_and_policy():
    specs = [
        ServiceSpec("http", ipaddress.IPv4Address(VIP), 80, Policy.ROUND_ROBIN,
                    (BackendSpec("web1", ipaddress.IPv4Address(WEB["web1"]), 80),)),
        ServiceSpec("alt", ipaddress.IPv4Address(VIP), 8080, Policy.LEAST_OUTSTANDING,
                    (BackendSpec("web2", ipaddress.IPv4Address(WEB["web2"]), 9000),)),
    ]
    ip = Interposer(specs, ConnectionTable(10))
    _, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    assert out == tcp(CLIENT, WEB["web1"], 40000, 80, "S")
    _, out = ip.handle(tcp(CLIENT, VIP, 40000, 8080, "S"), 0.0)
    assert out == tcp(CLIENT, WEB["web2"], 40000, 9000, "S")
    assert ip.decide(tcp(WEB["web2"], CLIENT, 9000, 40000, "SA"), 0.0)[:2] == (Reason.TO_CLIENT, None)


packet_bytes = st.one_of(
    st.binary(max_size=80),
    st.builds(
        lambda base, pos, value: base[:pos] + bytes([value]) + base[pos + 1:],
        st.sampled_from([tcp(CLIENT, VIP, 40000, 80, "S"), tcp(CLIENT, VIP, 40000, 80, "PA", b"abc"),
                         tcp(WEB["web1"], CLIENT, 80, 40000, "SA")]),
        st.integers(0, 42),
        st.integers(0, 255),
    ),
)


@settings(max_examples=400, deadline=None)
@given(st.lists(packet_bytes, max_size=30))
def test_any_byte_sequence_gets_a_verdict_and_keeps_the_table_consistent(packets):
    ip = make(capacity=4)
    for i, packet in enumerate(packets):
        verdict, out = ip.handle(packet, float(i))
        assert verdict in (ACCEPT, DROP)
        assert out is None or (verdict == ACCEPT and len(out) == len(packet))
    ip.expire(10_000.0)
    balancer = ip.services[0].balancer
    open_per_backend = [0, 0]
    for conn in ip.table:
        if conn.is_open:
            open_per_backend[conn.backend.index] += 1
    assert open_per_backend == [balancer.outstanding(0), balancer.outstanding(1)]
    assert sum(ip.counts) == len(packets)


def test_reset_node_sends_each_client_an_acceptable_rst_and_answers_later_segments_with_rst():
    from scapy.layers.inet import IP, TCP

    ip = make()
    handshake(ip, 40000, "web1")
    handshake(ip, 40001, "web2")
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A", seq=2, ack=5001), 0.1)
    effects = ip.reset_node("web1", 1.0)
    ended = [e.conn.key for e in effects if isinstance(e, ConnectionEnded)]
    assert ended == [tcp(CLIENT, VIP, 40000, 80, "A")[12:24]]
    assert ip.services[0].balancer.outstanding(0) == 0
    (rst,) = [e.packet for e in effects if isinstance(e, SendPacket)]
    assert checksums_valid(rst)
    packet = IP(rst)
    assert (packet.src, packet.dst, packet[TCP].sport, packet[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert packet[TCP].flags == "R" and packet[TCP].seq == 5001
    # The client missed it and sends more: another RST, at the sequence it now expects; nothing reaches web1.
    reason, out, extra = ip.decide(tcp(CLIENT, VIP, 40000, 80, "PA", b"more", seq=2, ack=6001), 1.1)
    assert (reason.verdict, out) == (DROP, None)
    (again,) = extra
    assert isinstance(again, SendPacket) and IP(again.packet)[TCP].seq == 6001 and checksums_valid(again.packet)
    assert ip.handle(tcp(WEB["web1"], CLIENT, 80, 40000, "PA", b"late"), 1.2) == (DROP, None)
    # web2's connection is untouched.
    verdict, out = ip.handle(tcp(CLIENT, VIP, 40001, 80, "A"), 1.3)
    assert verdict == ACCEPT and out is not None


def test_syn_on_the_4_tuple_of_a_connection_to_an_excluded_node_is_balanced_again():
    ip = make()
    handshake(ip, 40000, "web1")  # web1 never answers: the client gives up and reuses the port
    ip.set_node_available("web1", False)
    _, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S", seq=999), 3.0)
    assert out == tcp(CLIENT, WEB["web2"], 40000, 80, "S", seq=999)
    assert [ip.services[0].balancer.outstanding(i) for i in range(2)] == [0, 1]
    assert len(ip.table) == 1


def test_a_ttl_1_packet_to_the_vip_is_dropped_never_forwarded_to_draw_a_time_exceeded_quoting_a_node():
    ip = make()
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "S", ip={"ttl": 1}), 0.0)[:2] == (Reason.TTL_EXPIRED, None)
    assert len(ip.table) == 0
    handshake(ip, 40001, "web1")
    ip.handle(tcp(CLIENT, VIP, 40001, 80, "A"), 0.1)  # established: the inline path checks the TTL too
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "PA", b"x", ip={"ttl": 1}), 0.2)[:2] == (Reason.TTL_EXPIRED, None)
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "PA", b"x", ip={"ttl": 2}), 0.2)[0] is Reason.TO_BACKEND
    assert ip.decide(tcp(CLIENT, "203.0.113.99", 40002, 80, "S", ip={"ttl": 1}), 0.3)[0] is Reason.NOT_SERVICE


def test_rewrite_mode_resets_both_ends_of_a_connection_that_idled_out_instead_of_dropping_its_segments():
    from scapy.layers.inet import IP, TCP

    ip = make()
    handshake(ip, 40000, "web1")
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A", seq=5, ack=9000), 0.1)
    (ended,) = ip.expire(0.1 + 901)
    assert isinstance(ended, ConnectionEnded)
    reason, out, extra = ip.decide(tcp(CLIENT, VIP, 40000, 80, "PA", b"GET /", seq=77, ack=9100), 1000.0)
    assert (reason, out) == (Reason.EXPIRED_FLOW, None)
    to_client, to_node = (IP(e.packet) for e in extra)
    assert (to_client.src, to_client.dst, to_client[TCP].sport, to_client[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert to_client[TCP].flags == "R" and to_client[TCP].seq == 9100
    assert (to_node.src, to_node.dst, to_node[TCP].sport, to_node[TCP].dport) == (CLIENT, WEB["web1"], 40000, 80)
    assert to_node[TCP].flags == "R" and to_node[TCP].seq == 77
    assert all(checksums_valid(e.packet) for e in extra)
    # A connection never seen is still dropped silently (after a takeover its entry may be on its way).
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "PA", b"x"), 1000.0)[:3] == (Reason.UNKNOWN_FLOW, None, None)
    # A half-open one that expired is not remembered: there is nothing to reset.
    ip.decide(tcp(CLIENT, VIP, 40002, 80, "S"), 1000.0)
    ip.expire(1100.0)
    assert ip.decide(tcp(CLIENT, VIP, 40002, 80, "A"), 1101.0)[0] is Reason.UNKNOWN_FLOW


def test_persistence_keeps_a_client_on_its_node_moves_it_when_the_node_is_out_and_the_replica_learns_it():
    spec = service_spec(Policy.ROUND_ROBIN, nodes=("web1", "web2", "web3"))
    spec = ServiceSpec(spec.name, spec.vip, spec.port, spec.policy, spec.backends, persistence=300.0)
    ip = Interposer([spec], ConnectionTable(100))
    other = "203.0.113.77"

    def node_of(client, port, now):
        _, out, _ = ip.decide(tcp(client, VIP, port, 80, "S"), now)
        return next(n for n, a in WEB.items() if out[16:20] == ipaddress.IPv4Address(a).packed)

    first = node_of(CLIENT, 40000, 0.0)
    assert {node_of(CLIENT, p, 1.0) for p in range(40001, 40010)} == {first}  # round-robin would spread them
    assert node_of(other, 40000, 1.0) != first or node_of(other, 40001, 1.0) == node_of(other, 40000, 1.0)
    ip.set_node_available(first, False)  # its node is out: the client moves, and stays on the new one
    moved = node_of(CLIENT, 40020, 2.0)
    assert moved != first and {node_of(CLIENT, p, 3.0) for p in range(40021, 40025)} == {moved}
    assert node_of(CLIENT, 40030, 2.0 + 301) in WEB  # expired: placed afresh (any node)
    replica = Interposer([spec], ConnectionTable(100))
    key = tcp(CLIENT, VIP, 40000, 80, "A")[12:24]
    assert replica.install(key, 1, 5.0)
    assert replica.sticky_node(replica.services[0], key[0:4], 6.0).name == "web2"
