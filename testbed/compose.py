"""Generates docker-compose.yml from the testbed topology.

Contract: ``python -m testbed.compose [--nodes N] > docker-compose.yml``
prints the compose file for the same topology the namespace runner builds;
a unit test checks that the committed file is exactly this output.  The file
works on Docker Compose v2 and on podman-compose (the README's compose
section, and ``testbed.compose_cluster``, which drives either):

* one image for every host (``Dockerfile``), built from wheels made on the
  host (``python -m testbed.compose_cluster wheels``), so the build needs no
  package index;
* start order by healthchecks: web nodes healthy, then dist1, then dist2
  (``depends_on: condition: service_healthy``), so dist1 becomes the active
  distributor.  Engines that ignore conditions (podman < 4.6 through
  podman-compose) get the same order from the entrypoint, which waits for
  the hosts a distributor depends on (``testbed.container``);
* the floating addresses (VIP, the nodes' gateway) reserved with
  ``aux_addresses``, the Docker bridges' own addresses moved to .254;
* the data path chosen by ``DISTRIBUTOR_MODE`` (``rewrite`` or ``kernel``);
* the heartbeat key made by the first container that starts, on the
  ``keys`` volume: each run that starts from an empty volume gets its own
  secret, and there is no public default; the control-API tokens likewise
  (made by the first distributor; ``testbed.container``), and the operator
  key that signs task bundles, which every agent trusts (by the first web node);
* each distributor's metrics and control API on its cluster-LAN address
  (:data:`LAN_PORTS`).  The distributor's guard lets the engine's host address
  on that bridge (:func:`host_address`, when the engine gives the host one)
  reach both ports (``[metrics] allow``, ``[api] allow``); on engines that give
  the host no address there (podman), ``exec`` in a distributor reaches them;
* every node agent's broker on its cluster-LAN address (:data:`BROKER_PORT`),
  configured as the namespace runner configures it (``testbed.container``):
  the active distributor pushes content and bundles and runs tasks there
  (``distributorctl content ...``, ``task ...`` in a distributor); the
  requests leave from the distributor's LAN address, the one each broker pins
  to its name, and the answers come back from node addresses, which the
  distributor's guard lets through (its rules match the service port only);
* both networks ``internal``: nothing in the cluster routes to the outside.

:data:`PROFILE_SERVICES` renders optional services under compose profiles, each
with its own image so that the runtime image of every run stays as it is:

* ``monitor`` (``--profile monitor``): Debian's prometheus and
  prometheus-alertmanager with deploy/prometheus's files
  (``testbed/image/Dockerfile.monitor``, packages in
  ``testbed/image/monitor-packages.txt``), at :data:`MONITOR_ADDRESS` on the
  cluster LAN (the namespace testbed's monitor address, outside the hosts' and
  the reserved ones), scraping the distributors (:data:`LAN_PORTS`) and the
  node agents (:data:`AGENT_METRICS_PORT`, which every web node serves on its
  LAN address) at the targets :func:`monitor_targets` renders from the
  topology; the distributors' guard lets that address reach the metrics port
  (``[metrics] allow``, ``testbed.container``), nothing else.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import sys
from typing import Callable

from .monitoring import AGENT_METRICS_PORT, ALERTMANAGER_PORT, PROMETHEUS_PORT
# BROKER_PORT: every node agent's broker (node/broker.py) listens there on its cluster-LAN address.
from .runner import API_PORT, BROKER_PORT, METRICS_PORT
from .topology import MONITOR, Host, Topology, build

IMAGE = "distributor-testbed"
KEYS_VOLUME = "keys"
KEYS_MOUNT = "/run/testbed-keys"  # testbed.container reads the same path
MODE_VARIABLE = "DISTRIBUTOR_MODE"
BASE_IMAGE_VARIABLE = "DISTRIBUTOR_BASE_IMAGE"

# Ports a distributor serves on its cluster-LAN address, for the host (Docker gives
# it an address on every bridge, internal ones included: host_address) and for the
# cluster's containers.  testbed.container configures both there.
LAN_PORTS: dict[str, int] = {"metrics": METRICS_PORT, "api": API_PORT}

# The monitor profile's service: its own image (Debian's prometheus and alertmanager stay out of
# IMAGE), from the same base as IMAGE (DISTRIBUTOR_MONITOR_BASE_IMAGE on podman: a local base
# with its packages, testbed.compose_cluster), at the namespace testbed's monitor address.
MONITOR_PROFILE = "monitor"
MONITOR_IMAGE = "distributor-testbed-monitor"
MONITOR_DOCKERFILE = "testbed/image/Dockerfile.monitor"
MONITOR_BASE_VARIABLE = "DISTRIBUTOR_MONITOR_BASE_IMAGE"
MONITOR_ADDRESS = MONITOR.ip
MONITOR_PORTS: dict[str, int] = {"prometheus": PROMETHEUS_PORT, "alertmanager": ALERTMANAGER_PORT}
# The monitor's entrypoint (testbed/image/monitor-entrypoint.sh) writes each variable's JSON to
# the file_sd file of deploy/prometheus/prometheus.yml named here.
MONITOR_TARGET_FILES: dict[str, str] = {"DISTRIBUTOR_TARGETS": "distributors.json",
                                        "NODE_AGENT_TARGETS": "node-agents.json"}

# A container's /proc/sys is read-only, so sysctls the programs would write themselves
# are set by the engine when it creates the container.  Kernel mode makes conntrack
# accept segments without window history after a takeover (datapath.Conntrack.be_liberal).
CONTAINER_SYSCTLS: dict[str, tuple[tuple[str, str], ...]] = {
    "distributor": (("net.netfilter.nf_conntrack_tcp_be_liberal", "1"),),
}

HEALTH = {"interval": "2s", "timeout": "3s", "retries": "3", "start_period": "30s"}

HEADER = """\
# Generated by `python -m testbed.compose` from testbed/topology.py; do not edit by hand.
# The cluster of `cluster-testbed up`, as containers (README, "The compose testbed"):
#   .venv/bin/python -m testbed.compose_cluster wheels    # the wheels the image installs offline
#   docker compose up --build --wait                      # DISTRIBUTOR_MODE=kernel for kernel mode
#   docker compose exec client curl -si http://203.0.113.1/
#   docker compose exec dist1 distributorctl --url http://198.51.100.2:8410 --token-file /run/testbed-keys/admin-token nodes
#   docker compose down -v                                # -v also drops this run's key
# Prometheus and Alertmanager too (198.51.100.9:9090, :9093): --profile monitor after `compose`, in `up` and `down`.
# podman: bash scripts/install-compose.sh, then .venv/bin/python -m testbed.compose_cluster [--profile monitor] up
"""


def monitor_targets(topology: Topology) -> dict[str, list[dict]]:
    """The monitor's scrape targets, {variable: file_sd list}: both distributors' metrics on their
    LAN addresses, labelled ``distributor``, and every node agent's, labelled ``node`` (the labels
    deploy/prometheus's rules use; testbed.monitoring writes the same for the namespace testbed)."""
    return {
        "DISTRIBUTOR_TARGETS": [{"targets": [f"{h.address_on('int')}:{LAN_PORTS['metrics']}"],
                                 "labels": {"distributor": h.name}} for h in topology.by_role("distributor")],
        "NODE_AGENT_TARGETS": [{"targets": [f"{h.address_on('int')}:{AGENT_METRICS_PORT}"], "labels": {"node": h.name}}
                               for h in topology.web_nodes],
    }


