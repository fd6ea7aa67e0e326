"""The maglev policy in the data path's core: same flow, same node, on every distributor (no root).

The table itself (balance, disruption, identical construction) is tested in test_maglev.py; here,
what a service with ``policy = "maglev"`` does with SYNs, refusals, run-time changes and explain.
"""

from __future__ import annotations

import ipaddress
import random

from distributor.admin import AdminOp
from distributor.balancer import Policy
from distributor.config import parse
from distributor.conntable import ConnectionTable
from distributor.core import DistributorCore
from distributor.maglev import MaglevBalancer
from distributor.reroute import BackendSpec, Interposer, Mode, Reason
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.unit.test_admin_core import request
from tests.unit.test_config import MINIMAL
from tests.unit.test_passive_health import refusal
from tests.unit.test_reroute import service_spec

NODES = ("web1", "web2", "web3")


def node_of(out: bytes) -> str:
    address = str(ipaddress.IPv4Address(out[16:20]))
    return next(name for name, a in WEB.items() if a == address)


def syns(count: int, seed: int = 7) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(f"192.0.2.{rng.randrange(1, 255)}", rng.randrange(1024, 65536)) for _ in range(count)]


def test_two_distributors_send_every_flow_to_the_same_node_and_the_shares_are_even():
    first, second = (Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(10_000)) for _ in range(2))
    assert isinstance(first.services[0].balancer, MaglevBalancer)
    shares = {n: 0 for n in NODES}
    for client, port in syns(3000):
        packet = tcp(client, VIP, port, 80, "S", seq=1)
        (r1, out1, _), (r2, out2, _) = first.decide(packet, 0.0), second.decide(packet, 5.0)  # other times, same pick
        assert r1 is r2 is Reason.NEW_CONNECTION and out1 == out2
        shares[node_of(out1)] += 1
    assert all(900 <= n <= 1100 for n in shares.values()), shares


def test_a_refused_syn_goes_to_the_flows_next_node_without_rebuilding_the_table():
    ip = Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(100))
    balancer = ip.services[0].balancer
    reason, out, _ = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000), 0.0)
    first = node_of(out)
    rebuilds = balancer.rebuilds
    reason, _, effects = ip.decide(refusal(first, isn=1000), 0.001)
    assert reason is Reason.NODE_REFUSED
    moved = [e for e in effects if type(e).__name__ == "SendPacket"]
    assert len(moved) == 1 and node_of(moved[0].packet) != first
    assert balancer.rebuilds == rebuilds  # one flow moved, the table stayed
    # A second distributor decides the same for the same flow and the same refusal.
    other = Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(100))
    other.decide(tcp(CLIENT, VIP, 40000, 80, "S", seq=1000), 0.0)
    _, _, again = other.decide(refusal(first, isn=1000), 0.001)
    assert [e.packet for e in again if type(e).__name__ == "SendPacket"] == [moved[0].packet]


def test_switching_to_and_from_maglev_at_run_time_keeps_the_open_counts():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(Policy.LEAST_OUTSTANDING, nodes=NODES)], 100)
    core.start(0.0, 0.0)
    for port in range(41000, 41006):
        assert core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 0.1)[0] is Reason.NEW_CONNECTION
    service = core.interposer.services[0]
    open_before = [service.balancer.outstanding(i) for i in range(3)]
    replies = core.handle(request(AdminOp.SET_POLICY, service="web", policy="maglev"))
    assert any(getattr(c, "status", None) == 200 for c in replies)
    assert isinstance(service.balancer, MaglevBalancer) and service.policy is Policy.MAGLEV
    assert [service.balancer.outstanding(i) for i in range(3)] == open_before == [2, 2, 2]
    explained = core.explain("192.0.2.9", 50000)["services"][0]
    packet = tcp("192.0.2.9", VIP, 50000, 80, "S")
    reason, out, _ = core.interposer.decide(packet, 0.2)
    assert explained["next"] == node_of(out) and "Maglev table" in explained["why"]
    core.handle(request(AdminOp.SET_POLICY, service="web", policy="round-robin"))
    assert not isinstance(service.balancer, MaglevBalancer) and service.policy is Policy.ROUND_ROBIN
    assert sum(service.balancer.outstanding(i) for i in range(3)) == 7


def test_a_node_added_at_run_time_joins_the_table():
    ip = Interposer([service_spec(Policy.MAGLEV, nodes=("web1", "web2"))], ConnectionTable(10_000))
    ip.add_backend("web", BackendSpec("web3", ipaddress.IPv4Address(WEB["web3"]), 80))
    seen = {node_of(ip.decide(tcp(client, VIP, port, 80, "S"), 0.0)[1]) for client, port in syns(300)}
    assert seen == set(NODES)


def test_the_config_takes_maglev_as_a_policy():
    config = parse(MINIMAL.replace('backends = ["web1"]', 'backends = ["web1"]\npolicy = "maglev"'))
    assert config.services[0].policy is Policy.MAGLEV


def test_the_flow_hash_is_keyed_by_the_clusters_keys_file_so_outsiders_cannot_aim_flows():
    from common.wire import Keys
    from distributor.core import flow_hash_secret

    ours, theirs = Keys({1: b"k" * 32, 2: b"n" * 32}), Keys({1: b"x" * 32})
    assert flow_hash_secret(ours) == flow_hash_secret(Keys({1: b"k" * 32, 2: b"n" * 32}))  # every distributor alike
    assert flow_hash_secret(None) == b"" and len(flow_hash_secret(ours)) == 32
    picks = {}
    for name, keys in (("ours", ours), ("again", ours), ("theirs", theirs), ("none", None)):
        ip = Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(10_000),
                        flow_secret=flow_hash_secret(keys))
        picks[name] = [node_of(ip.decide(tcp(c, VIP, p, 80, "S"), 0.0)[1]) for c, p in syns(300)]
    assert picks["ours"] == picks["again"]
    assert picks["ours"] != picks["theirs"] and picks["ours"] != picks["none"]  # the key changes the table's use
