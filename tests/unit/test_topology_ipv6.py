"""The dual-stack testbed as data (no root): its IPv6 address plan, the configs it writes with and without
Options.ipv6, and what stays IPv4 only (docker compose, active-active).

The running testbed is exercised by the end-to-end tests' ``ipv6`` cases (tests/e2e/test_reroute_e2e.py,
test_health_e2e.py, test_failover_e2e.py, test_pmtu_e2e.py).
"""

from __future__ import annotations

import ipaddress
import socket

import pytest

from testbed.runner import Options, Testbed, render_distributor_config, write_web_files
from testbed.topology import EXT_NET6, GATEWAY6, INT_NET6, MONITOR6, VIP6, build


def test_every_link_of_the_dual_stack_testbed_has_its_ipv6_address_mirroring_the_ipv4_one():
    topology = build(3, monitor=True, ipv6=True)
    assert topology.ipv6 and topology.vip6 == VIP6 and topology.gateway6 == GATEWAY6
    assert topology.bridges6 == {"ext": EXT_NET6, "int": INT_NET6}
    expected = {
        "client": {"ext": "2001:db8:203::10"},
        "dist1": {"ext": "2001:db8:203::2", "int": "2001:db8:198::2"},
        "dist2": {"ext": "2001:db8:203::3", "int": "2001:db8:198::3"},
        "web1": {"int": "2001:db8:198::11"}, "web2": {"int": "2001:db8:198::12"}, "web3": {"int": "2001:db8:198::13"},
        "monitor": {"int": str(MONITOR6.ip)},
    }
    for host in topology.hosts:
        assert {link.bridge: str(link.address6.ip) for link in host.links} == expected[host.name], host.name
        for link in host.links:
            assert link.address6.network == topology.bridges6[link.bridge]
            # The IPv6 interface identifier is written as the IPv4 host part: .11 <-> ::11.
            assert str(link.address6.ip).rsplit(":", 1)[1] == str(link.address.ip).rsplit(".", 1)[1]
    addresses = [link.address6.ip for host in topology.hosts for link in host.links]
    assert len(addresses) == len(set(addresses)) and VIP6 not in addresses and GATEWAY6 not in addresses
    assert VIP6 in EXT_NET6 and GATEWAY6 in INT_NET6  # on-link: the client and the nodes resolve them by NDP
    assert all(ipaddress.IPv6Address(a) in ipaddress.IPv6Network("2001:db8::/32") for a in addresses)


def test_nodes_route_ipv6_via_the_floating_gateway_and_distributors_forward():
    topology = build(3, ipv6=True)
    for web in topology.web_nodes:
        assert web.default_gateway6 == GATEWAY6
    for host in topology.hosts:
        sysctls = dict(host.sysctls)
        # Nothing waits on DAD, and a downed link keeps its addresses (testbed kill/start).
        assert sysctls["net.ipv6.conf.default.accept_dad"] == "0"
        assert sysctls["net.ipv6.conf.all.keep_addr_on_down"] == "1"
        assert sysctls.get("net.ipv6.conf.all.forwarding") == ("1" if host.role == "distributor" else None)
    big = build(50, ipv6=True)
    assert str(big.host("web50").address6_on("int")) == "2001:db8:198::60"


def test_without_ipv6_the_topology_is_the_ipv4_one_docker_compose_renders():
    topology = build(3)
    assert not topology.ipv6 and topology.vip6 is None and topology.bridges6 == {}
    assert all(link.address6 is None and host.default_gateway6 is None
               for host in topology.hosts for link in host.links)
    assert not any(key.startswith("net.ipv6.") for host in topology.hosts for key, _ in host.sysctls)
    with pytest.raises(KeyError, match="not a dual-stack testbed"):
        topology.host("web1").address6_on("int")


def test_active_active_stays_ipv4_only():
    with pytest.raises(ValueError, match="IPv4 only"):
        build(3, active_active=3, ipv6=True)
    bed = Testbed("unitaa", Options(active_active=3, mode="dsr", policy="maglev", ipv6=True))
    assert not bed.topology.ipv6 and not bed.dual_stack


