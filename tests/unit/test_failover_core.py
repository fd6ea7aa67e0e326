"""Playbooks of the failover core: two distributors, a lossy LAN between them, and the commands they issue."""

from __future__ import annotations

import ipaddress
import random

from backup.failover import (RULES_RETRY, Announce, ArmFirstForward, ClaimAddresses, DrainQueue, FailoverCore,
                             FailoverOptions, FirstForward, HoldNewSyns, InstallRules, PacketsHandled, PeerDatagram,
                             ReleaseAddresses, ReleaseNewSyns, RemoveRules)
from backup.roles import FailoverSettings, Role
from common.sansio import Alert, CommandDone, Level, Send, StopRequested, Tick
from common.wire import HEADER_SIZE, Keys, Kind
from distributor.balancer import Policy
from distributor.conntable import ConnectionTable
from distributor.core import DistributorCore
from distributor.reroute import ConnectionOpened, Interposer
from tests.packets import CLIENT, VIP, tcp
from tests.playbook import Playbook
from tests.unit.test_reroute import service_spec

KEYS = Keys({1: b"d" * 32})
WALL = 1_800_000_000.0
INTERVAL = 0.05
BROADCAST = ("198.51.100.255", 8406)
ADDRESSES = {"dist1": "198.51.100.2", "dist2": "198.51.100.3"}


def options(name: str, priority: int, preempt: bool = False, garp_repeat: float = 5.0,
            lifetime: float = 0.0) -> FailoverOptions:
    """Permanent addresses unless a test asks for a lifetime (renewals would fill every playbook)."""
    other = "dist2" if name == "dist1" else "dist1"
    return FailoverOptions(name, ipaddress.IPv4Address(ADDRESSES[name]),
                           FailoverSettings(priority=priority, preempt=preempt, interval=INTERVAL, warning=3, dead=6),
                           BROADCAST, {other: ipaddress.IPv4Address(ADDRESSES[other])}, 8406, 5.0, garp_repeat,
                           address_lifetime=lifetime)


def kind_of(command: Send) -> Kind:
    return Kind(command.data[5])


class Lan:
    """Two failover cores; their Send commands are delivered to each other unless the test drops them."""

    def __init__(self, preempt1: bool = False, lifetime: float = 0.0):
        self.now = 0.0
        self.replicas = {name: Interposer([service_spec(Policy.LEAST_OUTSTANDING)], ConnectionTable(10_000))
                         for name in ADDRESSES}
        self.cores = {"dist1": FailoverCore(options("dist1", 200, preempt1, lifetime=lifetime), KEYS, self.replicas["dist1"]),
                      "dist2": FailoverCore(options("dist2", 100, lifetime=lifetime), KEYS, self.replicas["dist2"])}
        self.log: dict[str, list] = {name: [] for name in ADDRESSES}
        self.frozen: set[str] = set()  # SIGSTOPped: neither ticks nor receives
        self.cut = False  # a partition: nothing crosses
        self.drop = lambda sender, command: False
        self.install_error: str | None = None  # what InstallRules' CommandDone says (None: installed)
        for name, core in self.cores.items():
            self._run(name, core.start(self.now, WALL + self.now))

    def restart(self, name: str, preempt: bool = False) -> None:
        """The daemon crashed and starts again: a new core with an empty table and no replay marks."""
        self.replicas[name] = Interposer([service_spec(Policy.LEAST_OUTSTANDING)], ConnectionTable(10_000))
        priority = 200 if name == "dist1" else 100
        self.cores[name] = FailoverCore(options(name, priority, preempt), KEYS, self.replicas[name])
        self._run(name, self.cores[name].start(self.now, WALL + self.now))

    def step(self, count: int = 1) -> None:
        for _ in range(count):
            self.now += INTERVAL
            for name, core in self.cores.items():
                if name not in self.frozen:
                    self._run(name, core.handle(Tick(self.now, WALL + self.now)))

    def feed(self, name: str, event) -> list:
        return self._run(name, self.cores[name].handle(event))

    def _run(self, name: str, commands: list) -> list:
        self.log[name] += commands
        for command in commands:
            if isinstance(command, Send) and not self.cut and not self.drop(name, command):
                for other, address in ADDRESSES.items():
                    if other != name and other not in self.frozen and command.destination[0] in (address, BROADCAST[0]):
                        self._run(other, self.cores[other].handle(
                            PeerDatagram(command.data, ADDRESSES[name], self.now, WALL + self.now)))
        for command in commands:
            if isinstance(command, InstallRules) and name not in self.frozen:
                # The adapter reports each install when it is done (the runtime's slow lane).
                self._run(name, self.cores[name].handle(CommandDone(command, self.now, self.install_error)))
        return commands

    def roles(self) -> tuple[Role, Role]:
        return self.cores["dist1"].role, self.cores["dist2"].role

    def since(self, name: str, mark: int, kinds: tuple = ()) -> list:
        commands = self.log[name][mark:]
        return [c for c in commands if isinstance(c, kinds)] if kinds else commands

    def open_connections(self, count: int, start_port: int = 40000) -> None:
        """The active opens connections; its core replicates them at the end of the batch."""
        name = next(n for n, c in self.cores.items() if c.role is Role.ACTIVE and n not in self.frozen)
        replica, core = self.replicas[name], self.cores[name]
        effects = []
        for port in range(start_port, start_port + count):
            _, _, extra = replica.decide(tcp(CLIENT, VIP, port, 80, "S"), self.now)
            effects += extra or ()
            replica.decide(tcp(CLIENT, VIP, port, 80, "A"), self.now)
        for effect in effects:
            if isinstance(effect, ConnectionOpened):
                core.record_opened(effect.conn.key, effect.conn.backend.index)
        self.feed(name, PacketsHandled(self.now, WALL + self.now, tuple(effects)))