def monitor_service(topology: Topology) -> str:
    out = [
        f"  {MONITOR_PROFILE}:\n",
        f"    image: {MONITOR_IMAGE}\n",
        "    build:\n      context: .\n",
        f"      dockerfile: {MONITOR_DOCKERFILE}\n",
        "      args:\n",
        f'        BASE_IMAGE: "${{{MONITOR_BASE_VARIABLE}:-debian:12}}"\n',
        f'    profiles: ["{MONITOR_PROFILE}"]\n',
        f"    hostname: {MONITOR_PROFILE}\n",
        "    environment:\n",
    ]
    # Single-quoted YAML: JSON has no single quote, and no `$` for compose to interpolate.
    out += [f"      {variable}: '{json.dumps(targets)}'\n" for variable, targets in monitor_targets(topology).items()]
    out.append("    healthcheck:\n")
    out.append('      test: ["CMD", "testbed-monitor", "--health"]\n')
    out += [f"      {key}: {value}\n" for key, value in HEALTH.items()]
    out.append(f"    networks:\n      int:\n        ipv4_address: {MONITOR_ADDRESS}\n")
    return "".join(out)


# Functions rendering optional services (each returns YAML text indented as a service
# under `services:`, with its own `profiles: [...]`), and the profiles they make.
PROFILE_SERVICES: list[Callable[[Topology], str]] = [monitor_service]
PROFILES = (MONITOR_PROFILE,)


