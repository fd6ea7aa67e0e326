"""Entrypoint of the compose testbed: one container plays one topology host.

Contract
--------
``python -m testbed.container HOST`` prepares the container the way the
namespace runner prepares a namespace (floating addresses on the primary, the
default route of web nodes, configs and web content from the same renderers)
and then runs the host's services in the foreground:

* the heartbeat key comes from the ``keys`` volume (docker-compose.yml); the
  first container to start makes it (a fresh secret, created with ``link(2)``
  so that two containers starting together agree on one);
* the control-API tokens come from the same volume, made the same way by the
  first distributor: ``api-tokens`` (the distributors' ``[api] tokens_file``,
  one admin and one viewer token) and ``admin-token``, ``viewer-token`` (the
  bare token, for ``distributorctl --token-file``), all mode 0600;
* distributors use ``DISTRIBUTOR_MODE`` (``rewrite`` or ``kernel``) and serve
  their metrics and their control API on their cluster-LAN address
  (``testbed.compose.LAN_PORTS``); the guard lets the engine's host address on
  the cluster LAN (``testbed.compose.host_address``) reach both ports
  (``[metrics] allow``, ``[api] allow``), and the ``monitor`` profile's address
  (``testbed.compose.MONITOR_ADDRESS``) the metrics port only;
* node agents serve their metrics on their cluster-LAN address
  (``testbed.compose.AGENT_METRICS_PORT``), for the ``monitor`` profile,
  and run their broker there (``[broker]`` as the namespace runner renders it,
  on ``testbed.compose.BROKER_PORT``), for the distributors' ``[administration]``:
  the distributors by name and LAN address as senders, the heartbeat key on
  the keys volume as the brokers' key, content in the nginx root;
* the run's operator key (signs task bundles) comes from the keys volume too,
  made like the heartbeat key by the first web node: ``operator.key`` (0600)
  and ``operator.key.pub``, which every agent trusts (``[broker.bundles]``),
  so ``distributor-sign sign --key /run/testbed-keys/operator.key`` in a
  container signs a bundle the nodes run.  A testbed's shortcut: a real
  operator key stays off the cluster;
* before it starts, a host waits (at most ``TESTBED_START_WAIT`` seconds,
  default 60) for the hosts it depends on to be healthy, the same order the
  compose file's ``depends_on`` gives, for engines that ignore its conditions;
* the client idles until it is stopped (SIGTERM ends it at once).

``python -m testbed.container --health HOST`` is the compose healthcheck:
exit 0 when the host is healthy (a web node answers ``/health``, a
distributor holds a settled role, the client reaches the VIP), 1 otherwise,
with the reason on stdout.  The number of web nodes comes from
``TESTBED_NODES`` (default 3).  It runs only inside a container with
NET_ADMIN; the namespace runner does not use it.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

from .compose import (AGENT_METRICS_PORT, KEYS_MOUNT, LAN_PORTS, MODE_VARIABLE, MONITOR_ADDRESS, host_address,
                      start_order)
from .runner import Options, render_agent_config, render_distributor_config, write_web_files
from .topology import Host, Topology, build

STATE = Path("/run/testbed")
OPERATOR_KEY = "operator.key"  # on the keys volume, with OPERATOR_KEY.pub beside it
API_TOKENS = "api-tokens"  # on the keys volume: "ROLE NAME TOKEN" lines, the distributors' [api] tokens_file
API_ROLES = {"admin": "operator", "viewer": "watcher"}  # role: the token's name (as the namespace runner names them)
MODES = ("rewrite", "kernel")
SETTLED_ROLES = ("active", "backup")
_ROLE_SAMPLE = re.compile(r'^distributor_failover_role\{role="(\w+)"\} 1(?:\.0)?$', re.M)
_METRICS_LISTEN = re.compile(r'^(\[metrics\]\nlisten = )"127\.0\.0\.1:(\d+)"$', re.M)
_API_LISTEN = re.compile(r'^\[api\]\nlisten = "([\d.]+):(\d+)"$', re.M)


def log(message: str) -> None:
    print(f"testbed.container: {message}", file=sys.stderr, flush=True)


def role_from_metrics(text: str) -> str | None:
    """The failover role a distributor's /metrics reports (None when it reports none)."""
    match = _ROLE_SAMPLE.search(text)
    return match.group(1) if match else None


def mode_from_environment(environ: dict[str, str]) -> str:
    mode = environ.get(MODE_VARIABLE, "rewrite") or "rewrite"
    if mode not in MODES:
        raise SystemExit(f"testbed.container: {MODE_VARIABLE}={mode!r} is not valid; expected one of {', '.join(MODES)}")
    return mode


