"""The ``distributor`` gateway daemon: the core, its adapters, and one asyncio loop (program).

Contract: ``distributor --config FILE`` binds the NFQUEUE, hands control to the core (which
installs the rules, or lets the failover core decide when), reroutes until SIGTERM or SIGINT, then
removes its rules and exits 0.  A bad config exits 2 with a message naming the key and value; a
failure to set up the data path (not root, queue taken, iptables missing) exits 1.  ``--check``
validates the config and exits.  Under systemd (``Type=notify``) it reports readiness once the core
has started.

This module only wires: it builds the :class:`~distributor.core.DistributorCore`, the adapters
(NFQUEUE, iptables, UDP sockets, netlink addresses and ARP, conntrack, raw sends, alerts, metrics,
and with ``[administration]`` the blob store and the brokers' client) and the
:class:`~distributor.runtime.Runtime` whose executor table maps each command to the adapter that
carries it out.  Signal handlers only feed an event.  Two state files: the runtime state
(``distributor.state_file``) and the administration state (``administration.state_file``: desired
content, confirmed versions, task records), each written atomically and read back at start.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from backup.failover import (Announce, ArmFirstForward, ClaimAddresses, DrainQueue, HoldNewSyns, InstallRules,
                             PeerDatagram, ReleaseAddresses, ReleaseNewSyns, RemoveRules)
from backup.takeover import AddressOwner
from common.keyfile import KeysFileMissing, load_keys
from common.realtime import realtime_scheduling, set_nice, set_realtime
from common.systemd import JournalFormatter, notify, under_journal, watchdog_interval
from common.sansio import Alert, Level, Log, Send, StopRequested
from common.wire import Keys, KeysError

from . import __version__
from .admin import AdminReply, RuntimeState, SaveState
from .adminclient import NodeAdministrator
from .alerts import Alerts
from .announce import AnnounceRoute, WithdrawRoute
from .announcer import AnnounceError, BirdProcess, RouteTable
from .api import ControlApi, EventLog
from .blobstore import BlobStore
from .contentcore import CollectBlobs, ContentCore, FetchTask, RunTask, SaveAdministration, SyncNode
from .config import Config, ConfigError, TokensFileMissing, load
from .conntrack import Conntrack
from .core import ConntrackAnswered, CountHalfOpen, DistributorCore, HalfOpenCounted, Reconfigure, SetConntrackLiberal
from .datapath import COALESCE_PAUSE, PacketQueue, QueueError, RawSender
from .heartbeat import NodeDatagram
from .metrics import start_metrics_server
from .reroute import ConfirmWithConntrack, ForgetHandshakes, ForgetInConntrack, Mode, SendPacket
from .netif import interface_of, interface_towards
from .rules import Guard, GuardSpec, Rules, RulesError
from .runtime import Runtime
from .udp import DatagramEndpoint, open_endpoint

log = logging.getLogger("distributor")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributor",
        description="Cluster web-server distributor: reroutes TCP connections for virtual IPs to healthy "
        "backend nodes through an NFQUEUE packet interposer. Needs root (CAP_NET_ADMIN, CAP_NET_RAW).",
    )
    parser.add_argument("-c", "--config", required=True, help="TOML config file (see docs/distributor.example.toml)")
    parser.add_argument("--check", action="store_true", help="validate the config and its keys files, print a summary "
                        "and exit")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override distributor.log_level of the config"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
    except ConfigError as exc:
        print(f"distributor: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        try:
            missing = files_missing(config)
        except (ConfigError, KeysError) as exc:
            print(f"distributor: config error: {exc}", file=sys.stderr)
            return 2
        print(describe(config))
        for problem in missing:
            print(f"  warning: {problem} (the daemon needs it to start)")
        return 0
    try:
        keys, failover_keys, tokens = load_secrets(config)
        admin_keys = load_admin_keys(config)
    except (ConfigError, KeysError) as exc:
        print(f"distributor: config error: {exc}", file=sys.stderr)
        return 2
    setup_logging(args.log_level or config.log_level)
    missing = missing_capabilities()
    if missing:
        log.error("the distributor needs %s (NFQUEUE, iptables and addresses need CAP_NET_ADMIN; raw sockets and "
                  "gratuitous ARP need CAP_NET_RAW): run it as root, or under systemd with "
                  "AmbientCapabilities=CAP_NET_ADMIN CAP_NET_RAW", " and ".join(missing))
        return 1
    problem = ipv6_problem(config)
    if problem is not None:
        log.error("%s", problem)
        return 1
    if config.realtime_priority:
        problem = set_realtime(config.realtime_priority)
        setting, how = "realtime_priority = 0", f"SCHED_FIFO priority {config.realtime_priority}"
    else:
        problem = set_nice(config.nice)
        setting, how = "nice = 0", f"nice {config.nice}"
    if problem:
        log.warning("%s; timers may wait behind load (set distributor.%s to silence this)", problem, setting)
    elif config.realtime_priority or config.nice:
        log.info("running at %s", how)
    try:
        asyncio.run(serve(config, keys, failover_keys, tokens, args.config, admin_keys))
    except (RulesError, QueueError, AnnounceError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    # Under systemd, each line carries its syslog priority for journald (and journald adds the time).
    handler.setFormatter(JournalFormatter() if under_journal()
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level.upper(), handlers=[handler])


def load_secrets(config: Config) -> tuple[Keys | None, Keys | None, list]:
    keys = load_keys(config.health.keys_file) if config.health else None
    failover_keys = load_keys(config.failover.keys_file) if config.failover else None
    tokens = config.api.all_tokens() if config.api else []
    return keys, failover_keys, tokens


def load_admin_keys(config: Config) -> Keys | None:
    """The keys that sign requests to the node brokers ([administration] keys_file), or None when it is off."""
    return load_keys(config.administration.keys_file) if config.administration is not None else None


def files_missing(config: Config) -> list[str]:
    """What --check reports without failing: files the config names that this host does not have (yet).

    A file that is there but not valid is an error (KeysError, ConfigError), raised: the daemon
    would not start with it."""
    loaders = [lambda: config.api.all_tokens() if config.api else None]
    loaders += [lambda path=path: load_keys(path) for path in dict.fromkeys(  # one file named twice is read once
        section.keys_file for section in (config.health, config.failover, config.administration) if section)]
    problems: list[str] = []
    for read in loaders:  # each on its own: a missing file must not hide an invalid one
        try:
            read()
        except (KeysFileMissing, TokensFileMissing) as exc:
            problems.append(str(exc))
    return problems


_CAPABILITIES = {"CAP_NET_ADMIN": 12, "CAP_NET_RAW": 13}


def missing_capabilities(status: str | None = None) -> list[str]:
    """The capabilities the daemon needs and does not have (from /proc/self/status's CapEff)."""
    if status is None:
        try:
            with open("/proc/self/status") as f:
                status = f.read()
        except OSError:
            return []  # cannot tell: let the first privileged call say what it says
    for line in status.splitlines():
        if line.startswith("CapEff:"):
            effective = int(line.split()[1], 16)
            return [name for name, bit in _CAPABILITIES.items() if not effective >> bit & 1]
    return []


IPV6_FORWARDING = "/proc/sys/net/ipv6/conf/all/forwarding"


def ipv6_problem(config: Config, forwarding: str = IPV6_FORWARDING, which=shutil.which) -> str | None:
    """Why this host cannot serve the config's IPv6 services, or None (also None without IPv6 services).

    The data path forwards the services' packets, so IPv6 forwarding must be on (Linux has it off by
    default), and their rules need ip6tables (rewrite mode's nft is needed for IPv4 already)."""
    if not config.ipv6:
        return None
    services = ", ".join(s.name for s in config.services if s.vip.version == 6)
    for program in ("ip6tables-restore", "ip6tables-save"):
        if which(program) is None:
            return (f"{program} is not installed (Debian package: iptables), and the IPv6 service(s) {services} need "
                    "it for their rules")
    try:
        with open(forwarding) as f:
            value = f.read().strip()
    except OSError as exc:
        return (f"cannot read {forwarding} ({exc.strerror}): does this kernel have IPv6? The IPv6 service(s) "
                f"{services} need it")
    if value != "1":
        return (f"IPv6 forwarding is off ({forwarding} is {value}), so the IPv6 service(s) {services} could not "
                "reach their nodes; turn it on (sysctl -w net.ipv6.conf.all.forwarding=1, and in /etc/sysctl.d to "
                "keep it)")
    return None


def endpoint_text(address, port: int) -> str:
    """``203.0.113.1:80`` or ``[2001:db8:203::1]:80``."""
    return f"[{address}]:{port}" if ":" in str(address) else f"{address}:{port}"


def cluster_interface(config: Config, configured: str) -> str | None:
    """The interface control datagrams are received on: the configured one, or the cluster side.

    Blocking netlink (pyroute2's synchronous API): call it in a worker thread from the loop.
    """
    if configured != "auto":
        return configured or None
    if config.failover is not None:
        found = interface_of(str(config.failover.address))
        if found is None:
            raise OSError(f"failover.address {config.failover.address} is on no interface of this host; set "
                          "failover.address to this distributor's cluster-LAN address, or failover.interface")
        return found
    return interface_towards(str(next(iter(config.nodes.values()))))


def api_address(config: Config) -> str:
    """The API's "auto" address: this distributor's cluster-LAN address when it has one on this host, else loopback."""
    if config.failover is not None and interface_of(str(config.failover.address)) is not None:
        return str(config.failover.address)
    return "127.0.0.1"


def guard_spec(config: Config, interface: str | None = None, more_nodes=()) -> GuardSpec:
    """Who the guard lets through: the configured nodes, ``more_nodes`` (added at run time), peers, this host;
    and the sources of ``[metrics] allow`` and ``[api] allow``, to the metrics and the API port only."""
    # Nodes' IPv6 addresses (address6) too: the guard's IPv6 chain lets them in and keeps the outside from them.
    nodes = [str(address) for address in config.nodes.values()] + [str(address) for address in more_nodes]
    nodes += [str(address) for address in config.nodes6.values()]
    peers = [str(address) for address in config.failover.peers.values()] if config.failover else []
    own = [str(config.failover.address)] if config.failover else []
    ports = []
    if config.health is not None:
        ports.append(config.health.listen[1])
    if config.failover is not None:
        ports.append(config.failover.listen[1])
    openings = []  # (TCP port, the sources of its allow list) for each list that is set
    if config.metrics_allow and config.metrics_listen:
        openings.append((config.metrics_listen[1], tuple(str(address) for address in config.metrics_allow)))
    if config.api is not None and config.api.allow:
        openings.append((config.api.port, tuple(str(network) for network in config.api.allow)))
    return GuardSpec(tuple(dict.fromkeys(nodes + peers + own)), tuple(dict.fromkeys(nodes + peers + own)),
                     tuple(dict.fromkeys(ports)), interface, tuple(openings))


def describe(config: Config) -> str:
    lines = [f"config OK: distributor {config.name!r}, {config.mode.value} mode, queue {config.queue}, "
             f"table capacity {config.capacity}"]
    for service in config.services:
        backends = ", ".join(f"{b.name}={endpoint_text(b.address, b.port)}(w{b.weight})" for b in service.backends)
        lines.append(f"  service {service.name}: {endpoint_text(service.vip, service.port)} {service.policy.value} "
                     f"-> {backends}")
    if config.health:
        h = config.health.settings
        lines.append(f"  health: heartbeats on udp {config.health.listen[0]}:{config.health.listen[1]}, excluded after "
                     f"{h.warning_seconds:.2f} s of silence, dead after {h.dead_seconds:.2f} s, rise {h.rise}, "
                     f"slow start {h.slow_start:g} s, dead node's connections: {config.health.on_dead.value}")
    else:
        lines.append("  health: off (no [health] section): every node is always a candidate")
    if config.announce:
        a = config.announce
        bird = f"BIRD run with {a.bird_config}" if a.bird_config else "BIRD run by the operator"
        lines.append(f"  active-active: the VIPs announced through table {a.table} ({bird}, control socket "
                     f"{a.bird_socket})")
    if config.failover:
        f = config.failover
        addresses = ", ".join(f"{a.address} on {a.interface}" for a in f.addresses)
        lines.append(f"  failover: priority {f.settings.priority}{', preempts' if f.settings.preempt else ''}, peers "
                     f"{', '.join(f.peers)}, takes over after {f.settings.dead_seconds:.2f} s of silence; floating: {addresses}")
    elif not config.announce:
        lines.append("  failover: off (no [failover] section): this distributor serves alone")
    if config.administration:
        a = config.administration
        lines.append(f"  administration: brokers on port {a.options.broker_port} as {a.sender!r}, blobs in {a.blob_dir}, "
                     f"state {a.state_file or 'in memory only'}, checks every {a.options.check_interval:g} s")
    else:
        lines.append("  administration: off (no [administration] section): no content or task management")
    return "\n".join(lines)


def build_core(config: Config, keys: Keys | None, failover_keys: Keys | None,
               saved: RuntimeState | None = None, saved_administration: str | None = None) -> DistributorCore:
    return DistributorCore(
        config.name, config.mode, config.services, config.capacity, config.timeouts,
        health=config.health.options(config.nodes) if config.health is not None and keys is not None else None,
        health_keys=keys,
        failover=config.failover.options(config.name) if config.failover is not None and failover_keys else None,
        failover_keys=failover_keys,
        saved_state=saved,
        syn_auth=config.syn_auth(os.urandom(32)),
        administration=config.administration.options if config.administration is not None else None,
        saved_administration=saved_administration,
        announce=config.announce is not None,
        node_addresses={name: str(address) for name, address in config.nodes.items()},
    )


def read_state(path: str | None) -> RuntimeState | None:
    """The state file a previous run left; an unreadable one is kept aside (``.bad``) and ignored."""
    if not path:
        return None
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the state file %s (%s): starting from the configuration alone", path, exc.strerror)
        return None
    try:
        state = RuntimeState.from_json(text)
    except ValueError as exc:
        aside = f"{path}.bad"
        os.replace(path, aside)
        log.error("the state file %s is unreadable (%s): kept as %s; starting from the configuration alone",
                  path, exc, aside)
        return None
    log.info("runtime state version %d restored from %s", state.version, path)
    return state


def read_administration(config: Config) -> str | None:
    """The administration state a previous run left, checked; an unreadable one is kept aside (``.bad``)."""
    if config.administration is None or not config.administration.state_file:
        return None
    path = config.administration.state_file
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.error("cannot read the administration state %s (%s): starting with no desired content", path, exc.strerror)
        return None
    try:
        restored = ContentCore.restore(text, config.administration.options)
    except ValueError as exc:
        aside = f"{path}.bad"
        os.replace(path, aside)
        log.error("the administration state %s is unreadable (%s): kept as %s; starting with no desired content",
                  path, exc, aside)
        return None
    log.info("administration state restored from %s: content version %d, %d task request(s)", path,
             restored.desired.version, len(restored.tasks))
    return text


class LatestWriter:
    """Writes the newest text it was given to a file, atomically, in a worker thread; a text that a newer one
    replaced before its turn is skipped (the administration state can be large and change often)."""

    def __init__(self, path: str, what: str):
        self.path = path
        self.what = what
        self._latest: str | None = None
        self._task: asyncio.Task | None = None

    def save(self, text: str) -> None:
        self._latest = text
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._write(), name=f"write {self.what}")

    async def _write(self) -> None:
        while self._latest is not None:
            text, self._latest = self._latest, None
            try:
                await asyncio.to_thread(write_state, self.path, text)
            except OSError as exc:
                log.error("cannot write the %s %s: %s; it is not kept across a restart", self.what, self.path, exc)

    async def flush(self) -> None:
        if self._task is not None:
            await asyncio.wait({self._task}, timeout=10.0)


