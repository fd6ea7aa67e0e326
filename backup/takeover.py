"""Claiming, releasing and announcing the floating addresses (adapter).

Contract: :class:`AddressOwner` is prepared once at start (interfaces looked
up, gratuitous ARP frames crafted with scapy, one AF_PACKET socket opened
per interface and kept), so a takeover costs only netlink calls and socket
sends.  Netlink goes through pyroute2's asyncio API, on the daemon's own
loop.  :meth:`claim` and :meth:`release` are idempotent (an address already
present, or already gone, is not an error); with a lifetime, an address
vanishes by itself unless it is claimed again in time (the failover core
renews it while active), so a daemon killed without a chance to release its
addresses loses them within that lifetime.  :meth:`announce` sends
``garp_count`` gratuitous ARP requests per address on its interface; the
caller schedules the second burst.  Gratuitous ARP *requests* are used, as
keepalived does: Linux updates an existing neighbour entry from one even
with ``arp_accept = 0``, and overrides its ``locktime`` for it.

IPv6 floating addresses are added with ``IFA_F_NODAD`` (a takeover cannot wait
a second of duplicate address detection, and the address is meant to move) and
announced by unsolicited neighbour advertisements (RFC 4861 section 7.2.6:
Override set so neighbours replace the cached link-layer address, Solicited
clear, Router set since the distributor forwards; to all nodes, ff02::1, hop
limit 255, with the Target Link-Layer Address option), ``garp_count`` per
address per burst beside the gratuitous ARPs.  They leave through an
AF_PACKET socket bound with protocol 0, which sends and receives nothing else
(one bound to IPv6 would be handed a copy of every IPv6 packet).
"""

from __future__ import annotations

import errno
import ipaddress
import logging
import math
import socket
from dataclasses import dataclass

from pyroute2 import AsyncIPRoute
from pyroute2.netlink.exceptions import NetlinkError

log = logging.getLogger("distributor.takeover")

ETH_P_ARP = 0x0806
IFA_F_NODAD = 0x02  # linux/if_addr.h: no duplicate address detection (IPv6)


@dataclass(frozen=True)
class FloatingAddress:
    address: ipaddress.IPv4Interface | ipaddress.IPv6Interface
    interface: str


class AddressOwner:
    def __init__(self, addresses: list[FloatingAddress], garp_count: int = 3):
        self.addresses = addresses
        self.garp_count = garp_count
        self.announcements = 0
        self._ipr = None
        self._index: dict[str, int] = {}
        self._sockets: dict[str, socket.socket] = {}  # per interface: gratuitous ARP
        self._sockets6: dict[str, socket.socket] = {}  # per interface with an IPv6 address: neighbour advertisements
        self._frames: list[tuple[socket.socket, str, bytes, str]] = []  # (socket, interface, frame, what), in order

    async def prepare(self) -> None:
        self._ipr = AsyncIPRoute()
        try:
            for floating in self.addresses:
                name = floating.interface
                if name not in self._index:
                    found = await self._ipr.link_lookup(ifname=name)
                    if not found:
                        raise OSError(f"no interface {name!r} for floating address {floating.address}")
                    self._index[name] = found[0]
                    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
                    sock.bind((name, 0))
                    sock.setblocking(False)
                    self._sockets[name] = sock
                links = [link async for link in await self._ipr.get_links(self._index[name])]
                mac = links[0].get_attr("IFLA_ADDRESS")
                if floating.address.version == 6:
                    if name not in self._sockets6:
                        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
                        sock.bind((name, 0))
                        sock.setblocking(False)
                        self._sockets6[name] = sock
                    self._frames.append((self._sockets6[name], name, _na_frame(mac, str(floating.address.ip)),
                                         "a neighbour advertisement"))
                else:
                    self._frames.append((self._sockets[name], name, _garp_frame(mac, str(floating.address.ip)),
                                         "gratuitous ARP"))
        except BaseException:
            self.close()
            raise

    async def claim(self, lifetime: float | None = None) -> None:
        """Add the addresses, or renew them: with ``lifetime`` they vanish by themselves unless claimed again."""
        for floating in self.addresses:
            options = {}
            if lifetime:
                seconds = max(1, math.ceil(lifetime))
                options = {"valid_lft": seconds, "preferred_lft": seconds}
            if floating.address.version == 6:
                options["flags"] = IFA_F_NODAD
            try:
                # "replace" adds a missing address and updates a present one's lifetimes in place.
                await self._ipr.addr("replace", index=self._index[floating.interface], address=str(floating.address.ip),
                                     prefixlen=floating.address.network.prefixlen, **options)
            except NetlinkError as exc:
                raise OSError(f"cannot add {floating.address} to {floating.interface}: {exc}") from None

    async def release(self) -> None:
        for floating in self.addresses:
            try:
                await self._ipr.addr("del", index=self._index[floating.interface], address=str(floating.address.ip),
                                     prefixlen=floating.address.network.prefixlen)
            except NetlinkError as exc:
                if exc.code not in (errno.EADDRNOTAVAIL, errno.ENOENT, errno.ENODEV):
                    log.error("cannot remove %s from %s: %s", floating.address, floating.interface, exc)

    def announce(self) -> None:
        for _ in range(self.garp_count):
            for sock, name, frame, what in self._frames:
                try:
                    sock.send(frame)
                except OSError as exc:
                    log.warning("cannot send %s on %s: %s", what, name, exc)
        self.announcements += 1

    def close(self) -> None:
        for sock in [*self._sockets.values(), *self._sockets6.values()]:
            sock.close()
        self._sockets.clear()
        self._sockets6.clear()
        self._frames.clear()
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None


def _garp_frame(mac: str, ip: str) -> bytes:
    from scapy.layers.l2 import ARP, Ether

    return bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=mac) / ARP(op=1, hwsrc=mac, psrc=ip, hwdst="00:00:00:00:00:00", pdst=ip))


def _na_frame(mac: str, ip: str) -> bytes:
    """An unsolicited neighbour advertisement for ``ip`` at ``mac`` (RFC 4861 section 7.2.6), as an Ethernet frame."""
    from scapy.layers.inet6 import IPv6, ICMPv6ND_NA, ICMPv6NDOptDstLLAddr
    from scapy.layers.l2 import Ether

    return bytes(Ether(dst="33:33:00:00:00:01", src=mac) / IPv6(src=ip, dst="ff02::1", hlim=255)
                 / ICMPv6ND_NA(R=1, S=0, O=1, tgt=ip) / ICMPv6NDOptDstLLAddr(lladdr=mac))
