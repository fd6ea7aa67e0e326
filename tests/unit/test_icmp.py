"""Rewrite mode's ICMP: errors about a VIP connection reach the host they concern (packet tables).

Every expected packet is built by scapy from scratch (its own checksums), so the interposer's
incrementally patched checksums are checked against an independent computation.
"""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP
from scapy.packet import Raw

from distributor.reroute import ACCEPT, DROP, Mode, Reason
from tests.packets import CLIENT, VIP, WEB, checksums_valid, record_route, rfc1071, tcp, udp
from tests.unit.test_passive_health import make as make_in_mode
from tests.unit.test_reroute import handshake, make

ROUTER = "192.0.2.1"  # a router on the client's side (TEST-NET-1)
INSIDE = "198.51.100.254"  # a router on the cluster LAN
PAYLOAD = b"x" * 200


def icmp_error(src: str, dst: str, quoted: bytes, kind: int = 3, code: int = 4, mtu: int = 1400) -> bytes:
    layer = ICMP(type=kind, code=code, nexthopmtu=mtu) if (kind, code) == (3, 4) else ICMP(type=kind, code=code)
    return bytes(IP(src=src, dst=dst) / layer / Raw(quoted))


def established(backend_port: int = 80):
    ip = make(backend_port=backend_port)
    verdict, out = ip.handle(tcp(CLIENT, VIP, 40000, 80, "S", seq=1), 0.0)
    assert verdict == ACCEPT
    ip.handle(tcp(WEB["web1"], CLIENT, backend_port, 40000, "SA", seq=5000, ack=2), 0.001)
    ip.handle(tcp(CLIENT, VIP, 40000, 80, "A", seq=2, ack=5001), 0.002)
    return ip


def response(src: str, sport: int = 80) -> bytes:
    """The response segment as it left its sender: the node, or (after the return path) the VIP."""
    return tcp(src, CLIENT, sport, 40000, "PA", PAYLOAD, seq=5001, ack=2)


def icmp_checksums_valid(packet: bytes) -> bool:
    return rfc1071(packet[:20]) == 0 and rfc1071(packet[20:]) == 0


# (name, how much of the segment the error quotes)
QUOTES = [("a Linux router's quote (the whole segment)", None), ("RFC 792's minimum: IP header and 8 bytes", 28),
          ("a quote that ends inside the TCP header, before its checksum", 36)]


def test_fragmentation_needed_about_a_response_goes_to_the_node_that_sent_it():
    for name, cut in QUOTES:
        ip = established()
        packet = icmp_error(ROUTER, VIP, response(VIP)[:cut])
        reason, out, extra = ip.decide(packet, 1.0)
        assert reason is Reason.ICMP_TO_NODE and reason.verdict == ACCEPT and extra is None, name
        assert out == icmp_error(ROUTER, WEB["web1"], response(WEB["web1"])[:cut]), name
        assert icmp_checksums_valid(out), name
        if cut is None:
            assert checksums_valid(out[28:]), name  # the quoted segment is the node's own, checksums and all


def test_the_quoted_port_is_the_nodes_when_it_listens_on_another_port():
    ip = established(backend_port=8080)
    reason, out, _ = ip.decide(icmp_error(ROUTER, VIP, response(VIP)), 1.0)
    assert reason is Reason.ICMP_TO_NODE
    assert out == icmp_error(ROUTER, WEB["web1"], response(WEB["web1"], sport=8080))


def test_time_exceeded_and_unreachable_about_a_response_reach_the_node_too():
    for kind, code in ((11, 0), (3, 1), (12, 0)):
        ip = established()
        reason, out, _ = ip.decide(icmp_error(ROUTER, VIP, response(VIP), kind, code), 1.0)
        assert reason is Reason.ICMP_TO_NODE, (kind, code)
        assert out == icmp_error(ROUTER, WEB["web1"], response(WEB["web1"]), kind, code)


def test_an_error_about_no_known_connection_of_a_vip_is_dropped_and_counted():
    ip = established()
    other = tcp(VIP, CLIENT, 80, 40999, "PA", PAYLOAD, seq=5001, ack=2)  # a port no client connected from
    reason, out, _ = ip.decide(icmp_error(ROUTER, VIP, other), 1.0)
    assert (reason, reason.verdict, out) == (Reason.ICMP_UNKNOWN, DROP, None)
    assert ip.counts[Reason.ICMP_UNKNOWN] == 1


def test_fragmentation_needed_on_the_cluster_lan_reaches_the_client_about_the_vip():
    # A client's large upload meets a smaller MTU on the node's side: the error names the node,
    # which the client never heard of; it must name the VIP, as the source of the error too.
    ip = established()
    upload = tcp(CLIENT, WEB["web1"], 40000, 80, "PA", PAYLOAD, seq=2, ack=5001)
    for sender in (INSIDE, "198.51.100.2"):  # a router inside, or the distributor's own stack
        reason, out, _ = ip.decide(icmp_error(sender, CLIENT, upload, mtu=1280), 1.0)
        assert reason is Reason.ICMP_TO_CLIENT and reason.verdict == ACCEPT
        assert out == icmp_error(VIP, CLIENT, tcp(CLIENT, VIP, 40000, 80, "PA", PAYLOAD, seq=2, ack=5001), mtu=1280)
        assert icmp_checksums_valid(out) and checksums_valid(out[28:])