def test_the_namespace_testbed_is_dual_stack_and_options_ipv6_adds_the_ipv6_service():
    plain, dual = Testbed("unitv4", Options(ipv6=False)), Testbed("unitv6")
    assert plain.topology.ipv6 and not plain.dual_stack  # the network is dual stack either way
    assert Options().ipv6  # the default: the distributors serve the VIP6 too
    assert dual.dual_stack and dual.vip6 == "2001:db8:203::1"
    assert dual.url("/1m.bin", socket.AF_INET6) == "http://[2001:db8:203::1]/1m.bin"
    assert dual.url("/1m.bin") == "http://203.0.113.1/1m.bin"
    assert dual.vip_of(socket.AF_INET6) == dual.vip6 and dual.vip_of(socket.AF_INET) == dual.vip


def _config(tmp_path, **options) -> str:
    topology = build(3, ipv6=True)
    return render_distributor_config(topology, Options(**options), topology.host("dist2"), tmp_path / "keys", tmp_path,
                                     tmp_path / "tokens")


def test_the_distributor_config_has_the_ipv6_service_and_floating_addresses_only_with_options_ipv6(tmp_path):
    ipv4_only = _config(tmp_path, ipv6=False)
    assert "address6" not in ipv4_only and "http6" not in ipv4_only and "2001:db8" not in ipv4_only
    text = _config(tmp_path, policy="least-outstanding")
    for n in (1, 2, 3):
        assert f'[nodes.web{n}]\naddress = "198.51.100.1{n}"\naddress6 = "2001:db8:198::1{n}"\n' in text
    assert ('[[services]]\nname = "http6"\nvip = "2001:db8:203::1"\nport = 80\npolicy = "least-outstanding"\n'
            'backends = ["web1", "web2", "web3"]\n') in text
    assert '{ address = "2001:db8:203::1/64", interface = "ext0" }' in text
    assert '{ address = "2001:db8:198::1/64", interface = "int0" }' in text
    # Everything else (the IPv4 service, heartbeats, sync, API) is as without IPv6.
    assert text.replace("address6", "").count('name = "http"') == 1
    without = [line for line in text.splitlines() if "2001:db8" not in line and "http6" not in line]
    assert set(ipv4_only.splitlines()) - {'policy = "round-robin"'} <= set(without)


def test_the_dual_stack_distributor_config_parses(tmp_path):
    from distributor.config import ConfigError, parse

    try:
        config = parse(_config(tmp_path))
    except ConfigError as exc:
        pytest.fail(f"the distributor refuses the testbed's dual-stack config: {exc}")
    services = {s.name: s for s in config.services}
    assert str(services["http6"].vip) == "2001:db8:203::1"
    assert {b.name: str(b.address) for b in services["http6"].backends} == {
        "web1": "2001:db8:198::11", "web2": "2001:db8:198::12", "web3": "2001:db8:198::13"}
    assert {b.name: str(b.address) for b in services["http"].backends}["web1"] == "198.51.100.11"


def test_nginx_listens_on_the_nodes_ipv6_address_too(tmp_path):
    topology = build(2, ipv6=True)
    write_web_files(topology, topology.host("web2"), tmp_path, content_too=False)
    text = (tmp_path / "nginx.conf").read_text()
    assert "listen 198.51.100.12:80 backlog=4096;" in text and "listen [2001:db8:198::12]:80 backlog=4096;" in text
    write_web_files(build(2), build(2).host("web2"), tmp_path, content_too=False)
    assert "[" not in (tmp_path / "nginx.conf").read_text().split("server {")[1].split("root")[0]


def test_the_cli_refuses_ipv6_with_active_active():
    from testbed import cli

    with pytest.raises(SystemExit) as stopped:
        cli.main(["up", "--active-active", "3", "--ipv6"])
    assert stopped.value.code == 2
