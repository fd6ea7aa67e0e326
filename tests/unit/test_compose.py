"""docker-compose.yml is the namespace testbed's topology, and stays so; its entrypoint and driver, without an engine."""

import ipaddress
import json
import re
from pathlib import Path

import pytest
import yaml

from common import bundle
from testbed import compose_cluster, container, monitoring
from distributor import config as distributor_config
from distributor.api import parse_token_file
from distributor.daemon import guard_spec
from distributor.rules import render_guard
from node.agent import parse_config as parse_agent_config
from testbed.compose import (AGENT_METRICS_PORT, BROKER_PORT, CONTAINER_SYSCTLS, IMAGE, KEYS_MOUNT, LAN_PORTS,
                             MODE_VARIABLE, MONITOR_ADDRESS, MONITOR_BASE_VARIABLE, MONITOR_DOCKERFILE, MONITOR_IMAGE,
                             MONITOR_TARGET_FILES, host_address, monitor_targets, render, start_order)
from testbed.topology import build

ROOT = Path(__file__).parents[2]
COMPOSE = ROOT / "docker-compose.yml"


@pytest.fixture(scope="module")
def data():
    return yaml.safe_load(COMPOSE.read_text())


def default_services(data) -> dict:
    """The services `up` starts without a profile: the topology's hosts."""
    return {name: service for name, service in data["services"].items() if "profiles" not in service}


def test_committed_compose_file_is_generated_from_the_topology():
    assert COMPOSE.read_text() == render(build(3)), "regenerate: python -m testbed.compose > docker-compose.yml"


def test_compose_file_declares_every_host_with_its_addresses(data):
    topology = build(3)
    assert set(default_services(data)) == {h.name for h in topology.hosts}
    assert set(data["services"]) - set(default_services(data)) == {"monitor"}
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
    for name, service in default_services(data).items():
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
    for name, service in default_services(data).items():
        if name != "client":
            assert f"keys:{KEYS_MOUNT}" in service["volumes"]
    assert "volumes" not in data["services"]["monitor"]  # the monitor needs no secret
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
    assert config.metrics_allow == (host, MONITOR_ADDRESS)
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


# -- the monitor profile ---------------------------------------------------------

def test_the_monitor_is_a_profile_with_its_own_image_outside_the_default_start(data):
    monitor = data["services"]["monitor"]
    assert monitor["profiles"] == ["monitor"]
    assert monitor["image"] == MONITOR_IMAGE != IMAGE == data["x-image"]["image"]
    assert monitor["build"] == {"context": ".", "dockerfile": MONITOR_DOCKERFILE,
                                "args": {"BASE_IMAGE": f"${{{MONITOR_BASE_VARIABLE}:-debian:12}}"}}
    assert (ROOT / MONITOR_DOCKERFILE).is_file()
    assert monitor["healthcheck"]["test"] == ["CMD", "testbed-monitor", "--health"]
    # Nothing of the default start waits for it, and it runs as nobody's dependency.
    assert all("monitor" not in service.get("depends_on", {}) for service in data["services"].values())
    assert "cap_add" not in monitor and "sysctls" not in monitor


def test_the_monitor_has_a_fixed_lan_address_no_host_and_no_reserved_address_takes(data):
    topology = build(3)
    address = data["services"]["monitor"]["networks"]
    assert address == {"int": {"ipv4_address": str(MONITOR_ADDRESS)}}
    assert MONITOR_ADDRESS in topology.bridges["int"]
    taken = {str(link.address.ip) for host in topology.hosts for link in host.links}
    reserved = {a for n in data["networks"].values() for a in n["ipam"]["config"][0]["aux_addresses"].values()}
    gateways = {n["ipam"]["config"][0]["gateway"] for n in data["networks"].values()}
    assert str(MONITOR_ADDRESS) not in taken | reserved | gateways
    assert build(3, monitor=True).host("monitor").address_on("int") == MONITOR_ADDRESS  # the namespace testbed's


