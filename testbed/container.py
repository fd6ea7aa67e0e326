"""Entrypoint of the docker compose testbed: one container plays one topology host.

Contract: ``python -m testbed.container HOST`` prepares the container the way
the namespace runner prepares a namespace (floating addresses on the primary,
the default route of web nodes, configs and web content from the same
renderers) and then runs the host's services.  The number of web nodes comes
from ``TESTBED_NODES`` (default 3).  It runs only inside a container with
NET_ADMIN; the namespace runner does not use it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from .runner import Options, render_agent_config, render_distributor_config, write_web_files
from .topology import build

STATE = Path("/run/testbed")
DEMO_KEY = "64656d6f206b6579206f66207468652064697374726962757465722074657374"  # only for the compose demo


def _interface_with(address: str) -> str:
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout)
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("local") == address:
                return link["ifname"]
    raise SystemExit(f"testbed.container: no interface holds {address}; is this container on the compose networks?")


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    if len(args) != 1:
        print("usage: python -m testbed.container HOST", file=sys.stderr)
        return 2
    topology = build(int(os.environ.get("TESTBED_NODES", "3")))
    host = topology.host(args[0])
    directory = STATE / host.name
    directory.mkdir(parents=True, exist_ok=True)
    if host.default_gateway is not None:
        subprocess.run(["ip", "route", "replace", "default", "via", str(host.default_gateway)], check=True)
    if host.role == "distributor":
        # Compose names interfaces in attachment order; the config names them as the runner does.
        for link in host.links:
            current = _interface_with(str(link.address.ip))
            if current != link.ifname:
                subprocess.run(["ip", "link", "set", current, "down"], check=True)
                subprocess.run(["ip", "link", "set", current, "name", link.ifname], check=True)
                subprocess.run(["ip", "link", "set", link.ifname, "up"], check=True)
    keys = STATE / "keys"
    # Compose cannot generate a per-run secret; it passes one in TESTBED_KEY (see docker-compose.yml).
    keys.write_text(f"1 {os.environ.get('TESTBED_KEY', DEMO_KEY)}\n")
    keys.chmod(0o600)
    if "agent" in host.services:
        (directory / "agent.toml").write_text(render_agent_config(topology, host, keys))
        subprocess.Popen([sys.executable, "-m", "node.agent", "--config", str(directory / "agent.toml")])
    if "nginx" in host.services:
        write_web_files(topology, host, directory)
        os.execvp("nginx", ["nginx", "-c", str(directory / "nginx.conf"), "-p", str(directory), "-e", "/dev/stderr"])
    if "distributor" in host.services:
        config = directory / "distributor.toml"
        config.write_text(render_distributor_config(topology, Options(nodes=len(topology.web_nodes)), host, keys, directory))
        os.execvp(sys.executable, [sys.executable, "-m", "distributor.daemon", "--config", str(config)])
    os.execvp("sleep", ["sleep", "infinity"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
