"""Persistence end to end: a client keeps its node across new connections and a takeover, and moves when
its node fails.

The service is round-robin with ``persistence = 300``: without persistence, one client's new
connections would go round the three nodes; with it, each client address stays on the node of its
first connection.  Several client addresses (extra addresses on the client host) show that different
clients do get different nodes.
"""

from __future__ import annotations

import http.client
import json
import socket
import time

import pytest

from testbed import netns
from testbed.runner import wait_until
from tests.e2e.conftest import MODES

CLIENT = "203.0.113.10"  # the client host's own address
EXTRA = [f"203.0.113.{n}" for n in range(21, 26)]  # more clients: addresses added to the client host
CLIENTS = [CLIENT, *EXTRA]
CONNECTIONS = 20  # new connections per client and check
HOMES: dict[str, dict[str, str]] = {}  # project -> each client's node, as the earlier tests found it


@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    bed = make_testbed(f"tpers{request.param[0]}", nodes=3, policy="round-robin", persistence=300, preempt=False,
                       mode=request.param)
    for address in EXTRA:
        bed.run("client", ["ip", "addr", "add", f"{address}/24", "dev", "eth0"])
    return bed


def node_for(bed, source: str, timeout: float = 5.0) -> str:
    """One GET of /health through the VIP on a new connection from ``source``: the X-Node that served it."""

    def connect() -> socket.socket:
        return socket.create_connection((bed.vip, 80), timeout=timeout, source_address=(source, 0))

    conn = http.client.HTTPConnection(bed.vip, 80, timeout=timeout)
    conn.sock = netns.call_in(bed.ns("client"), connect)
    try:
        conn.request("GET", "/health", headers={"Connection": "close"})
        response = conn.getresponse()
        response.read()
        assert response.status == 200, (source, response.status)
        return response.getheader("X-Node")
    finally:
        conn.close()


def nodes_of(bed, clients=CLIENTS, count: int = CONNECTIONS) -> dict[str, set[str]]:
    """The nodes each client reached over ``count`` new connections (interleaved across clients)."""
    seen: dict[str, set[str]] = {client: set() for client in clients}
    for _ in range(count):
        for client in clients:
            seen[client].add(node_for(bed, client))
    return seen


def one_each(seen: dict[str, set[str]]) -> dict[str, str]:
    assert all(len(nodes) == 1 for nodes in seen.values()), seen
    return {client: next(iter(nodes)) for client, nodes in seen.items()}


def explained(bed, host: str, client: str) -> dict:
    """The distributor on ``host`` explains where ``client``'s next connection goes (control API, viewer)."""
    answer = json.loads(bed.ctl(["--json", "explain", client], host=host, role="viewer", check=True).stdout)
    return answer["services"][0]


def knows(bed, host: str, home: dict[str, str]) -> bool:
    """Every client's next connection goes to its node on ``host``, because of persistence."""
    answers = {client: explained(bed, host, client) for client in home}
    return all(a["next"] == home[c] and "persistence" in a["why"] for c, a in answers.items())


def home_of(bed) -> dict[str, str]:
    return HOMES.get(bed.project) or one_each(nodes_of(bed, count=3))


def test_each_client_reaches_one_node_on_every_new_connection_and_clients_are_spread(bed):
    bed.wait_settled()
    home = one_each(nodes_of(bed))
    assert set(home.values()) == {"web1", "web2", "web3"}, home  # round-robin spread the clients' first picks
    HOMES[bed.project] = home


def test_the_clients_keep_their_nodes_after_the_active_dies_and_the_backup_takes_over(bed):
    home = home_of(bed)
    assert bed.wait_settled() == ("dist1", "dist2")
    # The backup learnt each client's node from the replicated connections.
    wait_until(lambda: knows(bed, "dist2", home), 10, "dist2 to know every client's node")
    bed.kill("dist1")  # the whole host: links down, every process SIGKILLed
    wait_until(lambda: bed.role("dist2") == "active", 10, "dist2 to take over")
    assert one_each(nodes_of(bed)) == home
    bed.start("dist1")  # back as the backup (no preempt); the clients stay where they are
    assert bed.wait_settled(30) == ("dist2", "dist1")
    assert one_each(nodes_of(bed, count=3)) == home


def test_a_stopped_nodes_clients_move_to_another_node_and_stay_there(bed):
    home = home_of(bed)
    active = bed.active_distributor()
    node = home[CLIENT]
    stopped_at = time.time()
    bed.stop_service(node, "nginx")  # SIGTERM: nothing listens, the node resets SYNs; its agent's probe fails
    try:
        movers = [c for c in CLIENTS if home[c] == node]
        # Passive health takes the node out at its first refused SYN (rewrite mode resends the SYN to
        # another node at once; kernel mode after the client's retransmission); the heartbeats confirm.
        first = wait_until(lambda: node_for(bed, CLIENT), 15, f"a request from {CLIENT} to succeed")
        assert first != node
        moved = one_each(nodes_of(bed))
        for client in CLIENTS:
            if client in movers:
                assert moved[client] != node, (client, moved)
            else:
                assert moved[client] == home[client], (client, moved)
        assert moved[CLIENT] == first
    finally:
        restarted = time.time()
        bed.start_service(node, "nginx")
    # Back in service: nobody returns to it, each client keeps the node it moved to.
    assert bed.wait_alert(node, "warning", stopped_at, 10, host=active)
    wait_until(lambda: any(r["node"] == node and r["to"] in ("up", "slow_start") and r["time"] >= restarted
                           for r in bed.alerts(active)), 30, f"{node} back in service")
    assert one_each(nodes_of(bed, count=5)) == moved
