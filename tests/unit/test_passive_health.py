"""Passive health: a node that resets or ignores a SYN is caught on the data path, and the connection moves.

Packet tables for the interposer (input bytes -> verdict, bytes, effects; checksums verified
independently), playbooks for the health core and the distributor core.
"""

from __future__ import annotations

import ipaddress

from common.sansio import Alert, Log
from common.wire import Kind, NodeHeartbeat, seal
from distributor.admin import AdminOp
from distributor.balancer import Policy
from distributor.conntable import ConnectionTable
from distributor.core import DistributorCore, HealthOptions
from distributor.heartbeat import HealthSettings, NodeDatagram, NodeHealth, NodeState, SetNodeEligible
from distributor.reroute import (ACCEPT, DROP, MAX_REDISPATCHES, BackendSpec, ConnectionEnded, ConnectionOpened,
                                 ForgetInConntrack, Interposer, Mode, PassiveFailure, PassiveKind, Reason, SendPacket,
                                 ServiceSpec)
from backup.failover import PacketsHandled
from tests.packets import CLIENT, VIP, WEB, checksums_valid, tcp
from tests.playbook import Playbook
from tests.unit.test_health_core import KEYS, NODES, WALL
from tests.unit.test_admin_core import request
from tests.unit.test_reroute import service_spec

ISN = 0x01020304
KEY = bytes(map(int, CLIENT.split("."))) + bytes(map(int, VIP.split("."))) + (40000).to_bytes(2, "big") + (80).to_bytes(2, "big")


def make(mode=Mode.REWRITE, nodes=("web1", "web2"), persistence=0.0):
    spec = service_spec(nodes=nodes)
    if persistence:
        spec = ServiceSpec(spec.name, spec.vip, spec.port, spec.policy, spec.backends, persistence)
    return Interposer([spec], ConnectionTable(100), mode)


def syn(sport=40000, seq=ISN) -> bytes:
    return tcp(CLIENT, VIP, sport, 80, "S", seq=seq, ack=0)


def refusal(node="web1", sport=40000, isn=ISN) -> bytes:
    """What Linux answers a SYN to a closed port with: RST|ACK, seq 0, ack = ISN + 1 (RFC 793 section 3.4)."""
    return tcp(WEB[node], CLIENT, 80, sport, "RA", seq=0, ack=isn + 1)


def of(effects, kind):
    return [e for e in effects or () if isinstance(e, kind)]


# -- rewrite mode: the RST never reaches the client, the SYN goes to the next node at once ---------------
def test_a_node_resetting_a_syn_is_hidden_from_the_client_and_the_syn_goes_to_another_node():
    ip = make()
    reason, out, _ = ip.decide(syn(), 0.0)
    assert reason is Reason.NEW_CONNECTION and out == tcp(CLIENT, WEB["web1"], 40000, 80, "S", seq=ISN, ack=0)

    reason, out, effects = ip.decide(refusal("web1"), 0.001)
    assert reason is Reason.NODE_REFUSED and reason.verdict == DROP and out is None
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.REFUSED, KEY, True)]
    [sent] = of(effects, SendPacket)
    assert sent.packet == tcp(CLIENT, WEB["web2"], 40000, 80, "S", seq=ISN, ack=0) and checksums_valid(sent.packet)
    [ended], [opened] = of(effects, ConnectionEnded), of(effects, ConnectionOpened)
    assert ended.conn.backend.name == "web1" and opened.conn.backend.name == "web2" and opened.conn.key == KEY
    balancer = ip.services[0].balancer
    assert (balancer.outstanding(0), balancer.outstanding(1)) == (0, 1)

    # The connection now lives on web2: its SYN-ACK is seen, the client's ACK and data go there.
    assert ip.decide(tcp(WEB["web2"], CLIENT, 80, 40000, "SA", seq=7, ack=ISN + 1), 0.002)[0] is Reason.TO_CLIENT
    reason, out, _ = ip.decide(tcp(CLIENT, VIP, 40000, 80, "PA", b"GET /", seq=ISN + 1, ack=8), 0.003)
    assert reason is Reason.TO_BACKEND and out[16:20] == ipaddress.IPv4Address(WEB["web2"]).packed
    assert checksums_valid(out)
    assert ip.count(Reason.NODE_REFUSED) == 1