TAKEOVER = (Alert, HoldNewSyns(True), ArmFirstForward(), InstallRules(), ClaimAddresses(None), Announce())
GIVE_UP = (ReleaseAddresses(), HoldNewSyns(False), RemoveRules(), DrainQueue())


def decisions(commands: list) -> list:
    """Commands that act on the host (not datagrams, not logs, not timers), in order."""
    return [c for c in commands if type(c).__name__ not in ("Send", "Log", "WakeUpAt")]


def test_start_cleans_up_what_a_crash_left_and_then_the_higher_priority_takes_over_in_order():
    lan = Lan()
    assert decisions(lan.log["dist1"]) == [ReleaseAddresses(), RemoveRules()]
    lan.step(10)
    assert lan.roles() == (Role.ACTIVE, Role.BACKUP)
    taken = decisions(lan.log["dist1"])[2:]
    assert taken[0] == Alert("dist1", "starting", "active", taken[0].reason)
    assert tuple(taken[1:]) == TAKEOVER[1:]  # state, rules, addresses, announcement: in that order
    # The backup asked the active for a snapshot as soon as it followed it.
    assert Kind.SYNC_REQUEST in [kind_of(c) for c in lan.log["dist2"] if isinstance(c, Send)]
    assert lan.cores["dist1"].machine.term == 1


def test_the_backup_takes_over_in_order_only_after_the_dead_window_and_repeats_its_announcement():
    lan = Lan()
    lan.step(20)
    lan.open_connections(5)
    lan.step(2)
    lan.frozen.add("dist1")  # the active stops heartbeating
    mark = len(lan.log["dist2"])
    lan.step(5)
    # The backup ticked once after the last heartbeat already: 6 silent ticks now, not more than `dead`.
    assert lan.roles()[1] is Role.BACKUP
    lan.step(1)
    assert lan.roles()[1] is Role.ACTIVE
    taken = decisions(lan.since("dist2", mark))
    assert taken[0] == Alert("dist2", "backup", "active", taken[0].reason) and tuple(taken[1:]) == TAKEOVER[1:]
    assert len(lan.replicas["dist2"]) == 5 and lan.cores["dist2"].machine.term == 2
    # The replicated connections are forwarded at once; the timeline takes the first forward and the claim.
    lan.feed("dist2", CommandDone(ClaimAddresses(), lan.now + 0.004))
    lan.feed("dist2", FirstForward(lan.now + 0.01))
    takeover = lan.cores["dist2"].stats().last_takeover
    assert takeover.started - takeover.last_heartbeat >= 6 * INTERVAL - 1e-9
    assert takeover.started < takeover.claimed < takeover.first_forward
    mark = len(lan.log["dist2"])
    lan.step(int(5.0 / INTERVAL) + 1)  # garp_repeat later: the second burst
    assert lan.since("dist2", mark, (Announce,)) == [Announce()]