def test_the_monitor_scrapes_the_targets_the_namespace_testbeds_monitor_scrapes(data, tmp_path):
    environment = data["services"]["monitor"]["environment"]
    assert set(environment) == set(MONITOR_TARGET_FILES)
    monitoring.write_monitor_files(build(3, monitor=True), tmp_path)
    for variable, name in MONITOR_TARGET_FILES.items():
        assert json.loads(environment[variable]) == json.loads((tmp_path / "targets" / name).read_text()), variable
    distributors = json.loads(environment["DISTRIBUTOR_TARGETS"])
    assert [t["targets"] for t in distributors] == [[f"198.51.100.2:{LAN_PORTS['metrics']}"],
                                                    [f"198.51.100.3:{LAN_PORTS['metrics']}"]]
    # The entrypoint writes each variable to the file_sd file deploy's prometheus.yml reads.
    entrypoint = (ROOT / "testbed" / "image" / "monitor-entrypoint.sh").read_text()
    scrape = yaml.safe_load((ROOT / "deploy" / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    files = {f for job in scrape for sd in job.get("file_sd_configs", []) for f in sd["files"]}
    for variable, name in MONITOR_TARGET_FILES.items():
        assert f"write_targets {variable} {name}\n" in entrypoint
        assert f"targets/{name}" in files


def test_the_monitor_targets_follow_the_number_of_nodes():
    targets = monitor_targets(build(5))
    assert [t["labels"]["node"] for t in targets["NODE_AGENT_TARGETS"]] == [f"web{n}" for n in range(1, 6)]
    assert targets["NODE_AGENT_TARGETS"][4]["targets"] == [f"198.51.100.15:{AGENT_METRICS_PORT}"]
    text = render(build(5))
    assert json.loads(yaml.safe_load(text)["services"]["monitor"]["environment"]["NODE_AGENT_TARGETS"]) == \
        targets["NODE_AGENT_TARGETS"]


def test_a_topology_with_its_monitor_host_renders_the_same_file():
    assert render(build(3, monitor=True)) == render(build(3))


def test_the_monitor_reaches_the_distributors_metrics_port_and_nothing_else_through_the_guard(tmp_path):
    topology = build(3)
    tokens = container.ensure_api_tokens(tmp_path, "dist1")
    for dist in topology.by_role("distributor"):
        config = distributor_config.parse(container.distributor_config(topology, dist, "rewrite", tmp_path / "keys",
                                                                       tmp_path, tokens))
        assert MONITOR_ADDRESS in config.metrics_allow
        assert not any(MONITOR_ADDRESS in network for network in config.api.allow)
        rules = render_guard(config.queue, guard_spec(config, "int0"))[("raw", f"DGRD{config.queue}-IN")]
        assert [rule for rule in rules if f"-s {MONITOR_ADDRESS}/32" in rule] == [
            f"-A DGRD{config.queue}-IN -s {MONITOR_ADDRESS}/32 -p tcp -m tcp --dport {LAN_PORTS['metrics']} -j RETURN"]


def test_node_agents_serve_their_metrics_on_their_lan_address(tmp_path):
    topology = build(3)
    operator = container.ensure_operator_key(tmp_path, "web1")
    for web in topology.web_nodes:
        config = parse_agent_config(container.agent_config(topology, web, tmp_path / "keys", tmp_path / web.name,
                                                           operator))
        assert config.metrics_listen == (str(web.address_on("int")), AGENT_METRICS_PORT)
        assert config.node_id == web.name


def test_node_agents_run_their_broker_for_the_distributors_as_their_administration_reaches_it(tmp_path):
    topology = build(3)
    keys = container.ensure_key(tmp_path, "web1")
    operator = container.ensure_operator_key(tmp_path, "web1")
    tokens = container.ensure_api_tokens(tmp_path, "dist1")
    distributors = {d.name: distributor_config.parse(container.distributor_config(topology, d, "rewrite", keys,
                                                                                  tmp_path / d.name, tokens))
                    for d in topology.by_role("distributor")}
    for web in topology.web_nodes:
        directory = Path("/run/testbed") / web.name  # testbed.container.STATE / HOST: nginx's root is its www
        config = parse_agent_config(container.agent_config(topology, web, keys, directory, operator))
        broker = config.broker
        assert broker is not None, "a compose agent without [broker]: the distributors find no broker"
        assert broker.listen == (str(web.address_on("int")), BROKER_PORT)
        assert broker.document_root == directory / "www" and broker.bundle_dir == directory / "bundles"
        assert broker.keys_file is None and config.keys_file == str(keys)  # the heartbeat key on the keys volume
        assert broker.trusted_keys == (bundle.parse_public_key(operator),) and broker.bundles_enabled
        for name, dist in distributors.items():
            administration = dist.administration
            # The distributor signs as its name, with the same keys, from its LAN address, to the broker's port.
            assert administration.sender == name and broker.senders[name] == str(dist.failover.address)
            assert administration.keys_file == str(keys) and administration.options.broker_port == BROKER_PORT
            assert web.name in dist.nodes and str(dist.nodes[web.name]) == broker.listen[0]
        assert set(broker.senders) == set(distributors)


def test_the_guard_lets_the_brokers_answers_reach_every_distributor(tmp_path):
    topology = build(3)
    tokens = container.ensure_api_tokens(tmp_path, "dist1")
    for dist in topology.by_role("distributor"):
        config = distributor_config.parse(container.distributor_config(topology, dist, "kernel", tmp_path / "keys",
                                                                       tmp_path, tokens))
        chain = f"DGRD{config.queue}-IN"
        rules = render_guard(config.queue, guard_spec(config, "int0"))[("raw", chain)]
        first_drop = min(i for i, rule in enumerate(rules) if rule.endswith("-j DROP"))
        for web in topology.web_nodes:
            # A node's packets (its broker's answers among them, any port) pass before anything is dropped.
            assert rules.index(f"-A {chain} -s {web.address_on('int')}/32 -i int0 -j RETURN") < first_drop


def test_the_first_web_node_makes_the_operator_key_and_every_other_container_reads_it(tmp_path):
    public = container.ensure_operator_key(tmp_path, "web1")
    assert container.ensure_operator_key(tmp_path, "web2") == public
    private = bundle.load_private_key((tmp_path / "operator.key").read_bytes())
    assert bundle.public_key_text(private) == public == (tmp_path / "operator.key.pub").read_text().strip()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["operator.key", "operator.key.pub"]
    assert all(p.stat().st_mode & 0o077 == 0 for p in tmp_path.iterdir())
    # A bundle signed with it (distributor-sign in a container) opens on a node that trusts the run's key.
    data = bundle.make_bundle(private, "hello", 1, "low", 10, 64, "run.sh", {"run.sh": b"#!/bin/sh\n"})
    assert bundle.open_bundle(data, [bundle.parse_public_key(public)]).manifest.name == "hello"
    other_run = tmp_path / "other"
    other_run.mkdir()
    assert container.ensure_operator_key(other_run, "web1") != public  # per run: no fixed default


def test_the_monitor_image_is_its_own_and_the_runtime_image_stays_without_prometheus():
    runtime = (ROOT / "Dockerfile").read_text() + (ROOT / "testbed" / "image" / "debian-packages.txt").read_text()
    assert "prometheus" not in runtime
    monitor = (ROOT / MONITOR_DOCKERFILE).read_text()
    steps = [line.split()[0] for line in monitor.splitlines() if line and not line.startswith((" ", "#"))]
    assert steps[:2] == ["ARG", "FROM"] and "FROM ${BASE_IMAGE}" in monitor
    assert {"prometheus", "prometheus-alertmanager"} <= set(compose_cluster.image_packages(
        path=compose_cluster.MONITOR_PACKAGES_FILE))
    for source in ("deploy/prometheus/prometheus.yml", "deploy/prometheus/alertmanager.yml", "deploy/prometheus/rules/",
                   "testbed/image/monitor-entrypoint.sh"):
        assert source in monitor


def test_the_build_context_lets_in_what_each_dockerfile_copies():
    ignore = (ROOT / ".dockerignore").read_text().splitlines()
    assert "*" in ignore  # everything else stays out
    included = [line[1:].rstrip("/") for line in ignore if line.startswith("!")]
    for dockerfile in (ROOT / "Dockerfile", ROOT / MONITOR_DOCKERFILE):
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    source = source.rstrip("/")
                    assert any(source == i or source.startswith(i + "/") for i in included), (dockerfile.name, source)
                    if (ROOT / source).is_relative_to(compose_cluster.WHEELS):
                        # Made by `compose_cluster.py wheels` before every build, not kept in the repository.
                        assert source in ((compose_cluster.WHEELS / "deps").relative_to(ROOT).as_posix(),
                                          (compose_cluster.WHEELS / "project").relative_to(ROOT).as_posix()), source
                    else:
                        assert (ROOT / source).exists(), source


def test_profile_clusters_name_their_profile_and_their_images():
    plain = compose_cluster.ComposeCluster("cunit", "podman")
    monitored = compose_cluster.ComposeCluster("cunit", "podman", profiles=("monitor", "monitor"))
    assert monitored.profiles == ("monitor",)
    argv = monitored.compose_argv("up", "-d")
    assert argv[1:5] == ["--profile=monitor", "-p", "cunit", "-f"] and argv[-2:] == ["up", "-d"]
    assert "--profile=monitor" not in plain.compose_argv("up")
    assert "--profile=monitor" in plain.compose_argv("down", profiles=compose_cluster.PROFILES)  # down removes all
    assert [f.image for f in plain.flavours] == [IMAGE]
    assert [f.image for f in monitored.flavours] == [IMAGE, MONITOR_IMAGE]
    assert monitored.env[MONITOR_BASE_VARIABLE] == compose_cluster.base_image_name(flavour=compose_cluster.MONITOR)
    order = monitored._health_order()
    assert order[-1] == "monitor" and "monitor" not in plain._health_order()
    with pytest.raises(compose_cluster.ComposeError, match="profile 'grafana' is not valid; expected one of monitor"):
        compose_cluster.ComposeCluster("cunit", "podman", profiles=("grafana",))


def test_the_monitor_base_is_a_second_base_keyed_by_its_own_package_list():
    runtime = compose_cluster.base_image_name()
    monitor = compose_cluster.base_image_name(flavour=compose_cluster.MONITOR)
    assert runtime.startswith("localhost/distributor-base:bookworm-")
    assert monitor.startswith("localhost/distributor-monitor-base:bookworm-")
    packages = compose_cluster.image_packages(path=compose_cluster.MONITOR_PACKAGES_FILE)
    assert monitor == compose_cluster.base_image_name(list(reversed(packages)), compose_cluster.MONITOR)
    assert monitor != compose_cluster.base_image_name([*packages, "grafana"], compose_cluster.MONITOR)


def test_down_removes_every_profiles_containers(monkeypatch):
    calls = []
    monkeypatch.setattr(compose_cluster, "_run", lambda argv, **kw: calls.append(argv) or
                        compose_cluster.subprocess.CompletedProcess(argv, 0, "", ""))
    compose_cluster.ComposeCluster("cunit", "podman").down()
    down = next(argv for argv in calls if "down" in argv)
    assert "--profile=monitor" in down and down[down.index("-p") + 1] == "cunit"
