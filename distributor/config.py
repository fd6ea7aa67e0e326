"""The distributor's TOML configuration: parse, validate, default.

Contract: :func:`load` (a path) and :func:`parse` (a string) return a frozen
:class:`Config` or raise :class:`ConfigError` whose message names the key
(as a dotted path, e.g. ``services[0].policy``), the bad value, and what would
be valid.  Unknown keys are errors too, so a typo never silently falls back to
a default.  An annotated example lives in ``docs/distributor.example.toml``.

IPv6: a node may have an ``address6``; a service's VIP may be IPv6, and its backends are then
its nodes' ``address6`` (a dual-stack service is two services, one per family).  Floating
addresses may be IPv6.  Control traffic (heartbeats, the sync stream, the API, metrics) stays on
the cluster LAN's IPv4: those addresses are IPv4 only.  Dsr mode serves IPv4 VIPs only.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from pathlib import Path

from backup.failover import FailoverOptions
from backup.roles import FailoverSettings
from backup.takeover import FloatingAddress
from common.tomlconfig import ConfigError, TableReader, loads, show

from .admin import NODE_NAME_RULE, is_node_name, unusable_address
from .alerts import SmtpSettings
from .api import ApiToken, parse_token_file
from .balancer import MAX_WEIGHT, Policy
from .conntable import Timeouts
from .contentcore import AdministrationOptions
from .core import HealthOptions
from .heartbeat import HealthSettings, OnDead
from .reroute import BackendSpec, Mode, ServiceSpec
from .rules import DSR_MAX_QUEUE, dsr_table
from .synauth import SynAuth

__all__ = ["ConfigError", "Config", "load", "parse"]


@dataclasses.dataclass(frozen=True)
class HealthConfig:
    settings: HealthSettings
    listen: tuple[str, int]
    interface: str  # receive heartbeats only on this interface; "auto": the cluster side; "": any
    keys_file: str
    freshness: float
    on_dead: OnDead

    def options(self, nodes: dict[str, ipaddress.IPv4Address]) -> HealthOptions:
        return HealthOptions(self.settings, {name: str(address) for name, address in nodes.items()}, self.freshness,
                             self.on_dead)


@dataclasses.dataclass(frozen=True)
class FailoverConfig:
    settings: FailoverSettings
    address: ipaddress.IPv4Address
    listen: tuple[str, int]
    interface: str  # receive peer datagrams only on this interface; "auto": the one holding `address`; "": any
    destination: tuple[str, int]  # heartbeats and resigns: the cluster LAN's broadcast address
    keys_file: str
    freshness: float
    peers: dict[str, ipaddress.IPv4Address]  # name -> address: the state-sync stream goes to each, unicast
    addresses: tuple[FloatingAddress, ...]
    garp_count: int
    garp_repeat: float
    garp_refresh: float
    address_lifetime: float

    def options(self, name: str) -> FailoverOptions:
        return FailoverOptions(name, self.address, self.settings, self.destination, dict(self.peers), self.listen[1],
                               self.freshness, self.garp_repeat, self.garp_refresh, self.address_lifetime)


@dataclasses.dataclass(frozen=True)
class ApiConfig:
    listen: tuple[str, int] | None  # None: "auto" (the cluster-LAN address, or loopback), resolved at start
    port: int
    tokens: tuple[ApiToken, ...]  # inline ones; tokens_file is read by the program at start
    tokens_file: str | None
    allow: tuple[ipaddress.IPv4Network, ...] = ()  # may reach the API's port through the guard (an address: a /32)

    def all_tokens(self) -> list[ApiToken]:
        """The inline tokens and those of tokens_file (read now); raises ConfigError naming the file."""
        tokens = list(self.tokens)
        if self.tokens_file:
            try:
                tokens += parse_token_file(Path(self.tokens_file).read_text(encoding="utf-8"), self.tokens_file)
            except FileNotFoundError as exc:
                raise TokensFileMissing(f"api.tokens_file: cannot read {self.tokens_file!r}: {exc.strerror}") from None
            except OSError as exc:
                raise ConfigError(f"api.tokens_file: cannot read {self.tokens_file!r}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"api.tokens_file: {self.tokens_file!r} is not UTF-8 text (byte {exc.start})") from None
            except ValueError as exc:
                raise ConfigError(f"api.tokens_file: {exc}") from None
        if not tokens:
            raise ConfigError("api: no token; add api.tokens or api.tokens_file (every request needs one)")
        return tokens


@dataclasses.dataclass(frozen=True)
class AdministrationConfig:
    """[administration]: content and tasks on the nodes through their brokers (docs/administration.md)."""

    options: AdministrationOptions
    keys_file: str  # the brokers' keys (default: the heartbeat's, as the agents' [broker] keys_file defaults)
    sender: str  # the name the brokers know this distributor by ([broker] senders; default: distributor.name)
    blob_dir: str  # the bytes of every desired file, by SHA-256
    state_file: str | None  # desired content, confirmed versions, task records; None: memory only
    max_upload: int  # bytes one push (a file or a tree's tar) may have
    connect_timeout: float  # seconds to reach a broker
    timeout: float  # seconds a broker may take to answer one read


@dataclasses.dataclass(frozen=True)
class AnnounceConfig:
    """``[announce]``: active-active (docs/scale-out.md).  The daemon puts ``VIP/32 dev lo`` in ``table``
    while the VIP can be served and takes it out otherwise; the BIRD it runs (``bird_config``, dying
    with the daemon) exports that table's routes to the router over BGP."""

    table: int
    bird_config: str | None  # None: BIRD is the operator's to run (and a crashed daemon's route stays announced)
    bird_socket: str
    bird_binary: str