def test_an_rst_that_is_no_answer_to_the_syn_reaches_the_client_unchanged():
    for name, packet in [("own sequence number", tcp(WEB["web1"], CLIENT, 80, 40000, "RA", seq=99, ack=ISN + 1)),
                         ("other acknowledgment", tcp(WEB["web1"], CLIENT, 80, 40000, "RA", seq=0, ack=ISN + 5)),
                         ("no ACK flag", tcp(WEB["web1"], CLIENT, 80, 40000, "R", seq=0, ack=0))]:
        ip = make()
        ip.decide(syn(), 0.0)
        reason, out, effects = ip.decide(packet, 0.001)
        assert (reason, out) == (Reason.TO_CLIENT, None), name
        assert not of(effects, PassiveFailure) and len(of(effects, ConnectionEnded)) == 1, name


def test_an_rst_after_the_node_accepted_is_the_connections_end_not_a_refusal():
    ip = make()
    ip.decide(syn(), 0.0)
    ip.decide(tcp(WEB["web1"], CLIENT, 80, 40000, "SA", seq=7, ack=ISN + 1), 0.001)
    reason, _, effects = ip.decide(refusal("web1"), 0.002)
    assert reason is Reason.TO_CLIENT and not of(effects, PassiveFailure)


def test_with_no_other_node_the_refusal_reaches_the_client_and_is_still_reported():
    ip = make(nodes=("web1",))
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(refusal("web1"), 0.001)
    assert reason is Reason.TO_CLIENT and out is None
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.REFUSED, KEY, False)]
    assert len(of(effects, ConnectionEnded)) == 1 and ip.services[0].balancer.outstanding(0) == 0


def test_two_refusing_nodes_do_not_bounce_a_syn_forever():
    ip = make()
    ip.decide(syn(), 0.0)
    node, verdicts = "web1", []
    for step in range(MAX_REDISPATCHES + 1):
        reason, _, effects = ip.decide(refusal(node), 0.001 * (step + 1))
        verdicts.append(reason)
        node = "web2" if node == "web1" else "web1"
    assert verdicts == [Reason.NODE_REFUSED] * MAX_REDISPATCHES + [Reason.TO_CLIENT]
    assert all(ip.services[0].balancer.outstanding(i) == 0 for i in range(2))


def test_a_retransmitted_syn_its_node_never_answered_goes_to_another_node():
    ip = make()
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(syn(), 1.0)  # the client's RTO: 1 s (RFC 6298)
    assert reason is Reason.SYN_REDISPATCHED and reason.verdict == ACCEPT
    assert out == tcp(CLIENT, WEB["web2"], 40000, 80, "S", seq=ISN, ack=0) and checksums_valid(out)
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.UNANSWERED, KEY, True, 0.0)]
    assert ip.services[0].balancer.outstanding(0) == 0 and ip.services[0].balancer.outstanding(1) == 1


def test_a_retransmission_after_the_node_answered_stays_where_it_is():
    ip = make()
    ip.decide(syn(), 0.0)
    ip.decide(tcp(WEB["web1"], CLIENT, 80, 40000, "SA", seq=7, ack=ISN + 1), 0.001)  # the SYN-ACK got lost later
    reason, out, effects = ip.decide(syn(), 1.0)
    assert reason is Reason.TO_BACKEND and out[16:20] == ipaddress.IPv4Address(WEB["web1"]).packed
    assert not of(effects, PassiveFailure)


def test_persistence_moves_the_clients_sticky_node_with_the_redispatch():
    ip = make(persistence=300.0)
    ip.decide(syn(), 0.0)
    ip.decide(refusal("web1"), 0.001)
    service = ip.services[0]
    assert ip.sticky_node(service, KEY[0:4], 0.002).name == "web2"


