"""Playbooks of runtime administration in the distributor core: drain, maint, weights, nodes, policies."""

from __future__ import annotations

import ipaddress

from backup.failover import FailoverOptions, InstallRules, PeerDatagram
from backup.roles import FailoverSettings, Role
from common.sansio import Alert, CommandDone, Send, Tick
from common.wire import Keys
from distributor.admin import AdminOp, AdminReply, AdminRequest, AdminState, RuntimeState, SaveState
from distributor.balancer import Policy
from distributor.core import DistributorCore
from distributor.reroute import Mode, SendPacket
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.playbook import Playbook
from tests.unit.test_reroute import service_spec

WALL = 1_800_000_000.0
KEYS = Keys({1: b"d" * 32})
INTERVAL = 0.05  # failover heartbeats: the dead window is (6 + 1) x 50 ms
DISTRIBUTORS = {"dist1": ("198.51.100.2", 200), "dist2": ("198.51.100.3", 100)}  # name -> (address, priority)
BROADCAST = ("198.51.100.255", 8406)


def make(mode=Mode.REWRITE, policy=Policy.ROUND_ROBIN, saved=None):
    core = DistributorCore("dist1", mode, [service_spec(policy)], 100, saved_state=saved)
    core.start(0.0, WALL)
    return core, Playbook(core, keep=(SaveState,))


def request(op, now=1.0, who="alice", **args):
    request.counter = getattr(request, "counter", 0) + 1
    return AdminRequest(request.counter, op, args, who, now, WALL + now)


class Pair:
    """Two distributor cores with failover on one LAN: what one sends reaches the other unless it is down.

    dist1 (priority 200) is elected active, dist2 (100) follows it.  A distributor that is ``down``
    neither ticks nor receives (a crash: no resign); :meth:`start` brings one up afresh, with no
    state file, as a restarted peer is.
    """

    def __init__(self):
        self.now = 0.0
        self.cores: dict[str, DistributorCore] = {}
        self.answers: dict[str, list] = {name: [] for name in DISTRIBUTORS}
        self.down: set[str] = set()
        for name in DISTRIBUTORS:
            self.start(name)

    @staticmethod
    def failover_options(name: str) -> FailoverOptions:
        """``name``'s failover settings: its priority, the other one as its peer, the LAN's broadcast."""
        address, priority = DISTRIBUTORS[name]
        (peer, (peer_address, _)), = ((n, a) for n, a in DISTRIBUTORS.items() if n != name)
        return FailoverOptions(name, ipaddress.IPv4Address(address),
                               FailoverSettings(priority=priority, interval=INTERVAL, warning=3, dead=6),
                               BROADCAST, {peer: ipaddress.IPv4Address(peer_address)}, BROADCAST[1],
                               address_lifetime=0.0)

    def start(self, name: str) -> DistributorCore:
        core = DistributorCore(name, Mode.REWRITE, [service_spec()], 100, failover=self.failover_options(name),
                               failover_keys=KEYS)
        self.cores[name] = core
        self.down.discard(name)
        self._run(name, core.start(self.now, WALL + self.now))
        return core

    def crash(self, name: str) -> None:
        self.down.add(name)

    def step(self, seconds: float) -> None:
        for _ in range(round(seconds / INTERVAL)):
            self.now += INTERVAL
            for name, core in self.cores.items():
                if name not in self.down:
                    self._run(name, core.handle(Tick(self.now, WALL + self.now)))

    def admin(self, name: str, op: AdminOp, **args) -> AdminReply:
        commands = self._run(name, self.cores[name].handle(request(op, self.now, **args)))
        (reply,) = [c for c in commands if isinstance(c, AdminReply)]
        return reply

    def role(self, name: str) -> Role:
        return self.cores[name].stats(self.now).failover.role

    def _run(self, name: str, commands: list) -> list:
        self.answers[name] += commands
        address = DISTRIBUTORS[name][0]
        for command in commands:
            if not isinstance(command, Send):
                continue
            for other, (other_address, _) in DISTRIBUTORS.items():
                if other != name and other not in self.down and command.destination[0] in (other_address,
                                                                                         BROADCAST[0]):
                    self._run(other, self.cores[other].handle(PeerDatagram(command.data, address, self.now,
                                                                           WALL + self.now)))
        return commands


def open_conn(core, port, now=0.5):
    reason, _, _ = core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), now)
    core.interposer.decide(tcp(CLIENT, VIP, port, 80, "A", ack=500), now)
    return reason


def nodes_of_new(core, ports):
    found = []
    for port in ports:
        _, out, _ = core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 2.0)
        found.append(next(n for n, a in WEB.items() if out[16:20] == ipaddress.IPv4Address(a).packed) if out else None)
    return found


