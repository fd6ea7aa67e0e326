"""The cluster testbed's topology, declared once as data.

Contract: :func:`build` returns the :class:`Topology` for ``nodes`` web nodes (and, with
``active_active``, that many distributors behind a router; with ``ipv6``, a dual-stack primary-backup
cluster: every link also has its IPv6 address, see below);
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

Dual stack (``build(ipv6=True)``, primary-backup only; the namespace runner builds it so, docker
compose does not): every link also gets an address from the documentation prefix 2001:db8::/32
(RFC 3849), the interface identifier mirroring the IPv4 host part::

   outside 2001:db8:203::/64                cluster LAN 2001:db8:198::/64
   client ::10, dist1 ::2, dist2 ::3        dist1 ::2, dist2 ::3, web<i> ::<10+i> (::11 ...), monitor ::9
   floating: VIP6 2001:db8:203::1 (port 80; the VIP6 is on-link for the client, whose neighbour
   discovery finds the active distributor), gateway 2001:db8:198::1 (the nodes' IPv6 default route)

Every host takes its addresses without duplicate address detection (``accept_dad`` 0: nothing
waits on DAD) and keeps them while a link is down (``keep_addr_on_down``, as IPv4 does); the
distributors forward IPv6 (``net.ipv6.conf.all.forwarding``).  Heartbeats, sync, API and metrics stay
on IPv4.
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
# Dual stack (build(ipv6=True)): the same plan in the documentation prefix (RFC 3849).
EXT_NET6 = ipaddress.IPv6Network("2001:db8:203::/64")
INT_NET6 = ipaddress.IPv6Network("2001:db8:198::/64")
VIP6 = ipaddress.IPv6Address("2001:db8:203::1")
GATEWAY6 = ipaddress.IPv6Address("2001:db8:198::1")
MONITOR6 = ipaddress.IPv6Interface("2001:db8:198::9/64")


def uplink_network(index: int) -> ipaddress.IPv4Network:
    """The /24 between the router (.1) and distributor ``index`` (.2)."""
    return ipaddress.IPv4Network(f"198.18.{index}.0/24")


@dataclass(frozen=True)
class Link:
    bridge: str  # "ext", "int", or an active-active uplink "up<i>"
    ifname: str  # interface name inside the host
    address: ipaddress.IPv4Interface
    address6: ipaddress.IPv6Interface | None = None  # dual stack only


def _link(bridge: str, ifname: str, host_part: int, ipv6: bool) -> Link:
    """A link on "ext" or "int" whose addresses end in ``host_part``: IPv4 .N, IPv6 ::N written alike
    (web1: 198.51.100.11 and 2001:db8:198::11)."""
    net, net6 = {"ext": (EXT_NET, EXT_NET6), "int": (INT_NET, INT_NET6)}[bridge]
    address6 = ipaddress.IPv6Interface(f"{net6.network_address}{host_part}/{net6.prefixlen}") if ipv6 else None
    return Link(bridge, ifname, ipaddress.IPv4Interface(f"{net[host_part]}/{net.prefixlen}"), address6)


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
    default_gateway6: ipaddress.IPv6Address | None = None  # dual stack: the IPv6 default route

    def address_on(self, bridge: str) -> ipaddress.IPv4Address:
        for link in self.links:
            if link.bridge == bridge:
                return link.address.ip
        raise KeyError(f"{self.name} has no link on bridge {bridge!r}")

    def address6_on(self, bridge: str) -> ipaddress.IPv6Address:
        for link in self.links:
            if link.bridge == bridge:
                if link.address6 is None:
                    raise KeyError(f"{self.name} has no IPv6 address on bridge {bridge!r} (not a dual-stack testbed)")
                return link.address6.ip
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
    # Dual stack (build(ipv6=True)): the IPv6 prefixes of "ext" and "int", the VIP6 and the nodes' IPv6 gateway.
    bridges6: dict[str, ipaddress.IPv6Network] = field(default_factory=dict)
    vip6: ipaddress.IPv6Address | None = None
    gateway6: ipaddress.IPv6Address | None = None

    @property
    def ipv6(self) -> bool:
        return self.vip6 is not None

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


# Dual stack: addresses usable at once (no DAD to wait for) and kept while a link is down, as IPv4's are
# (by default the kernel flushes a downed interface's IPv6 addresses).
_IPV6_SYSCTLS = tuple(
    (f"net.ipv6.conf.{scope}.{key}", value)
    for scope in ("all", "default")
    for key, value in (("accept_dad", "0"), ("keep_addr_on_down", "1"))
)
_IPV6_ROUTER_SYSCTLS = _IPV6_SYSCTLS + (("net.ipv6.conf.all.forwarding", "1"),)


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


def build(nodes: int = 3, monitor: bool = False, active_active: int = 0, ipv6: bool = False) -> Topology:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes {nodes}: a testbed has from 1 to {MAX_NODES} web nodes")
    if active_active:
        if ipv6:
            raise ValueError("ipv6: the active-active testbed is IPv4 only")
        return _build_active_active(nodes, monitor, active_active)
    extra6 = _IPV6_SYSCTLS if ipv6 else ()
    hosts = [Host("client", "client", (_link("ext", "eth0", 10, ipv6),), sysctls=_CLIENT_SYSCTLS + extra6)]
    for name, part in (("dist1", 2), ("dist2", 3)):
        hosts.append(Host(name, "distributor", (_link("ext", "ext0", part, ipv6), _link("int", "int0", part, ipv6)),
                          services=("distributor",),
                          sysctls=_ROUTER_SYSCTLS + (_IPV6_ROUTER_SYSCTLS if ipv6 else ())))
    hosts += [_web(n, ipv6=ipv6, sysctls=extra6) for n in range(1, nodes + 1)]
    if monitor:
        monitor_part = int(MONITOR.ip) - int(INT_NET.network_address)  # .9 and ::9
        hosts.append(Host("monitor", "monitor", (_link("int", "eth0", monitor_part, ipv6),),
                          services=MONITOR_SERVICES, sysctls=extra6))
    if not ipv6:
        return Topology(tuple(hosts))
    return Topology(tuple(hosts), bridges6={"ext": EXT_NET6, "int": INT_NET6}, vip6=VIP6, gateway6=GATEWAY6)


def _web(n: int, ipv6: bool = False, **extra) -> Host:
    """Web node ``n``: nginx and an agent at .10+n (dual stack: and ::10+n) on the cluster LAN, whose gateway
    is GATEWAY (and GATEWAY6)."""
    return Host(f"web{n}", "web", (_link("int", "eth0", 10 + n, ipv6),), default_gateway=GATEWAY,
                services=("nginx", "agent"), default_gateway6=GATEWAY6 if ipv6 else None, **extra)


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