def test_a_stopping_active_flushes_resigns_three_times_gives_up_and_the_backup_takes_over_at_once():
    lan = Lan()
    lan.step(20)
    lan.open_connections(3)
    mark1, mark2 = len(lan.log["dist1"]), len(lan.log["dist2"])
    lan.feed("dist1", StopRequested(lan.now, WALL + lan.now))
    sent = [kind_of(c) for c in lan.since("dist1", mark1, (Send,))]
    assert sent.count(Kind.RESIGN) == 3
    assert decisions(lan.since("dist1", mark1)) == [Alert("dist1", "active", "stopped", "shutting down"), *GIVE_UP,
                                                    ReleaseAddresses()]
    assert lan.roles() == (Role.STOPPED, Role.ACTIVE)  # no dead window: the resign hands over
    assert decisions(lan.since("dist2", mark2))[1:6] == list(TAKEOVER[1:])
    assert len(lan.replicas["dist2"]) == 3


def test_split_brain_heals_by_term_then_priority_then_address_the_loser_gives_up_the_winner_announces():
    lan = Lan()
    lan.step(20)
    lan.cut = True  # a partition: both become active
    lan.step(10)
    assert lan.roles() == (Role.ACTIVE, Role.ACTIVE)
    assert lan.cores["dist2"].machine.term == 2 > lan.cores["dist1"].machine.term
    mark1, mark2 = len(lan.log["dist1"]), len(lan.log["dist2"])
    lan.cut = False
    lan.step(1)
    assert lan.roles() == (Role.BACKUP, Role.ACTIVE)  # the higher term wins, though dist1 has the higher priority
    assert decisions(lan.since("dist1", mark1)) == [Alert("dist1", "active", "backup", decisions(
        lan.since("dist1", mark1))[0].reason), *GIVE_UP]
    assert Kind.SYNC_REQUEST in [kind_of(c) for c in lan.since("dist1", mark1, (Send,))]
    assert Announce() in lan.since("dist2", mark2)


def test_equal_terms_are_broken_by_priority():
    lan = Lan()
    lan.cut = True
    lan.step(10)  # both start alone: both active with term 1
    assert lan.roles() == (Role.ACTIVE, Role.ACTIVE)
    lan.cut = False
    lan.step(2)
    assert lan.roles() == (Role.ACTIVE, Role.BACKUP)


def test_a_returning_primary_with_preempt_waits_until_caught_up_then_the_active_resigns_to_it():
    lan = Lan(preempt1=True)
    lan.step(20)
    lan.open_connections(40)
    lan.frozen.add("dist1")
    lan.step(10)
    assert lan.roles()[1] is Role.ACTIVE
    lan.open_connections(30, start_port=41000)
    lan.frozen.discard("dist1")
    # dist1 comes back with an empty table; the snapshot request is lost twice, so it cannot catch up yet.
    lan.restart("dist1", preempt=True)
    lost = {"count": 0}

    def lose_requests(sender, command):
        if sender == "dist1" and kind_of(command) is Kind.SYNC_REQUEST and lost["count"] < 1:
            lost["count"] += 1
            return True
        return False

    lan.drop = lose_requests
    lan.step(3)  # it hears the active at once and follows it, but its first snapshot request was lost
    assert lan.roles() == (Role.BACKUP, Role.ACTIVE) and lost["count"] == 1
    assert not lan.cores["dist1"].machine.caught_up and len(lan.replicas["dist1"]) == 0
    for _ in range(40):  # it asks again one dead window later; once caught up, dist2 resigns to it
        caught_up = lan.cores["dist1"].machine.caught_up
        replicated = len(lan.replicas["dist1"])
        lan.step(1)
        if lan.roles() == (Role.ACTIVE, Role.BACKUP):
            break
    assert lan.roles() == (Role.ACTIVE, Role.BACKUP)
    assert caught_up and replicated == 70  # it had caught up before it took the addresses back
    assert len(lan.replicas["dist1"]) == 70