def test_a_drain_sends_no_new_connection_to_the_node_and_reports_its_end_when_the_last_one_closes():
    core, play = make()
    for port in (40000, 40001, 40002, 40003):
        open_conn(core, port)  # round-robin: web1, web2, web1, web2
    play(request(AdminOp.DRAIN, node="web2"))
    reply = play.of(AdminReply)[0]
    assert reply.status == 200 and reply.body["node"]["state"] == "drain" and reply.body["node"]["connections"] == 2
    assert Alert("web2", "ready", "drain", "set by an operator") in play.last and play.of(SaveState)
    assert nodes_of_new(core, range(41000, 41006)) == ["web1"] * 6
    core.interposer.decide(tcp(CLIENT, VIP, 40001, 80, "R"), 3.0)
    play(Tick(3.5, WALL + 3.5))
    assert not any(a.new == "drained" for a in play.of(Alert))
    core.interposer.decide(tcp(CLIENT, VIP, 40003, 80, "R"), 4.0)
    play(Tick(5.0, WALL + 5.0))
    (drained,) = [a for a in play.of(Alert) if a.new == "drained"]
    assert drained.subject == "web2"
    view = core.node_view("web2", 5.0)
    assert view["drain"]["drained"] and view["connections"] == 0
    play(request(AdminOp.READY, node="web2", now=6.0))
    assert "web2" in nodes_of_new(core, range(42000, 42004))


def test_maint_takes_the_node_out_at_once_and_resets_its_connections_but_keeps_counting_its_health():
    core, play = make()
    for port in (40000, 40001):
        open_conn(core, port)
    play(request(AdminOp.MAINT, node="web1"))
    rsts = play.of(SendPacket)
    assert len(rsts) == 1 and rsts[0].packet[12:16] == ipaddress.IPv4Address(VIP).packed
    assert core.node_view("web1", 1.0)["state"] == "maint" and core.node_view("web1", 1.0)["connections"] == 0
    assert nodes_of_new(core, range(41000, 41004)) == ["web2"] * 4


def test_weights_policies_and_refusals():
    core, play = make()
    play(request(AdminOp.SET_WEIGHT, node="web1", weight=0))
    assert play.of(AdminReply)[0].status == 200
    assert nodes_of_new(core, range(41000, 41004)) == ["web2"] * 4
    play(request(AdminOp.SET_POLICY, service="web", policy="least-outstanding"))
    assert core.interposer.services[0].policy is Policy.LEAST_OUTSTANDING
    for op, args, status in [(AdminOp.DRAIN, {"node": "web9"}, 404), (AdminOp.SET_WEIGHT, {"node": "web1", "weight": -1}, 400),
                             (AdminOp.SET_POLICY, {"service": "web", "policy": "fastest"}, 400),
                             (AdminOp.ADD_NODE, {"node": "web1", "address": "198.51.100.11",
                                                 "services": {"web": {"port": 80}}}, 409)]:
        version = core.runtime.version
        play(request(op, **args))
        (reply,) = play.of(AdminReply)
        assert reply.status == status and "error" in reply.body and core.runtime.version == version
        assert not play.of(SaveState)  # a refused change changes nothing


def test_a_node_added_at_run_time_takes_connections_and_one_removed_drains_where_it_is():
    core, play = make()
    open_conn(core, 40000)  # web1
    play(request(AdminOp.ADD_NODE, node="web3", address="198.51.100.13", services={"web": {"port": 80, "weight": 1}}))
    assert play.of(AdminReply)[0].status == 200
    (rules,) = play.of(InstallRules)
    # Out of new connections until its rules are in the kernel (no DNAT for its mark before).
    assert "web3" not in nodes_of_new(core, range(40100, 40103))
    assert core.explain(CLIENT, 40200)["services"][0]["excluded"][0]["node"] == "web3"
    play(CommandDone(rules, 1.5))
    picks = nodes_of_new(core, range(41000, 41006))
    assert picks.count("web3") == 2
    play(request(AdminOp.REMOVE_NODE, node="web1"))
    assert "web1" not in nodes_of_new(core, range(42000, 42006))
    # web1's connection still goes where it was.
    _, out, _ = core.interposer.decide(tcp(CLIENT, VIP, 40000, 80, "PA", b"x"), 3.0)
    assert out[16:20] == ipaddress.IPv4Address(WEB["web1"]).packed


