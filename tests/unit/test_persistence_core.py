"""Playbooks of persistence across a takeover: two distributor cores with failover and node health.

A service with ``persistence`` keeps each client (by address) on the node of its last connection.
The active replicates its connections; the backup learns each client's node from them, so after a
takeover a client's next new connection reaches the node it had.  A node that dies moves its
clients: their next connection goes to a live node, and they stay there.
"""

from __future__ import annotations

import ipaddress

from backup.failover import PacketsHandled
from backup.roles import Role
from common.sansio import Tick
from common.wire import Keys, Kind, NodeHeartbeat, seal
from distributor.balancer import Policy
from distributor.core import DistributorCore, HealthOptions
from distributor.heartbeat import HealthSettings, NodeDatagram
from distributor.reroute import Mode, ServiceSpec
from tests.packets import VIP, WEB, tcp
from tests.unit.test_admin_core import INTERVAL, KEYS, WALL, Pair
from tests.unit.test_reroute import service_spec

NODE_KEYS = Keys({1: b"k" * 32})
HEALTH = HealthSettings(tick=0.25, warning=3, dead=8, rise=3, slow_start=0.0, flap_suppress=0.0)
PERSISTENCE = 300.0
REPORT = NodeHeartbeat(0.1, 0.1, 2.0, 250).pack()
CLIENTS = [f"203.0.113.{20 + i}" for i in range(6)]


def persistent_spec(policy: Policy = Policy.ROUND_ROBIN) -> ServiceSpec:
    spec = service_spec(policy, nodes=("web1", "web2", "web3"))
    return ServiceSpec(spec.name, spec.vip, spec.port, spec.policy, spec.backends, persistence=PERSISTENCE)


class PersistentPair(Pair):
    """Pair's two distributors with a persistent three-node service, and node agents heartbeating to both.

    A node in ``silent`` sends no heartbeat (it died); the others heartbeat at every step.
    """

    def __init__(self):
        self.silent: set[str] = set()
        self.sequence = {node: 0 for node in WEB}
        super().__init__()

    def start(self, name: str) -> DistributorCore:
        core = DistributorCore(name, Mode.REWRITE, [persistent_spec()], 100,
                               health=HealthOptions(HEALTH, dict(WEB)), health_keys=NODE_KEYS,
                               failover=self.failover_options(name), failover_keys=KEYS)
        self.cores[name] = core
        self.down.discard(name)
        self._run(name, core.start(self.now, WALL + self.now))
        return core

    def step(self, seconds: float) -> None:
        for _ in range(round(seconds / INTERVAL)):
            self.now += INTERVAL
            for node, address in WEB.items():
                if node in self.silent:
                    continue
                self.sequence[node] += 1
                data = seal(NODE_KEYS, Kind.NODE_HEARTBEAT, node, self.sequence[node], WALL + self.now, REPORT)
                for name, core in self.cores.items():  # broadcast on the cluster LAN: both distributors hear it
                    if name not in self.down:
                        self._run(name, core.handle(NodeDatagram(data, address, self.now, WALL + self.now)))
            for name, core in self.cores.items():
                if name not in self.down:
                    self._run(name, core.handle(Tick(self.now, WALL + self.now)))

    def connect(self, name: str, client: str, port: int, close: bool = True) -> str | None:
        """One connection from ``client:port`` through distributor ``name``: the node it reached, or None.

        The handshake completes (and, with ``close``, the connection ends with an RST); the batch's
        effects go to the core, which replicates them to the peer.
        """
        core = self.cores[name]
        effects: list = []
        _, out, extra = core.interposer.decide(tcp(client, VIP, port, 80, "S"), self.now)
        effects += extra or ()
        if out is None:
            return None
        node = next(n for n, a in WEB.items() if out[16:20] == ipaddress.IPv4Address(a).packed)
        effects += core.interposer.decide(tcp(WEB[node], client, 80, port, "SA"), self.now)[2] or ()
        effects += core.interposer.decide(tcp(client, VIP, port, 80, "A"), self.now)[2] or ()
        if close:
            effects += core.interposer.decide(tcp(client, VIP, port, 80, "RA"), self.now)[2] or ()
        self._run(name, core.handle(PacketsHandled(self.now, WALL + self.now, tuple(effects))))
        return node

    def why(self, name: str, client: str) -> str:
        return self.cores[name].explain(client, 50000, now=self.now)["services"][0]["why"]


