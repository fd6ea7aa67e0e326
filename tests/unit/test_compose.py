"""docker-compose.yml is the namespace testbed's topology, and stays so; its entrypoint and driver, without an engine."""

import ipaddress
import re
from pathlib import Path

import pytest
import yaml

from testbed import compose_cluster, container
from distributor import config as distributor_config
from distributor.api import parse_token_file
from distributor.daemon import guard_spec
from distributor.rules import render_guard
from testbed.compose import CONTAINER_SYSCTLS, KEYS_MOUNT, LAN_PORTS, MODE_VARIABLE, host_address, render, start_order
from testbed.topology import build

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def data():
    return yaml.safe_load(COMPOSE.read_text())


def test_committed_compose_file_is_generated_from_the_topology():
    assert COMPOSE.read_text() == render(build(3)), "regenerate: python -m testbed.compose > docker-compose.yml"


def test_compose_file_declares_every_host_with_its_addresses(data):
    topology = build(3)
    assert set(data["services"]) == {h.name for h in topology.hosts}
    for host in topology.hosts:
        networks = data["services"][host.name]["networks"]
        for link in host.links:
            assert networks[link.bridge]["ipv4_address"] == str(link.address.ip)
    gateways = {n: c["ipam"]["config"][0]["gateway"] for n, c in data["networks"].items()}
    assert str(topology.vip) not in gateways.values() and str(topology.gateway) not in gateways.values()


def test_floating_addresses_are_reserved_and_no_network_routes_outside(data):
    topology = build(3)
    reserved = {n: set(c["ipam"]["config"][0]["aux_addresses"].values()) for n, c in data["networks"].items()}
    assert reserved == {"ext": {str(topology.vip)}, "int": {str(topology.gateway)}}
    assert all(network["internal"] is True for network in data["networks"].values())


def test_start_order_makes_dist1_active_and_dist2_its_backup(data):
    depends = {name: service.get("depends_on", {}) for name, service in data["services"].items()}
    assert depends["dist2"] == {"dist1": {"condition": "service_healthy"}}
    assert depends["dist1"] == {f"web{n}": {"condition": "service_healthy"} for n in (1, 2, 3)}
    assert all(not depends[f"web{n}"] for n in (1, 2, 3))
    assert start_order(build(3))["dist2"] == ["dist1"]  # the entrypoint waits for the same hosts


def test_every_service_has_a_healthcheck_run_by_the_entrypoint(data):
    for name, service in data["services"].items():
        assert service["healthcheck"]["test"] == ["CMD", "python3", "-m", "testbed.container", "--health", name]


def test_distributors_take_the_mode_from_the_environment_and_get_the_conntrack_sysctl(data):
    for name in ("dist1", "dist2"):
        service = data["services"][name]
        assert service["environment"][MODE_VARIABLE] == "${DISTRIBUTOR_MODE:-rewrite}"
        for key, value in CONTAINER_SYSCTLS["distributor"]:
            assert service["sysctls"][key] == value


def test_no_secret_is_written_in_the_compose_file_and_the_key_volume_is_shared(data):
    text = COMPOSE.read_text()
    assert not re.search(r"[0-9a-f]{32,}", text), "a fixed key in docker-compose.yml would be a public secret"
    for name, service in data["services"].items():
        if name != "client":
            assert f"keys:{KEYS_MOUNT}" in service["volumes"]
    assert "keys" in data["volumes"]


def test_dockerfile_is_a_runtime_image_with_dependencies_before_the_project():
    dockerfile = (ROOT / "Dockerfile").read_text()
    steps = [line.split()[0] for line in dockerfile.splitlines() if line and not line.startswith((" ", "#"))]
    assert steps[:2] == ["ARG", "FROM"]
    packages, deps, project = (dockerfile.index(marker) for marker in
                               ("debian-packages.txt /tmp", ".compose/wheels/deps/", ".compose/wheels/project/"))
    assert packages < deps < project
    assert "[test" not in dockerfile and "install.sh" not in dockerfile
    assert "ln -s" not in dockerfile  # a linked venv python is not the venv's python


