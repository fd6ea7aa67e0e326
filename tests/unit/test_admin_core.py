"""Playbooks of runtime administration in the distributor core: drain, maint, weights, nodes, policies."""

from __future__ import annotations

import ipaddress

from backup.failover import InstallRules
from common.sansio import Alert, CommandDone, Tick
from distributor.admin import AdminOp, AdminReply, AdminRequest, AdminState, RuntimeState, SaveState
from distributor.balancer import Policy
from distributor.core import DistributorCore
from distributor.reroute import ConnectionEnded, Mode, Reason, SendPacket
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.playbook import Playbook
from tests.unit.test_reroute import service_spec

WALL = 1_800_000_000.0


def make(mode=Mode.REWRITE, policy=Policy.ROUND_ROBIN, saved=None):
    core = DistributorCore("dist1", mode, [service_spec(policy)], 100, saved_state=saved)
    core.start(0.0, WALL)
    return core, Playbook(core, keep=(SaveState,))


def request(op, now=1.0, who="alice", **args):
    request.counter = getattr(request, "counter", 0) + 1
    return AdminRequest(request.counter, op, args, who, now, WALL + now)


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
