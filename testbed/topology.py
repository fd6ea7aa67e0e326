"""The cluster testbed's topology, declared once as data.

Contract: :func:`build` returns the :class:`Topology` for ``nodes`` web nodes;
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


@dataclass(frozen=True)
class Link:
    bridge: str  # "ext" or "int"
    ifname: str  # interface name inside the host
    address: ipaddress.IPv4Interface


@dataclass(frozen=True)
class Host:
    name: str
    role: str  # "client", "distributor", "web" or "monitor"
    links: tuple[Link, ...]
    default_gateway: ipaddress.IPv4Address | None = None
    services: tuple[str, ...] = ()  # started in this order, stopped in reverse
    sysctls: tuple[tuple[str, str], ...] = ()

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


def build(nodes: int = 3, monitor: bool = False) -> Topology:
    if not 1 <= nodes <= MAX_NODES:
        raise ValueError(f"--nodes {nodes}: a testbed has from 1 to {MAX_NODES} web nodes")
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
    for n in range(1, nodes + 1):
        hosts.append(
            Host(
                f"web{n}",
                "web",
                (Link("int", "eth0", ipaddress.IPv4Interface(f"198.51.100.{10 + n}/24")),),
                default_gateway=GATEWAY,
                services=("nginx", "agent"),
            )
        )
    if monitor:
        hosts.append(Host("monitor", "monitor", (Link("int", "eth0", MONITOR),), services=MONITOR_SERVICES))
    return Topology(tuple(hosts))
