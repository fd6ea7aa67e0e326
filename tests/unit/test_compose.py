"""docker-compose.yml is the namespace testbed's topology, and stays so."""

from pathlib import Path

import yaml

from testbed.compose import render
from testbed.topology import build

COMPOSE = Path(__file__).parents[2] / "docker-compose.yml"


def test_committed_compose_file_is_generated_from_the_topology():
    assert COMPOSE.read_text() == render(build(3)), "regenerate: python -m testbed.compose > docker-compose.yml"


def test_compose_file_declares_every_host_with_its_addresses():
    data = yaml.safe_load(COMPOSE.read_text())
    topology = build(3)
    assert set(data["services"]) == {h.name for h in topology.hosts}
    for host in topology.hosts:
        networks = data["services"][host.name]["networks"]
        for link in host.links:
            assert networks[link.bridge]["ipv4_address"] == str(link.address.ip)
    gateways = {n: c["ipam"]["config"][0]["gateway"] for n, c in data["networks"].items()}
    assert str(topology.vip) not in gateways.values() and str(topology.gateway) not in gateways.values()