# -- kernel mode: conntrack binds the node, so the RST is dropped and the client's retransmission is new --
def test_kernel_mode_drops_the_refusal_and_forgets_the_connection():
    ip = make(Mode.KERNEL)
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(refusal("web1"), 0.001)
    assert reason is Reason.NODE_REFUSED and reason.verdict == DROP
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.REFUSED, KEY, True)]
    assert len(ip.table) == 0 and ip.services[0].balancer.outstanding(0) == 0


def test_kernel_mode_drops_an_unanswered_retransmission_and_has_conntrack_forget_it():
    ip = make(Mode.KERNEL)
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(syn(), 1.0)
    assert reason is Reason.SYN_UNANSWERED and reason.verdict == DROP
    assert of(effects, ForgetInConntrack) == [ForgetInConntrack((KEY,), ())]
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.UNANSWERED, KEY, True, 0.0)]
    assert len(ip.table) == 0


# -- the health core: excluded at once, cleared only by a heartbeat probed after the failure ---------------
def heartbeat(node: str, sequence: int, now: float, response_ms: float) -> NodeDatagram:
    payload = NodeHeartbeat(0.1, 0.1, response_ms, 500).pack()
    return NodeDatagram(seal(KEYS, Kind.NODE_HEARTBEAT, node, sequence, WALL + now, payload), NODES[node], now,
                        WALL + now)


SETTINGS = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=0)


def test_a_failed_connection_excludes_the_node_until_a_heartbeat_probed_after_it():
    health = NodeHealth(SETTINGS, NODES, KEYS)
    health.start(0.0, WALL)
    play = Playbook(health)
    commands = health.passive_failure("web1", "reset a client's SYN", 0.10)
    assert SetNodeEligible("web1", False) in commands
    assert any(isinstance(c, Alert) and c.new == "warning" and "reset a client's SYN" in c.reason for c in commands)
    assert health.board.state("web1") is NodeState.WARNING

    # Probed at 0.12 - 0.05 = 0.07, before the failure: proves nothing, the node stays out.
    play(heartbeat("web1", 1, 0.12, 50.0)).expect_nothing()
    assert health.board.state("web1") is NodeState.WARNING
    # Probed at 0.30 - 0.002, after it: back in service.
    play(heartbeat("web1", 2, 0.30, 2.0))
    assert SetNodeEligible("web1", True) in play.last and health.board.state("web1") is NodeState.UP
    assert health.stats(0.3).nodes[0].failed_connections == 1


def test_a_node_that_stays_silent_after_its_failure_dies_on_the_usual_schedule():
    from common.sansio import Tick
    health = NodeHealth(SETTINGS, NODES, KEYS)
    health.start(0.0, WALL)
    health.passive_failure("web1", "left a client's SYN unanswered", 0.1)
    states = []
    for n in range(1, 11):
        health.handle(heartbeat("web2", n, n * 0.25 - 0.01, 2.0))
        health.handle(Tick(n * 0.25, WALL + n * 0.25))
        states.append(health.board.state("web1"))
    assert states[0] is NodeState.WARNING and states[-1] is NodeState.DEAD
    assert states.index(NodeState.DEAD) == SETTINGS.dead  # counter > dead, as without the failure


def test_an_unanswered_syn_from_before_a_probe_the_node_answered_leaves_it_in_service():
    # A saturated node's handshake can outlast the client's RTO while its web server still answers
    # its agent: the SYN was sent at 0.10, the heartbeat's probe began at 0.60 - 0.05 = 0.55.
    health = NodeHealth(SETTINGS, NODES, KEYS)
    health.start(0.0, WALL)
    health.handle(heartbeat("web1", 1, 0.60, 50.0))
    commands = health.passive_failure("web1", "left a client's SYN unanswered", 1.10, since=0.10)
    assert health.board.state("web1") is NodeState.UP and not any(isinstance(c, SetNodeEligible) for c in commands)
    assert any(isinstance(c, Log) and "probe answered since" in c.message for c in commands)
    assert health.stats(1.1).nodes[0].failed_connections == 1
    # A SYN sent after that probe, and still unanswered a second later, does exclude it.
    commands = health.passive_failure("web1", "left a client's SYN unanswered", 1.70, since=0.70)
    assert SetNodeEligible("web1", False) in commands and health.board.state("web1") is NodeState.WARNING


