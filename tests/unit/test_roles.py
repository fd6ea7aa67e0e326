"""The distributor role machine with a fake clock."""

import random

import pytest

from backup.roles import Action, FailoverSettings, IllegalRoleTransition, PeerBeat, Role, RoleEvent, RoleMachine

SETTINGS = FailoverSettings(priority=200, interval=0.05, warning=3, dead=6)
LOW = FailoverSettings(priority=100, interval=0.05, warning=3, dead=6)


def actions(decisions):
    return [d.action for d in decisions if d.action not in (Action.PEER_LATE, Action.PEER_LOST, Action.PEER_BACK)]


class Pair:
    """Two distributors whose heartbeats are delivered (or lost) by the test."""

    def __init__(self, a_settings=SETTINGS, b_settings=LOW):
        self.a = RoleMachine("dist1", 2, a_settings)
        self.b = RoleMachine("dist2", 3, b_settings)
        self.now = 0.0
        self.log: list[tuple[str, Action]] = []

    @staticmethod
    def beat(sender: RoleMachine, receiver: RoleMachine):
        return receiver.heartbeat(PeerBeat(sender.name, sender.role, sender.settings.priority, sender.term,
                                           sender.address, sender.caught_up, sender.settings.preempt))

    def step(self, deliver_a=True, deliver_b=True, freeze_a=False):
        """One tick on each side, then each heartbeat delivered (or lost); a frozen dist1 does nothing."""
        self.now += 0.05
        machines = [(self.a, self.b, deliver_a and not freeze_a), (self.b, self.a, deliver_b)]
        for machine, _, _ in machines:
            if machine.role is not Role.STOPPED and not (freeze_a and machine is self.a):
                for d in machine.tick(self.now):
                    self.log.append((machine.name, d.action))
        for machine, other, deliver in machines:
            if deliver and machine.role is not Role.STOPPED and other.role is not Role.STOPPED \
                    and not (freeze_a and other is self.a):
                for d in self.beat(machine, other):
                    self.log.append((other.name, d.action))

    def run(self, steps, **kw):
        for _ in range(steps):
            self.step(**kw)


def test_both_starting_the_higher_priority_becomes_active_the_other_backup():
    pair = Pair()
    pair.run(20)
    assert (pair.a.role, pair.b.role) == (Role.ACTIVE, Role.BACKUP)
    assert pair.a.term == 1
    assert ("dist2", Action.REQUEST_SYNC) in pair.log


def test_backup_takes_over_when_the_active_falls_silent_after_the_dead_window_only():
    pair = Pair()
    pair.run(20)
    pair.run(SETTINGS.warning, deliver_a=False)  # a stall shorter than the warning window
    assert pair.b.role is Role.BACKUP
    pair.run(1)
    pair.run(SETTINGS.dead, deliver_a=False)
    assert pair.b.role is Role.BACKUP  # dead ticks not yet exceeded
    pair.run(1, deliver_a=False)
    assert pair.b.role is Role.ACTIVE and pair.b.term == 2


def test_a_resign_hands_over_at_once():
    pair = Pair()
    pair.run(20)
    decisions = pair.a.shutdown()
    assert actions(decisions) == [Action.RESIGN] and pair.a.role is Role.STOPPED
    assert actions(pair.b.resign("dist1", pair.a.term, stopping=True)) == [Action.TAKE_OVER]
    assert pair.b.term == 2


def test_an_active_that_sees_a_higher_term_gives_up_and_the_winner_reannounces():
    pair = Pair()
    pair.run(20)
    pair.run(8, freeze_a=True)  # dist1 frozen (SIGSTOP): dist2 takes over with term 2
    assert pair.b.role is Role.ACTIVE
    # dist1 resumes: it still thinks it is active with term 1.
    assert actions(Pair.beat(pair.a, pair.b)) == [Action.ANNOUNCE]
    assert actions(Pair.beat(pair.b, pair.a)) == [Action.GIVE_UP, Action.REQUEST_SYNC]
    assert (pair.a.role, pair.b.role) == (Role.BACKUP, Role.ACTIVE)


