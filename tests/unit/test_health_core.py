"""Playbooks of the health core: heartbeat datagrams and ticks in, gating commands out."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.sansio import Alert, Tick
from common.wire import Keys, Kind, NodeHeartbeat, Reject, seal
from distributor.heartbeat import (MIN_RAMP, HealthSettings, NodeDatagram, NodeHealth, NodeState, OnDead, ResetNode,
                                   SetNodeEligible, SetNodeRamp)
from tests.playbook import Playbook

KEYS = Keys({1: b"k" * 32})
NODES = {"web1": "198.51.100.11", "web2": "198.51.100.12"}
SETTINGS = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=10.0)
WALL = 1_800_000_000.0  # wall clock = WALL + monotonic, for the freshness window
REPORT = NodeHeartbeat(0.5, 0.1, 2.0, 500).pack()


class Nodes:
    """Heartbeat datagrams as the agents would send them (sequences grow per node)."""

    def __init__(self, keys=KEYS):
        self.keys = keys
        self.sequence = {name: 0 for name in NODES}

    def beat(self, node: str, now: float, source: str | None = None, payload: bytes = REPORT) -> NodeDatagram:
        self.sequence[node] += 1
        data = seal(self.keys, Kind.NODE_HEARTBEAT, node, self.sequence[node], WALL + now, payload)
        return NodeDatagram(data, source or NODES[node], now, WALL + now)


def core(on_dead=OnDead.KEEP, health=SETTINGS) -> tuple[Playbook, NodeHealth, Nodes]:
    health_core = NodeHealth(health, NODES, KEYS, on_dead=on_dead)
    health_core.start(0.0, WALL)
    return Playbook(health_core), health_core, Nodes()


def tick(n: int) -> Tick:
    now = n * SETTINGS.tick
    return Tick(now, WALL + now)


def run_ticks(play: Playbook, nodes: Nodes, first: int, last: int, beating=("web1",)) -> None:
    """Ticks first..last; the named nodes heartbeat just before each tick."""
    for n in range(first, last + 1):
        for node in beating:
            play(nodes.beat(node, n * SETTINGS.tick - 0.01)).expect_nothing()
        play(tick(n))


def test_a_silent_node_is_skipped_after_the_warning_window_and_declared_dead_after_the_dead_window():
    play, health, nodes = core()
    run_ticks(play, nodes, 1, 3)  # web2 silent for 3 ticks: counter 3, not yet over the threshold
    play.expect_nothing()
    run_ticks(play, nodes, 4, 4)
    play.expect(SetNodeEligible("web2", False), Alert("web2", "up", "warning", "no heartbeat for 4 ticks"))
    run_ticks(play, nodes, 5, 8)
    play.expect_nothing()
    run_ticks(play, nodes, 9, 9)
    play.expect(SetNodeEligible("web2", False), Alert("web2", "warning", "dead", "no heartbeat for 9 ticks"))
    assert health.board.state("web1") is NodeState.UP and health.board.state("web2") is NodeState.DEAD


def test_on_dead_reset_asks_for_the_dead_nodes_connections_to_be_reset_once():
    play, _, nodes = core(on_dead=OnDead.RESET)
    run_ticks(play, nodes, 1, 8)
    run_ticks(play, nodes, 9, 9)
    play.expect(SetNodeEligible("web2", False), ResetNode("web2"), Alert)
    run_ticks(play, nodes, 10, 40)
    assert not play.of(ResetNode)


def test_a_heartbeat_ends_a_warning_before_the_node_is_dead():
    play, _, nodes = core()
    run_ticks(play, nodes, 1, 5)  # web2 in warning since tick 4
    play(nodes.beat("web2", 5.1 * SETTINGS.tick)).expect(SetNodeEligible("web2", True), SetNodeRamp("web2", 1.0),
                                                         Alert("web2", "warning", "up", "heartbeat after 5 ticks"))


def test_a_dead_node_rises_after_rise_heartbeats_then_ramps_up_in_slow_start_then_is_up():
    play, health, nodes = core()
    run_ticks(play, nodes, 1, 9)
    assert health.board.state("web2") is NodeState.DEAD
    play(nodes.beat("web2", 2.30)).expect(SetNodeEligible("web2", False))  # rising: logged, nothing to alert yet
    assert play.logged("web2: dead -> rising (heartbeat 1 of 3)")
    play(nodes.beat("web2", 2.35)).expect_nothing()
    play(nodes.beat("web2", 2.40)).expect(SetNodeEligible("web2", True), SetNodeRamp("web2", MIN_RAMP),
                                          Alert("web2", "rising", "slow_start", "3 consecutive heartbeat(s)"))
    ramps = []
    for n in range(10, 60):  # 2.5 s .. 14.75 s; web2 keeps heartbeating
        run_ticks(play, nodes, n, n, beating=("web1", "web2"))
        ramps += [c.factor for c in play.of(SetNodeRamp) if c.node == "web2"]
        if health.board.state("web2") is NodeState.UP:
            break
    assert ramps == sorted(ramps) and ramps[0] < 0.1 and ramps[-1] == 1.0
    play.expect(SetNodeEligible("web2", True), SetNodeRamp("web2", 1.0))  # the ramp's end is logged, not alerted
    assert play.logged("web2: slow_start -> up (slow start finished)")
    assert 12.0 <= health.board.last_heartbeat("web2") <= 12.5  # 10 s after it rose


def test_a_rising_node_that_misses_a_heartbeat_is_dead_again():
    import dataclasses

    play, _, nodes = core(health=dataclasses.replace(SETTINGS, flap_suppress=0))  # no damping in this one
    run_ticks(play, nodes, 1, 9)
    play(nodes.beat("web2", 2.30))
    run_ticks(play, nodes, 10, 13)  # 4 ticks without web2: counter 4 > warning
    play.expect(SetNodeEligible("web2", False), Alert("web2", "rising", "dead", "heartbeats stopped after 1 of 3"))


def test_a_node_in_slow_start_that_falls_late_resumes_its_ramp_not_a_full_share():
    import dataclasses

    play, health, nodes = core(health=dataclasses.replace(SETTINGS, flap_suppress=0))  # no damping in this one
    run_ticks(play, nodes, 1, 9)
    for t in (2.30, 2.35, 2.40):
        play(nodes.beat("web2", t))
    run_ticks(play, nodes, 10, 13, beating=("web1", "web2"))
    run_ticks(play, nodes, 14, 17)  # web2 late again: warning
    assert health.board.state("web2") is NodeState.WARNING
    play(nodes.beat("web2", 4.3)).expect(SetNodeEligible("web2", True), SetNodeRamp,
                                         Alert("web2", "warning", "slow_start", "heartbeat after 5 ticks"))
    (ramp,) = play.of(SetNodeRamp)
    assert MIN_RAMP < ramp.factor < 0.3


def test_ticks_never_catch_up_after_a_stall():
    play, health, nodes = core()
    play(Tick(30.0, WALL + 30.0))  # the loop stalled for 30 s: one tick, not 120
    assert health.board.counter("web1") == 1 and health.board.state("web1") is NodeState.UP
    assert play.wake_at() == pytest.approx(30.0)  # the next one is due at once, then every tick
    play(Tick(30.0, WALL + 30.0))
    assert health.board.counter("web1") == 2 and play.wake_at() == pytest.approx(30.25)


@pytest.mark.parametrize("make,reason", [
    (lambda n: Nodes(Keys({1: b"an attacker's guess at the key!!"})).beat("web1", 0.1), Reject.BAD_MAC),
    (lambda n: n.beat("web1", 0.1, source="198.51.100.99"), Reject.WRONG_ADDRESS),
    (lambda n: NodeDatagram(seal(KEYS, Kind.NODE_HEARTBEAT, "web9", 1, WALL, REPORT), "198.51.100.11", 0.1, WALL),
     Reject.UNKNOWN_SENDER),
    (lambda n: NodeDatagram(seal(KEYS, Kind.NODE_HEARTBEAT, "web1", 1, WALL - 60, REPORT), NODES["web1"], 0.1, WALL),
     Reject.STALE),
    (lambda n: n.beat("web1", 0.1, payload=b"short"), Reject.BAD_PAYLOAD),
])
def test_bad_datagrams_are_counted_by_reason_and_change_nothing(make, reason):
    play, health, nodes = core()
    run_ticks(play, nodes, 1, 3, beating=())
    counter = health.board.counter("web1")
    play(make(nodes))
    assert health.board.counter("web1") == counter
    assert health.stats(1.0).rejected[reason] == 1
    assert all(not isinstance(c, (SetNodeEligible, Alert)) for c in play.last)


def test_a_replayed_heartbeat_is_refused():
    play, health, nodes = core()
    datagram = nodes.beat("web1", 0.1)
    play(datagram)
    run_ticks(play, nodes, 1, 3, beating=())
    play(datagram)
    assert health.board.counter("web1") == 3 and health.stats(1.0).rejected[Reject.REPLAY] == 1


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=120), st.sampled_from(["198.51.100.11", "203.0.113.10"]))
def test_any_bytes_are_handled_without_raising(data, source):
    health_core = NodeHealth(SETTINGS, NODES, KEYS)
    commands = health_core.handle(NodeDatagram(data, source, 1.0, WALL + 1.0))
    assert all(not isinstance(c, (SetNodeEligible, Alert)) for c in commands)
    assert sum(health_core.stats(1.0).rejected.values()) == 1


def test_a_node_that_announced_a_longer_interval_is_not_late_before_it_plus_a_tick_and_the_stretch_is_bounded():
    play, health, nodes = core()
    slow = NodeHeartbeat(0.5, 0.1, 150.0, 1500).pack()  # a slow probe: the agent says its next one is in 1.5 s
    play(nodes.beat("web2", 0.1, payload=slow))
    for n in range(1, 7):  # 1.5 s
        run_ticks(play, nodes, n, n)
        assert not play.of(Alert)
    run_ticks(play, nodes, 7, 7)
    play.expect(SetNodeEligible("web2", False), Alert("web2", "up", "warning", "no heartbeat for 7 ticks"))
    huge = NodeHeartbeat(0.5, 0.1, 150.0, 60_000).pack()  # "next one in a minute": honoured up to max_interval
    play(nodes.beat("web2", 1.8, payload=huge))
    warning, dead = SETTINGS.allowance(60.0)
    assert (warning, dead) == (8, 13)  # 2 s at most, then the usual dead window on top
    run_ticks(play, nodes, 8, 8 + warning)
    assert health.board.state("web2") is NodeState.WARNING


def test_a_flapping_node_is_held_out_with_one_alert_and_comes_back_with_one_once_stable():
    play, health, nodes = core()
    alerts = []
    now = 0
    for cycle in range(5):  # web2 stalls for 2.5 s (dead each time), then rises with 3 heartbeats
        for n in range(now + 1, now + 11):
            play(nodes.beat("web1", n * 0.25 - 0.01))
            play(tick(n))
            alerts += play.of(Alert)
        for n in range(now + 11, now + 15):
            play(nodes.beat("web1", n * 0.25 - 0.01))
            play(nodes.beat("web2", n * 0.25 - 0.01))
            play(tick(n))
            alerts += play.of(Alert)
        now += 14
    web2 = [a for a in alerts if a.subject == "web2"]
    assert sum("flapping" in a.reason for a in web2) == 1 and len(web2) <= 8  # not 20
    assert [a for a in alerts if a.subject == "web1"] == []  # short silences alone are not flapping
    assert health.board.damped("web2") and not health.board.eligible("web2")
    back = []
    for n in range(now + 1, now + 600):  # now it stays stable: the penalty decays (half-life 30 s)
        play(nodes.beat("web2", n * 0.25 - 0.01))
        play(nodes.beat("web1", n * 0.25 - 0.01))
        play(tick(n))
        back += [a for a in play.of(Alert) if a.subject == "web2"]
        if back:
            break
    assert back == [Alert("web2", "flapping", health.board.state("web2").value, "stable again: back in service")]
    assert SetNodeEligible("web2", True) in play.last and health.board.eligible("web2")


def test_damping_never_holds_out_the_last_node_that_could_serve():
    play, health, nodes = core()
    for cycle in range(5):  # both nodes die and rise together: holding either out would leave only the other
        base = cycle * 14
        for n in range(base + 1, base + 11):
            play(tick(n))
        for n in range(base + 11, base + 15):
            play(nodes.beat("web1", n * 0.25 - 0.01))
            play(nodes.beat("web2", n * 0.25 - 0.01))
            play(tick(n))
    assert not (health.board.damped("web1") and health.board.damped("web2"))


def test_stats_count_each_nodes_moves_by_from_and_to_state():
    play, health, nodes = core()
    run_ticks(play, nodes, 1, 9, beating=("web1",))  # web2 silent: up -> warning -> dead
    moves = {stats.node: stats.moves for stats in health.stats(9 * SETTINGS.tick).nodes}
    assert moves == {"web1": {}, "web2": {(NodeState.UP, NodeState.WARNING): 1, (NodeState.WARNING, NodeState.DEAD): 1}}


def test_a_node_added_at_run_time_has_its_moves_counted_too():
    play, health, nodes = core()
    health.add_node("web3", "198.51.100.13")
    run_ticks(play, nodes, 1, 4, beating=("web1", "web2"))
    moves = {stats.node: stats.moves for stats in health.stats(4 * SETTINGS.tick).nodes}
    assert moves["web3"] == {(NodeState.UP, NodeState.WARNING): 1}
