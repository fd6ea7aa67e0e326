"""SYN authentication under a flood: packet tables through the interposer."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP

from distributor.conntable import ConnectionTable
from distributor.reroute import Interposer, Mode, Reason, SendPacket
from distributor.synauth import SynAuth
from tests.packets import CLIENT, VIP, checksums_valid, tcp
from tests.unit.test_reroute import service_spec

SECRET = b"s" * 32


def make(mode=Mode.REWRITE, threshold=8):
    return Interposer([service_spec()], ConnectionTable(1000), mode, SynAuth(SECRET, threshold))


def spoofed(i):
    return tcp(f"203.0.113.{100 + i % 100}", VIP, 1024 + i, 80, "S", seq=i)


def test_below_the_threshold_syns_go_on_above_it_new_clients_get_a_cookie_and_no_node_sees_their_syn():
    ip = make()
    reasons = [ip.decide(spoofed(i), 0.0)[0] for i in range(30)]
    assert reasons[:9] == [Reason.NEW_CONNECTION] * 9 and set(reasons[9:]) == {Reason.SYN_CHALLENGED}
    assert len(ip.table) == 9  # the flood stopped filling the table
    reason, out, extra = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000), 0.1)
    assert (reason, out) == (Reason.SYN_CHALLENGED, None)
    (answer,) = [e.packet for e in extra if isinstance(e, SendPacket)]
    assert checksums_valid(answer)
    synack = IP(answer)
    assert (synack.src, synack.dst, synack[TCP].sport, synack[TCP].dport) == (VIP, CLIENT, 80, 40000)
    assert synack[TCP].flags == "SA" and synack[TCP].ack != 1001  # a wrong acknowledgment: the cookie
    # The client answers with an RST whose sequence number is our acknowledgment (RFC 793 3.4).
    rst = tcp(CLIENT, VIP, 40000, 80, "R", seq=synack[TCP].ack, ack=0)
    assert ip.decide(rst, 0.2)[0] is Reason.SYN_VERIFIED
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000), 1.2)[0] is Reason.NEW_CONNECTION  # its retransmission


def test_a_forged_answer_verifies_nothing_and_a_cookie_from_another_tuple_does_not_count():
    ip = make()
    for i in range(30):
        ip.decide(spoofed(i), 0.0)
    _, _, extra = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 0.1)
    cookie = IP(extra[-1].packet)[TCP].ack
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "R", seq=cookie ^ 1), 0.2)[0] is Reason.UNKNOWN_FLOW
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "R", seq=cookie), 0.2)[0] is Reason.UNKNOWN_FLOW
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 1.2)[0] is Reason.SYN_CHALLENGED


def test_a_client_that_completed_a_handshake_is_not_delayed_by_a_flood_and_calm_switches_it_off():
    ip = make()
    ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    ip.decide(tcp(CLIENT, VIP, 40000, 80, "A"), 0.0)  # a real, completed handshake
    for i in range(30):
        ip.decide(spoofed(i), 0.5)
    assert ip.syn_auth.active
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "S"), 1.0)[0] is Reason.NEW_CONNECTION
    ip.expire(100.0)  # the spoofed half-open entries time out
    assert ip.syn_auth.settle(ip.table.half_open(), 100.0) is None
    assert ip.syn_auth.settle(ip.table.half_open(), 111.0) is False and not ip.syn_auth.active


def test_kernel_mode_switches_on_from_conntracks_count_and_checks_cookie_answers_too():
    ip = make(Mode.KERNEL)
    ip.half_open_hint = 100
    reason, mark, extra = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 0.0)
    assert (reason, mark) == (Reason.SYN_CHALLENGED, None) and len(ip.table) == 0
    cookie = IP(extra[-1].packet)[TCP].ack
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "R", seq=cookie), 0.1)[0] is Reason.SYN_VERIFIED
    reason, mark, _ = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 1.1)
    assert reason is Reason.NEW_CONNECTION and mark is not None
