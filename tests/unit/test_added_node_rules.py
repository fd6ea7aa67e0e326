"""A node added to a running layout takes new connections only once the rules naming it are installed.

Before them, its first SYNs would meet no per-node rule: in kernel mode no DNAT for its mark (the
gateway itself answers the SYN with an RST), in rewrite mode no rule queueing its replies (its
SYN-ACK leaves with its own address).  Seen end to end as wrk write errors after a SIGHUP that
added a node in kernel mode (tests/e2e/test_operate_e2e.py).
"""

from __future__ import annotations

from backup.failover import InstallRules
from common.sansio import CommandDone, Log
from distributor.balancer import Policy
from distributor.core import DistributorCore, Reconfigure
from distributor.reroute import Mode
from tests.playbook import Playbook
from tests.unit.test_admin_core import nodes_of_new
from tests.unit.test_reroute import service_spec


def started(mode=Mode.REWRITE):
    core = DistributorCore("dist1", mode, [service_spec(Policy.ROUND_ROBIN)], 100)
    first = core.start(0.0, 0.0)
    assert any(isinstance(c, InstallRules) for c in first)
    return core, Playbook(core, keep=(Log,))


def test_a_node_added_by_a_reload_waits_for_its_rules():
    core, play = started(Mode.KERNEL)
    old_rules = InstallRules(core.interposer.rule_layout())
    play(Reconfigure((service_spec(Policy.ROUND_ROBIN, nodes=("web1", "web2", "web3")),), None, 1.0))
    (rules,) = play.of(InstallRules)
    assert any(b.address == "198.51.100.13" for s in rules.layout for b in s.backends)
    assert core.node_view("web3", 1.0)["serving"] is False
    assert core.explain("203.0.113.10", 40000)["services"][0]["excluded"] == [
        {"node": "web3", "reason": "just added: waiting for its rules to be installed"}]
    play(CommandDone(old_rules, 1.1))  # an earlier install, without web3, releases nothing
    assert core.node_view("web3", 1.1)["serving"] is False
    play(CommandDone(rules, 1.2, error="iptables-restore: line 3 failed"))
    assert play.logged("kept out of new connections") and core.node_view("web3", 1.2)["serving"] is False
    play(CommandDone(rules, 1.3))
    assert core.node_view("web3", 1.3)["serving"] is True


def test_in_rewrite_mode_too_and_connections_follow_once_released():
    core, play = started()
    play(Reconfigure((service_spec(Policy.ROUND_ROBIN, nodes=("web1", "web2", "web3")),), None, 1.0))
    (rules,) = play.of(InstallRules)
    assert "web3" not in nodes_of_new(core, range(41000, 41004))
    play(CommandDone(rules, 1.5))
    assert nodes_of_new(core, range(42000, 42006)).count("web3") == 2


def test_a_node_known_from_the_start_does_not_wait():
    core, _ = started()
    assert all(core.node_view(n, 0.0)["serving"] for n in ("web1", "web2"))