# -- the entrypoint --------------------------------------------------------------

METRICS = """\
# TYPE distributor_failover_role gauge
distributor_failover_role{role="starting"} 0.0
distributor_failover_role{role="backup"} 1.0
distributor_failover_role{role="active"} 0.0
"""


def test_role_is_read_from_the_metrics():
    assert container.role_from_metrics(METRICS) == "backup"
    assert container.role_from_metrics(METRICS.replace("1.0", "0.0")) is None


def test_mode_comes_from_the_environment_and_a_bad_one_is_named():
    assert container.mode_from_environment({}) == "rewrite"
    assert container.mode_from_environment({MODE_VARIABLE: "kernel"}) == "kernel"
    with pytest.raises(SystemExit, match="DISTRIBUTOR_MODE='fast' is not valid; expected one of rewrite, kernel"):
        container.mode_from_environment({MODE_VARIABLE: "fast"})


def test_distributor_serves_metrics_and_the_api_on_its_lan_address(tmp_path):
    topology = build(3)
    tokens = container.ensure_api_tokens(tmp_path, "dist2")
    text = container.distributor_config(topology, topology.host("dist2"), "kernel", tmp_path / "keys", tmp_path, tokens)
    assert f'listen = "198.51.100.3:{LAN_PORTS["metrics"]}"' in text
    assert 'mode = "kernel"' in text and "127.0.0.1" not in text
    config = distributor_config.parse(text)
    assert config.api.listen == ("198.51.100.3", LAN_PORTS["api"]) and config.api.tokens_file == str(tokens)
    assert {(t.role, t.name) for t in config.api.all_tokens()} == {("admin", "operator"), ("viewer", "watcher")}


def test_the_engines_host_address_may_reach_the_metrics_and_the_api_through_the_guard(tmp_path):
    topology = build(3)
    host = host_address(topology.bridges["int"])
    assert str(host) == "198.51.100.254"  # the int network's gateway in docker-compose.yml: the host's address there
    text = container.distributor_config(topology, topology.host("dist1"), "rewrite", tmp_path / "keys", tmp_path,
                                        container.ensure_api_tokens(tmp_path, "dist1"))
    assert f'[api]\nlisten = "198.51.100.2:{LAN_PORTS["api"]}"\nallow = ["{host}"]\n' in text
    config = distributor_config.parse(text)
    assert config.metrics_allow == (host,)
    assert config.api.allow == (ipaddress.IPv4Network(f"{host}/32"),)
    rules = render_guard(config.queue, guard_spec(config, "int0"))[("raw", f"DGRD{config.queue}-IN")]
    opened = [f"-A DGRD{config.queue}-IN -s {host}/32 -p tcp -m tcp --dport {LAN_PORTS[port]} -j RETURN"
              for port in ("metrics", "api")]
    # Those two ports only, before the drop of everything else to the distributor's own address
    # (README, "The compose testbed": distributorctl from a Docker host).
    assert [rule for rule in rules if f"-s {host}/32" in rule] == opened
    assert max(rules.index(rule) for rule in opened) < rules.index(next(r for r in rules if "-d 198.51.100.2/32" in r))


def test_every_compose_distributor_lets_the_host_reach_its_api(tmp_path):
    topology = build(3)
    tokens = container.ensure_api_tokens(tmp_path, "dist1")
    for dist in topology.by_role("distributor"):
        text = container.distributor_config(topology, topology.host(dist.name), "kernel", tmp_path / "keys", tmp_path,
                                            tokens)
        config = distributor_config.parse(text)
        assert config.api.listen == (str(dist.address_on("int")), LAN_PORTS["api"])
        assert [str(n) for n in config.api.allow] == [f"{host_address(topology.bridges['int'])}/32"]