def test_the_last_node_that_could_serve_is_never_excluded_by_a_failure():
    health = NodeHealth(SETTINGS, NODES, KEYS)
    health.start(0.0, WALL)
    health.passive_failure("web2", "reset a client's SYN", 0.1)
    commands = health.passive_failure("web1", "reset a client's SYN", 0.2)
    assert health.board.state("web1") is NodeState.UP and not any(isinstance(c, SetNodeEligible) for c in commands)
    assert any(isinstance(c, Log) and "kept" in c.message for c in commands)


# -- the distributor core: the data path's failure reaches the health gate within the batch ---------------
def test_the_core_excludes_a_refusing_node_so_the_next_clients_go_elsewhere():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec()], 100, health=HealthOptions(SETTINGS, NODES),
                           health_keys=KEYS)
    core.start(0.0, WALL)
    effects = []
    for packet, now in [(syn(), 0.0), (refusal("web1"), 0.001)]:
        _, _, extra = core.interposer.decide(packet, now)
        effects += list(extra or ())
    commands = core.handle(PacketsHandled(0.002, WALL + 0.002, tuple(effects)))
    assert [c.packet[16:20] for c in commands if isinstance(c, SendPacket)] == [ipaddress.IPv4Address(WEB["web2"]).packed]
    assert any(isinstance(c, Alert) and c.subject == "web1" and c.new == "warning" for c in commands)
    for port in range(41000, 41006):  # web1 is out: every new client goes to web2
        _, out, _ = core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 0.01)
        assert out[16:20] == ipaddress.IPv4Address(WEB["web2"]).packed


def test_the_core_keeps_a_node_whose_agent_probed_it_after_the_syn_it_left_unanswered():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec()], 100, health=HealthOptions(SETTINGS, NODES),
                           health_keys=KEYS)
    core.start(0.0, WALL)
    _, _, first = core.interposer.decide(syn(), 0.0)  # to web1, which never answers it
    core.handle(heartbeat("web1", 1, 0.5, 5.0))  # its web server answered its agent at 0.495
    reason, out, retried = core.interposer.decide(syn(), 1.0)
    assert reason is Reason.SYN_REDISPATCHED and out[16:20] == ipaddress.IPv4Address(WEB["web2"]).packed
    commands = core.handle(PacketsHandled(1.001, WALL + 1.001, tuple(first or ()) + tuple(retried or ())))
    assert core.health.board.state("web1") is NodeState.UP
    assert not any(isinstance(c, Alert) and c.subject == "web1" for c in commands)


# -- what must not count against a node, and what must not hide a refusal ------------------------------------
def test_kernel_mode_lets_the_refusal_through_when_no_other_node_could_take_the_connection():
    ip = make(Mode.KERNEL, nodes=("web1",))
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(refusal("web1"), 0.001)
    assert reason is Reason.CONNECTION_END and reason.verdict == ACCEPT  # the client learns at once
    assert not of(effects, PassiveFailure) and ip.services[0].balancer.outstanding(0) == 0


def test_kernel_mode_sends_an_unanswered_retransmission_on_when_no_other_node_could_take_it():
    ip = make(Mode.KERNEL, nodes=("web1",))
    ip.decide(syn(), 0.0)
    reason, out, effects = ip.decide(syn(), 1.0)
    assert reason is Reason.TO_BACKEND and out == ip.services[0].backends[0].mark
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.UNANSWERED, KEY, False, 0.0)]
    assert not of(effects, ForgetInConntrack) and len(ip.table) == 1


def test_a_node_that_answered_other_clients_since_is_not_blamed_for_one_unanswered_syn():
    # Rewrite mode keeps conntrack off, so nothing checks a client's TCP checksum before the node
    # does: a SYN damaged on its way (or on purpose) is dropped by the node in silence.
    ip = make()
    ip.decide(syn(), 0.0)  # to web1, never answered
    ip.decide(syn(sport=40001), 0.1)  # round-robin: web2
    ip.decide(syn(sport=40002), 0.2)  # web1 again, which answers this one
    ip.decide(tcp(WEB["web1"], CLIENT, 80, 40002, "SA", seq=7, ack=ISN + 1), 0.3)
    reason, out, effects = ip.decide(syn(), 1.0)
    assert reason is Reason.SYN_REDISPATCHED and out[16:20] == ipaddress.IPv4Address(WEB["web2"]).packed
    assert checksums_valid(out) and not of(effects, PassiveFailure)