def distributor_config(topology: Topology, host: Host, mode: str, keys: Path, directory: Path, api_tokens: Path) -> str:
    """The runner's distributor config (its control API on the cluster-LAN address, with ``api_tokens``), with
    metrics on the cluster-LAN address instead of loopback; both open to the engine's host address there, and
    the metrics to the monitor profile's address (whether or not the profile runs: nothing else takes it)."""
    text = render_distributor_config(topology, Options(nodes=len(topology.web_nodes), mode=mode), host, keys, directory,
                                     api_tokens)
    lan = host.address_on("int")
    allow = host_address(topology.bridges["int"])
    scrapers = ", ".join(f'"{address}"' for address in (allow, MONITOR_ADDRESS))
    text, replaced = _METRICS_LISTEN.subn(lambda m: f'{m.group(1)}"{lan}:{LAN_PORTS["metrics"]}"\nallow = [{scrapers}]',
                                          text)
    if replaced != 1:
        raise RuntimeError("testbed.container: the runner's distributor config has no `[metrics] listen = \"127.0.0.1:PORT\"` to move")
    api = _API_LISTEN.search(text)
    if api is None or (api.group(1), int(api.group(2))) != (str(lan), LAN_PORTS["api"]):
        raise RuntimeError(f"testbed.container: the runner's distributor config has no `[api] listen = \"{lan}:"
                           f"{LAN_PORTS['api']}\"` (testbed.compose.LAN_PORTS)")
    return f'{text[:api.end()]}\nallow = ["{allow}"]{text[api.end():]}'


def agent_config(topology: Topology, host: Host, keys: Path, directory: Path, operator_public: str) -> str:
    """The runner's agent config with its broker (the runner's [broker]: on the cluster-LAN address, the distributors
    as senders, content in ``directory``/www, trusting ``operator_public``), and the agent's metrics on its
    cluster-LAN address (the monitor scrapes them)."""
    return (f'{render_agent_config(topology, host, keys, directory, operator_public)}\n[metrics]\n'
            f'listen = "{host.address_on("int")}:{AGENT_METRICS_PORT}"\n')


