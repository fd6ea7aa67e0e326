"""Heartbeat counters, thresholds, rise, slow start and flapping, with a fake clock."""

import random

import pytest

from common.machine import IllegalTransition
from distributor.heartbeat import MIN_RAMP, HealthBoard, HealthSettings, NodeEvent, NodeState, node_moves

SETTINGS = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=10.0)


class Clock:
    def __init__(self):
        self.now = 0.0

    def tick(self, board, n=1):
        changes = []
        for _ in range(n):
            self.now += board.settings.tick
            changes += board.tick(self.now)
        return changes


def states(changes):
    return [(c.node, c.old.value, c.new.value) for c in changes]


def test_silence_goes_warning_after_warning_ticks_then_dead_after_dead_ticks():
    board, clock = HealthBoard(SETTINGS, ["web1", "web2"]), Clock()
    for _ in range(3):
        board.heartbeat("web2", clock.now)
        assert clock.tick(board) == []
        board.heartbeat("web2", clock.now)
    changes = clock.tick(board)  # 4th tick without a heartbeat: counter 4 > warning 3
    assert states(changes) == [("web1", "up", "warning")]
    assert not board.eligible("web1") and board.eligible("web2")
    board.heartbeat("web2", clock.now)
    for _ in range(4):
        board.heartbeat("web2", clock.now)
        assert clock.tick(board) == []
    board.heartbeat("web2", clock.now)
    assert states(clock.tick(board)) == [("web1", "warning", "dead")]  # counter 9 > dead 8
    assert board.counter("web1") == 9 and clock.now == SETTINGS.dead_seconds


def test_a_late_heartbeat_in_warning_makes_the_node_a_candidate_again_at_once():
    board, clock = HealthBoard(SETTINGS, ["web1"]), Clock()
    clock.tick(board, 4)
    assert board.state("web1") is NodeState.WARNING
    assert states(board.heartbeat("web1", clock.now)) == [("web1", "warning", "up")]
    assert board.eligible("web1")


def test_a_dead_node_needs_rise_consecutive_heartbeats_then_ramps_up():
    board, clock = HealthBoard(SETTINGS, ["web1"]), Clock()
    clock.tick(board, 9)
    assert board.state("web1") is NodeState.DEAD
    assert states(board.heartbeat("web1", clock.now)) == [("web1", "dead", "rising")]
    clock.tick(board)
    assert board.heartbeat("web1", clock.now) == []
    assert not board.eligible("web1")
    clock.tick(board)
    assert states(board.heartbeat("web1", clock.now)) == [("web1", "rising", "slow_start")]
    assert board.eligible("web1")
    start = clock.now
    assert board.ramp("web1", start) == MIN_RAMP
    assert board.ramp("web1", start + 5.0) == pytest.approx(0.5)
    for _ in range(39):
        board.heartbeat("web1", clock.now)
        assert clock.tick(board) == []
    board.heartbeat("web1", clock.now)
    assert states(clock.tick(board)) == [("web1", "slow_start", "up")]
    assert board.ramp("web1", clock.now) == 1.0


def test_missing_a_heartbeat_while_rising_starts_the_rise_over():
    board, clock = HealthBoard(SETTINGS, ["web1"]), Clock()
    clock.tick(board, 9)
    board.heartbeat("web1", clock.now)
    board.heartbeat("web1", clock.now)
    assert states(clock.tick(board, 4)) == [("web1", "rising", "dead")]
    board.heartbeat("web1", clock.now)
    assert board.state("web1") is NodeState.RISING


def test_one_stray_heartbeat_does_not_revive_a_dead_node():
    board, clock = HealthBoard(SETTINGS, ["web1"]), Clock()
    clock.tick(board, 9)
    for _ in range(20):  # a stray datagram now and then, never rise in a row
        board.heartbeat("web1", clock.now)
        clock.tick(board, 5)
        assert not board.eligible("web1")


def test_rise_one_and_no_slow_start_go_straight_up():
    board, clock = HealthBoard(HealthSettings(rise=1, slow_start=0), ["web1"]), Clock()
    clock.tick(board, 9)
    assert states(board.heartbeat("web1", clock.now)) == [("web1", "dead", "up")]


def test_flapping_input_only_produces_legal_transitions_each_reported_once():
    rng = random.Random(7)
    board, clock = HealthBoard(SETTINGS, ["a", "b", "c"]), Clock()
    seen = []
    state = {n: NodeState.UP for n in board.nodes}
    for _ in range(5000):
        if rng.random() < 0.5:
            node = rng.choice(board.nodes)
            changes = board.heartbeat(node, clock.now)
        else:
            changes = clock.tick(board)
        for change in changes:
            assert change.old is state[change.node] and change.new is not change.old
            state[change.node] = change.new
        seen += changes
    assert all(board.state(n) is state[n] for n in board.nodes)
    assert sum(board.transitions.values()) == len(seen)


def test_illegal_moves_are_refused():
    board = HealthBoard(SETTINGS, ["web1"])
    with pytest.raises(IllegalTransition, match=r"node \(web1\): event RISEN is not allowed in state UP"):
        board._fire(board._nodes["web1"], NodeEvent.RISEN, 0.0, "test")
    assert board.state("web1") is NodeState.UP


def test_the_table_lists_every_state_and_without_slow_start_a_risen_node_is_up_at_once():
    for slow_start in (True, False):
        moves = node_moves(slow_start)
        reached = {new for new, _ in moves.values()} | {state for state, _ in moves}
        assert reached == (set(NodeState) if slow_start else set(NodeState))
        risen = moves[(NodeState.RISING, NodeEvent.RISEN)][0]
        assert risen is (NodeState.SLOW_START if slow_start else NodeState.UP)


@pytest.mark.parametrize("kwargs,match", [
    ({"warning": 8, "dead": 8}, "warning"), ({"tick": 0}, "tick"), ({"rise": 0}, "rise"), ({"slow_start": -1}, "slow_start"),
])
def test_bad_settings_name_the_key(kwargs, match):
    with pytest.raises(ValueError, match=match):
        HealthSettings(**kwargs)
