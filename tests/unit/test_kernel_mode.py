"""Kernel-assisted mode: header-only decisions that return marks, and the rules that use them."""

import pytest

from distributor.rules import render_rules
from distributor.conntable import ConnectionTable
from distributor.reroute import END_MARK, MARK_BASE, Interposer, Mode, Reason, rule_layout_of
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.unit.test_reroute import service_spec


def make(capacity=100):
    return Interposer([service_spec()], ConnectionTable(capacity), Mode.KERNEL)


def decide_mark(ip, packet, now):
    """Kernel mode's verdict without its effects: (reason, mark)."""
    reason, mark, _ = ip.decide(packet, now)
    return reason, mark


def test_syn_gets_the_chosen_backends_mark_and_opens_a_connection():
    ip = make()
    assert decide_mark(ip, tcp(CLIENT, VIP, 40000, 80, "S"), 0.0) == (Reason.NEW_CONNECTION, MARK_BASE)
    assert decide_mark(ip, tcp(CLIENT, VIP, 40001, 80, "S"), 0.0) == (Reason.NEW_CONNECTION, MARK_BASE + 1)
    assert ip.services[0].balancer.outstanding(0) == 1 and len(ip.table) == 2


def test_header_only_copies_are_enough():
    ip = make()
    packet = tcp(CLIENT, VIP, 40000, 80, "S", payload=b"x" * 1000)
    assert decide_mark(ip, packet[:128], 0.0) == (Reason.NEW_CONNECTION, MARK_BASE)


def test_first_fin_or_rst_from_either_side_ends_the_connection_and_stops_further_queueing():
    ip = make()
    decide_mark(ip, tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    decide_mark(ip, tcp(CLIENT, VIP, 40001, 80, "S"), 0.0)
    assert decide_mark(ip, tcp(WEB["web1"], CLIENT, 80, 40000, "FA"), 1.0) == (Reason.CONNECTION_END, END_MARK)
    assert decide_mark(ip, tcp(CLIENT, VIP, 40001, 80, "RA"), 1.0) == (Reason.CONNECTION_END, END_MARK)
    assert [ip.services[0].balancer.outstanding(i) for i in range(2)] == [0, 0]
    # An end of a connection this distributor does not know still passes (the kernel NATs it).
    assert decide_mark(ip, tcp(CLIENT, VIP, 45000, 80, "FA"), 1.0) == (Reason.CONNECTION_END, END_MARK)


def test_mid_stream_pickup_of_a_replicated_connection_goes_to_its_node_an_unknown_one_is_dropped():
    ip = make()
    key = tcp(CLIENT, VIP, 40000, 80, "A")[12:24]
    assert ip.install(key, 1, 0.0)
    assert decide_mark(ip, tcp(CLIENT, VIP, 40000, 80, "PA", b"more"), 1.0) == (Reason.TO_BACKEND, MARK_BASE + 1)
    assert decide_mark(ip, tcp(CLIENT, VIP, 40001, 80, "PA", b"more"), 1.0) == (Reason.UNKNOWN_FLOW, None)


@pytest.mark.parametrize("packet,reason", [
    (tcp(CLIENT, VIP, 40000, 80, "S")[:39], Reason.TRUNCATED),
    (bytes([0x46]) + tcp(CLIENT, VIP, 40000, 80, "S")[1:], Reason.IP_OPTIONS),
    (tcp(CLIENT, VIP, 40000, 80, "SF"), Reason.BAD_FLAGS),
    (tcp(CLIENT, "203.0.113.9", 40000, 80, "S"), Reason.NOT_SERVICE),
])
def test_malformed_and_foreign_packets(packet, reason):
    ip = make()
    assert decide_mark(ip, packet, 0.0) == (reason, None)
    assert len(ip.table) == 0


def test_kernel_rules_queue_only_new_connections_and_first_ends_and_dnat_by_mark():
    specs = [service_spec()]
    rules = render_rules(0, rule_layout_of(specs), Mode.KERNEL)
    chain_in = rules[("mangle", "DIST0-IN")]
    # Exactly these chains: in particular none hooked into FORWARD, which every packet would walk.
    assert set(rules) == {("mangle", "DIST0-NEW"), ("mangle", "DIST0-IN"), ("nat", "DIST0-NAT"), ("raw", "DIST0-LOCAL")}
    # The common packet (established, no FIN/RST) leaves after the first two rules.
    assert chain_in[:3] == [
        "-A DIST0-IN -m conntrack --ctstate NEW,INVALID -j DIST0-NEW",
        "-A DIST0-IN -p tcp -m tcp --tcp-flags FIN,RST NONE -j RETURN",
        "-A DIST0-IN -m connmark --mark 0x40000000/0x40000000 -j RETURN",
    ]
    assert sum("-j NFQUEUE --queue-num 0" in line for line in chain_in) == 3  # the client side and 2 nodes
    new = rules[("mangle", "DIST0-NEW")]
    not_repeated = "-m mark ! --mark 0x40000000/0x40000000"
    assert new[0].endswith(f"--dport 80 -m conntrack --ctstate NEW {not_repeated} -j NFQUEUE --queue-num 0")
    # RSTs to the VIP that conntrack cannot place are queued too: they may answer a SYN cookie.
    # Once: one user space sent back (NF_REPEAT, END_MARK) is still INVALID when it walks the hook again.
    assert new[1].endswith(f"--tcp-flags RST RST -m conntrack --ctstate INVALID {not_repeated} -j NFQUEUE --queue-num 0")
    assert [line.split()[3] for line in new[2:]] == ["198.51.100.11/32", "198.51.100.12/32"]
    assert all(line.endswith("-j DROP") for line in new[2:])
    nat = rules[("nat", "DIST0-NAT")]
    assert nat == [
        "-A DIST0-NAT -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -m mark --mark 0x1000/0xffff -j DNAT --to-destination 198.51.100.11:80",
        "-A DIST0-NAT -d 203.0.113.1/32 -p tcp -m tcp --dport 80 -m mark --mark 0x1001/0xffff -j DNAT --to-destination 198.51.100.12:80",
    ]
    assert "CONNMARK --save-mark" in chain_in[3] and chain_in[4].endswith("-j RETURN")  # the repeated first FIN


def test_packets_the_distributor_sends_itself_stay_out_of_conntrack_in_both_modes():
    # Its RSTs and probes leave from the VIP; rewrite mode also sends segments to nodes in a
    # client's name (a SYN moved to another node): tracked, the node's answer would meet an entry
    # made for a locally sent packet.  Kernel mode never sends to nodes itself.
    layout = rule_layout_of([service_spec()])
    rewrite = render_rules(0, layout, Mode.REWRITE)[("raw", "DIST0-LOCAL")]
    kernel = render_rules(0, layout, Mode.KERNEL)[("raw", "DIST0-LOCAL")]
    from_vip = f"-A DIST0-LOCAL -s {VIP}/32 -p tcp -m tcp --sport 80 -j CT --notrack"
    assert kernel == [from_vip]
    assert rewrite == [from_vip] + [f"-A DIST0-LOCAL -d {WEB[n]}/32 -p tcp -m tcp --dport 80 -j CT --notrack"
                                    for n in ("web1", "web2")]