def test_returning_primary_without_preempt_stays_backup():
    pair = Pair()
    pair.run(20)
    pair.a = RoleMachine("dist1", 2, SETTINGS)  # dist1 crashed and restarts
    pair.run(8, deliver_a=False)
    pair.run(40)
    assert (pair.a.role, pair.b.role) == (Role.BACKUP, Role.ACTIVE)


def test_returning_primary_with_preempt_takes_over_only_once_caught_up():
    preempting = FailoverSettings(priority=200, preempt=True, interval=0.05, warning=3, dead=6)
    pair = Pair(a_settings=preempting)
    pair.run(20)
    pair.a = RoleMachine("dist1", 2, preempting)
    pair.run(8, deliver_a=False)
    assert pair.b.role is Role.ACTIVE
    pair.run(40)
    assert (pair.a.role, pair.b.role) == (Role.BACKUP, Role.ACTIVE)  # not caught up yet
    pair.a.set_caught_up(True)
    decisions = Pair.beat(pair.a, pair.b)
    assert actions(decisions) == [Action.RESIGN] and pair.b.role is Role.BACKUP
    assert actions(pair.a.resign("dist2", pair.b.term, stopping=False)) == [Action.TAKE_OVER]
    assert pair.a.term == pair.b.term + 1
    pair.run(40)
    assert (pair.a.role, pair.b.role) == (Role.ACTIVE, Role.BACKUP)


def test_equal_priorities_break_the_tie_by_address_and_never_preempt():
    same = FailoverSettings(priority=100, preempt=True, interval=0.05, warning=3, dead=6)
    pair = Pair(a_settings=same, b_settings=same)
    pair.run(20)
    assert (pair.a.role, pair.b.role) == (Role.BACKUP, Role.ACTIVE)  # address 3 > 2
    pair.a.set_caught_up(True)
    pair.run(40)
    assert (pair.a.role, pair.b.role) == (Role.BACKUP, Role.ACTIVE)


@pytest.mark.parametrize("seed", range(20))
def test_heartbeats_lost_at_random_never_leave_two_actives_once_they_hear_each_other(seed):
    rng = random.Random(seed)
    pair = Pair()
    terms_seen = []
    for _ in range(600):
        loss = rng.random() < 0.3
        pair.step(deliver_a=not (loss and rng.random() < 0.8), deliver_b=not (loss and rng.random() < 0.8))
        terms_seen += [pair.a.term, pair.b.term]
    pair.run(20)  # then a clean network: exactly one active, the same forever
    roles = sorted([pair.a.role, pair.b.role])
    assert roles == [Role.BACKUP, Role.ACTIVE]
    owner = pair.a if pair.a.role is Role.ACTIVE else pair.b
    assert owner.term == max(pair.a.max_term, pair.b.max_term)
    pair.run(40)
    assert sorted([pair.a.role, pair.b.role]) == [Role.BACKUP, Role.ACTIVE]


def test_terms_only_grow():
    pair = Pair()
    terms = []
    for i in range(10):
        pair.run(10)
        pair.run(8, deliver_a=(i % 2 == 1), deliver_b=(i % 2 == 0))
        terms.append(max(pair.a.term, pair.b.term))
    assert terms == sorted(terms) and terms[-1] > terms[0]


def test_illegal_moves_and_bad_settings_are_refused():
    machine = RoleMachine("dist1", 2, SETTINGS)
    machine.shutdown()
    assert machine.role is Role.STOPPED and machine.shutdown() == []
    with pytest.raises(IllegalRoleTransition, match="event ELECTED is not allowed in state STOPPED"):
        machine._fire(RoleEvent.ELECTED, "a stopped distributor cannot take over")
    with pytest.raises(ValueError, match="failover.warning"):
        FailoverSettings(warning=6, dead=6)