def test_other_errors_about_a_node_never_reach_the_client():
    # Host unreachable about a SYN to a node (the gateway's ARP for it failed) would make the
    # client abort at once (a hard error in SYN-SENT); the distributor moves the connection.
    ip = make()
    syn_to_node = handshake(ip)
    for kind, code in ((3, 1), (3, 3), (11, 0)):
        reason, out, _ = ip.decide(icmp_error("198.51.100.2", CLIENT, syn_to_node, kind, code), 0.5)
        assert (reason, out) == (Reason.ICMP_UNKNOWN, None), (kind, code)


def test_an_error_about_a_node_port_with_no_connection_is_dropped_not_leaked():
    ip = make()
    stray = tcp(CLIENT, WEB["web2"], 40123, 80, "PA", PAYLOAD)
    reason, out, _ = ip.decide(icmp_error(INSIDE, CLIENT, stray, mtu=1280), 0.5)
    assert (reason, out) == (Reason.ICMP_UNKNOWN, None)


def test_icmp_that_is_not_about_a_vip_connection_passes_untouched():
    ip = established()
    cases = [
        ("echo request to the VIP (the distributor's stack answers it)", bytes(IP(src=CLIENT, dst=VIP) / ICMP()),
         Reason.NOT_TCP),
        ("port unreachable about a heartbeat", icmp_error("198.51.100.11", "198.51.100.2",
                                                          udp("198.51.100.2", "198.51.100.11", 8405, 8405), 3, 3),
         Reason.NOT_TCP),
        ("an error about someone else's TCP", icmp_error(ROUTER, "203.0.113.2", tcp("203.0.113.2", CLIENT, 22, 40000)),
         Reason.NOT_SERVICE),
    ]
    for name, packet, expected in cases:
        reason, out, _ = ip.decide(packet, 1.0)
        assert (reason, reason.verdict, out) == (expected, ACCEPT, None), name


def test_malformed_icmp_errors_are_dropped_by_reason():
    ip = established()
    whole = icmp_error(ROUTER, VIP, response(VIP))
    cases = [
        ("a quote shorter than RFC 792's 8 bytes of TCP", icmp_error(ROUTER, VIP, response(VIP)[:24]), Reason.TRUNCATED),
        ("a copy shorter than its IP total length", whole[:-10], Reason.TRUNCATED),
        ("a fragment", bytes(IP(src=ROUTER, dst=VIP, flags="MF") / ICMP(type=3, code=4) / Raw(response(VIP))),
         Reason.FRAGMENT),
    ]
    for name, packet, expected in cases:
        reason, out, _ = ip.decide(packet, 1.0)
        assert (reason, reason.verdict, out) == (expected, DROP, None), name


def test_kernel_mode_leaves_icmp_to_conntrack():
    # conntrack translates the errors RELATED to a NATed connection itself; the rules queue none.
    ip = make_in_mode(Mode.KERNEL)
    reason, out, _ = ip.decide(icmp_error(ROUTER, VIP, response(VIP)), 1.0)
    assert (reason, out) == (Reason.NOT_TCP, None)