def test_a_lost_sync_batch_is_a_gap_the_backup_asks_for_a_snapshot_and_the_replica_converges():
    lan = Lan()
    lan.step(20)
    dropped = {"done": False}

    def lose_one_batch(sender, command):
        if sender == "dist1" and kind_of(command) is Kind.STATE_SYNC and not dropped["done"]:
            dropped["done"] = True
            return True
        return False

    lan.drop = lose_one_batch
    lan.open_connections(10)
    mark = len(lan.log["dist2"])
    lan.open_connections(10, start_port=41000)  # the next batch shows the gap
    assert Kind.SYNC_REQUEST in [kind_of(c) for c in lan.since("dist2", mark, (Send,))]
    lan.step(5)
    assert len(lan.replicas["dist2"]) == 20 and lan.cores["dist2"].machine.caught_up
    assert lan.cores["dist2"].stats().gaps == 1


def test_heartbeats_lost_at_random_never_leave_two_actives_on_a_clean_network():
    for seed in range(5):
        rng = random.Random(seed)
        lan = Lan()
        lan.drop = lambda sender, command: rng.random() < 0.3
        lan.step(300)
        lan.drop = lambda sender, command: False
        lan.step(20)
        assert sorted(lan.roles()) == [Role.BACKUP, Role.ACTIVE]


def test_forged_and_replayed_peer_datagrams_change_nothing():
    lan = Lan()
    lan.step(20)
    heartbeat = next(c for c in reversed(lan.log["dist1"]) if isinstance(c, Send) and kind_of(c) is Kind.DIST_HEARTBEAT)
    core = lan.cores["dist2"]
    before = core.stats()
    forged = bytearray(heartbeat.data)
    forged[HEADER_SIZE] ^= 1  # one payload bit: the MAC no longer matches
    assert lan.feed("dist2", PeerDatagram(bytes(forged), ADDRESSES["dist1"], lan.now, WALL + lan.now)) == []
    assert lan.feed("dist2", PeerDatagram(heartbeat.data, ADDRESSES["dist1"], lan.now, WALL + lan.now)) == []
    after = core.stats()
    assert after.role is before.role and sum(after.rejected.values()) == sum(before.rejected.values()) + 2


def test_the_active_releases_new_syns_only_after_sending_the_batch_that_announces_them():
    core = DistributorCore("dist1", lan_mode(), [service_spec()], 100,
                           failover=options("dist1", 200), failover_keys=KEYS)
    play = Playbook(core)
    play(Tick(0.0, WALL))
    for n in range(1, 12):
        play(Tick(n * INTERVAL, WALL + n * INTERVAL))
    assert core.failover.role is Role.ACTIVE
    reason, _, effects = core.interposer.decide(tcp(CLIENT, VIP, 40000, 80, "S"), 1.0)
    play(PacketsHandled(1.0, WALL + 1.0, effects))
    kinds = [kind_of(c) if isinstance(c, Send) else type(c) for c in play.decisions]
    assert kinds == [Kind.STATE_SYNC, ReleaseNewSyns]  # one datagram to the one peer, then the release


def lan_mode():
    from distributor.reroute import Mode

    return Mode.REWRITE


def test_with_30_percent_loss_on_the_sync_stream_the_backup_catches_up_and_holds_every_connection():
    rng = random.Random(7)
    lan = Lan()
    lan.drop = lambda sender, command: kind_of(command) in (Kind.STATE_SYNC, Kind.SYNC_REQUEST) and rng.random() < 0.3
    lan.step(20)
    for round_ in range(30):  # connections keep opening while datagrams are lost
        lan.open_connections(20, start_port=40000 + 20 * round_)
        lan.step(2)
    lan.step(40)
    backup = lan.cores["dist2"]
    assert backup.machine.caught_up
    assert set(lan.replicas["dist2"].open_connections()) == set(lan.replicas["dist1"].open_connections())
    assert len(lan.replicas["dist2"]) == 600
    stats = backup.stats()
    assert stats.retransmit_requests > 0 and lan.cores["dist1"].stats().retransmitted > 0
    lan.frozen.add("dist1")
    lan.step(10)
    assert lan.roles()[1] is Role.ACTIVE and len(lan.replicas["dist2"]) == 600