@dataclasses.dataclass(frozen=True)
class Config:
    def syn_auth(self, secret: bytes) -> SynAuth | None:
        """The SYN authentication the configuration asks for (``secret``: fresh random bytes)."""
        if self.syn_auth_mode == "off":
            return None
        auth = SynAuth(secret, self.syn_auth_threshold)
        auth.always = self.syn_auth_mode == "always"
        return auth

    name: str
    mode: Mode
    queue: int
    queue_length: int
    capacity: int
    timeouts: Timeouts
    services: tuple[ServiceSpec, ...]
    nodes: dict[str, ipaddress.IPv4Address]
    metrics_listen: tuple[str, int] | None
    log_level: str
    guard: bool = True  # refuse the outside the control ports and the cluster's own addresses
    vip_echo: str = "answer"  # ICMP echo requests to a VIP: "answer" (this host's stack does) or "drop"
    realtime_priority: int = 10  # SCHED_FIFO priority of the daemon's loop; 0: the normal policy (at ``nice``)
    nice: int = -20  # the daemon loop's nice value when realtime_priority is 0 (common/realtime.py says why)
    health: HealthConfig | None = None
    alert_log: str | None = None
    smtp: SmtpSettings | None = None
    failover: FailoverConfig | None = None
    api: ApiConfig | None = None
    syn_auth_mode: str = "auto"  # "auto": authenticate new clients while half-open connections pile up
    syn_auth_threshold: int = 64
    state_file: str | None = "/var/lib/distributor/state.json"  # runtime changes kept across restarts; None: off
    metrics_allow: tuple[ipaddress.IPv4Address, ...] = ()  # may scrape the metrics port through the guard
    administration: AdministrationConfig | None = None  # content and tasks on the nodes; None: off
    announce: AnnounceConfig | None = None  # active-active: the VIPs announced to the router by BIRD; None: off
    nodes6: dict[str, ipaddress.IPv6Address] = dataclasses.field(default_factory=dict)  # [nodes.X] address6, if any

    @property
    def ipv6(self) -> bool:
        """Whether a service has an IPv6 VIP (the data path then needs ip6tables and IPv6 forwarding)."""
        return any(service.vip.version == 6 for service in self.services)


class TokensFileMissing(ConfigError):
    """api.tokens_file is not there (yet): what a config check on another host may only warn about."""


_LOG_LEVELS = ("debug", "info", "warning", "error")
_show = show


def load(path: str | Path) -> Config:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {str(path)!r}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start}); TOML files are UTF-8") from None
    return parse(text, source=str(path))



def parse(text: str, source: str = "<config>") -> Config:
    top = TableReader(loads(text, source), "")

    dist = top.table("distributor")
    name = dist.string("name", "distributor")
    mode = Mode(dist.string("mode", Mode.REWRITE.value, tuple(m.value for m in Mode)))
    queue = dist.integer("queue", 0, 0, 65535)
    queue_length = dist.integer("queue_length", 4096, 16, 1_048_576)
    log_level = dist.string("log_level", "info", _LOG_LEVELS)
    guard = dist.boolean("guard", True)
    # A dsr distributor does not hold its VIPs, so it cannot answer their echo requests.
    vip_echo = dist.string("vip_echo", "drop" if mode is Mode.DSR else "answer", ("answer", "drop"))
    if mode is Mode.DSR and vip_echo == "answer":
        raise ConfigError("distributor.vip_echo: \"answer\" is not valid in dsr mode (the nodes hold the VIP, this "
                          "host does not); expected \"drop\"")
    realtime_priority = dist.integer("realtime_priority", 10, 0, 99)
    nice = dist.integer("nice", -20, -20, 19)
    state_file = dist.get("state_file", "/var/lib/distributor/state.json")
    if not isinstance(state_file, str):
        raise ConfigError(f"distributor.state_file: {show(state_file)} is not valid; expected a file path, or \"\" "
                          "to keep runtime changes in memory only")
    dist.done()

    table = top.table("table")
    capacity = table.integer("capacity", 262_144, 1, 50_000_000)
    syn_auth_mode = table.string("syn_auth", "auto", ("auto", "always", "off"))
    syn_auth_threshold = table.integer("syn_auth_threshold", 64, 1, 50_000_000)
    timeouts_table = table.table("timeouts")
    defaults = Timeouts()
    timeouts = Timeouts(
        **{
            field.name: timeouts_table.number(field.name, getattr(defaults, field.name), 0)
            for field in dataclasses.fields(Timeouts)
        }
    )
    timeouts_table.done()
    table.done()

    metrics = top.table("metrics")
    metrics_listen = _control_endpoint(metrics, "listen")
    metrics_allow = _metrics_allow(metrics, metrics_listen)
    metrics.done()

    nodes, nodes6 = _nodes(top)
    services = _services(top, nodes, nodes6)
    health = _health(top)
    alert_log, smtp = _alerts(top)
    failover = _failover(top, name, health)
    if failover is not None:
        _check_failover_addresses(failover, nodes, services, health)
    if metrics_listen is not None:
        problem = _vip_side(ipaddress.ip_address(metrics_listen[0]), services, failover)
        if problem is not None:
            raise ConfigError(f"metrics.listen: {metrics_listen[0]} is not valid: {problem}; expected 127.0.0.1 or "
                              "this distributor's own cluster-LAN address")
    api = _api(top, services, failover)
    administration = _administration(top, name, health)
    announce = _announce(top, name)
    _check_dsr(mode, queue, services, failover, announce)
    top.done()
    return Config(
        name=name,
        mode=mode,
        queue=queue,
        queue_length=queue_length,
        capacity=capacity,
        timeouts=timeouts,
        services=services,
        nodes=nodes,
        metrics_listen=metrics_listen,
        log_level=log_level,
        guard=guard,
        vip_echo=vip_echo,
        realtime_priority=realtime_priority,
        nice=nice,
        api=api,
        state_file=state_file or None,
        syn_auth_mode=syn_auth_mode,
        syn_auth_threshold=syn_auth_threshold,
        health=health,
        alert_log=alert_log,
        smtp=smtp,
        failover=failover,
        metrics_allow=metrics_allow,
        administration=administration,
        announce=announce,
        nodes6=nodes6,
    )