def _publish(path: Path, text: str, host: str) -> bool:
    """Make ``path`` (mode 0600) with ``text`` unless it exists; True when this call made it.  The file is
    written beside it and linked into place: ``link(2)`` fails if another container linked its own first,
    and then that one stays, so containers starting together agree on one."""
    if path.exists():
        return False
    candidate = path.with_name(f".{path.name}.{host}.{secrets.token_hex(4)}")
    fd = os.open(candidate, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others, not even briefly
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.link(candidate, path)
        return True
    except FileExistsError:
        return False
    finally:
        candidate.unlink()


def ensure_key(directory: Path, host: str) -> Path:
    """The run's key file on the shared volume, made here if no container made it yet."""
    keys = directory / "keys"
    if _publish(keys, f"# heartbeat keys of this compose run, made by {host}\n1 {secrets.token_hex(32)}\n", host):
        log(f"made this run's heartbeat key in {keys}")
    return keys


def ensure_operator_key(directory: Path, host: str) -> str:
    """The run's operator public key (``ed25519:...``), its key pair on the shared volume made here if no container
    made it yet: ``operator.key`` (PEM, 0600) and ``operator.key.pub``, derived from whichever key was linked first."""
    from common import bundle

    private = directory / OPERATOR_KEY
    if _publish(private, bundle.private_key_pem(bundle.generate_private_key()).decode(), host):
        log(f"made this run's operator key (signs task bundles) in {private}")
    public = bundle.public_key_text(bundle.load_private_key(private.read_bytes()))
    _publish(directory / f"{OPERATOR_KEY}.pub", public + "\n", host)
    return public


def read_api_token(tokens: Path, role: str) -> str:
    """The token of ``role`` in an ``api-tokens`` file."""
    for line in tokens.read_text().splitlines():
        parts = line.split("#", 1)[0].split()
        if len(parts) == 3 and parts[0] == role:
            return parts[2]
    raise RuntimeError(f"testbed.container: no {role} token in {tokens}")


def ensure_api_tokens(directory: Path, host: str) -> Path:
    """The run's control-API tokens on the shared volume, made here if no container made them yet: the
    distributors' tokens file (returned), and ``ROLE-token`` per role holding that role's bare token."""
    tokens = directory / API_TOKENS
    lines = "".join(f"{role} {name} {secrets.token_urlsafe(24)}\n" for role, name in API_ROLES.items())
    if _publish(tokens, f"# control-API tokens of this compose run, made by {host}\n{lines}", host):
        log(f"made this run's control-API tokens in {tokens}")
    for role in API_ROLES:
        # Derived from the file every distributor reads, so whichever container writes it writes the same.
        _publish(directory / f"{role}-token", read_api_token(tokens, role) + "\n", host)
    return tokens


def _get(address: str, port: int, path: str, timeout: float = 1.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def health(topology: Topology, host: Host) -> tuple[bool, str]:
    """Is ``host`` healthy? (ok, reason).  Probes its cluster-LAN address (the VIP for the client),
    so any host on that network can ask, the host itself included."""
    try:
        if host.role == "web":
            status, _ = _get(str(host.address_on("int")), topology.vip_port, "/health")
            return status == 200, f"/health answered {status}"
        if host.role == "distributor":
            status, body = _get(str(host.address_on("int")), LAN_PORTS["metrics"], "/metrics")
            role = role_from_metrics(body.decode(errors="replace")) if status == 200 else None
            return role in SETTLED_ROLES, f"role {role}" if role else f"/metrics answered {status}, no role"
        status, _ = _get(str(topology.vip), topology.vip_port, "/health")
        return status == 200, f"the VIP answered {status}"
    except OSError as exc:
        return False, f"{type(exc).__name__}: {exc}"


def wait_for_dependencies(topology: Topology, host: Host, timeout: float) -> None:
    """Wait for the hosts ``host`` depends on, probing them over the network, at most ``timeout`` s."""
    waiting = start_order(topology)[host.name]
    if not waiting:
        return
    log(f"{host.name} waits for {', '.join(waiting)} to be healthy (at most {timeout:.0f} s)")
    deadline = time.monotonic() + timeout
    reasons: dict[str, str] = {}
    while waiting and time.monotonic() < deadline:
        for name in list(waiting):
            ok, reasons[name] = health(topology, topology.host(name))
            if ok:
                waiting.remove(name)
        if waiting:
            time.sleep(0.2)
    if waiting:
        log(f"starting anyway: {', '.join(f'{n} ({reasons.get(n)})' for n in waiting)} not healthy after {timeout:.0f} s")


def _interface_with(address: str) -> str:
    links = json.loads(subprocess.run(["ip", "-j", "addr", "show"], capture_output=True, text=True, check=True).stdout)
    for link in links:
        for info in link.get("addr_info", []):
            if info.get("local") == address:
                return link["ifname"]
    raise SystemExit(f"testbed.container: no interface holds {address}; is this container on the compose networks?")


def _idle() -> None:
    # PID 1 ignores signals it has no handler for: without one, `stop` waits its whole grace period.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    while True:
        signal.pause()


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    checking = args[:1] == ["--health"]
    if checking:
        args = args[1:]
    if len(args) != 1:
        print("usage: python -m testbed.container [--health] HOST", file=sys.stderr)
        return 2
    topology = build(int(os.environ.get("TESTBED_NODES", "3")))
    host = topology.host(args[0])
    if checking:
        ok, reason = health(topology, host)
        print(f"{host.name}: {'healthy' if ok else 'not healthy'}: {reason}")
        return 0 if ok else 1

    mode = mode_from_environment(dict(os.environ))
    directory = STATE / host.name
    directory.mkdir(parents=True, exist_ok=True)
    if host.default_gateway is not None:
        subprocess.run(["ip", "route", "replace", "default", "via", str(host.default_gateway)], check=True)
    if host.role == "distributor":
        # Engines name interfaces in attachment order; the config names them as the runner does.
        for link in host.links:
            current = _interface_with(str(link.address.ip))
            if current != link.ifname:
                subprocess.run(["ip", "link", "set", current, "down"], check=True)
                subprocess.run(["ip", "link", "set", current, "name", link.ifname], check=True)
                subprocess.run(["ip", "link", "set", link.ifname, "up"], check=True)
    if host.role == "client":
        _idle()
    keys = ensure_key(Path(KEYS_MOUNT), host.name)
    operator = ensure_operator_key(Path(KEYS_MOUNT), host.name) if "agent" in host.services else None
    wait_for_dependencies(topology, host, float(os.environ.get("TESTBED_START_WAIT", "60")))
    if "nginx" in host.services:
        write_web_files(topology, host, directory)  # before the agent: its broker manages this document root
    if "agent" in host.services:
        assert operator is not None
        (directory / "agent.toml").write_text(agent_config(topology, host, keys, directory, operator))
        subprocess.Popen([sys.executable, "-m", "node.agent", "--config", str(directory / "agent.toml")])
    if "nginx" in host.services:
        os.execvp("nginx", ["nginx", "-c", str(directory / "nginx.conf"), "-p", str(directory), "-e", "/dev/stderr"])
    if "distributor" in host.services:
        config = directory / "distributor.toml"
        tokens = ensure_api_tokens(Path(KEYS_MOUNT), host.name)
        config.write_text(distributor_config(topology, host, mode, keys, directory, tokens))
        os.execvp(sys.executable, [sys.executable, "-m", "distributor.daemon", "--config", str(config)])
    raise SystemExit(f"testbed.container: {host.name} has no service to run: {host.services}")


if __name__ == "__main__":
    sys.exit(main())