def test_the_first_container_makes_the_key_and_the_others_use_it(tmp_path):
    first = container.ensure_key(tmp_path, "web1")
    secret = first.read_text()
    assert re.search(r"^1 [0-9a-f]{64}$", secret, re.M)
    assert container.ensure_key(tmp_path, "dist1").read_text() == secret
    assert [p.name for p in tmp_path.iterdir()] == ["keys"]  # no candidate left behind
    assert first.stat().st_mode & 0o077 == 0


def test_the_first_distributor_makes_the_api_tokens_and_the_other_uses_them(tmp_path):
    tokens = container.ensure_api_tokens(tmp_path, "dist1")
    text = tokens.read_text()
    assert container.ensure_api_tokens(tmp_path, "dist2").read_text() == text
    parsed = {t.role: t for t in parse_token_file(text, str(tokens))}  # the distributor's own reader
    assert set(parsed) == {"admin", "viewer"}
    for role, token in parsed.items():
        # distributorctl --token-file reads the first line: the bare token
        assert (tmp_path / f"{role}-token").read_text() == token.token + "\n"
        assert len(token.token) >= 16
    assert sorted(p.name for p in tmp_path.iterdir()) == ["admin-token", "api-tokens", "viewer-token"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.iterdir())
    other_run = tmp_path / "other"
    other_run.mkdir()
    assert container.ensure_api_tokens(other_run, "dist1").read_text() != text  # per run: no fixed default


# -- the driver -----------------------------------------------------------------

def test_health_order_starts_nodes_then_dist1_then_dist2():
    order = compose_cluster.ComposeCluster("cunit", "podman")._health_order()
    assert order.index("web3") < order.index("dist1") < order.index("dist2")
    assert order.index("dist1") < order.index("client")


def test_cache_keys_follow_their_inputs():
    key = compose_cluster.wheels_key(b"[project]", (3, 11), "x86_64")
    assert key == compose_cluster.wheels_key(b"[project]", (3, 11), "x86_64")
    assert key != compose_cluster.wheels_key(b"[project] changed", (3, 11), "x86_64")
    assert key != compose_cluster.wheels_key(b"[project]", (3, 12), "x86_64")
    base = compose_cluster.base_image_name(["nginx", "curl"])
    assert base == compose_cluster.base_image_name(["curl", "nginx"])
    assert base != compose_cluster.base_image_name(["curl", "nginx", "wrk"])
    assert base.startswith("localhost/distributor-base:bookworm-")


def test_image_packages_skip_comments():
    assert compose_cluster.image_packages("# list\npython3\n\n  nginx \n# more\n") == ["python3", "nginx"]
    assert "python3" in compose_cluster.image_packages() and "libnetfilter-queue1" in compose_cluster.image_packages()


def test_apt_mirror_is_read_from_deb822_and_one_line_sources(tmp_path):
    deb822 = tmp_path / "debian.sources"
    deb822.write_text("Types: deb\nURIs: http://security.example/debian-security\nSuites: bookworm-security\n\n"
                      "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n")
    assert compose_cluster.apt_mirror([deb822]) == "http://mirror.example/debian"
    one_line = tmp_path / "sources.list"
    one_line.write_text("deb [arch=amd64] http://old.example/debian bookworm main\n")
    assert compose_cluster.apt_mirror([one_line]) == "http://old.example/debian"
    assert compose_cluster.apt_mirror([tmp_path / "missing"]) == "http://deb.debian.org/debian"


def test_bad_names_are_refused_with_what_is_valid():
    with pytest.raises(compose_cluster.ComposeError, match="project name 'Bad_Name' is not valid"):
        compose_cluster.ComposeCluster("Bad_Name", "podman")
    with pytest.raises(compose_cluster.ComposeError, match="mode 'fast' is not valid; expected one of rewrite, kernel"):
        compose_cluster.ComposeCluster("cunit", "podman", "fast")
    with pytest.raises(compose_cluster.ComposeError, match="engine 'lxc' is not valid"):
        compose_cluster.ComposeCluster("cunit", "lxc")
