"""Kernel mode's view of conntrack over netlink (adapter): is a connection still tracked, forget one.

Contract: :class:`Conntrack` opens its pyroute2 sockets on first use, on the
daemon's asyncio loop: one per family (ctnetlink takes the family of a get, a
delete or a dump from the message).  :meth:`Conntrack.tracks` and
:meth:`Conntrack.forget` take a connection's client -> VIP key, 12 bytes for
IPv4 (addresses 4 + 4, ports 2 + 2), 36 for IPv6 (16 + 16, 2 + 2); a missing
entry is an answer (False), not an error; other netlink errors raise.
:meth:`be_liberal` sets the sysctl that lets conntrack pick connections up
mid-stream after a takeover.
"""

from __future__ import annotations

import ipaddress
import logging
import socket

from pyroute2 import AsyncNFCTSocket
from pyroute2.netlink.exceptions import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_ASSURED, IPS_SEEN_REPLY, NFCTAttrTuple

__all__ = ["Conntrack"]

log = logging.getLogger("distributor.conntrack")


class Conntrack:
    """Kernel mode's view of conntrack: does the kernel still track a connection? (netlink, asyncio)."""

    LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"

    def __init__(self, ipv6: bool = False) -> None:
        """``ipv6``: the layout has IPv6 services, so the half-open count covers IPv6 connections too."""
        self.ipv6 = ipv6
        self._sockets: dict[int, AsyncNFCTSocket] = {}

    @classmethod
    def be_liberal(cls) -> None:
        # A backup that takes over meets connections mid-stream: conntrack picks them
        # up (nf_conntrack_tcp_loose), but without window history it would mark some
        # segments INVALID, and INVALID segments are not NATed.
        try:
            # A container's /proc/sys is read-only; its engine sets this one at creation
            # (docker-compose.yml, `sysctls`), so a value already in place needs no write.
            with open(cls.LIBERAL) as f:
                if f.read().strip() == "1":
                    return
        except OSError:
            pass
        try:
            with open(cls.LIBERAL, "w") as f:
                f.write("1\n")
        except OSError as exc:
            log.warning("cannot set %s: %s; connections may break after a takeover", cls.LIBERAL, exc)

    def _socket(self, family: int) -> AsyncNFCTSocket:
        sock = self._sockets.get(family)
        if sock is None:
            sock = self._sockets[family] = AsyncNFCTSocket(nfgen_family=family)
        return sock

    @staticmethod
    def _tuple(key: bytes) -> NFCTAttrTuple:
        """The original-direction tuple of a connection key (12 bytes: IPv4, 36: IPv6)."""
        if len(key) == 36:
            return NFCTAttrTuple(family=socket.AF_INET6, saddr=socket.inet_ntop(socket.AF_INET6, key[0:16]),
                                 daddr=socket.inet_ntop(socket.AF_INET6, key[16:32]), proto=socket.IPPROTO_TCP,
                                 sport=int.from_bytes(key[32:34], "big"), dport=int.from_bytes(key[34:36], "big"))
        if len(key) != 12:
            raise ValueError(f"a connection key is 12 bytes (IPv4) or 36 (IPv6), not {len(key)}")
        return NFCTAttrTuple(saddr=socket.inet_ntoa(key[0:4]), daddr=socket.inet_ntoa(key[4:8]), proto=socket.IPPROTO_TCP,
                             sport=int.from_bytes(key[8:10], "big"), dport=int.from_bytes(key[10:12], "big"))

    async def tracks(self, key: bytes) -> bool:
        """True when conntrack has the client -> VIP connection of this key."""
        original = self._tuple(key)
        try:
            result = await self._socket(original.family).entry("get", tuple_orig=original)
            if hasattr(result, "__aiter__"):
                result = [entry async for entry in result]
            return bool(result)
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT
                return False
            raise

    async def forget(self, key: bytes) -> bool:
        """Delete the client -> VIP connection of this key from conntrack; False when it was not there."""
        original = self._tuple(key)
        try:
            await self._socket(original.family).entry("del", tuple_orig=original)
            return True
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT
                return False
            raise

    async def confirm(self, keys) -> tuple[tuple[bytes, ...], tuple[bytes, ...]]:
        """(still tracked, gone) for ConfirmWithConntrack; on netlink trouble the rest count as alive."""
        alive: list[bytes] = []
        gone: list[bytes] = []
        for i, key in enumerate(keys):
            try:
                (alive if await self.tracks(key) else gone).append(key)
            except Exception as exc:  # keep the entries rather than miscount
                log.warning("cannot ask conntrack about a connection (%s); keeping %d entries", exc, len(keys) - i)
                alive.extend(keys[i:])
                break
        return tuple(alive), tuple(gone)

    async def forget_handshakes(self, nodes) -> int:
        """ForgetHandshakes: delete the unreplied connections whose reply would come from one of ``nodes``.

        ``nodes``: (address, port) pairs, IPv4 or IPv6 addresses; each family present is dumped once."""
        wanted = {(_canonical(address), port) for address, port in nodes}
        forgotten = 0
        for family in sorted({socket.AF_INET6 if ":" in address else socket.AF_INET for address, _ in wanted}):
            sock = self._socket(family)
            # The kernel filters by status (unreplied only, Linux >= 5.15): the dump stays small.
            result = await sock.dump(status=0, status_mask=IPS_SEEN_REPLY)
            entries = [entry async for entry in result] if hasattr(result, "__aiter__") else list(result)
            for entry in entries:
                reply = NFCTAttrTuple.from_netlink(family, entry.get_attr("CTA_TUPLE_REPLY"))
                if reply.proto != socket.IPPROTO_TCP or (_canonical(reply.saddr), reply.sport) not in wanted:
                    continue
                original = NFCTAttrTuple.from_netlink(family, entry.get_attr("CTA_TUPLE_ORIG"))
                try:
                    await sock.entry("del", tuple_orig=original)
                    forgotten += 1
                except NetlinkError as exc:
                    if exc.code != 2:  # ENOENT: it ended meanwhile
                        raise
        return forgotten

    async def count_half_open(self, limit: int) -> int:
        """Connections conntrack holds whose handshake the client never completed, counted up to ``limit``.

        Not ASSURED rather than unreplied: the node answers a spoofed SYN too (the reply passes
        here), but only a real client completes the handshake.
        """
        count = 0
        for family in (socket.AF_INET, socket.AF_INET6) if self.ipv6 else (socket.AF_INET,):
            result = await self._socket(family).dump(status=0, status_mask=IPS_ASSURED)
            if hasattr(result, "__aiter__"):
                async for _entry in result:
                    count += 1
                    if count >= limit:
                        break
            else:
                count = min(limit, count + sum(1 for _ in result))
            if count >= limit:
                break
        return count

    async def forget_all(self, keys, probes, send) -> None:
        """ForgetInConntrack: delete each connection, then ``send`` its probe (when it has one)."""
        for index, key in enumerate(keys):
            try:
                await self.forget(key)
            except Exception as exc:
                log.warning("cannot delete a connection from conntrack (%s); its client waits for its own timeout", exc)
                return
            if index < len(probes):
                send(probes[index])

    def close(self) -> None:
        for sock in self._sockets.values():
            sock.close()
        self._sockets.clear()


def _canonical(address) -> str:
    """One spelling per address (IPv6 text has several; the kernel's is inet_ntop's, as ipaddress's)."""
    return str(ipaddress.ip_address(str(address)))