# Kernel routing tables an operator may not give [announce] (0: unspecified; 253-255: default, main, local).
_RESERVED_TABLES = (0, 253, 254, 255)


def _announce(top: TableReader, name: str) -> AnnounceConfig | None:
    if not top.has("announce"):
        return None
    table = top.table("announce")
    number = table.integer("table", 100, 1, 0xFFFFFFFF)
    if number in _RESERVED_TABLES:
        raise ConfigError(f"announce.table: {number} is not valid; expected a table of its own, not one of the "
                          "kernel's (253 default, 254 main, 255 local)")
    bird_config = table.get("bird_config", "")
    if not isinstance(bird_config, str):
        raise ConfigError(f"announce.bird_config: {show(bird_config)} is not valid; expected the path of the BIRD "
                          "configuration the daemon runs BIRD with, or \"\" when BIRD is run by the operator")
    socket = table.string("bird_socket", f"/run/distributor-bird-{name}.ctl")
    binary = table.string("bird_binary", "bird")
    if not socket or not binary:
        raise ConfigError("announce.bird_socket and announce.bird_binary: \"\" is not valid; expected a path "
                          "(defaults: /run/distributor-bird-<name>.ctl and bird)")
    table.done()
    return AnnounceConfig(number, bird_config or None, socket, binary)


def _check_dsr(mode: Mode, queue: int, services: tuple[ServiceSpec, ...], failover: FailoverConfig | None,
               announce: AnnounceConfig | None) -> None:
    """Direct server return and active-active go together (docs/scale-out.md says why)."""
    if announce is not None and mode is not Mode.DSR:
        raise ConfigError(f"[announce]: active-active needs distributor.mode = \"dsr\" (not {mode.value!r}): every "
                          "distributor forwards, and the nodes answer the clients themselves")
    if mode is not Mode.DSR:
        return
    if queue > DSR_MAX_QUEUE:
        raise ConfigError(f"distributor.queue: {queue} is not valid in dsr mode; expected 0 to {DSR_MAX_QUEUE} (its "
                          "policy-rule priorities, 10000 + 2 x queue, must stay below the main table's 32766)")
    if announce is not None and announce.table >> 16 == dsr_table(queue, 0) >> 16:
        raise ConfigError(f"announce.table: {announce.table} is not valid; tables {dsr_table(queue, 0)} to "
                          f"{dsr_table(queue, 0xFFFF)} are dsr mode's node routes for queue {queue}")
    if failover is not None:
        raise ConfigError("[failover]: not valid in dsr mode: dsr distributors are all active ([announce]); "
                          "primary-backup uses mode \"rewrite\" or \"kernel\"")
    for i, service in enumerate(services):
        if service.vip.version == 6:
            raise ConfigError(f"services[{i}].vip: {service.vip} is not valid in dsr mode: dsr mode serves IPv4 VIPs "
                              "only; expected an IPv4 address (serve IPv6 with mode \"rewrite\" or \"kernel\")")
        if service.policy is not Policy.MAGLEV:
            raise ConfigError(f"services[{i}].policy: {service.policy.value!r} is not valid in dsr mode; expected "
                              "\"maglev\": the connection table is a cache there, and a flow it does not know must "
                              "reach the node every distributor chose for it")
        if service.persistence:
            raise ConfigError(f"services[{i}].persistence: {service.persistence:g} is not valid in dsr mode (each "
                              "distributor would remember its own clients); expected 0")
        for backend in service.backends:
            if backend.port != service.port:
                raise ConfigError(f"services[{i}]: node {backend.name}'s port {backend.port} is not valid in dsr "
                                  f"mode; expected the VIP's port, {service.port} (the packet reaches the node "
                                  "unchanged, so no port is translated)")


