"""What the failover core tells observers: every takeover's timeline, replication lag."""

from __future__ import annotations

import pytest

from backup.failover import TAKEOVER_HISTORY, ClaimAddresses, FirstForward
from backup.roles import Role
from common.sansio import CommandDone
from tests.unit.test_failover_core import INTERVAL, Lan


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