def test_a_client_keeps_its_node_across_a_takeover_and_a_dead_nodes_clients_move_and_stay_moved():
    pair = PersistentPair()
    pair.step(1.0)
    assert (pair.role("dist1"), pair.role("dist2")) == (Role.ACTIVE, Role.BACKUP)

    # Through dist1: each client's first connection is balanced (round-robin spreads them over the
    # three nodes); its later ones, open or closed, stay where the first went.
    home = {client: pair.connect("dist1", client, 40000) for client in CLIENTS}
    assert set(home.values()) == {"web1", "web2", "web3"}
    for round_, port in enumerate(range(40001, 40004)):
        pair.step(0.5)
        assert {client: pair.connect("dist1", client, port, close=round_ != 2) for client in CLIENTS} == home
    # Without persistence, round-robin would have spread one client's connections: it is the entry.
    assert all("persistence" in pair.why("dist1", client) for client in CLIENTS)

    # The backup learnt every client's node from the replicated connections.
    standby = pair.cores["dist2"]
    service = standby.interposer.services[0]
    client_bytes = {client: ipaddress.IPv4Address(client).packed for client in CLIENTS}
    assert {client: standby.interposer.sticky_node(service, client_bytes[client], pair.now).name
            for client in CLIENTS} == home

    # dist1 crashes; dist2 takes over and sends each client's next new connection to the same node.
    pair.crash("dist1")
    pair.step(1.0)
    assert pair.role("dist2") is Role.ACTIVE
    assert {client: pair.connect("dist2", client, 41000) for client in CLIENTS} == home
    assert all("persistence" in pair.why("dist2", client) for client in CLIENTS)

    # A node dies (its agent falls silent): its clients move to live nodes and stay on them; the
    # other clients keep theirs.
    dead = home[CLIENTS[0]]
    pair.silent.add(dead)
    pair.step(3.0)  # past the dead window: (dead + 1) ticks of 0.25 s
    assert standby.node_view(dead, pair.now)["state"] == "dead"
    moved = {client: pair.connect("dist2", client, 42000) for client in CLIENTS}
    for client in CLIENTS:
        if home[client] == dead:
            assert moved[client] != dead, client
        else:
            assert moved[client] == home[client], client
    for port in (42001, 42002):
        pair.step(0.5)
        assert {client: pair.connect("dist2", client, port) for client in CLIENTS} == moved

    # The node comes back: nobody is sent back to it (the entries now name the new nodes).
    pair.silent.discard(dead)
    pair.step(2.0)
    assert standby.node_view(dead, pair.now)["state"] == "up"
    assert {client: pair.connect("dist2", client, 43000) for client in CLIENTS} == moved


def test_a_restarted_peer_learns_the_new_actives_placements_from_its_snapshot_and_keeps_them_on_takeover_back():
    pair = PersistentPair()
    pair.step(1.0)
    home = {client: pair.connect("dist1", client, 40000, close=False) for client in CLIENTS}  # still open
    pair.crash("dist1")
    pair.step(1.0)
    assert pair.role("dist2") is Role.ACTIVE
    pair.start("dist1")  # empty: it learns the open connections (and so their clients' nodes) from a snapshot
    pair.step(2.5)
    assert pair.role("dist1") is Role.BACKUP
    restarted = pair.cores["dist1"]
    service = restarted.interposer.services[0]
    assert {client: restarted.interposer.sticky_node(service, ipaddress.IPv4Address(client).packed, pair.now).name
            for client in CLIENTS} == home
    pair.crash("dist2")
    pair.step(1.0)
    assert pair.role("dist1") is Role.ACTIVE
    assert {client: pair.connect("dist1", client, 41000) for client in CLIENTS} == home


def test_without_persistence_the_same_client_is_balanced_afresh_each_time():
    # The control: the same harness and service without persistence spreads one client's connections.
    pair = PersistentPair()
    for core in pair.cores.values():
        core.interposer.services[0].persistence = 0.0
    pair.step(1.0)
    assert len({pair.connect("dist1", CLIENTS[0], port) for port in range(40000, 40006)}) == 3