def write_state(path: str, text: str) -> None:
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, target)


def reload_refusal(running: Config, new: Config) -> str | None:
    """Why a reloaded config cannot be applied without a restart, or None."""
    for field in ("mode", "queue", "name", "vip_echo"):
        if getattr(running, field) != getattr(new, field):
            return f"distributor.{field} changed ({getattr(running, field)!r} -> {getattr(new, field)!r})"
    if (running.failover is None) != (new.failover is None) or (running.health is None) != (new.health is None):
        return "a [health] or [failover] section was added or removed"
    if running.failover is not None and running.failover != new.failover:
        return "the [failover] section changed"
    if running.announce != new.announce:
        return "the [announce] section changed"
    if running.administration != new.administration:
        return "the [administration] section changed"
    # The core keeps its services (their queue rules and VIPs are set up at start); refusing here
    # keeps the running config and the core in agreement, and says so as a refusal.
    added = [s.name for s in new.services if s.name not in {r.name for r in running.services}]
    if added:
        return f"new services ({', '.join(added)})"
    return None


async def serve(config: Config, keys: Keys | None = None, failover_keys: Keys | None = None, tokens: list | None = None,
                config_path: str | None = None, admin_keys: Keys | None = None) -> None:
    loop = asyncio.get_running_loop()
    clock, wall_clock = time.monotonic, time.time
    core = build_core(config, keys, failover_keys, read_state(config.state_file), read_administration(config))
    runtime = Runtime(core, {}, clock, wall_clock)
    runtime.attach(loop)
    alerts = Alerts(config.name, config.alert_log, config.smtp)
    raw = RawSender()
    rules = Rules(config.queue, config.mode, answer_echo=config.vip_echo == "answer")
    guard: Guard | None = None
    conntrack = Conntrack(ipv6=config.ipv6) if config.mode is Mode.KERNEL else None
    # At SCHED_FIFO the queue coalesces (datapath.COALESCE_BELOW says why); at the normal policy it need not.
    queue = PacketQueue(config.queue, core.interposer.decide, runtime.feed, config.mode, config.queue_length, clock,
                        wall_clock, coalesce=COALESCE_PAUSE if realtime_scheduling() else 0.0)
    owner = AddressOwner(list(config.failover.addresses), config.failover.garp_count) if config.failover else None
    routes = RouteTable(config.announce.table) if config.announce is not None else None
    bird: BirdProcess | None = None
    events = EventLog()
    if config.announce is not None and config.announce.bird_config:
        bird = BirdProcess(config.announce.bird_binary, config.announce.bird_config, config.announce.bird_socket,
                           on_exit=lambda code: events.add("log", level="error", message=f"BIRD exited with {code}: "
                                                           "the VIPs are not announced until it is back"))
        await asyncio.to_thread(bird.check)  # a mistake in BIRD's config is said before anything changes
    elif config.announce is not None:
        log.warning("announce.bird_config is empty: BIRD is the operator's to run, and it keeps announcing the VIPs "
                    "in table %d if this daemon dies (run BIRD with announce.bird_config to have it die too)",
                    config.announce.table)
    endpoints: list[DatagramEndpoint] = []
    peers: DatagramEndpoint | None = None
    administration = config.administration
    blobs: BlobStore | None = None
    administrator: NodeAdministrator | None = None
    admin_writer: LatestWriter | None = None
    if administration is not None:
        if admin_keys is None:
            admin_keys = load_admin_keys(config)
        blobs = await asyncio.to_thread(BlobStore, administration.blob_dir)
        # Requests leave from this distributor's cluster-LAN address: the brokers pin its name to it, and the
        # active one also holds the internal gateway address on that interface.
        local = str(config.failover.address) if config.failover is not None else None
        administrator = NodeAdministrator(admin_keys, administration.sender, blobs, runtime.feed, clock, wall_clock,
                                          local, administration.connect_timeout, administration.timeout)
        if administration.state_file:
            admin_writer = LatestWriter(administration.state_file, "administration state")

    def role() -> str:
        return core.stats(clock()).role

    api = ControlApi(core, runtime.feed, tokens or [], events, clock, wall_clock, role, config.mode.value,
                     config.name, blobs=blobs,
                     max_upload=administration.max_upload if administration is not None else 0) \
        if config.api is not None else None

    def alert(command: Alert) -> None:
        alerts.notify(command.subject, command.old, command.new, command.reason, int(command.level))
        events.add("alert", subject=command.subject, old=command.old, new=command.new, reason=command.reason,
                   level=command.level.name.lower())

    def log_line(command: Log) -> None:
        log.log(int(command.level), "%s", command.message)
        if command.level >= Level.WARNING:
            events.add("log", level=command.level.name.lower(), message=command.message)

    async def refresh_guard() -> None:
        # The guard drops control datagrams from any source it does not list: a node that a reload or
        # an operator added must be listed, or its heartbeats never arrive and it is declared dead.
        if guard is None:
            return
        spec = guard_spec(config, guard.spec.interface, core.nodes().values())
        if spec != guard.spec:
            guard.spec = spec
            try:
                await asyncio.to_thread(guard.install)
            except RulesError as exc:
                log.error("cannot update the guard chain for the new nodes: %s", exc)

    async def save_state(command: SaveState) -> None:
        await refresh_guard()  # a runtime change (here or replicated from the active) may have added a node
        if config.state_file:
            try:
                await asyncio.to_thread(write_state, config.state_file, command.text)
            except OSError as exc:
                log.error("cannot write the state file %s: %s; runtime changes are not kept across a restart",
                          config.state_file, exc)

    def send(command: Send) -> None:
        assert peers is not None, "only the failover core sends datagrams"
        peers.send(command.data, command.destination)

    async def confirm(command: ConfirmWithConntrack) -> None:
        assert conntrack is not None
        alive, gone = await conntrack.confirm(command.keys)
        runtime.feed(ConntrackAnswered(alive, gone, clock()))

    async def forget(command: ForgetInConntrack) -> None:
        assert conntrack is not None
        await conntrack.forget_all(command.keys, command.probes, raw.send)

    async def count_half_open(command: CountHalfOpen) -> None:
        assert conntrack is not None
        try:
            count = await conntrack.count_half_open(command.limit)
        except Exception as exc:
            log.debug("cannot count half-open connections: %s", exc)
            return
        runtime.feed(HalfOpenCounted(count, clock()))

    async def forget_handshakes(command: ForgetHandshakes) -> None:
        assert conntrack is not None
        forgotten = await conntrack.forget_handshakes(command.nodes)
        if forgotten:
            log.info("forgot %d handshake(s) in flight to %s in conntrack: their next SYN is placed afresh", forgotten,
                     ", ".join(f"{a}:{p}" for a, p in command.nodes))

    async def install_rules(command: InstallRules) -> None:
        await asyncio.to_thread(rules.install_layout, command.layout)

    async def remove_rules(_command: RemoveRules) -> None:
        await asyncio.to_thread(rules.remove)

    async def announce_route(command: AnnounceRoute) -> None:
        assert routes is not None
        await asyncio.to_thread(routes.announce, command.vip)

    async def withdraw_route(command: WithdrawRoute) -> None:
        assert routes is not None
        await asyncio.to_thread(routes.withdraw, command.vip)

    async def claim(command: ClaimAddresses) -> None:
        assert owner is not None
        await owner.claim(command.lifetime)

    async def release(_command: ReleaseAddresses) -> None:
        assert owner is not None
        await owner.release()

    runtime.register({
        Send: send,
        SendPacket: lambda c: raw.send(c.packet),
        Log: log_line,
        Alert: alert,
        AdminReply: lambda c: api.reply(c) if api is not None else None,
        SaveState: save_state,
        HoldNewSyns: lambda c: queue.hold(c.hold),
        ReleaseNewSyns: lambda c: queue.release_held(),
        ArmFirstForward: lambda c: queue.arm_first_forward(),
        DrainQueue: lambda c: queue.drain(),
        Announce: lambda c: owner.announce() if owner is not None else None,
        SetConntrackLiberal: lambda c: Conntrack.be_liberal(),
        InstallRules: install_rules,
        RemoveRules: remove_rules,
        AnnounceRoute: announce_route,
        WithdrawRoute: withdraw_route,
        ClaimAddresses: claim,
        ReleaseAddresses: release,
        ConfirmWithConntrack: confirm,
        ForgetInConntrack: forget,
        ForgetHandshakes: forget_handshakes,
        CountHalfOpen: count_half_open,
    })
    if administrator is not None:
        # Plain functions that start a task each: a 100 MiB sync never holds up the runtime's slow lane.
        runtime.register({
            SyncNode: administrator.sync,
            RunTask: administrator.run_task,
            FetchTask: administrator.fetch_task,
            CollectBlobs: administrator.collect_blobs,
            SaveAdministration: (lambda c: admin_writer.save(c.text)) if admin_writer is not None else (lambda c: None),
        })

    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    reloading: list[asyncio.Task] = []

    async def reload() -> None:
        nonlocal config
        notify("RELOADING=1")
        try:
            new = await asyncio.to_thread(load, config_path)
            refusal = reload_refusal(config, new)
            if refusal is not None:
                raise ConfigError(f"{refusal}: that needs a restart")
            runtime.feed(Reconfigure(new.services, new.health.settings if new.health else None, clock(),
                                     {name: str(address) for name, address in new.nodes.items()}))
            config = new
            await refresh_guard()
            log.info("configuration %s reloaded", config_path)
        except (ConfigError, OSError) as exc:
            log.error("reload refused, the running configuration stays: %s", exc)
            events.add("log", level="error", message=f"reload refused: {exc}")
        finally:
            notify("READY=1")

    if config_path:
        loop.add_signal_handler(signal.SIGHUP, lambda: reloading.append(loop.create_task(reload())))
    watchdog = watchdog_interval()

    async def feed_watchdog() -> None:
        # The event loop itself sends these: a loop that is stuck stops them, and systemd restarts it.
        while True:
            notify("WATCHDOG=1")
            await asyncio.sleep(watchdog)

    tasks: list[asyncio.Task] = []
    metrics_runner = None
    try:
        alerts.start()
        if config.guard:
            try:
                inside = await asyncio.to_thread(cluster_interface, config, "auto")
            except OSError as exc:
                log.warning("the guard cannot tell the cluster side (%s): forged cluster sources are not refused", exc)
                inside = None
            guard = Guard(config.queue, guard_spec(config, inside))
            await asyncio.to_thread(guard.install)
        if owner is not None:
            await owner.prepare()
        # The core starts before any socket can feed it: what a crashed run left goes first.
        runtime.execute(core.start(clock(), wall_clock()))
        await runtime.settle()
        if bird is not None:
            bird.start()  # after the leftover routes were withdrawn: it announces only what can be served
        await refresh_guard()  # nodes the state file added
        if config.health is not None and keys is not None:
            host, port = config.health.listen
            device = await asyncio.to_thread(cluster_interface, config, config.health.interface)
            endpoints.append(await open_endpoint(
                lambda data, addr: runtime.feed(NodeDatagram(data, addr[0], clock(), wall_clock())),
                host, port, "node heartbeats", device=device))
            log.info("listening for node heartbeats on udp %s:%d%s", host, port, f" on {device}" if device else "")
        if config.failover is not None:
            host, port = config.failover.listen
            device = await asyncio.to_thread(cluster_interface, config, config.failover.interface)
            peers = await open_endpoint(
                lambda data, addr: runtime.feed(PeerDatagram(data, addr[0], clock(), wall_clock())),
                host, port, "distributor datagrams", broadcast=True, device=device)
            endpoints.append(peers)
        loop.add_reader(queue.fileno(), queue.drain)
        if config.metrics_listen:
            metrics_runner = await start_metrics_server(core, queue, alerts, runtime, [rules, guard],
                                                        *config.metrics_listen)
        if api is not None:
            host, port = config.api.listen or (await asyncio.to_thread(api_address, config), config.api.port)
            await api.start(host, port)
        if watchdog:
            tasks.append(loop.create_task(feed_watchdog(), name="watchdog"))
        log.info("distributor %s ready: %d service(s) on queue %d: %s", config.name, len(config.services),
                 config.queue, ", ".join(endpoint_text(s.vip, s.port) for s in config.services))
        notify("READY=1")
        await stop.wait()
        log.info("stopping on signal")
        notify("STOPPING=1")
    finally:
        for task in tasks + reloading:
            task.cancel()
        if api is not None:
            await api.stop()
        if administrator is not None:
            await administrator.close()
        if admin_writer is not None:
            await admin_writer.flush()
        runtime.feed(StopRequested(clock(), wall_clock()))
        await runtime.settle()
        runtime.close()
        if bird is not None:
            await bird.stop()  # after the withdrawal: the router moves the flows before the session ends
        loop.remove_reader(queue.fileno())
        queue.drain()  # packets queued before the rules went away still need a verdict
        queue.close()
        raw.close()
        if conntrack is not None:
            conntrack.close()
        for endpoint in endpoints:
            endpoint.close()
        if guard is not None:
            try:
                guard.remove()
            except RulesError as exc:
                log.error("cannot remove the guard chain: %s", exc)
        if owner is not None:
            owner.close()
        await alerts.stop()
        if metrics_runner is not None:
            await metrics_runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