def test_the_runtime_state_survives_a_restart_through_its_file_and_a_takeover_through_replication():
    core, play = make()
    play(request(AdminOp.DRAIN, node="web2"))
    play(request(AdminOp.ADD_NODE, node="web3", address="198.51.100.13", services={"web": {"port": 80}}))
    saved = RuntimeState.from_json(play.of(SaveState)[-1].text)
    assert saved.admin == {"web2": AdminState.DRAIN} and "web3" in saved.added and saved.version == 2
    restarted, _ = make(saved=saved)
    assert restarted.node_view("web2", 0.0)["state"] == "drain"
    assert set(restarted.nodes()) == {"web1", "web2", "web3"}
    assert nodes_of_new(restarted, range(41000, 41004)).count("web2") == 0

    # The takeover's half: the standby holds the active's changes as they are made, and once it has
    # taken over it serves them and makes its own on top.
    pair = Pair()
    pair.step(1.0)
    assert (pair.role("dist1"), pair.role("dist2")) == (Role.ACTIVE, Role.BACKUP)
    assert pair.admin("dist1", AdminOp.DRAIN, node="web2").status == 200
    assert pair.admin("dist1", AdminOp.ADD_NODE, node="web3", address="198.51.100.13",
                      services={"web": {"port": 80}}).status == 200
    standby = pair.cores["dist2"]
    assert standby.node_view("web2", pair.now)["admin"] == "drain" and "web3" in standby.nodes()
    assert standby.stats(pair.now).state_version == 2
    pair.crash("dist1")
    pair.step(1.0)
    assert pair.role("dist2") is Role.ACTIVE
    assert standby.node_view("web2", pair.now)["admin"] == "drain" and set(standby.nodes()) == {"web1", "web2",
                                                                                              "web3"}
    assert pair.admin("dist2", AdminOp.SET_WEIGHT, node="web1", weight=3).status == 200
    assert standby.stats(pair.now).state_version == 3


def test_a_new_active_resends_the_state_it_adopted_to_a_peer_that_restarts_empty():
    pair = Pair()
    pair.step(1.0)
    assert pair.admin("dist1", AdminOp.DRAIN, node="web2").status == 200
    assert pair.cores["dist2"].node_view("web2", pair.now)["admin"] == "drain"  # adopted
    pair.crash("dist1")
    pair.step(1.0)
    assert pair.role("dist2") is Role.ACTIVE
    restarted = pair.start("dist1")  # no state file: all it knows is what the new active sends
    assert restarted.node_view("web2", pair.now)["admin"] == "ready"
    pair.step(2.5)  # a dead window to follow the active, then its once-a-second refresh
    assert pair.role("dist1") is Role.BACKUP
    assert restarted.node_view("web2", pair.now)["admin"] == "drain"
    assert restarted.stats(pair.now).state_version == 1


def test_a_change_is_refused_on_a_standby_naming_the_active_and_allowed_without_failover():
    pair = Pair()
    pair.step(1.0)
    reply = pair.admin("dist2", AdminOp.DRAIN, node="web2")
    assert reply.status == 409
    assert reply.body["error"] == "dist2 is the backup; make changes on the active (dist1)"
    assert pair.cores["dist2"].node_view("web2", pair.now)["admin"] == "ready"
    assert pair.cores["dist2"].stats(pair.now).state_version == 0
    assert not [c for c in pair.answers["dist2"] if isinstance(c, SaveState)]  # nothing saved, nothing to replicate
    # Before the election nobody is active: refused too, and the message says no active is known.
    lone = Pair()
    reply = lone.admin("dist1", AdminOp.DRAIN, node="web2")
    assert reply.status == 409 and "dist1 is starting" in reply.body["error"] and "no active" in reply.body["error"]
    # The active accepts; so does a distributor without failover (no peer to defer to).
    assert pair.admin("dist1", AdminOp.DRAIN, node="web2").status == 200
    core, play = make()
    play(request(AdminOp.DRAIN, node="web2"))
    assert play.of(AdminReply)[0].status == 200


def test_a_repeated_drain_changes_nothing_saves_nothing_and_keeps_the_drains_start():
    core, play = make()
    open_conn(core, 40000)
    open_conn(core, 40001)  # web2
    play(request(AdminOp.DRAIN, node="web2", now=1.0))
    version = core.runtime.version
    play(request(AdminOp.DRAIN, node="web2", now=2.0))
    reply = play.of(AdminReply)[0]
    assert reply.status == 200 and reply.body["unchanged"] and reply.body["node"]["state"] == "drain"
    assert core.runtime.version == version and not play.of(SaveState) and not play.of(Alert)
    assert core.node_view("web2", 3.0)["drain"]["started_ago"] == 2.0  # the drain began at 1.0, not at 2.0