def host_address(network: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    """The bridge's own address (the host's, on engines that give the host one): clear of the topology's."""
    return network.broadcast_address - 1


def _depends_on(topology: Topology, host: Host) -> list[str]:
    """The hosts that must be healthy before ``host`` starts, as the namespace runner orders them."""
    if host.role == "distributor":
        mine = topology.priorities[host.name]
        higher = [d.name for d in topology.by_role("distributor") if topology.priorities[d.name] > mine]
        # The primary waits for the nodes (it hears their heartbeats from its first tick);
        # a backup waits for the distributors that outrank it, so they become active first.
        return higher or [w.name for w in topology.web_nodes]
    if host.role == "client":
        return [max(topology.by_role("distributor"), key=lambda d: topology.priorities[d.name]).name]
    return []


def start_order(topology: Topology) -> dict[str, list[str]]:
    """Every host's dependencies (the entrypoint waits for the same ones)."""
    return {host.name: _depends_on(topology, host) for host in topology.hosts}


def _healthcheck(host: Host) -> str:
    lines = [
        "    healthcheck:\n",
        f'      test: ["CMD", "python3", "-m", "testbed.container", "--health", "{host.name}"]\n',
    ]
    lines += [f"      {key}: {value}\n" for key, value in HEALTH.items()]
    return "".join(lines)


def _service(topology: Topology, host: Host) -> str:
    out = [f"  {host.name}:\n", "    <<: *image\n", f"    hostname: {host.name}\n"]
    out.append(f'    command: ["python3", "-m", "testbed.container", "{host.name}"]\n')
    out.append(f'    environment:\n      TESTBED_NODES: "{len(topology.web_nodes)}"\n')
    if host.role == "distributor":
        out.append(f'      {MODE_VARIABLE}: "${{{MODE_VARIABLE}:-rewrite}}"\n')
    if host.role != "client":
        out.append("    cap_add: [NET_ADMIN, NET_RAW]\n")
        out.append(f"    volumes:\n      - {KEYS_VOLUME}:{KEYS_MOUNT}\n")
    sysctls = host.sysctls + CONTAINER_SYSCTLS.get(host.role, ())
    if sysctls:
        out.append("    sysctls:\n")
        out += [f'      {key}: "{value}"\n' for key, value in sysctls]
    out.append(_healthcheck(host))
    depends = _depends_on(topology, host)
    if depends:
        out.append("    depends_on:\n")
        out += [f"      {name}:\n        condition: service_healthy\n" for name in depends]
    out.append("    networks:\n")
    for link in host.links:
        out.append(f"      {link.bridge}:\n        ipv4_address: {link.address.ip}\n")
    return "".join(out)


def render(topology: Topology) -> str:
    out = [HEADER, "name: distributor-testbed\n"]
    out.append(
        "x-image: &image\n"
        f"  image: {IMAGE}\n"
        "  build:\n"
        "    context: .\n"
        "    args:\n"
        f'      BASE_IMAGE: "${{{BASE_IMAGE_VARIABLE}:-debian:12}}"\n'
    )
    out.append("services:\n")
    for host in topology.hosts:
        if host.role != "monitor":  # a topology built with monitor=True: the profile renders it
            out.append(_service(topology, host))
    for profile_service in PROFILE_SERVICES:
        out.append(profile_service(topology))
    out.append("networks:\n")
    floating = {"ext": {"vip": topology.vip}, "int": {"gateway": topology.gateway}}
    for bridge, network in topology.bridges.items():
        out.append(f"  {bridge}:\n    internal: true\n    ipam:\n      config:\n")
        out.append(f"        - subnet: {network}\n          gateway: {host_address(network)}\n")
        out.append("          aux_addresses:\n")
        out += [f"            {name}: {address}\n" for name, address in floating[bridge].items()]
    out.append(f"volumes:\n  {KEYS_VOLUME}: {{}}\n")
    return "".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    args = parser.parse_args(argv)
    sys.stdout.write(render(build(args.nodes)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
