"""Playbooks of the distributor core: health decisions reach the interposer; what comes out is for adapters."""

from __future__ import annotations

from backup.failover import DrainQueue, InstallRules, PacketsHandled, RemoveRules
from common.sansio import Alert, StopRequested, Tick, WakeUpAt
from distributor.core import ConntrackAnswered, DistributorCore, HealthOptions, SetConntrackLiberal
from distributor.heartbeat import HealthSettings, OnDead
from distributor.reroute import ConfirmWithConntrack, ForgetInConntrack, Mode, Reason, SendPacket
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.playbook import Playbook
from tests.unit.test_health_core import KEYS, NODES, WALL, Nodes
from tests.unit.test_reroute import service_spec

SETTINGS = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=0)


def make(mode=Mode.REWRITE, on_dead=OnDead.KEEP, capacity=100):
    core = DistributorCore("dist1", mode, [service_spec()], capacity,
                           health=HealthOptions(SETTINGS, NODES, on_dead=on_dead), health_keys=KEYS)
    return core, Playbook(core)


def tick(play, n):
    play(Tick(n * SETTINGS.tick, WALL + n * SETTINGS.tick))


def test_serving_alone_installs_the_rules_at_start_and_kernel_mode_first_loosens_conntrack():
    core, play = make()
    assert [type(c) for c in core.start(0.0, WALL) if not isinstance(c, WakeUpAt)][-1] is InstallRules
    core, play = make(Mode.KERNEL)
    started = [c for c in core.start(0.0, WALL) if type(c).__name__ != "Log"]
    assert started[0] == SetConntrackLiberal() and InstallRules(core.interposer.rule_layout()) in started
    assert isinstance(started[-1], WakeUpAt)  # exactly one timer, last


def test_every_answer_ends_with_exactly_one_wakeup():
    core, play = make()
    core.start(0.0, WALL)
    tick(play, 1)
    assert [type(c) for c in play.last].count(WakeUpAt) == 1 and isinstance(play.last[-1], WakeUpAt)


def test_a_node_in_warning_gets_no_new_connection_and_the_alert_goes_out():
    core, play = make()
    core.start(0.0, WALL)
    nodes = Nodes()
    for n in range(1, 5):
        play(nodes.beat("web2", n * 0.25 - 0.01))
        tick(play, n)
    assert Alert("web1", "up", "warning", "no heartbeat for 4 ticks") in play.last
    for port in range(40000, 40010):
        _, out, _ = core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 1.1)
        assert out == tcp(CLIENT, WEB["web2"], port, 80, "S")


def dead_node_with_connections(mode):
    core, play = make(mode, on_dead=OnDead.RESET)
    core.start(0.0, WALL)
    nodes = Nodes()
    ip = core.interposer
    for port in (40000, 40001):  # round-robin: web1, web2
        ip.decide(tcp(CLIENT, VIP, port, 80, "S"), 0.0)
        ip.decide(tcp(CLIENT, VIP, port, 80, "A", ack=7000), 0.0)
    for n in range(1, 10):
        play(nodes.beat("web2", n * 0.25 - 0.01))
        tick(play, n)
    return core, play


def test_rewrite_mode_resets_a_dead_nodes_clients_with_acceptable_rsts():
    core, play = dead_node_with_connections(Mode.REWRITE)
    (rst,) = play.of(SendPacket)
    assert rst.packet[12:20] == tcp(VIP, CLIENT, 80, 40000, "R")[12:20] and rst.packet[24:28] == (7000).to_bytes(4, "big")
    assert core.stats(2.5).health.reset_connections == 1
    assert core.interposer.services[0].balancer.outstanding(0) == 0


def test_kernel_mode_forgets_a_dead_nodes_connections_in_conntrack_and_probes_their_clients():
    core, play = dead_node_with_connections(Mode.KERNEL)
    assert not play.of(SendPacket)
    (forget,) = play.of(ForgetInConntrack)
    assert forget.keys == (tcp(CLIENT, VIP, 40000, 80, "A")[12:24],) and len(forget.probes) == 1


def test_kernel_mode_expiry_asks_conntrack_and_ends_only_what_conntrack_forgot():
    core = DistributorCore("dist1", Mode.KERNEL, [service_spec()], 100)
    play = Playbook(core)
    core.start(0.0, WALL)
    ip = core.interposer
    for port in (40000, 40001):
        ip.decide(tcp(CLIENT, VIP, port, 80, "S"), 0.0)
        ip.decide(tcp(CLIENT, VIP, port, 80, "A"), 0.0)
    play(Tick(950.0, WALL + 950.0))  # both idle past the established timeout as user space sees them
    (ask,) = play.of(ConfirmWithConntrack)
    assert sorted(ask.keys) == sorted(tcp(CLIENT, VIP, p, 80, "A")[12:24] for p in (40000, 40001))
    alive, gone = ask.keys[0], ask.keys[1]
    play(ConntrackAnswered((alive,), (gone,), 950.1))
    assert ip.is_open(alive) and not ip.is_open(gone)
    assert sum(ip.services[0].balancer.outstanding(i) for i in range(2)) == 1


def test_packets_handled_without_failover_change_nothing_and_stop_removes_the_rules_then_drains():
    core, play = make()
    core.start(0.0, WALL)
    reason, _, effects = core.interposer.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 0.1)
    assert reason is Reason.NEW_CONNECTION
    play(PacketsHandled(0.1, WALL + 0.1, effects)).expect_nothing()
    play(StopRequested(1.0, WALL + 1.0))
    assert play.last[-2:] == [RemoveRules(), DrainQueue()]


def test_drops_are_reported_once_per_housekeeping_round_by_kind():
    from common.sansio import Level, Log

    core = DistributorCore("dist1", Mode.REWRITE, [service_spec()], 1)
    play = Playbook(core, keep=(Log,))
    core.start(0.0, WALL)
    ip = core.interposer
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 0.1)[0] is Reason.NEW_CONNECTION
    ip.decide(tcp(CLIENT, VIP, 40000, 80, "A"), 0.1)  # established: it cannot be evicted
    assert ip.decide(tcp(CLIENT, VIP, 40001, 80, "S"), 0.1)[0] is Reason.TABLE_FULL
    assert ip.decide(tcp(CLIENT, VIP, 40002, 80, "PA", b"x"), 0.1)[0] is Reason.UNKNOWN_FLOW
    play(Tick(1.0, WALL + 1.0)).expect(
        Log(Level.WARNING, "refused 1 new connection(s): connection table full (capacity 1)"),
        Log(Level.INFO, "dropped packets: unknown_flow=1"))
    play(Tick(2.0, WALL + 2.0)).expect_nothing()


def test_kernel_mode_forgets_the_handshakes_in_flight_to_a_node_the_moment_it_is_excluded():
    from distributor.reroute import ForgetHandshakes

    for mode in (Mode.KERNEL, Mode.REWRITE):
        core, play = make(mode)
        core.start(0.0, WALL)
        nodes = Nodes()
        for n in range(1, 5):
            play(nodes.beat("web2", n * 0.25 - 0.01))
            tick(play, n)
        forgets = play.of(ForgetHandshakes)
        assert forgets == ([ForgetHandshakes((("198.51.100.11", 80),))] if mode is Mode.KERNEL else [])
