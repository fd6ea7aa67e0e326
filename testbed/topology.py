"""The cluster testbed's topology, declared once as data.

Contract: :func:`build` returns the :class:`Topology` for ``nodes`` web nodes (and, with
``active_active``, that many distributors behind a router);
the namespace runner, the docker-compose generator, the tests, the demo and
the benchmarks all read it, so an address is written down in one place only.

Address plan (documentation ranges, RFC 5737, so nothing collides with a real
network)::

              outside: 203.0.113.0/24                     cluster LAN: 198.51.100.0/24
 client .10 ---[ bridge "ext" ]---+-- dist1 (primary) --+---[ bridge "int" ]--- web1 .11
                                  |   .2        .2      |                       web2 .12
                                  +-- dist2 (backup) ---+                       web3 .13
                                      .3        .3
 floating: VIP 203.0.113.1 (port 80), internal gateway 198.51.100.1 (the nodes' default route)

With ``monitor=True`` a ``monitor`` host joins the cluster LAN at .9, running Prometheus (9090),
Alertmanager (9093) and a mail sink for Alertmanager's e-mail (testbed.monitoring).

With ``active_active=N`` (2 to 4) the distributors are all active behind a BGP router that spreads
the VIP's flows over them by ECMP, and the nodes answer the client directly (direct server return;
docs/scale-out.md, "Routing")::

 client .10 --[ "ext" ]-- router .254            uplinks: 198.18.<i>.0/24 (RFC 2544's benchmark range)
                            |  .1 --[ "up<i>" ]-- dist<i> .2 (AS 65000+<i>, announces the VIP by BGP)
                            |                       | 198.51.100.<1+i>
                            +-- .1 ----------[ bridge "int" ]--- web1 .11 (VIP on lo) ...
 router: AS 65000, BIRD, one eBGP session (with BFD) per distributor; the nodes' default gateway.

The VIP lies in the outside /24, so the client reaches it through a host route via the router, and
every node holds it on ``lo`` without answering ARP for it.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field

EXT_NET = ipaddress.IPv4Network("203.0.113.0/24")
INT_NET = ipaddress.IPv4Network("198.51.100.0/24")
VIP = ipaddress.IPv4Address("203.0.113.1")
VIP_PORT = 80
GATEWAY = ipaddress.IPv4Address("198.51.100.1")
MAX_NODES = 50  # web nodes take .11 upwards on the cluster LAN
MONITOR = ipaddress.IPv4Interface("198.51.100.9/24")
MONITOR_SERVICES = ("mailsink", "alertmanager", "prometheus")
# Active-active (build(active_active=N)): the router, its uplinks to the distributors, the BGP numbering.
MAX_ACTIVE_ACTIVE = 4
ROUTER_EXT = ipaddress.IPv4Interface("203.0.113.254/24")
ROUTER_AS = 65000  # distributor i is AS ROUTER_AS + i: eBGP, so their equally long paths are merged
ANNOUNCE_TABLE = 100  # the kernel table a distributor puts "VIP dev lo" in while it wants the VIP announced


def uplink_network(index: int) -> ipaddress.IPv4Network:
    """The /24 between the router (.1) and distributor ``index`` (.2)."""
    return ipaddress.IPv4Network(f"198.18.{index}.0/24")


@dataclass(frozen=True)
class Link:
    bridge: str  # "ext", "int", or an active-active uplink "up<i>"
    ifname: str  # interface name inside the host
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class Route:
    destination: ipaddress.IPv4Network
    via: ipaddress.IPv4Address


@dataclass(frozen=True)
class Host:
    name: str
    role: str  # "client", "distributor", "web", "monitor" or "router"
    links: tuple[Link, ...]
    default_gateway: ipaddress.IPv4Address | None = None
    services: tuple[str, ...] = ()  # started in this order, stopped in reverse
    sysctls: tuple[tuple[str, str], ...] = ()  # those of an interface ("net.ipv4.conf.eth0.x") apply once it exists
    routes: tuple[Route, ...] = ()  # besides the default route
    loopback: tuple[ipaddress.IPv4Interface, ...] = ()  # addresses on lo (a DSR node's VIP)

    def address_on(self, bridge: str) -> ipaddress.IPv4Address:
        for link in self.links:
            if link.bridge == bridge:
                return link.address.ip
        raise KeyError(f"{self.name} has no link on bridge {bridge!r}")


@dataclass(frozen=True)
class Topology:
    hosts: tuple[Host, ...]
    bridges: dict[str, ipaddress.IPv4Network] = field(default_factory=lambda: {"ext": EXT_NET, "int": INT_NET})
    vip: ipaddress.IPv4Address = VIP
    vip_port: int = VIP_PORT
    gateway: ipaddress.IPv4Address = GATEWAY
    # The highest priority is active when both start: dist1 is the primary.
    priorities: dict[str, int] = field(default_factory=lambda: {"dist1": 200, "dist2": 100})
    active_active: int = 0  # distributors behind the BGP router, all active (0: a primary and a backup)

    def host(self, name: str) -> Host:
        for host in self.hosts:
            if host.name == name:
                return host
        known = ", ".join(h.name for h in self.hosts)
        raise KeyError(f"no host {name!r} in this testbed; hosts: {known}")

    def by_role(self, role: str) -> list[Host]:
        return [h for h in self.hosts if h.role == role]

    @property
    def web_nodes(self) -> list[Host]:
        return self.by_role("web")


_ROUTER_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    ("net.ipv4.conf.all.rp_filter", "0"),
    ("net.ipv4.conf.default.rp_filter", "0"),
    # Only the owner of a floating address answers ARP for it.
    ("net.ipv4.conf.all.arp_ignore", "1"),
    ("net.ipv4.conf.all.arp_announce", "2"),
)
_CLIENT_SYSCTLS = (
    ("net.ipv4.ip_local_port_range", "1024 65000"),
    ("net.ipv4.tcp_tw_reuse", "1"),
    # Timestamps without per-destination random offsets: a client port reused towards
    # the VIP after direct traffic to a node (benchmarks do both) would otherwise fail
    # the node's PAWS check against its TIME_WAIT socket and wait for a SYN retransmission.
    ("net.ipv4.tcp_timestamps", "2"),
)


# The BGP router in front of active-active distributors.
_BGP_ROUTER_SYSCTLS = (
    ("net.ipv4.ip_forward", "1"),
    # Loose: a node's reply comes in on "int" from the VIP, whose route points at the uplinks.
    ("net.ipv4.conf.all.rp_filter", "2"),
    ("net.ipv4.conf.default.rp_filter", "2"),
    # Layer-4 hashing; with the default (addresses only) one client's flows all take one path.
    ("net.ipv4.fib_multipath_hash_policy", "1"),
)
# A DSR node holds the VIP on lo and must not answer ARP for it on the LAN (nor announce it as a source),
# or it would draw the traffic meant for the distributors.
_DSR_NODE_SYSCTLS = tuple(
    (f"net.ipv4.conf.{dev}.{key}", value)
    for dev in ("all", "eth0", "lo")
    for key, value in (("arp_ignore", "1"), ("arp_announce", "2"))
)


def build(nodes: int = 3, monitor: bool = False, active_active: int = 0) -> Topology:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes {nodes}: a testbed has from 1 to {MAX_NODES} web nodes")
    if active_active:
        return _build_active_active(nodes, monitor, active_active)
    hosts = [
        Host("client", "client", (Link("ext", "eth0", ipaddress.IPv4Interface("203.0.113.10/24")),), sysctls=_CLIENT_SYSCTLS),
        Host(
            "dist1",
            "distributor",
            (
                Link("ext", "ext0", ipaddress.IPv4Interface("203.0.113.2/24")),
                Link("int", "int0", ipaddress.IPv4Interface("198.51.100.2/24")),
            ),
            services=("distributor",),
            sysctls=_ROUTER_SYSCTLS,
        ),
        Host(
            "dist2",
            "distributor",
            (
                Link("ext", "ext0", ipaddress.IPv4Interface("203.0.113.3/24")),
                Link("int", "int0", ipaddress.IPv4Interface("198.51.100.3/24")),
            ),
            services=("distributor",),
            sysctls=_ROUTER_SYSCTLS,
        ),
    ]
    hosts += [_web(n) for n in range(1, nodes + 1)]
    if monitor:
        hosts.append(Host("monitor", "monitor", (Link("int", "eth0", MONITOR),), services=MONITOR_SERVICES))
    return Topology(tuple(hosts))


def _web(n: int, **extra) -> Host:
    """Web node ``n``: nginx and an agent at .10+n on the cluster LAN, whose gateway is GATEWAY."""
    return Host(f"web{n}", "web", (Link("int", "eth0", ipaddress.IPv4Interface(f"198.51.100.{10 + n}/24")),),
                default_gateway=GATEWAY, services=("nginx", "agent"), **extra)


def _build_active_active(nodes: int, monitor: bool, count: int) -> Topology:
    if not 2 <= count <= MAX_ACTIVE_ACTIVE:
        raise ValueError(f"--active-active {count}: an active-active testbed has from 2 to {MAX_ACTIVE_ACTIVE} "
                         "distributors")
    vip_route = Route(ipaddress.IPv4Network(f"{VIP}/32"), ROUTER_EXT.ip)
    # Without the host route the client would ARP for the VIP, which lies in its own /24.
    hosts = [Host("client", "client", (Link("ext", "eth0", ipaddress.IPv4Interface("203.0.113.10/24")),),
                  sysctls=_CLIENT_SYSCTLS, routes=(vip_route,))]
    uplinks = {f"up{i}": uplink_network(i) for i in range(1, count + 1)}
    router_links = [Link("ext", "ext0", ROUTER_EXT)]
    router_links += [Link(bridge, bridge, ipaddress.IPv4Interface(f"{net[1]}/{net.prefixlen}"))
                     for bridge, net in uplinks.items()]
    router_links.append(Link("int", "int0", ipaddress.IPv4Interface(f"{GATEWAY}/{INT_NET.prefixlen}")))
    hosts.append(Host("router", "router", tuple(router_links), services=("bird",), sysctls=_BGP_ROUTER_SYSCTLS))
    for i, (bridge, net) in enumerate(uplinks.items(), start=1):
        hosts.append(
            Host(
                f"dist{i}",
                "distributor",
                (
                    Link(bridge, "up0", ipaddress.IPv4Interface(f"{net[2]}/{net.prefixlen}")),
                    Link("int", "int0", ipaddress.IPv4Interface(f"{INT_NET[1 + i]}/{INT_NET.prefixlen}")),
                ),
                default_gateway=net[1],
                services=("distributor",),
                sysctls=_ROUTER_SYSCTLS,
            )
        )
    # The nodes' gateway is the router: replies from the VIP go straight back through it.
    hosts += [_web(n, sysctls=_DSR_NODE_SYSCTLS, loopback=(ipaddress.IPv4Interface(f"{VIP}/32"),))
              for n in range(1, nodes + 1)]
    if monitor:
        hosts.append(Host("monitor", "monitor", (Link("int", "eth0", MONITOR),), services=MONITOR_SERVICES))
    return Topology(tuple(hosts), bridges={"ext": EXT_NET, "int": INT_NET, **uplinks}, priorities={},
                    active_active=count)
