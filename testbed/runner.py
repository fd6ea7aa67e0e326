"""Builds the testbed topology from network namespaces, veth pairs and bridges.

Contract
--------
* A run is named by a *project* (``-p NAME``).  Every namespace it creates is
  ``<project>-<host>``, plus ``<project>-sw`` which holds the two bridges, so
  the run adds nothing to the root namespace.  Its files (configs, logs, pid
  files, web content) live under ``/run/cluster-testbed/<project>/``.
* :meth:`Testbed.up` first removes whatever an earlier run of the same project
  left (also after a crash or a SIGKILL), builds the topology, starts every
  declared service, and returns only when the VIP answers HTTP.
* :meth:`Testbed.down` ends the processes inside the project's namespaces (by
  pid, SIGTERM then SIGKILL), deletes the namespaces and the state directory.
  Nothing outside the project is touched.
* ``kill``/``stop``/``start`` act on one host like their docker compose
  namesakes: kill sends SIGKILL to everything in the host and takes its links
  down (a dead host answers nothing); stop does the same politely; start
  brings the links up and starts the host's services again.
* ``Options(active_active=N)`` builds the active-active topology instead
  (testbed.topology): a BGP router running BIRD (service ``bird``) in front of
  N distributors in mode ``dsr``, each of which starts its own BIRD from the
  ``bird.conf`` written in its host directory.  ``up`` then also waits until
  the router's route to the VIP has N paths (:meth:`Testbed.wait_paths`).
* The primary-backup network is dual stack (testbed.topology's IPv6 plan: every link, the nodes'
  IPv6 default route via the floating 2001:db8:198::1, nginx on the node's IPv6 address too).
  ``Options(ipv6=True)``, the default, also gives the distributors the IPv6 service: each node's
  ``address6``, the service "http6" on the VIP6 (2001:db8:203::1, port 80, the same backends and policy as "http"),
  and the VIP6 and the IPv6 gateway among the floating addresses; ``up`` then waits for both VIPs.
  The active-active testbed is IPv4 only (it ignores ``ipv6``).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import secrets
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import content, http, monitoring, netns
from .topology import ANNOUNCE_TABLE, MAX_ACTIVE_ACTIVE, ROUTER_AS, Host, Link, Topology, build

log = logging.getLogger("testbed")

STATE_ROOT = Path(os.environ.get("CLUSTER_TESTBED_STATE", "/run/cluster-testbed"))
DEFAULT_PROJECT = "cluster"
METRICS_PORT = 9110  # the distributor's /metrics, on 127.0.0.1 inside its host (with a monitor: its LAN address)
HEARTBEAT_PORT = 8405
FAILOVER_PORT = 8406
API_PORT = 8410  # the control API and console, on each distributor's cluster-LAN address
BROKER_PORT = 8407  # the node agents' administration endpoint (node/broker.py)
_PROJECT_RE = re.compile(r"^[a-z][a-z0-9]{0,11}$")
_HOST_RE = re.compile(r"^(client|dist\d+|web\d+|monitor|router|far|sw)$")


class TestbedError(RuntimeError):
    __test__ = False


@dataclass
class Options:
    """What ``up`` may vary; saved with the run so later verbs rebuild the same configs."""

    nodes: int = 3
    policy: str = "round-robin"
    capacity: int = 262_144
    on_dead: str = "keep"  # what the distributor does with a dead node's connections
    preempt: bool = False  # a returning dist1 takes the addresses back once caught up
    mode: str = "rewrite"  # the distributors' data path: "rewrite" or "kernel"
    established_timeout: float = 900.0  # the distributors' idle timeout of an established connection
    smtp: str | None = None  # "ADDRESS:PORT" of a mail server for alerts, or None
    access_log: bool = False  # nginx writes <host dir>/access.log (scan-access-log reads it)
    flap_suppress: float | None = None  # health.flap_suppress (0: no flap damping; None: the daemon's default)
    garp_refresh: float | None = None  # failover.garp_refresh: seconds between an active's repeated announcements (None: the daemon's default)
    monitor: bool = False  # a monitor host with Prometheus and Alertmanager (testbed.monitoring)
    # The distributors' configs name only web1..webN (None: every web node); the others run nginx and
    # an agent but are unknown until a config naming them is reloaded (set_configured_nodes + SIGHUP).
    configured_nodes: int | None = None
    persistence: float = 0.0  # services.persistence: seconds a client's new connections follow its last one (0: off)
    # Distributors all active behind a BGP router (2 to topology.MAX_ACTIVE_ACTIVE), in mode "dsr" with the
    # maglev policy; 0: a primary and a backup.
    active_active: int = 0
    # The distributors serve the VIP6 too ("http6", the nodes' address6, the IPv6 floating addresses); the
    # network is dual stack either way (primary-backup; active-active is IPv4 only and ignores this).
    ipv6: bool = True


def check_options(options: Options) -> None:
    """Refuse a combination the chosen topology cannot run (ValueError naming it and what is valid)."""
    if not options.active_active:
        if options.mode == "dsr":
            raise ValueError(f"mode 'dsr' needs the active-active testbed (active_active 2 to {MAX_ACTIVE_ACTIVE}); "
                             "a primary and a backup run mode 'rewrite' or 'kernel'")
        return
    if options.mode != "dsr":
        raise ValueError(f"mode {options.mode!r}: the active-active testbed runs mode 'dsr' only "
                         "(its nodes answer the client directly)")
    if options.policy != "maglev":
        raise ValueError(f"policy {options.policy!r}: the active-active testbed runs policy 'maglev' only "
                         "(every distributor must pick the same node for a flow)")
    if options.persistence:
        raise ValueError(f"persistence {options.persistence:g}: refused in mode 'dsr' (use 0)")
    if options.garp_refresh is not None:
        raise ValueError(f"garp_refresh {options.garp_refresh:g}: the active-active testbed has no [failover] "
                         "section (use None)")


def check_project(name: str) -> str:
    if not _PROJECT_RE.match(name):
        raise TestbedError(f"project name {name!r} is not valid: use 1-12 lower-case letters and digits, starting with a letter")
    return name


def wait_until(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> object:
    """Poll ``condition`` until it returns a true value or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:  # conditions probe the network; failures mean "not yet"
            last_error = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error})" if last_error else ""
            raise TestbedError(f"timed out after {timeout:.0f} s waiting for {what}{detail}")
        time.sleep(interval)