def test_rewrite_rules_queue_the_icmp_errors_conntrack_cannot_translate_and_kernel_rules_none():
    from distributor.reroute import rule_layout_of
    from distributor.rules import ICMP_FLOOD_TAG, ICMP_QUEUE_LIMIT, render_rules
    from tests.unit.test_reroute import service_spec

    layout = rule_layout_of([service_spec()])
    rules = render_rules(0, layout, Mode.REWRITE)
    # One rule for ICMP in DIST0-IN (every packet of a connection walks it); the errors that quote a
    # segment, and only those, go further.
    assert [line for line in rules[("raw", "DIST0-IN")] if "icmp" in line] == ["-A DIST0-IN -p icmp -j DIST0-IERR"]
    assert rules[("raw", "DIST0-IERR")] == [f"-A DIST0-IERR -p icmp -m icmp --icmp-type {kind} -g DIST0-IQ"
                                            for kind in (3, 11, 12)]
    for kind in (3, 11, 12):
        assert f"-A DIST0-OUT -p icmp -m icmp --icmp-type {kind} -j DIST0-OERR" in rules[("mangle", "DIST0-OUT")]
    queue = f"-m limit --limit {ICMP_QUEUE_LIMIT}/second --limit-burst {ICMP_QUEUE_LIMIT} " \
            "-j NFQUEUE --queue-num 0 --queue-bypass"
    flood = f'-m comment --comment "{ICMP_FLOOD_TAG}" -j DROP'
    quotes = {node: f'-m u32 --u32 "0>>22&0x3C@24={int.from_bytes(bytes(map(int, WEB[node].split("."))), "big"):#x}'
                    f'&&0>>22&0x3C@8>>22&0x3C@8&0xFFFF=80"' for node in ("web1", "web2")}
    # From the outside, to the VIP: untracked and queued before routing, a flood dropped; errors
    # forwarded from the cluster LAN about a segment sent to a node: untracked like that segment.
    assert rules[("raw", "DIST0-IQ")] == [
        f"-A DIST0-IQ -d {VIP}/32 -j CT --notrack", f"-A DIST0-IQ -d {VIP}/32 {queue}",
        f"-A DIST0-IQ -d {VIP}/32 {flood}"] + [f"-A DIST0-IQ {quotes[n]} -j CT --notrack" for n in quotes]
    # Toward a client, after routing: only errors quoting a segment sent to a node, never one
    # addressed to this host's own sockets.
    assert rules[("mangle", "DIST0-OERR")] == ["-A DIST0-OERR -m addrtype --dst-type LOCAL -j RETURN"] + [
        f"-A DIST0-OERR {quotes[n]} -j DIST0-OQ" for n in quotes]
    # No --queue-bypass toward a client: while no daemon listens, an error quoting a node is dropped.
    assert rules[("mangle", "DIST0-OQ")] == [f"-A DIST0-OQ {queue.replace(' --queue-bypass', '')}",
                                             f"-A DIST0-OQ {flood}"]
    kernel = render_rules(0, layout, Mode.KERNEL)
    assert not any("icmp" in line for lines in kernel.values() for line in lines)


def test_a_bad_icmp_checksum_stays_bad_and_the_rest_is_translated_all_the_same():
    # Nothing checks a forwarded error's checksum before the queue: translating must not make a
    # damaged (or forged) one valid.  The node's stack drops it.
    ip = established()
    packet = bytearray(icmp_error(ROUTER, VIP, response(VIP)))
    packet[26] ^= 0x04  # the next-hop MTU's high byte, damaged on the way
    reason, out, _ = ip.decide(bytes(packet), 1.0)
    assert reason is Reason.ICMP_TO_NODE and rfc1071(out[:20]) == 0 and rfc1071(out[20:]) != 0
    good = icmp_error(ROUTER, WEB["web1"], response(WEB["web1"]))
    assert out[:26] == good[:26] and out[28:] == good[28:]


def test_errors_that_quote_no_tcp_header_or_carry_options_are_not_translated():
    ip = established()
    fragment = bytearray(response(VIP))
    fragment[6:8] = b"\x20\x64"  # a later fragment: its first bytes are data, not ports
    fragment[20:24] = b"\x00\x50\x9c\x40"  # that happen to read 80 -> 40000
    cases = [
        ("a quoted fragment past the first", icmp_error(ROUTER, VIP, bytes(fragment), 11, 1), Reason.ICMP_UNKNOWN),
        ("IP options on the error itself (a source route)",
         bytes(IP(src=ROUTER, dst=VIP, options=record_route()) / ICMP(type=3, code=4) / Raw(response(VIP))),
         Reason.IP_OPTIONS),
    ]
    for name, packet, expected in cases:
        reason, out, _ = ip.decide(packet, 1.0)
        assert (reason, reason.verdict, out) == (expected, DROP, None), name


def test_echo_to_the_vip_is_answered_by_default_and_dropped_first_when_configured():
    from distributor.config import ConfigError, parse
    from distributor.daemon import reload_refusal
    from distributor.reroute import rule_layout_of
    from distributor.rules import ECHO_REFUSED_TAG, render_rules
    from tests.unit.test_config import MINIMAL
    from tests.unit.test_reroute import service_spec

    layout = rule_layout_of([service_spec()])
    refuse = f'-d {VIP}/32 -p icmp -m icmp --icmp-type 8 -m comment --comment "{ECHO_REFUSED_TAG}" -j DROP'
    for mode, table in ((Mode.REWRITE, "raw"), (Mode.KERNEL, "mangle")):
        assert not any("--icmp-type 8" in line for lines in render_rules(0, layout, mode).values() for line in lines)
        chain = render_rules(0, layout, mode, answer_echo=False)[(table, "DIST0-IN")]
        assert chain[0] == f"-A DIST0-IN {refuse}", mode  # before anything could pass it on
    assert parse(MINIMAL).vip_echo == "answer"
    dropping = parse("[distributor]\nvip_echo = \"drop\"\n" + MINIMAL)
    assert dropping.vip_echo == "drop"
    assert reload_refusal(parse(MINIMAL), dropping) == "distributor.vip_echo changed ('answer' -> 'drop')"
    with pytest.raises(ConfigError, match="vip_echo"):
        parse("[distributor]\nvip_echo = \"refuse\"\n" + MINIMAL)
