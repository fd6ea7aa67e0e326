"""What the failover core tells observers: every takeover's timeline, replication lag."""

from __future__ import annotations

import pytest

from backup.failover import TAKEOVER_HISTORY, ClaimAddresses, FirstForward
from backup.roles import Role
from common.sansio import CommandDone
from common.wire import Kind
from tests.unit.test_failover_core import INTERVAL, Lan, kind_of


def kill_active_and_wait(lan: Lan) -> str:
    """Freeze the active until the other takes over; returns the new active's name."""
    active = next(n for n, c in lan.cores.items() if c.role is Role.ACTIVE)
    lan.frozen.add(active)
    for _ in range(40):
        lan.step(1)
        new = next((n for n, c in lan.cores.items() if c.role is Role.ACTIVE and n != active), None)
        if new is not None:
            return new
    raise AssertionError("nobody took over")


def test_every_takeover_is_counted_and_the_recent_ones_keep_their_timeline():
    lan = Lan()
    lan.step(20)
    assert lan.cores["dist1"].stats().takeovers == 1 and lan.cores["dist2"].stats().takeovers == 0
    assert kill_active_and_wait(lan) == "dist2"
    lan.feed("dist2", CommandDone(ClaimAddresses(), lan.now + 0.004))
    lan.feed("dist2", FirstForward(lan.now + 0.5, arrived=lan.now + 0.45))
    stats = lan.cores["dist2"].stats()
    assert stats.takeovers == 1 and len(stats.recent_takeovers) == 1
    takeover = stats.recent_takeovers[0]
    assert takeover == stats.last_takeover
    assert takeover.first_forward - takeover.first_arrival == pytest.approx(0.05)
    assert takeover.last_heartbeat is not None and takeover.started - takeover.last_heartbeat >= 6 * INTERVAL - 1e-9


def test_the_history_is_bounded_and_the_count_goes_on():
    lan = Lan()
    lan.step(20)
    for _ in range(TAKEOVER_HISTORY + 2):
        new = kill_active_and_wait(lan)
        old = "dist1" if new == "dist2" else "dist2"
        lan.frozen.discard(old)  # it comes back, hears the new active, and gives up
        lan.step(10)
    stats = {name: core.stats() for name, core in lan.cores.items()}
    assert sum(s.takeovers for s in stats.values()) == TAKEOVER_HISTORY + 3
    for s in stats.values():
        assert len(s.recent_takeovers) == min(s.takeovers, TAKEOVER_HISTORY)
        terms = [t.term for t in s.recent_takeovers]
        assert terms == sorted(terms)


def test_a_standby_cut_off_from_the_sync_stream_is_behind_since_then_and_the_active_counts_its_missing_records():
    lan = Lan()
    lan.step(20)
    assert lan.cores["dist2"].stats().behind_since is None
    peer = lan.cores["dist1"].stats().peers[0]
    assert peer.name == "dist2" and peer.lag_records == 0
    lan.drop = lambda sender, command: sender == "dist1" and kind_of(command) is Kind.STATE_SYNC
    cut_at = lan.now
    lan.open_connections(10)
    lan.open_connections(10, start_port=41000)  # two batches: one more than may be in flight
    lan.step(2)  # the active's heartbeats advertise them; the standby's say what it applied
    behind = lan.cores["dist2"].stats().behind_since
    assert behind is not None and cut_at <= behind <= lan.now
    assert lan.cores["dist1"].stats().peers[0].lag_records == 20
    assert lan.cores["dist1"].stats().behind_since is None  # the active is never behind
    lan.drop = lambda sender, command: False
    lan.step(10)  # the standby asks again for what it misses
    assert lan.cores["dist2"].stats().behind_since is None
    assert lan.cores["dist1"].stats().peers[0].lag_records == 0