def _administration(top: TableReader, name: str, health: HealthConfig | None) -> AdministrationConfig | None:
    if not top.has("administration"):
        return None
    table = top.table("administration")
    if not table.boolean("enabled", True):
        return None
    defaults = AdministrationOptions()
    options = AdministrationOptions(
        broker_port=table.integer("broker_port", defaults.broker_port, 1, 65535),
        check_interval=table.number("check_interval", defaults.check_interval, 0),
        retry=table.number("retry", defaults.retry, 0),
        max_retry=table.number("max_retry", defaults.max_retry, 0),
        task_poll=table.number("task_poll", defaults.task_poll, 0),
        task_wanted_for=table.number("task_wanted_for", defaults.task_wanted_for, 0),
        keep_tasks=table.integer("keep_tasks", defaults.keep_tasks, 1, 100_000),
        output_limit=table.integer("output_limit", defaults.output_limit, 0, 1 << 20),
    )
    if options.max_retry < options.retry:
        raise ConfigError(f"administration.max_retry: {options.max_retry!r} is not valid; expected at least "
                          f"administration.retry ({options.retry!r})")
    keys_file = table.get("keys_file", health.keys_file if health is not None else "")
    if not isinstance(keys_file, str) or not keys_file:
        raise ConfigError(f"administration.keys_file: {show(keys_file or None)} is not valid; expected the brokers' "
                          "'KEY_ID HEX_SECRET' file (required without [health], whose keys_file is the default)")
    sender = table.string("sender", name)
    if not (0 < len(sender) <= 64 and sender.isascii() and sender.isprintable() and " " not in sender):
        raise ConfigError(f"administration.sender: {sender!r} is not valid; expected 1 to 64 printable ASCII characters "
                          "without spaces (the name the nodes' [broker] senders list)")
    blob_dir = table.string("blob_dir", "/var/lib/distributor/blobs")
    if not blob_dir:
        raise ConfigError("administration.blob_dir: \"\" is not valid; expected a directory for the pushed bytes")
    state_file = table.get("state_file", "/var/lib/distributor/administration.json")
    if not isinstance(state_file, str):
        raise ConfigError(f"administration.state_file: {show(state_file)} is not valid; expected a file path, or \"\" "
                          "to keep the desired content and task records in memory only")
    config = AdministrationConfig(
        options=options,
        keys_file=keys_file,
        sender=sender,
        blob_dir=blob_dir,
        state_file=state_file or None,
        max_upload=table.integer("max_upload", 1 << 30, 1, 1 << 40),
        connect_timeout=table.number("connect_timeout", 5.0, 0),
        timeout=table.number("timeout", 60.0, 0),
    )
    table.done()
    return config


def _failover(top: TableReader, name: str, health: HealthConfig | None) -> FailoverConfig | None:
    if "failover" not in top.data:
        return None
    table = top.table("failover")
    if not table.boolean("enabled", True):
        return None
    if len(name.encode()) > 16 or not name.isascii():
        raise ConfigError(f"distributor.name: {name!r} is not valid with failover; expected 1 to 16 ASCII characters")
    defaults = FailoverSettings()
    try:
        settings = FailoverSettings(
            priority=table.integer("priority", defaults.priority, 0, 65535),
            preempt=table.boolean("preempt", defaults.preempt),
            interval=table.number("interval", defaults.interval, 0.001, inclusive=True, high=60),
            warning=table.integer("warning", defaults.warning, 0, 10_000),
            dead=table.integer("dead", defaults.dead, 1, 10_000),
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
    address = _control_ipv4(table, "address")
    listen = _control_endpoint(table, "listen", "0.0.0.0:8406")
    interface = _interface(table)
    destination = _control_endpoint(table, "destination")
    if destination is None:
        raise ConfigError("failover.destination: required, e.g. \"198.51.100.255:8406\" (the cluster LAN's broadcast address)")
    keys_file = table.get("keys_file", health.keys_file if health else None)
    if not isinstance(keys_file, str) or not keys_file:
        raise ConfigError("failover.keys_file: required (or set health.keys_file): a 'KEY_ID HEX_SECRET' file shared by the distributors")
    peers_table = table.table("peers", required=True)
    if not peers_table.data:
        raise ConfigError('failover.peers: expected the other distributors by name and address, e.g. { dist2 = "198.51.100.3" }')
    peers = {}
    for peer in peers_table.data:
        if peer == name:
            raise ConfigError(f"failover.peers.{peer}: that is this distributor's own name")
        peers[peer] = _control_ipv4(peers_table, peer)
        if peers[peer] == address:
            # Datagrams from it would be taken for this distributor's own broadcasts and ignored: split brain.
            raise ConfigError(f"failover.peers.{peer}: {address} is this distributor's own address (failover.address)")
    peers_table.done()
    if destination[1] != (listen or ("0.0.0.0", 8406))[1]:
        raise ConfigError(f"failover.destination: port {destination[1]} is not valid; the peers listen on "
                          f"failover.listen's port, {(listen or ('0.0.0.0', 8406))[1]}")
    raw = table.get("addresses")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"failover.addresses: {_show(raw)} is not valid; expected "
                          "[{ address = \"203.0.113.1/32\", interface = \"ext0\" }, ...]")
    addresses = []
    for i, item in enumerate(raw):
        entry = TableReader(item, f"failover.addresses[{i}]")
        text = entry.string("address")
        try:
            interface_address = (ipaddress.IPv6Interface(text) if ":" in text else ipaddress.IPv4Interface(text))
        except ValueError:
            raise ConfigError(f"{entry.key('address')}: {text!r} is not valid; expected ADDRESS/PREFIX such as "
                              "\"203.0.113.1/32\" or \"2001:db8:203::1/64\"") from None
        if interface_address.version == 6:
            problem = _unusable6(interface_address.ip)
            if problem is not None:
                raise ConfigError(f"{entry.key('address')}: {text!r} is not valid: {problem}; expected a global "
                                  "unicast ADDRESS/PREFIX such as \"2001:db8:203::1/64\"")
        addresses.append(FloatingAddress(interface_address, entry.string("interface")))
        entry.done()
    config = FailoverConfig(
        settings=settings,
        address=address,
        listen=listen or ("0.0.0.0", 8406),
        interface=interface,
        destination=destination,
        keys_file=keys_file,
        freshness=table.number("freshness", 5.0, 0),
        peers=peers,
        addresses=tuple(addresses),
        garp_count=table.integer("garp_count", 3, 1, 100),
        garp_repeat=table.number("garp_repeat", 5.0, 0, inclusive=True),
        garp_refresh=table.number("garp_refresh", 10.0, 0, inclusive=True),
        address_lifetime=_lifetime(table),
    )
    table.done()
    return config