def _run(argv: list[str], check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(argv, capture_output=True, text=True, **kwargs)
    if check and result.returncode != 0:
        raise TestbedError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result


class Testbed:
    __test__ = False  # not a pytest test class, despite the name

    def __init__(self, project: str = DEFAULT_PROJECT, options: Options | None = None):
        self.project = check_project(project)
        self.options = options or Options()
        check_options(self.options)
        self.topology: Topology = build(self.options.nodes, monitor=self.options.monitor,
                                        active_active=self.options.active_active,
                                        ipv6=not self.options.active_active)
        self.state_dir = STATE_ROOT / project
        self._children: dict[int, subprocess.Popen] = {}

    # -- naming ------------------------------------------------------------
    def ns(self, host: str) -> str:
        if host != "sw":
            self.topology.host(host)  # raises for an unknown host
        return f"{self.project}-{host}"

    def host_dir(self, host: str) -> Path:
        return self.state_dir / host

    def log_path(self, host: str, service: str) -> Path:
        return self.host_dir(host) / f"{service}.log"

    @property
    def vip(self) -> str:
        return str(self.topology.vip)

    @property
    def dual_stack(self) -> bool:
        """The distributors serve the VIP6 too (Options.ipv6 on a dual-stack topology)."""
        return self.options.ipv6 and self.topology.ipv6

    @property
    def vip6(self) -> str:
        if self.topology.vip6 is None:
            raise TestbedError("this testbed has no IPv6 (the active-active testbed is IPv4 only)")
        return str(self.topology.vip6)

    def vip_of(self, family: int) -> str:
        """The VIP of an address family (socket.AF_INET or AF_INET6)."""
        return self.vip6 if family == socket.AF_INET6 else self.vip

    def url(self, path: str = "/", family: int = socket.AF_INET) -> str:
        """``http://VIP/path`` for curl and wrk (an IPv6 VIP in brackets; curl needs ``-g`` for it)."""
        address = self.vip_of(family)
        return f"http://[{address}]{path}" if family == socket.AF_INET6 else f"http://{address}{path}"

    # -- persistence -------------------------------------------------------
    @classmethod
    def load(cls, project: str = DEFAULT_PROJECT) -> "Testbed":
        check_project(project)
        state = STATE_ROOT / project / "state.json"
        try:
            data = json.loads(state.read_text())
        except FileNotFoundError:
            raise TestbedError(f"no testbed {project!r} is up (no {state}); run `cluster-testbed -p {project} up`") from None
        return cls(project, Options(**data["options"]))

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        data = {"project": self.project, "options": self.options.__dict__}
        (self.state_dir / "state.json").write_text(json.dumps(data, indent=2))

    # -- up / down ---------------------------------------------------------
    def up(self, timeout: float = 60.0) -> None:
        self.down()
        self._save()
        try:
            self._build_network()
            self._write_files()
            for host in self.start_order():
                for service in host.services:
                    self._start_service(host, service)
            if self.options.active_active:
                self.wait_paths(self.options.active_active, timeout)
            self.wait_vip(timeout)
            if self.options.monitor:
                self.wait_monitor(timeout)
        except TestbedError as exc:
            tails = "\n".join(f"--- {h.name}/{s} ---\n{self.log_tail(h.name, s, 15)}"
                              for h in self.topology.by_role("router") + self.topology.by_role("distributor")
                              for s in h.services)
            self.down()
            raise TestbedError(f"{exc}\n{tails}") from None
        except BaseException:
            self.down()
            raise

    def start_order(self) -> list[Host]:
        """Web nodes first, so a distributor hears heartbeats from its first tick; then the router, so a
        distributor's BGP session finds its peer; then the rest in the topology's order."""
        rank = {"web": 0, "router": 1}
        return sorted(self.topology.hosts, key=lambda h: rank.get(h.role, 2))

    def down(self) -> list[str]:
        """Remove every namespace, process and file of this project; returns the namespaces removed."""
        prefix = f"{self.project}-"
        mine = [n for n in netns.names() if n.startswith(prefix) and _HOST_RE.match(n[len(prefix):])]
        mine.sort(key=lambda n: n.endswith("-sw"))  # the switch goes last
        for name in mine:
            self._end_processes(netns.pids(name), name)
        for name in mine:
            _run(["ip", "netns", "del", name], check=False)
        for child in list(self._children.values()):
            self._reap(child)
        if self.state_dir.exists():
            shutil.rmtree(self.state_dir)
        return mine

    def _build_network(self) -> None:
        sw = self.ns("sw")
        _run(["ip", "netns", "add", sw])
        _run(["ip", "-n", sw, "link", "set", "lo", "up"])
        # The switch has no IPv6 of its own (its ports would solicit routers and join groups), and floods
        # multicast: without an MLD querier, snooping would keep neighbour solicitations for a moved
        # floating address (solicited-node multicast) on the port of its former owner.
        for key in ("all", "default"):
            _run(["ip", "netns", "exec", sw, "sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"])
        for bridge in self.topology.bridges:
            _run(["ip", "-n", sw, "link", "add", bridge, "type", "bridge", "forward_delay", "0", "stp_state", "0",
                  "mcast_snooping", "0"])
            _run(["ip", "-n", sw, "link", "set", bridge, "up"])
        for host in self.topology.hosts:
            ns = self.ns(host.name)
            _run(["ip", "netns", "add", ns])
            _run(["ip", "-n", ns, "link", "set", "lo", "up"])
            # An interface's own values wait until it exists; the rest go first, because a new interface
            # copies the "default" ones (rp_filter).
            per_link = tuple(f"net.ipv{v}.conf.{link.ifname}." for link in host.links for v in (4, 6))
            for key, value in host.sysctls:
                if not key.startswith(per_link):
                    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])
            for link in host.links:
                port = f"{host.name}-{link.bridge}"
                _run(["ip", "-n", sw, "link", "add", port, "type", "veth", "peer", "name", link.ifname, "netns", ns])
                _run(["ip", "-n", sw, "link", "set", port, "master", link.bridge, "up"])
                _run(["ip", "-n", ns, "addr", "add", str(link.address), "dev", link.ifname])
                if link.address6 is not None:
                    _run(["ip", "-n", ns, "addr", "add", str(link.address6), "dev", link.ifname, "nodad"])
                _run(["ip", "-n", ns, "link", "set", link.ifname, "up"])
            for key, value in host.sysctls:
                if key.startswith(per_link):
                    _run(["ip", "netns", "exec", ns, "sysctl", "-q", "-w", f"{key}={value}"])
            for address in host.loopback:
                _run(["ip", "-n", ns, "addr", "add", str(address), "dev", "lo"])
            if host.default_gateway is not None:
                _run(["ip", "-n", ns, "route", "add", "default", "via", str(host.default_gateway)])
            if host.default_gateway6 is not None:
                _run(["ip", "-n", ns, "-6", "route", "add", "default", "via", str(host.default_gateway6)])
            for route in host.routes:
                _run(["ip", "-n", ns, "route", "add", str(route.destination), "via", str(route.via)])

    @property
    def keys_file(self) -> Path:
        return self.state_dir / "keys"

    @property
    def operator_key_file(self) -> Path:
        """The run's operator Ed25519 key (signs task bundles; every agent trusts its public half)."""
        return self.state_dir / "operator.key"

    def _write_operator_key(self) -> str:
        from common import bundle

        key = bundle.generate_private_key()
        self.operator_key_file.write_bytes(bundle.private_key_pem(key))
        self.operator_key_file.chmod(0o600)
        return bundle.public_key_text(key)

    def _write_files(self) -> None:
        self.state_dir.chmod(0o755)
        self.keys_file.write_text(f"# heartbeat keys of testbed run {self.project}\n1 {secrets.token_hex(32)}\n")
        self.keys_file.chmod(0o600)
        self.api_tokens_file.write_text(f"# control-API tokens of testbed run {self.project}\n"
                                        f"admin operator {secrets.token_urlsafe(24)}\n"
                                        f"viewer watcher {secrets.token_urlsafe(24)}\n")
        self.api_tokens_file.chmod(0o600)
        operator_public = self._write_operator_key()
        for host in self.topology.hosts:
            directory = self.host_dir(host.name)
            directory.mkdir(parents=True, exist_ok=True)
            directory.chmod(0o755)
            if "nginx" in host.services:
                write_web_files(self.topology, host, directory, access_log=self.options.access_log)
            if "agent" in host.services:
                agent = render_agent_config(self.topology, host, self.keys_file, directory, operator_public)
                if self.options.monitor:
                    agent += f'\n[metrics]\nlisten = "{host.address_on("int")}:{monitoring.AGENT_METRICS_PORT}"\n'
                (directory / "agent.toml").write_text(agent)
            if host.role == "monitor":
                monitoring.write_monitor_files(self.topology, directory)
            if "distributor" in host.services:
                (directory / "distributor.toml").write_text(self.distributor_config(host))
            if "bird" in host.services:
                (directory / "bird.conf").write_text(render_router_bird_config(self.topology, host))
            elif host.role == "distributor" and self.topology.active_active:
                # The distributor daemon starts this BIRD itself ([announce] of its config).
                (directory / "bird.conf").write_text(render_distributor_bird_config(self.topology, host))

    def distributor_config(self, host: Host) -> str:
        render = render_active_active_config if self.topology.active_active else render_distributor_config
        text = render(self.topology, self.options, host, self.keys_file, self.host_dir(host.name), self.api_tokens_file)
        if self.options.monitor:
            # Scraped from the monitor: metrics on the LAN address (never the VIP or the outside
            # one), and the guard lets the monitor reach that port.
            monitor = self.topology.host("monitor").address_on("int")
            local = f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
            assert local in text, "the distributor config template moved its [metrics] section"
            text = text.replace(local, f'[metrics]\nlisten = "{self.metrics_address(host.name)}:{METRICS_PORT}"\n'
                                       f'allow = ["{monitor}"]\n')
        return text

    def metrics_address(self, host: str) -> str:
        """Where the distributor on ``host`` serves /metrics: loopback, or its LAN address with a monitor."""
        return str(self.topology.host(host).address_on("int")) if self.options.monitor else "127.0.0.1"

    @property
    def api_tokens_file(self) -> Path:
        return self.state_dir / "api-tokens"

    def api_token(self, role: str = "admin") -> str:
        """This run's control-API token of a role (admin, viewer)."""
        for line in self.api_tokens_file.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == role:
                return parts[2]
        raise TestbedError(f"no {role} token in {self.api_tokens_file}")

    def api_url(self, host: str) -> str:
        return f"http://{self.topology.host(host).address_on('int')}:{API_PORT}"

    def active_distributor(self) -> str:
        for host in self.topology.by_role("distributor"):
            if self.role(host.name) == "active":
                return host.name
        raise TestbedError("no distributor is active")

    def ctl(self, args: list[str], host: str | None = None, role: str = "admin", check: bool = False,
            timeout: float = 120) -> subprocess.CompletedProcess:
        """Run distributorctl against a distributor (default: the active one; active-active: dist1) with this
        run's token."""
        if host is None:
            # Active-active: every distributor is active, and answers alike.
            active_active = self.topology.active_active
            host = self.topology.by_role("distributor")[0].name if active_active else self.active_distributor()
        argv = [sys.executable, "-m", "distributor.ctl", "--url", self.api_url(host), f"--token={self.api_token(role)}",
                *args]
        return self.run(host, argv, check=check, timeout=timeout)

    def start_service(self, host: str, service: str) -> int:
        """Start one declared service of ``host`` (no-op when it runs); returns its pid."""
        pid = self.service_pid(host, service)
        return pid if pid is not None else self._start_service(self.topology.host(host), service)

    def stop_service(self, host: str, service: str) -> None:
        """SIGTERM one service of ``host`` and wait for it (SIGKILL after 5 s)."""
        pid = self.service_pid(host, service)
        if pid is not None:
            self._end_processes([pid], self.ns(host))

    def set_mode(self, mode: str) -> None:
        """Rewrite the distributors' configs for another data path; takes effect when they (re)start."""
        check_options(Options(**{**self.options.__dict__, "mode": mode}))
        self.options.mode = mode
        self._save()
        for host in self.topology.by_role("distributor"):
            (self.host_dir(host.name) / "distributor.toml").write_text(self.distributor_config(host))

    def set_configured_nodes(self, count: int | None) -> None:
        """Rewrite the distributors' configs to name web1..web<count> (None: all); a SIGHUP applies them."""
        if count is not None and not 1 <= count <= len(self.topology.web_nodes):
            raise TestbedError(f"configured nodes {count}: this run has web1..web{len(self.topology.web_nodes)}")
        self.options.configured_nodes = count
        self._save()
        for host in self.topology.by_role("distributor"):
            (self.host_dir(host.name) / "distributor.toml").write_text(self.distributor_config(host))

    def set_web_delay(self, host: str, seconds: float) -> None:
        """Make a web node answer /health after ``seconds`` (0: at once); nginx reloads its config."""
        spec = self.topology.host(host)
        write_web_files(self.topology, spec, self.host_dir(host), health_delay=seconds, content_too=False,
                        access_log=self.options.access_log)
        pid = self.service_pid(host, "nginx")
        if pid is None:
            raise TestbedError(f"nginx is not running on {host}")
        os.kill(pid, signal.SIGHUP)

    # -- services ----------------------------------------------------------
    def _service_argv(self, host: Host, service: str) -> list[str]:
        directory = self.host_dir(host.name)
        if service == "nginx":
            return ["nginx", "-c", str(directory / "nginx.conf"), "-p", str(directory), "-e", str(directory / "nginx-error.log")]
        if service == "distributor":
            return [sys.executable, "-m", "distributor.daemon", "--config", str(directory / "distributor.toml")]
        if service == "agent":
            return [sys.executable, "-m", "node.agent", "--config", str(directory / "agent.toml")]
        if service == "bird":
            # In the foreground, so the runner's pid is BIRD's (its -P file then holds the pid the runner records).
            return ["bird", "-f", "-c", str(directory / "bird.conf"), "-s", str(directory / "bird.ctl"),
                    "-P", str(directory / "bird.pid")]
        if host.role == "monitor":
            return monitoring.service_argv(service, directory)
        raise TestbedError(f"unknown service {service!r} on {host.name}")

    def _start_service(self, host: Host, service: str, timeout: float = 20.0) -> int:
        argv = ["ip", "netns", "exec", self.ns(host.name), *self._service_argv(host, service)]
        path = self.log_path(host.name, service)
        offset = path.stat().st_size if path.exists() else 0  # readiness looks only at what this run writes
        log_file = open(path, "ab")
        try:
            child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log_file.close()
        self._children[child.pid] = child
        (self.host_dir(host.name) / f"{service}.pid").write_text(str(child.pid))
        self._wait_service(host, service, child, timeout, offset)
        return child.pid

    def _wait_service(self, host: Host, service: str, child: subprocess.Popen, timeout: float, offset: int) -> None:
        def new_log() -> str:
            with open(self.log_path(host.name, service), "rb") as f:
                f.seek(offset)
                return f.read().decode(errors="replace")

        def ready() -> bool:
            if child.poll() is not None:
                tail = self.log_tail(host.name, service)
                raise TestbedError(f"{service} on {host.name} exited with {child.returncode}:\n{tail}")
            if service == "nginx":
                reply = http.get(self.ns(host.name), str(host.address_on("int")), self.topology.vip_port, "/health", timeout=1)
                return reply.status == 200
            if service == "distributor":
                return "ready" in new_log()
            if service == "agent":
                return "sending heartbeats" in new_log()
            if service == "bird":
                status = ["birdc", "-s", str(self.host_dir(host.name) / "bird.ctl"), "show", "status"]
                return self.run(host.name, status, check=False, timeout=5).returncode == 0
            if host.role == "monitor":
                return monitoring.ready(self.ns(host.name), service)
            return True

        try:
            wait_until(ready, timeout, f"{service} on {host.name}")
        except TestbedError as exc:
            if "exited with" in str(exc):
                raise
            raise TestbedError(f"{exc}\n{self.log_tail(host.name, service)}") from None

    def service_pid(self, host: str, service: str) -> int | None:
        """The pid of a running service of ``host``, or None."""
        try:
            pid = int((self.host_dir(host) / f"{service}.pid").read_text())
        except (FileNotFoundError, ValueError):
            return None
        return pid if pid in netns.pids(self.ns(host)) else None

    def wait_vip(self, timeout: float = 30.0) -> None:
        """Wait until the VIP answers HTTP (and the VIP6, when the distributors serve it)."""
        deadline = time.monotonic() + timeout
        for vip in [self.vip] + ([self.vip6] if self.dual_stack else []):
            def answers() -> bool:
                return http.get(self.ns("client"), vip, self.topology.vip_port, "/health", timeout=1).status == 200

            shown = f"[{vip}]" if ":" in vip else vip
            wait_until(answers, max(deadline - time.monotonic(), 0.0),
                       f"the VIP {shown}:{self.topology.vip_port} to answer")

    def router_paths(self) -> list[str]:
        """The next hops (distributor uplink addresses) of the router's kernel route to the VIP, in its order."""
        result = _run(["ip", "-n", self.ns("router"), "-j", "route", "show", self.vip])
        paths = []
        for route in json.loads(result.stdout or "[]"):
            # One path: "gateway" in the route; several (BIRD's "merge paths"): a list of "nexthops".
            for hop in route.get("nexthops", [route]):
                if "gateway" in hop:
                    paths.append(hop["gateway"])
        return paths

    def bfd_up(self) -> list[str]:
        """The distributors' uplink addresses whose BFD session with the router is Up (``birdc show bfd sessions``)."""
        socket = self.host_dir("router") / "bird.ctl"
        result = _run(["ip", "netns", "exec", self.ns("router"), "birdc", "-s", str(socket), "show", "bfd", "sessions"],
                      check=False)
        return [words[0] for words in map(str.split, result.stdout.splitlines()) if len(words) > 2 and words[2] == "Up"]

    def wait_paths(self, count: int, timeout: float = 30.0) -> list[str]:
        """Wait until the router's route to the VIP has ``count`` paths (every distributor announces it), each
        watched by an Up BFD session: until its session is Up (about a second after BGP's, RFC 5880 sends
        slowly until then), a distributor that dies silently is noticed by the BGP hold timer (3 s), not BFD."""
        deadline = time.monotonic() + timeout
        while True:
            paths = self.router_paths()
            watched = set(self.bfd_up()) if len(paths) == count else set()
            if len(paths) == count and watched >= set(paths):
                return paths
            if time.monotonic() >= deadline:
                raise TestbedError(f"timed out after {timeout:.0f} s waiting for the router's route to {self.vip} to "
                                   f"have {count} paths with BFD up; it has {len(paths)}: "
                                   f"{', '.join(paths) or 'no route'} (BFD up: {', '.join(sorted(watched)) or 'none'})")
            time.sleep(0.1)

    def wait_monitor(self, timeout: float = 30.0) -> None:
        """Wait until the monitor's Prometheus has scraped every target once (a later rate sees all traffic)."""
        api = monitoring.PrometheusApi(self.ns("monitor"))
        expected = len(self.topology.by_role("distributor")) + len(self.topology.web_nodes) + 2  # + itself, Alertmanager

        def scraped() -> bool:
            targets = api.targets()
            return len(targets) == expected and all(t["health"] == "up" for t in targets)

        wait_until(scraped, timeout, "the monitor's Prometheus to scrape every target", interval=0.25)

    # -- compose-like verbs --------------------------------------------------
    def kill(self, host: str) -> None:
        """The host dies as at a power cut: its links go first, so nothing it does while dying
        (the kernel resetting its sockets as SIGKILL closes them) reaches anyone; then every process."""
        self._links(host, "down")
        self._end_processes(netns.pids(self.ns(host)), self.ns(host), polite=False)

    def stop(self, host: str) -> None:
        spec = self.topology.host(host)
        for service in reversed(spec.services):
            pid = self.service_pid(host, service)
            if pid is not None:
                self._end_processes([pid], self.ns(host))
        self._end_processes(netns.pids(self.ns(host)), self.ns(host))
        self._links(host, "down")

    def start(self, host: str) -> None:
        spec = self.topology.host(host)
        self._links(host, "up")
        for service in spec.services:
            if self.service_pid(host, service) is None:
                self._start_service(spec, service)

    def _links(self, host: str, state: str) -> None:
        spec = self.topology.host(host)
        for link in spec.links:
            _run(["ip", "-n", self.ns(host), "link", "set", link.ifname, state])
        if state == "up" and spec.default_gateway is not None:
            # Taking a link down deletes the routes through it; bring the default route back.
            _run(["ip", "-n", self.ns(host), "route", "replace", "default", "via", str(spec.default_gateway)])
        if state == "up" and spec.default_gateway6 is not None:
            _run(["ip", "-n", self.ns(host), "-6", "route", "replace", "default", "via", str(spec.default_gateway6)])
        if state == "up":
            for route in spec.routes:
                _run(["ip", "-n", self.ns(host), "route", "replace", str(route.destination), "via", str(route.via)])

    def exec_argv(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def run(self, host: str, argv: list[str], check: bool = True, timeout: float | None = 120, **kwargs) -> subprocess.CompletedProcess:
        """Run a command inside ``host`` and wait for it."""
        return _run(self.exec_argv(host, argv), check=check, timeout=timeout, **kwargs)

    def popen(self, host: str, argv: list[str], **kwargs) -> subprocess.Popen:
        child = subprocess.Popen(self.exec_argv(host, argv), **kwargs)
        self._children[child.pid] = child
        return child

    def metrics(self, host: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The distributor's Prometheus samples on ``host``: {(name, sorted labels): value}."""
        from prometheus_client.parser import text_string_to_metric_families

        reply = http.get(self.ns(host), self.metrics_address(host), METRICS_PORT, "/metrics", timeout=2)
        samples = {}
        for family in text_string_to_metric_families(reply.body.decode()):
            for sample in family.samples:
                samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
        return samples

    def takeover_durations(self, host: str) -> dict[str, tuple[float, float]]:
        """The distributor's takeover histogram on ``host``: {phase: (count, sum of seconds)}."""
        return takeover_durations(self.metrics(host))

    def role(self, host: str) -> str | None:
        """The failover role of the distributor on ``host`` (None when it is not running)."""
        if self.service_pid(host, "distributor") is None:
            return None
        for (name, labels), value in self.metrics(host).items():
            if name == "distributor_failover_role" and value == 1:
                return dict(labels)["role"]
        return None

    def wait_settled(self, timeout: float = 20.0) -> tuple[str, str]:
        """Wait for one active distributor and one caught-up backup; returns (active, backup)."""
        dists = [h.name for h in self.topology.by_role("distributor")]

        def check() -> tuple[str, str] | None:
            roles = {h: self.role(h) for h in dists}
            if sorted(map(str, roles.values())) != ["active", "backup"]:
                return None
            active = next(h for h, r in roles.items() if r == "active")
            backup = next(h for h, r in roles.items() if r == "backup")
            return (active, backup) if self.metrics(backup)[("distributor_sync_caught_up", ())] == 1 else None

        return wait_until(check, timeout, "one active distributor and one caught-up backup")  # type: ignore[return-value]

    def alerts(self, host: str = "dist1") -> list[dict]:
        """The node state changes the distributor on ``host`` wrote to its alert log."""
        path = self.host_dir(host) / "alerts.log"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def wait_alert(self, node: str, state: str, since: float, timeout: float, host: str = "dist1") -> dict:
        """The first alert, at or after wall time ``since``, of ``node`` entering ``state``."""
        def find() -> dict | None:
            return next((r for r in self.alerts(host) if r["node"] == node and r["to"] == state and r["time"] >= since), None)

        return wait_until(find, timeout, f"{node} to become {state}")  # type: ignore[return-value]

    def log_tail(self, host: str, service: str, lines: int = 30) -> str:
        try:
            text = self.log_path(host, service).read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log for {service} on {host})"
        return "\n".join(text.splitlines()[-lines:])

    def ps(self) -> list[dict]:
        rows = []
        for host in self.topology.hosts:
            ns = self.ns(host.name)
            alive = netns.exists(ns)
            addresses = _addresses(ns) if alive else []
            services = host.services or ("-",)
            for service in services:
                pid = self.service_pid(host.name, service) if service != "-" and alive else None
                state = "-" if service == "-" else ("running" if pid else "exited")
                rows.append({"host": host.name, "netns": ns if alive else "(missing)", "addresses": addresses,
                             "service": service, "pid": pid, "state": state})
        return rows

    # -- process ending ----------------------------------------------------
    def _end_processes(self, pids: list[int], ns: str, polite: bool = True, grace: float = 5.0) -> None:
        if not pids:
            return
        first = signal.SIGTERM if polite else signal.SIGKILL
        for pid in pids:
            _signal(pid, first)
        deadline = time.monotonic() + grace
        remaining = list(pids)
        while remaining and time.monotonic() < deadline:
            for pid in list(remaining):
                child = self._children.get(pid)
                if child is not None:
                    if child.poll() is not None:
                        remaining.remove(pid)
                elif not _alive(pid):
                    remaining.remove(pid)
            if remaining:
                time.sleep(0.02)
        for pid in remaining:
            log.warning("pid %d in %s did not end within %.0f s; sending SIGKILL", pid, ns, grace)
            _signal(pid, signal.SIGKILL)
        for pid in pids:
            child = self._children.get(pid)
            if child is not None:
                self._reap(child)

    def _reap(self, child: subprocess.Popen) -> None:
        try:
            child.wait(timeout=5)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self._children.pop(child.pid, None)


TAKEOVER_HISTOGRAM = "distributor_failover_takeover_duration_seconds"


def takeover_durations(samples: dict) -> dict[str, tuple[float, float]]:
    """{phase: (count, sum)} of the takeover histogram in parsed samples ({(name, labels): value})."""
    found: dict[str, tuple[float, float]] = {}
    for (name, labels), value in samples.items():
        if name in (f"{TAKEOVER_HISTOGRAM}_count", f"{TAKEOVER_HISTOGRAM}_sum"):
            phase = dict(labels)["phase"]
            count, total = found.get(phase, (0.0, 0.0))
            found[phase] = (value, total) if name.endswith("_count") else (count, value)
    return found


def new_takeover(before: dict[str, tuple[float, float]], after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """The phases (seconds) of the one takeover observed between two readings of :func:`takeover_durations`."""
    phases = {}
    for phase, (count, total) in after.items():
        old_count, old_total = before.get(phase, (0.0, 0.0))
        if count == old_count + 1:
            phases[phase] = total - old_total
    return phases


def write_web_files(topology: Topology, host: Host, directory: Path, health_delay: float = 0.0,
                    content_too: bool = True, access_log: bool = False) -> None:
    """The web node's document root (the known files of testbed.content) and its nginx.conf."""
    root = directory / "www"
    if content_too:
        root.mkdir(parents=True, exist_ok=True)
        root.chmod(0o755)
        for path in content.FILES:
            target = root / path.lstrip("/")
            target.write_bytes(content.body(path))
            target.chmod(0o644)
        (root / "index.html").write_text(f"<h1>{host.name}</h1>\n")
        (root / "index.html").chmod(0o644)
        (directory / "tmp").mkdir(exist_ok=True)
    # The echo module's echo_sleep delays the answer without blocking the worker.
    health = f"location = /health {{ echo_sleep {health_delay:g}; echo ok; }}" if health_delay > 0 else ""
    # A DSR node also listens on the VIP it holds on lo: the distributor hands it the client's packet unchanged.
    addresses = [str(host.address_on("int")), *(str(a.ip) for a in host.loopback)]
    addresses += [f"[{link.address6.ip}]" for link in host.links if link.bridge == "int" and link.address6 is not None]
    listen = "\n        ".join(f"listen {address}:{topology.vip_port} backlog=4096;" for address in addresses)
    (directory / "nginx.conf").write_text(
        NGINX_CONF.format(dir=directory, root=root, listen=listen, node=host.name, health=health,
                          access_log=f"{directory}/access.log combined" if access_log else "off")
    )


def render_agent_config(topology: Topology, host: Host, keys_file: Path, directory: Path | None = None,
                        operator_public: str | None = None) -> str:
    """The agent's config; with ``directory`` also its [broker] (content in <directory>/www, state beside it)."""
    network = topology.bridges["int"]
    text = AGENT_CONF.format(node=host.name, address=host.address_on("int"), port=topology.vip_port,
                             broadcast=network.broadcast_address, heartbeat_port=HEARTBEAT_PORT, keys=keys_file)
    if directory is None:
        return text
    senders = ", ".join(f'{d.name} = "{d.address_on("int")}"' for d in topology.by_role("distributor"))
    trusted = f'"{operator_public}"' if operator_public else ""
    return text + BROKER_CONF.format(address=host.address_on("int"), port=BROKER_PORT, senders=senders, dir=directory,
                                     trusted=trusted)


def _distributor_fields(topology: Topology, options: Options, host: Host, keys_file: Path, directory: Path,
                        api_tokens: Path | None) -> dict[str, object]:
    """The values both distributor templates (primary-backup and active-active) fill in."""
    configured = topology.web_nodes[:options.configured_nodes]  # [:None] is every node
    ipv6 = options.ipv6 and topology.ipv6
    smtp = ""
    if options.smtp:
        smtp_host, _, smtp_port = options.smtp.rpartition(":")
        smtp = SMTP_CONF.format(host=smtp_host, port=smtp_port, name=host.name)
    return dict(
        name=host.name,
        mode=options.mode,
        established=options.established_timeout,
        capacity=options.capacity,
        metrics_port=METRICS_PORT,
        nodes="".join(f'[nodes.{web.name}]\naddress = "{web.address_on("int")}"\n'
                      + (f'address6 = "{web.address6_on("int")}"\n' if ipv6 else "") for web in configured),
        vip=topology.vip,
        port=topology.vip_port,
        policy=options.policy,
        backends=", ".join(f'"{web.name}"' for web in configured),
        keys=keys_file,
        heartbeat_port=HEARTBEAT_PORT,
        on_dead=options.on_dead,
        alert_log=directory / "alerts.log",
        smtp=smtp,
        state_file=directory / "state.json",
        api=API_CONF.format(address=host.address_on("int"), port=API_PORT, tokens=api_tokens) if api_tokens else "",
        administration=ADMINISTRATION_CONF.format(port=BROKER_PORT, blobs=directory / "blobs",
                                                  state=directory / "administration.json"),
        health_extra="" if options.flap_suppress is None else f"flap_suppress = {options.flap_suppress:g}\n",
        service6=SERVICE6_CONF.format(vip6=topology.vip6, port=topology.vip_port, policy=options.policy,
                                      service_extra=_service_extra(options),
                                      backends=", ".join(f'"{web.name}"' for web in configured)) if ipv6 else "",
    )


def _service_extra(options: Options) -> str:
    return f"persistence = {options.persistence:g}\n" if options.persistence else ""


def _failover_addresses6(topology: Topology, options: Options, host: Host) -> str:
    """Options.ipv6: the VIP6 and the nodes' IPv6 gateway among the floating addresses ("" otherwise)."""
    if not (options.ipv6 and topology.ipv6):
        return ""
    return FAILOVER6_CONF.format(vip6=topology.vip6, vip6_prefix=topology.bridges6["ext"].prefixlen,
                                 gateway6=topology.gateway6, gateway6_prefix=topology.bridges6["int"].prefixlen,
                                 ext=_ifname(host, "ext"), int=_ifname(host, "int"))


def render_distributor_config(topology: Topology, options: Options, host: Host, keys_file: Path, directory: Path,
                              api_tokens: Path | None = None) -> str:
    peers = ", ".join(f'{d.name} = "{d.address_on("int")}"' for d in topology.by_role("distributor") if d.name != host.name)
    failover = FAILOVER_CONF.format(
        priority=topology.priorities[host.name],
        preempt="true" if options.preempt else "false",
        lan_address=host.address_on("int"),
        broadcast=topology.bridges["int"].broadcast_address,
        failover_port=FAILOVER_PORT,
        peers=peers,
        vip=topology.vip,
        ext=_ifname(host, "ext"),
        int=_ifname(host, "int"),
        gateway=topology.gateway,
        gateway_prefix=topology.bridges["int"].prefixlen,
        failover_extra="" if options.garp_refresh is None else f"garp_refresh = {options.garp_refresh:g}\n",
        addresses6=_failover_addresses6(topology, options, host),
    )
    return DISTRIBUTOR_CONF.format(
        **_distributor_fields(topology, options, host, keys_file, directory, api_tokens),
        service_extra=_service_extra(options),
        cluster=f"\n{failover}",
    )


def render_active_active_config(topology: Topology, options: Options, host: Host, keys_file: Path, directory: Path,
                                api_tokens: Path | None = None) -> str:
    """An active-active distributor's config: no [failover] (every distributor is active); [announce] names the
    BIRD the daemon starts (its config from :func:`render_distributor_bird_config`, in ``directory``)."""
    check_options(options)
    announce = ANNOUNCE_CONF.format(bird_config=directory / "bird.conf", bird_socket=directory / "bird.ctl",
                                    table=ANNOUNCE_TABLE)
    return DISTRIBUTOR_CONF.format(**_distributor_fields(topology, options, host, keys_file, directory, api_tokens),
                                   service_extra="", cluster=f"\n{announce}")


def render_router_bird_config(topology: Topology, host: Host) -> str:
    """The router's BIRD: an eBGP session (with BFD) to every distributor, and the VIP's equal paths merged
    into one multipath kernel route (docs/scale-out.md, "Routing")."""
    neighbors = "".join(
        f"protocol bgp {d.name} from dist {{ neighbor {_uplink(d).address.ip} as {ROUTER_AS + i}; }}\n"
        for i, d in enumerate(topology.by_role("distributor"), start=1)
    )
    # BFD on the router's uplinks (named after their bridges, up1..upN) only: not towards the client or the nodes.
    head = BIRD_HEAD.format(router_id=host.address_on("ext"), vip=topology.vip)
    return ROUTER_BIRD_CONF.format(name=host.name, head=head, bfd_interfaces="up*", local_as=ROUTER_AS,
                                   neighbors=neighbors)


def render_distributor_bird_config(topology: Topology, host: Host) -> str:
    """Distributor ``dist<i>``'s BIRD: announces the VIP to the router while the daemon keeps
    "VIP dev lo" in kernel table :data:`ANNOUNCE_TABLE`."""
    index = int(host.name.removeprefix("dist"))
    uplink = _uplink(host)
    router = topology.host("router").address_on(uplink.bridge)
    head = BIRD_HEAD.format(router_id=uplink.address.ip, vip=topology.vip)
    return DISTRIBUTOR_BIRD_CONF.format(name=host.name, head=head, table=ANNOUNCE_TABLE, uplink=uplink.ifname,
                                        local_as=ROUTER_AS + index, router=router, router_as=ROUTER_AS)


def _signal(pid: int, signum: int) -> None:
    try:
        os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):  # gone between listing and reading
        return False
    return state != "Z"


def _ifname(host: Host, bridge: str) -> str:
    for link in host.links:
        if link.bridge == bridge:
            return link.ifname
    raise KeyError(bridge)


def _uplink(distributor: Host) -> Link:
    """An active-active distributor's link to the router (bridge "up<i>")."""
    for link in distributor.links:
        if link.bridge.startswith("up"):
            return link
    raise KeyError(f"{distributor.name} has no uplink to a router (not an active-active distributor)")


def _addresses(ns: str) -> list[str]:
    result = _run(["ip", "-n", ns, "-j", "addr", "show"], check=False)
    if result.returncode != 0:
        return []
    found = []
    for link in json.loads(result.stdout or "[]"):
        if link.get("ifname") == "lo":
            continue
        for info in link.get("addr_info", []):
            if info.get("family") == "inet" or (info.get("family") == "inet6" and info.get("scope") == "global"):
                found.append(f"{info['local']}/{info['prefixlen']}")
    return found


NGINX_CONF = """\
# Written by cluster-testbed for {node}.
load_module /usr/lib/nginx/modules/ngx_http_echo_module.so;
daemon off;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/nginx-error.log warn;
events {{ worker_connections 8192; }}
http {{
    access_log {access_log};
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 65s;
    client_body_temp_path {dir}/tmp/body;
    proxy_temp_path {dir}/tmp/proxy;
    fastcgi_temp_path {dir}/tmp/fastcgi;
    uwsgi_temp_path {dir}/tmp/uwsgi;
    scgi_temp_path {dir}/tmp/scgi;
    types {{ text/html html; application/octet-stream bin; text/plain txt; }}
    default_type text/plain;
    server {{
        {listen}
        root {root};
        add_header X-Node {node} always;
        location / {{ }}
        {health}
    }}
}}
"""

DISTRIBUTOR_CONF = """\
# Written by cluster-testbed for {name}.
[distributor]
name = "{name}"
mode = "{mode}"
queue = 0
state_file = "{state_file}"

[table]
capacity = {capacity}
timeouts = {{ established = {established} }}

[metrics]
listen = "127.0.0.1:{metrics_port}"

{nodes}
[[services]]
name = "http"
vip = "{vip}"
port = {port}
policy = "{policy}"
{service_extra}backends = [{backends}]
{service6}
[health]
listen = "0.0.0.0:{heartbeat_port}"
keys_file = "{keys}"
on_dead = "{on_dead}"
{health_extra}
{cluster}
[alerts]
log_file = "{alert_log}"
{smtp}{api}{administration}"""

# Primary-backup's [failover] (the {cluster} part of DISTRIBUTOR_CONF).
FAILOVER_CONF = """\
[failover]
priority = {priority}
preempt = {preempt}
address = "{lan_address}"
listen = "0.0.0.0:{failover_port}"
destination = "{broadcast}:{failover_port}"
peers = {{ {peers} }}
{failover_extra}addresses = [
    {{ address = "{vip}/32", interface = "{ext}" }},
    {{ address = "{gateway}/{gateway_prefix}", interface = "{int}" }},
{addresses6}]
"""

# Options.ipv6: the dual-stack service's IPv6 half (after "http" in DISTRIBUTOR_CONF) and its floating
# addresses (in FAILOVER_CONF's list).
SERVICE6_CONF = """
[[services]]
name = "http6"
vip = "{vip6}"
port = {port}
policy = "{policy}"
{service_extra}backends = [{backends}]
"""

FAILOVER6_CONF = """\
    {{ address = "{vip6}/{vip6_prefix}", interface = "{ext}" }},
    {{ address = "{gateway6}/{gateway6_prefix}", interface = "{int}" }},
"""

# Active-active's [announce] instead (Options.active_active): no failover, every distributor is active.
ANNOUNCE_CONF = """\
[announce]
bird_config = "{bird_config}"
bird_socket = "{bird_socket}"
table = {table}
"""

# BIRD 2 (Debian's bird2), as tested in docs/scale-out.md. Both log to stderr: the runner's (or the
# daemon's) log of the service.
BIRD_HEAD = """\
log stderr all;
router id {router_id};
define VIP = {vip}/32;
filter vip_only {{ if net = VIP then accept; reject; }}
protocol device {{ scan time 10; }}
"""

ROUTER_BIRD_CONF = """\
# Written by cluster-testbed for {name}.
{head}protocol kernel {{
  ipv4 {{ import none; export filter vip_only; }};
  merge paths on;                 # every equal best BGP path -> one multipath kernel route
}}
protocol bfd {{
  interface "{bfd_interfaces}" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }};
}}
template bgp dist {{
  local as {local_as};
  hold time 3; keepalive time 1;  # RFC 4271's smallest hold time
  connect retry time 1; error wait time 1, 5;   # defaults (120 s, 60..300 s) delay a comeback
  bfd on;
  ipv4 {{ import filter vip_only; export none; }};
}}
{neighbors}"""

DISTRIBUTOR_BIRD_CONF = """\
# Written by cluster-testbed for {name}; the distributor daemon starts BIRD with it.
{head}protocol kernel announce {{        # the daemon adds/deletes "VIP dev lo table {table}"
  kernel table {table}; learn; scan time 10;
  ipv4 {{ import filter vip_only; export none; }};
}}
protocol bfd {{ interface "{uplink}" {{ min rx interval 100 ms; min tx interval 100 ms; multiplier 3; }}; }}
protocol bgp uplink {{             # "router" is a keyword in BIRD's grammar
  local as {local_as}; neighbor {router} as {router_as};
  hold time 3; keepalive time 1; connect retry time 1; error wait time 1, 5;
  bfd on;
  ipv4 {{ import none; export filter vip_only; next hop self; }};
}}
"""

# Content and tasks on the nodes: the agents' [broker] (BROKER_CONF) knows each distributor by its name
# and LAN address, and signs with the heartbeat keys, the defaults here too.
ADMINISTRATION_CONF = """
[administration]
broker_port = {port}
blob_dir = "{blobs}"
state_file = "{state}"
"""

API_CONF = """
[api]
listen = "{address}:{port}"
tokens_file = "{tokens}"
"""

SMTP_CONF = """\
[alerts.smtp]
host = "{host}"
port = {port}
sender = "distributor@{name}.cluster.test"
recipients = ["ops@cluster.test"]
timeout = 5
"""

AGENT_CONF = """\
# Written by cluster-testbed for {node}.
[agent]
id = "{node}"
probe_url = "http://{address}:{port}/health"
# Every namespace shares this machine's kernel, so load and CPU are machine-wide:
# thresholds this high keep a benchmark on one node from silencing all of them.
max_load = 1000.0
max_cpu = 1.0
# And the client, the distributors and every nginx share its two cores: a benchmark at full rate
# slows the probe of every node alike, which is the machine, not one node failing.
max_response_time = 2.5
probe_timeout = 3.0

[heartbeat]
destination = "{broadcast}:{heartbeat_port}"
keys_file = "{keys}"
"""

BROKER_CONF = """\

[broker]
listen = "{address}:{port}"
senders = {{ {senders} }}
document_root = "{dir}/www"
state_dir = "{dir}/broker"
bundle_dir = "{dir}/bundles"

[broker.tasks]
nginx_pid_file = "{dir}/nginx.pid"
access_log = "{dir}/access.log"
# The load measure is machine-wide here (namespaces share one kernel, other runs share the CPUs):
# "idle" ignores the load average and allows the CPU noise of neighbours; a busy loop on every CPU is "loaded".
idle_cpu = 0.85
idle_load = 1000.0
idle_for = 1.0

[broker.bundles]
trusted_keys = [{trusted}]
"""
