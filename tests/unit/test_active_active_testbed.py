"""The active-active testbed as data (no root): its topology, the configs it writes, what it refuses.

The running testbed is exercised by tests/e2e/test_active_active_e2e.py.
"""

from __future__ import annotations

import shutil
import subprocess

import pytest

from distributor.config import parse
from distributor.reroute import Mode
from testbed import cli
from testbed.runner import (Options, check_options, render_active_active_config, render_distributor_bird_config,
                            render_router_bird_config)
from testbed.topology import build

VIP = "203.0.113.1"


def test_three_distributors_each_have_an_uplink_to_the_router_and_a_leg_on_the_cluster_lan():
    topology = build(3, active_active=3)
    assert {h.name for h in topology.hosts} == {"client", "router", "dist1", "dist2", "dist3", "web1", "web2", "web3"}
    assert set(topology.bridges) == {"ext", "int", "up1", "up2", "up3"}
    for i in (1, 2, 3):
        dist = topology.host(f"dist{i}")
        assert str(dist.address_on(f"up{i}")) == f"198.18.{i}.2"
        assert str(dist.address_on("int")) == f"198.51.100.{1 + i}"
        assert str(dist.default_gateway) == f"198.18.{i}.1"
    router = topology.host("router")
    assert str(router.address_on("int")) == "198.51.100.1"  # the nodes' gateway: replies skip the distributors
    assert ("net.ipv4.fib_multipath_hash_policy", "1") in router.sysctls
    for web in topology.web_nodes:
        assert [str(a) for a in web.loopback] == [f"{VIP}/32"] and str(web.default_gateway) == "198.51.100.1"
        assert any(key.endswith("arp_ignore") and value == "1" for key, value in web.sysctls)
    (route,) = topology.host("client").routes
    assert str(route.destination) == f"{VIP}/32" and str(route.via) == "203.0.113.254"
    # veth port names in the switch namespace fit IFNAMSIZ (15 characters).
    big = build(50, active_active=4)
    assert all(len(f"{h.name}-{link.bridge}") <= 15 for h in big.hosts for link in h.links)


def test_the_monitor_host_joins_the_active_active_lan_too():
    topology = build(3, active_active=3, monitor=True)
    assert str(topology.host("monitor").address_on("int")) == "198.51.100.9"


def test_primary_backup_topology_is_unchanged():
    topology = build(3)
    assert {h.name for h in topology.hosts} == {"client", "dist1", "dist2", "web1", "web2", "web3"}
    assert all(not h.routes and not h.loopback for h in topology.hosts)


@pytest.mark.parametrize("kwargs, words", [({"active_active": 1}, "from 2 to 4"), ({"active_active": 5}, "from 2 to 4")])
def test_impossible_topologies_are_refused_by_name(kwargs, words):
    with pytest.raises(ValueError, match=words):
        build(3, **kwargs)


@pytest.mark.parametrize("options", [
    Options(mode="dsr"), Options(active_active=3, mode="rewrite", policy="maglev"),
    Options(active_active=3, mode="dsr", policy="round-robin"),
    Options(active_active=3, mode="dsr", policy="maglev", persistence=60),
])
def test_options_active_active_cannot_run_are_refused(options):
    with pytest.raises(ValueError):
        check_options(options)


def test_the_distributor_config_is_dsr_with_announce_and_no_failover(tmp_path):
    topology = build(3, active_active=3)
    options = Options(active_active=3, mode="dsr", policy="maglev")
    host = topology.host("dist2")
    config = parse(render_active_active_config(topology, options, host, tmp_path / "keys", tmp_path))
    assert config.mode is Mode.DSR and config.failover is None
    assert config.announce.table == 100 and config.announce.bird_config == str(tmp_path / "bird.conf")
    assert [s.policy.value for s in config.services] == ["maglev"]


def test_the_bird_configs_peer_each_distributor_with_the_router():
    topology = build(3, active_active=3)
    router = render_router_bird_config(topology, topology.host("router"))
    for i in (1, 2, 3):
        assert f"neighbor 198.18.{i}.2 as {65000 + i}" in router
    assert "merge paths on" in router and "bfd on" in router
    dist = render_distributor_bird_config(topology, topology.host("dist2"))
    assert "local as 65002" in dist and "neighbor 198.18.2.1 as 65000" in dist and "kernel table 100" in dist


@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD (Debian's bird2) is not installed: scripts/install.sh")
def test_bird_accepts_the_rendered_configs(tmp_path):
    topology = build(3, active_active=3)
    for name, text in (("router", render_router_bird_config(topology, topology.host("router"))),
                       ("dist1", render_distributor_bird_config(topology, topology.host("dist1")))):
        path = tmp_path / f"{name}.conf"
        path.write_text(text)
        result = subprocess.run(["bird", "-p", "-c", str(path)], capture_output=True, text=True)
        assert result.returncode == 0, f"{name}: {result.stderr}"


@pytest.mark.parametrize("argv", [
    ["up", "--active-active", "5"], ["up", "--mode", "dsr"], ["up", "--active-active", "3", "--policy", "round-robin"],
    ["up", "--active-active", "3", "--preempt"], ["up", "--active-active", "3", "--mode", "kernel"],
])
def test_the_cli_refuses_what_active_active_cannot_run(argv):
    with pytest.raises(SystemExit) as stopped:
        cli.main(argv)
    assert stopped.value.code == 2