def _api(top: TableReader, services: tuple[ServiceSpec, ...], failover: FailoverConfig | None) -> ApiConfig | None:
    if not top.has("api"):
        return None
    table = top.table("api")
    listen_text = table.get("listen", "auto")
    listen = None if listen_text == "auto" else table.endpoint("listen")
    port = listen[1] if listen else table.integer("port", 8410, 1, 65535)
    if listen is not None:
        problem = _vip_side(ipaddress.ip_address(listen[0]), services, failover)
        if problem is None and ":" in listen[0]:
            problem = _CONTROL_IPV4
        if problem is not None:
            raise ConfigError(f"api.listen: {listen_text!r} is not valid: {problem}; expected \"auto\" or "
                              "\"ADDRESS:PORT\" with a management-side address: this distributor's cluster-LAN "
                              "address (failover.address) or loopback such as \"127.0.0.1:8410\"")
    tokens: list[ApiToken] = []
    raw = table.get("tokens", [])
    if not isinstance(raw, list):
        raise ConfigError(f"api.tokens: {show(raw)} is not valid; expected [{{ name = \"ops\", role = \"admin\", "
                          "token = \"...\" }, ...]")
    for i, item in enumerate(raw):
        entry = TableReader(item, f"api.tokens[{i}]")
        token = entry.string("token")
        if len(token) < 16:
            raise ConfigError(f"api.tokens[{i}].token: too short ({len(token)} characters); use 16 or more")
        tokens.append(ApiToken(entry.string("name"), entry.string("role", "viewer", ("viewer", "admin")), token))
        entry.done()
    tokens_file = table.get("tokens_file", "")
    if not isinstance(tokens_file, str):
        raise ConfigError(f"api.tokens_file: {show(tokens_file)} is not valid; expected a file path")
    if not tokens and not tokens_file:
        raise ConfigError("api: no token; add api.tokens or api.tokens_file (every request needs one)")
    allow = _api_allow(table, listen)
    table.done()
    return ApiConfig(listen, port, tuple(tokens), tokens_file or None, allow)


def _api_allow(table: TableReader, listen: tuple[str, int] | None) -> tuple[ipaddress.IPv4Network, ...]:
    """[api] allow: hosts and networks (besides the cluster's own) the guard lets reach the API's port."""
    raw = table.get("allow", [])
    expected = 'a list of IPv4 addresses or networks, such as ["198.51.100.9", "198.51.100.0/24"]'
    if not isinstance(raw, list):
        raise ConfigError(f"{table.key('allow')}: {_show(raw)} is not valid; expected {expected}")
    allowed: list[ipaddress.IPv4Network] = []
    for item in raw:
        try:
            if not isinstance(item, str):
                raise TypeError(item)
            allowed.append(ipaddress.IPv4Network(item))
        except (ValueError, TypeError):
            problem = ""
            if isinstance(item, str):
                try:
                    problem = f" (host bits set: the network is {ipaddress.IPv4Network(item, strict=False)})"
                except ValueError:
                    pass
            raise ConfigError(f"{table.key('allow')}: {_show(item)} is not valid{problem}; expected {expected}") from None
    if allowed and listen is not None and ipaddress.ip_address(listen[0]).is_loopback:
        raise ConfigError(f"{table.key('allow')}: set, but api.listen is {listen[0]}:{listen[1]}, on loopback: no other "
                          "host can reach the API; listen on this distributor's cluster-LAN address, or \"auto\"")
    return tuple(dict.fromkeys(allowed))