def test_a_restarted_distributor_refuses_datagrams_sealed_before_it_started():
    lan = Lan()
    lan.step(20)
    recorded = [c for c in lan.log["dist1"][-40:] if isinstance(c, Send) and kind_of(c) is Kind.DIST_HEARTBEAT]
    lan.frozen.add("dist1")  # the active dies; its recorded heartbeats are replayed to a freshly started backup
    lan.now += 0.5  # the backup's daemon restarts meanwhile
    lan.restart("dist2")
    for heartbeat in recorded:
        assert lan.feed("dist2", PeerDatagram(heartbeat.data, ADDRESSES["dist1"], lan.now, WALL + lan.now)) == []
    from common.wire import Reject

    assert lan.cores["dist2"].stats().rejected[Reject.BEFORE_START] == len(recorded)
    lan.step(8)
    assert lan.roles()[1] is Role.ACTIVE  # one dead window after its start, as if nothing was replayed


def test_an_active_renews_its_addresses_and_repeats_its_announcement_and_stops_both_when_it_gives_up():
    lan = Lan(lifetime=1.0)
    lan.step(20)
    mark = len(lan.log["dist1"])
    lan.step(int(10.0 / INTERVAL) + 1)  # 10 s: the refresh interval
    renewals = lan.since("dist1", mark, (ClaimAddresses,))
    # every 1/8 of the lifetime, at the next tick (0.15 s at 50 ms ticks)
    assert all(c == ClaimAddresses(1.0) for c in renewals) and 60 <= len(renewals) <= 85
    assert lan.since("dist1", mark, (Announce,)) == [Announce(), Announce()]  # the second burst, the first refresh
    lan.cut = True
    lan.step(10)
    lan.cut = False
    lan.step(2)  # dist2 had taken over with a higher term: dist1 gives up
    assert lan.roles() == (Role.BACKUP, Role.ACTIVE)
    mark = len(lan.log["dist1"])
    lan.step(int(10.0 / INTERVAL) + 1)
    assert not lan.since("dist1", mark, (ClaimAddresses, Announce))


def test_the_active_replicates_its_runtime_state_and_repeats_it_a_lost_piece_costs_one_second():
    from backup.failover import AdminStateReceived

    lan = Lan()
    lan.step(20)
    text = '{"admin": {"web2": "drain"}, "version": 3}' + " " * 3000  # more than one datagram
    lost = {"n": 0}

    def lose_first(sender, command):
        if sender == "dist1" and kind_of(command) is Kind.ADMIN_STATE and lost["n"] == 0:
            lost["n"] += 1
            return True
        return False

    lan.drop = lose_first
    mark = len(lan.log["dist2"])
    lan._run("dist1", lan.cores["dist1"].publish_admin(3, text, WALL + lan.now))
    assert not lan.since("dist2", mark, (AdminStateReceived,))  # a piece was lost
    lan.step(int(1.0 / INTERVAL) + 1)
    (received,) = lan.since("dist2", mark, (AdminStateReceived,))
    assert received == AdminStateReceived(3, text)
    lan.step(int(1.0 / INTERVAL) + 1)
    assert len(lan.since("dist2", mark, (AdminStateReceived,))) == 1  # the same version is adopted once


def test_a_takeover_claims_the_addresses_only_once_its_rules_are_in_and_retries_a_failed_install():
    lan = Lan()
    lan.step(20)
    lan.install_error = "iptables-restore: line 3 failed"  # e.g. a module missing, the xtables lock held
    lan.frozen.add("dist1")
    mark = len(lan.log["dist2"])
    lan.step(8)
    assert lan.roles()[1] is Role.ACTIVE
    taken = decisions(lan.since("dist2", mark))
    assert tuple(taken[1:]) == (HoldNewSyns(True), ArmFirstForward(), InstallRules())  # no claim, no announcement
    assert any(c.level is Level.ERROR and "addresses stay unclaimed" in c.message
               for c in lan.since("dist2", mark) if type(c).__name__ == "Log")
    lan.step(int(RULES_RETRY / INTERVAL) + 1)  # tried again each second, never claiming while it fails
    assert lan.since("dist2", mark, (InstallRules,)) == [InstallRules(), InstallRules()]
    assert not lan.since("dist2", mark, (ClaimAddresses, Announce))
    lan.install_error = None
    mark = len(lan.log["dist2"])
    lan.step(int(RULES_RETRY / INTERVAL) + 1)
    assert decisions(lan.since("dist2", mark)) == [InstallRules(), ClaimAddresses(None), Announce()]