def test_failed_connections_never_hold_a_node_out_for_flapping():
    settings = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=0, flap_suppress=1.8)
    health = NodeHealth(settings, NODES, KEYS)
    health.start(0.0, WALL)
    sequence, now = 1, 0.0
    for _ in range(10):  # failure, then a heartbeat probed after it: ten times in five seconds
        now += 0.25
        health.passive_failure("web1", "reset a client's SYN", now)
        assert health.board.state("web1") is NodeState.WARNING
        now += 0.25
        health.handle(heartbeat("web1", sequence, now, 10.0))
        sequence += 1
        assert health.board.state("web1") is NodeState.UP and health.board.eligible("web1")
    assert not health.board.damped("web1")


def test_a_node_with_no_other_node_ready_in_its_service_is_kept_whatever_the_others_health():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec()], 100, health=HealthOptions(SETTINGS, NODES),
                           health_keys=KEYS)
    core.start(0.0, WALL)
    core.handle(request(AdminOp.DRAIN, node="web2"))  # web2 is healthy, but takes no new connection
    _, _, extra = core.interposer.decide(syn(), 0.5)
    _, _, refused = core.interposer.decide(refusal("web1"), 0.501)
    commands = core.handle(PacketsHandled(0.502, WALL + 0.502, tuple(extra or ()) + tuple(refused or ())))
    assert core.health.board.state("web1") is NodeState.UP
    assert not any(isinstance(c, Alert) and c.subject == "web1" for c in commands)
    _, out, _ = core.interposer.decide(tcp(CLIENT, VIP, 41000, 80, "S"), 0.6)
    assert out[16:20] == ipaddress.IPv4Address(WEB["web1"]).packed


def test_failures_a_kept_node_keeps_having_are_logged_once_in_a_while_with_their_count():
    health = NodeHealth(SETTINGS, NODES, KEYS)
    health.start(0.0, WALL)
    lines = []
    for step in range(30):  # web1 and web2 exist; web1 is the only one given as serving
        lines += [c for c in health.passive_failure("web1", "reset a client's SYN", 0.5 * step, spare=False)
                  if isinstance(c, Log)]
    assert health.board.state("web1") is NodeState.UP
    assert len(lines) == 2 and "19 more" in lines[1].message  # at 0 s and at 10 s: 15 s of failures


def test_kernel_mode_blames_no_node_that_finished_connections_since_the_syn_was_sent():
    # Under saturation a handshake can take longer than the client's RTO: the node is slow, not dead.
    # Kernel mode never sees a SYN-ACK, but it sees the first FIN of every connection.
    ip = make(Mode.KERNEL)
    ip.decide(syn(), 0.0)  # to web1
    ip.decide(syn(sport=40001), 0.1)  # web2
    ip.decide(syn(sport=40002), 0.2)  # web1, which finishes that connection
    ip.decide(tcp(WEB["web1"], CLIENT, 80, 40002, "FA", seq=9, ack=ISN + 1), 0.5)
    reason, out, effects = ip.decide(syn(), 1.0)
    assert reason is Reason.SYN_UNANSWERED and of(effects, ForgetInConntrack) == [ForgetInConntrack((KEY,), ())]
    assert not of(effects, PassiveFailure)


def test_a_node_silent_since_the_syn_is_still_blamed_in_kernel_mode():
    ip = make(Mode.KERNEL)
    ip.decide(tcp(WEB["web1"], CLIENT, 80, 39999, "FA"), 0.0)  # an old sign of life, before the SYN
    ip.decide(syn(), 0.1)
    reason, _, effects = ip.decide(syn(), 1.1)
    assert reason is Reason.SYN_UNANSWERED
    assert of(effects, PassiveFailure) == [PassiveFailure("web1", PassiveKind.UNANSWERED, KEY, True, 0.1)]