def _vip_side(address: ipaddress.IPv4Address | ipaddress.IPv6Address, services: tuple[ServiceSpec, ...],
              failover: FailoverConfig | None) -> str | None:
    """Why the control API or metrics may not listen on ``address`` (it would answer on the clients' side), or None."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped  # ::ffff:203.0.113.1 is the VIP all the same
    if address.is_unspecified:
        return "a wildcard listens on every address of the host, the VIPs included"
    for service in services:
        if address == service.vip:
            return f"it is the VIP of service {service.name!r}"
    for i, floating in enumerate(failover.addresses if failover is not None else ()):
        if address == floating.address.ip:
            return f"it is a floating address (failover.addresses[{i}]), held only by the active distributor"
    return None


def _interface(table: TableReader) -> str:
    value = table.get("interface", "auto")
    if not isinstance(value, str) or len(value) > 15 or "/" in value or " " in value:
        raise ConfigError(f"{table.key('interface')}: {show(value)} is not valid; expected \"auto\" (the cluster-side "
                          "interface), an interface name such as \"int0\", or \"\" (any interface)")
    return value


def _check_failover_addresses(failover: FailoverConfig, nodes: dict[str, ipaddress.IPv4Address],
                              services: tuple[ServiceSpec, ...], health: "HealthConfig | None") -> None:
    """What only the whole config can tell: addresses the failover section shares with the rest."""
    owner = next((n for n, a in nodes.items() if a == failover.address), None)
    if owner is not None:
        raise ConfigError(f"failover.address: {failover.address} is node {owner}'s address; expected this "
                          "distributor's own address on the cluster LAN")
    floating = {entry.address.ip for entry in failover.addresses}
    for service in services:
        if service.vip == failover.address:
            raise ConfigError(f"failover.address: {failover.address} is service {service.name}'s VIP, which moves "
                              "between the distributors; expected this distributor's own address")
        if service.vip not in floating:
            prefix = "/128" if service.vip.version == 6 else "/32"
            raise ConfigError(f"failover.addresses: service {service.name}'s VIP {service.vip} is not among them, so "
                              f"a backup taking over would not hold it; add {{ address = \"{service.vip}{prefix}\", "
                              "interface = ... }")
    if health is not None and health.listen[1] == failover.listen[1]:
        raise ConfigError(f"failover.listen: port {failover.listen[1]} is health.listen's too; the heartbeats "
                          "and the sync stream need a port each")


def _lifetime(table: TableReader) -> float:
    value = table.number("address_lifetime", 1.0, 0, inclusive=True, high=86_400)
    if 0 < value < 1:
        raise ConfigError(f"failover.address_lifetime: {value!r} is not valid; expected 0 (permanent addresses) or "
                          ">= 1 second (the kernel counts address lifetimes in whole seconds)")
    return value


def _health(top: TableReader) -> HealthConfig | None:
    if "health" not in top.data:
        return None
    health = top.table("health")
    if not health.boolean("enabled", True):
        return None  # the other keys stay valid but unused
    defaults = HealthSettings()
    try:
        settings = HealthSettings(
            tick=health.number("tick", defaults.tick, 0.001, inclusive=True, high=60),
            warning=health.integer("warning", defaults.warning, 0, 100_000),
            dead=health.integer("dead", defaults.dead, 1, 100_000),
            rise=health.integer("rise", defaults.rise, 1, 1000),
            slow_start=health.number("slow_start", defaults.slow_start, 0, inclusive=True),
            max_interval=health.number("max_interval", defaults.max_interval, 0, inclusive=True),
            flap_half_life=health.number("flap_half_life", defaults.flap_half_life, 0),
            flap_suppress=health.number("flap_suppress", defaults.flap_suppress, 0, inclusive=True),
            flap_reuse=health.number("flap_reuse", defaults.flap_reuse, 0),
        )
    except ValueError as exc:
        if isinstance(exc, ConfigError):
            raise
        raise ConfigError(str(exc)) from None
    listen = _control_endpoint(health, "listen", "0.0.0.0:8405")
    interface = _interface(health)
    keys_file = health.string("keys_file")
    freshness = health.number("freshness", 5.0, 0)
    on_dead = OnDead(health.string("on_dead", OnDead.KEEP.value, tuple(o.value for o in OnDead)))
    health.done()
    assert listen is not None
    return HealthConfig(settings, listen, interface, keys_file, freshness, on_dead)


def _alerts(top: TableReader) -> tuple[str | None, SmtpSettings | None]:
    alerts = top.table("alerts")
    log_file = alerts.get("log_file", "")
    if not isinstance(log_file, str):
        raise ConfigError(f"alerts.log_file: {_show(log_file)} is not valid; expected a file path or \"\" to disable")
    smtp = None
    if "smtp" in alerts.data:
        table = alerts.table("smtp")
        host = table.string("host")
        recipients = table.get("recipients")
        if not isinstance(recipients, list) or not recipients or not all(isinstance(r, str) and "@" in r for r in recipients):
            raise ConfigError(
                f"alerts.smtp.recipients: {_show(recipients)} is not valid; expected a list of e-mail addresses"
            )
        password = table.get("password", "")
        password_file = table.get("password_file", "")
        for key, value in (("password", password), ("password_file", password_file),
                           ("username", table.get("username", ""))):
            if not isinstance(value, str):
                raise ConfigError(f"alerts.smtp.{key}: {_show(value)} is not valid; expected a string")
        if password_file:
            try:
                password = Path(password_file).read_text(encoding="utf-8").strip()
            except OSError as exc:
                raise ConfigError(f"alerts.smtp.password_file: cannot read {password_file!r}: {exc.strerror}") from None
            except UnicodeDecodeError as exc:
                raise ConfigError(f"alerts.smtp.password_file: {password_file!r} is not UTF-8 text (byte "
                                  f"{exc.start})") from None
        smtp = SmtpSettings(
            host=host,
            port=table.integer("port", 25, 1, 65535),
            sender=table.string("sender", "distributor@localhost"),
            recipients=tuple(recipients),
            starttls=table.boolean("starttls", False),
            username=table.get("username", ""),
            password=password,
            timeout=table.number("timeout", 10.0, 0),
            retries=table.integer("retries", 3, 0, 100),
        )
        table.done()
    alerts.done()
    return log_file or None, smtp


def _listen(table: TableReader, name: str, default: str = "") -> tuple[str, int] | None:
    return table.endpoint(name, default)


def _metrics_allow(table: TableReader, listen: tuple[str, int] | None) -> tuple[ipaddress.IPv4Address, ...]:
    """[metrics] allow: monitoring hosts (besides the cluster's own) the guard lets reach the metrics port."""
    raw = table.get("allow", [])
    expected = 'a list of IPv4 addresses of monitoring hosts, such as ["198.51.100.9"]'
    if not isinstance(raw, list):
        raise ConfigError(f"{table.key('allow')}: {_show(raw)} is not valid; expected {expected}")
    allowed = []
    for item in raw:
        try:
            if not isinstance(item, str):
                raise TypeError(item)  # ipaddress would take 5 for 0.0.0.5
            allowed.append(ipaddress.IPv4Address(item))
        except (ValueError, TypeError):
            raise ConfigError(f"{table.key('allow')}: {_show(item)} is not valid; expected {expected}") from None
    if allowed and listen is None:
        raise ConfigError(f"{table.key('allow')}: set, but metrics.listen is empty: there is no metrics port to allow")
    return tuple(allowed)


def _nodes(top: TableReader) -> tuple[dict[str, ipaddress.IPv4Address], dict[str, ipaddress.IPv6Address]]:
    """[nodes]: each node's IPv4 address, and the IPv6 one (``address6``) of those that have one."""
    nodes_table = top.table("nodes", required=True)
    if not nodes_table.data:
        raise ConfigError("nodes: at least one node is required, e.g. [nodes.web1] address = \"198.51.100.11\"")
    nodes: dict[str, ipaddress.IPv4Address] = {}
    nodes6: dict[str, ipaddress.IPv6Address] = {}
    for node_name in nodes_table.data:
        if not is_node_name(node_name):
            raise ConfigError(f"nodes.{node_name}: the name {node_name!r} is not valid; expected {NODE_NAME_RULE}")
        node = nodes_table.table(node_name, required=True)
        address = node.ipv4("address")
        problem = unusable_address(address)
        if problem is not None:
            raise ConfigError(f"nodes.{node_name}.address: {address} is {problem}; expected the node's unicast address")
        twin = next((other for other, a in nodes.items() if a == address), None)
        if twin is not None:
            raise ConfigError(f"nodes.{node_name}.address: {address} is {twin}'s address too; each node has its own")
        nodes[node_name] = address
        if node.has("address6"):
            address6 = _ipv6(node, "address6", "the node's IPv6 address, such as \"2001:db8:198::11\"")
            twin = next((other for other, a in nodes6.items() if a == address6), None)
            if twin is not None:
                raise ConfigError(f"nodes.{node_name}.address6: {address6} is {twin}'s address6 too; each node has "
                                  "its own")
            nodes6[node_name] = address6
        node.done()
    nodes_table.done()
    return nodes, nodes6


def _unusable6(address: ipaddress.IPv6Address) -> str | None:
    """Why an IPv6 VIP, node or floating address cannot be ``address``, or None."""
    if address.ipv4_mapped is not None:
        return "an IPv4-mapped address (write the IPv4 address as such)"
    if address.is_link_local:
        return "a link-local address (valid on one link only, and needing a zone)"
    return unusable_address(address)


def _ipv6(table: TableReader, name: str, what: str) -> ipaddress.IPv6Address:
    value = table.get(name)
    try:
        if not isinstance(value, str):
            raise ValueError
        address = ipaddress.IPv6Address(value)
    except ValueError:
        raise ConfigError(f"{table.key(name)}: {show(value)} is not valid; expected {what}") from None
    problem = _unusable6(address)
    if problem is not None:
        raise ConfigError(f"{table.key(name)}: {address} is {problem}; expected {what}")
    return address


# Control traffic (heartbeats, the sync stream, the API, metrics) stays on the cluster LAN's IPv4.
_CONTROL_IPV4 = ("control traffic (heartbeats, the sync stream, the API, metrics) stays on the cluster LAN's IPv4, "
                 "IPv6 addresses are for the services only")


def _control_endpoint(table: TableReader, name: str, default: str = "") -> tuple[str, int] | None:
    """An ``"ADDRESS:PORT"`` of control traffic: IPv4 only."""
    endpoint = _listen(table, name, default)
    if endpoint is not None and ":" in endpoint[0]:
        raise ConfigError(f"{table.key(name)}: {show(table.get(name))} is not valid: {_CONTROL_IPV4}; expected an "
                          "IPv4 \"ADDRESS:PORT\" such as \"198.51.100.2:8406\"")
    return endpoint


def _control_ipv4(table: TableReader, name: str) -> ipaddress.IPv4Address:
    value = table.get(name)
    if isinstance(value, str) and ":" in value:
        raise ConfigError(f"{table.key(name)}: {show(value)} is not valid: {_CONTROL_IPV4}; expected an IPv4 "
                          "address such as \"198.51.100.2\"")
    return table.ipv4(name)


def _services(top: TableReader, nodes: dict[str, ipaddress.IPv4Address],
              nodes6: dict[str, ipaddress.IPv6Address]) -> tuple[ServiceSpec, ...]:
    raw = top.get("services")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"services: {_show(raw)} is not valid; expected at least one [[services]] table")
    services: list[ServiceSpec] = []
    seen_vips: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], str] = {}
    backend_owner: dict[tuple[ipaddress.IPv4Address | ipaddress.IPv6Address, int], str] = {}
    for i, item in enumerate(raw):
        svc = TableReader(item, f"services[{i}]")
        name = svc.string("name", f"service{i}")
        if any(service.name == name for service in services):
            raise ConfigError(f"{svc.key('name')}: {name!r} names another service too; service names are unique")
        raw_vip = svc.get("vip")
        if isinstance(raw_vip, str) and ":" in raw_vip:
            vip = _ipv6(svc, "vip", "the IPv6 address clients connect to, such as \"2001:db8:203::1\"")
            node = next((n for n, a in nodes6.items() if a == vip), None)
            if node is not None:
                raise ConfigError(f"{svc.key('vip')}: {vip} is node {node}'s address6; a VIP is the distributor's own")
        else:
            vip = svc.ipv4("vip")
            problem = unusable_address(vip)
            if problem is not None:
                raise ConfigError(f"{svc.key('vip')}: {vip} is {problem}; expected the address clients connect to")
        node = next((n for n, a in nodes.items() if a == vip), None)
        if node is not None:
            raise ConfigError(f"{svc.key('vip')}: {vip} is node {node}'s address; a VIP is the distributor's own")
        port = svc.integer("port", 80, 1, 65535)
        policy_text = svc.string("policy", Policy.ROUND_ROBIN.value, tuple(p.value for p in Policy))
        persistence = svc.number("persistence", 0, 0, inclusive=True, high=86_400)
        if (vip, port) in seen_vips:
            endpoint = f"[{vip}]:{port}" if vip.version == 6 else f"{vip}:{port}"
            raise ConfigError(f"{svc.key('vip')}: {endpoint} is already served by service {seen_vips[(vip, port)]!r}")
        seen_vips[(vip, port)] = name
        raw_backends = svc.get("backends")
        if not isinstance(raw_backends, list) or not raw_backends:
            raise ConfigError(
                f"{svc.key('backends')}: {_show(raw_backends)} is not valid; expected a list of node names or "
                '{ node = "web1", port = 80, weight = 1 } tables'
            )
        backends = []
        for j, entry in enumerate(raw_backends):
            where = f"{svc.key('backends')}[{j}]"
            if isinstance(entry, str):
                entry = {"node": entry}
            backend = TableReader(entry, where)
            node_name = backend.string("node")
            if node_name not in nodes:
                raise ConfigError(f"{backend.key('node')}: {node_name!r} is not a node; known nodes: {', '.join(nodes)}")
            backend_port = backend.integer("port", port, 1, 65535)
            weight = backend.integer("weight", 1, 0, MAX_WEIGHT)
            backend.done()
            if vip.version == 6:
                if node_name not in nodes6:
                    raise ConfigError(f"{backend.key('node')}: node {node_name} has no IPv6 address, and service "
                                      f"{name!r} has the IPv6 VIP {vip}; add address6 = \"...\" (its IPv6 address) "
                                      f"to [nodes.{node_name}], or serve it over IPv4 only")
                address = nodes6[node_name]
            else:
                address = nodes[node_name]
            # A backend's replies are matched on (address, port); two services
            # sharing one would make the reply direction ambiguous.
            owner = backend_owner.get((address, backend_port))
            if owner is not None:
                raise ConfigError(
                    f"{where}: {node_name} ({address}:{backend_port}) already serves {owner}; give this service another port"
                )
            backend_owner[(address, backend_port)] = f"{name}"
            backends.append(BackendSpec(node_name, address, backend_port, weight))
        svc.done()
        if not any(b.weight for b in backends):
            raise ConfigError(f"{svc.key('backends')}: every backend has weight 0, so no connection could be placed; "
                              "give at least one a weight from 1")
        services.append(ServiceSpec(name, vip, port, Policy.parse(policy_text), tuple(backends), persistence))
    return tuple(services)
