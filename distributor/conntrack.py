"""Kernel mode's view of conntrack over netlink (adapter): is a connection still tracked, forget one.

Contract: :class:`Conntrack` opens its pyroute2 socket on first use, on the
daemon's asyncio loop.  :meth:`Conntrack.tracks` and :meth:`Conntrack.forget`
take a connection's 12-byte client -> VIP key; a missing entry is an answer
(False), not an error; other netlink errors raise.  :meth:`be_liberal` sets
the sysctl that lets conntrack pick connections up mid-stream after a takeover.
"""

from __future__ import annotations

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

    def __init__(self) -> None:
        self._socket = None

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

    async def _connect(self) -> None:
        if self._socket is None:
            self._socket = AsyncNFCTSocket()

    @staticmethod
    def _tuple(key: bytes):
        return NFCTAttrTuple(saddr=socket.inet_ntoa(key[0:4]), daddr=socket.inet_ntoa(key[4:8]), proto=socket.IPPROTO_TCP,
                             sport=int.from_bytes(key[8:10], "big"), dport=int.from_bytes(key[10:12], "big"))

    async def tracks(self, key: bytes) -> bool:
        """True when conntrack has the client -> VIP connection of this 12-byte key."""
        await self._connect()
        try:
            result = await self._socket.entry("get", tuple_orig=self._tuple(key))
            if hasattr(result, "__aiter__"):
                result = [entry async for entry in result]
            return bool(result)
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT
                return False
            raise

    async def forget(self, key: bytes) -> bool:
        """Delete the client -> VIP connection of this key from conntrack; False when it was not there."""
        await self._connect()
        try:
            await self._socket.entry("del", tuple_orig=self._tuple(key))
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
        """ForgetHandshakes: delete the unreplied connections whose reply would come from one of ``nodes``."""
        await self._connect()
        wanted = {(address, port) for address, port in nodes}
        forgotten = 0
        # The kernel filters by status (unreplied only, Linux >= 5.15): the dump stays small.
        result = await self._socket.dump(status=0, status_mask=IPS_SEEN_REPLY)
        entries = [entry async for entry in result] if hasattr(result, "__aiter__") else list(result)
        for entry in entries:
            reply = NFCTAttrTuple.from_netlink(socket.AF_INET, entry.get_attr("CTA_TUPLE_REPLY"))
            if reply.proto != socket.IPPROTO_TCP or (reply.saddr, reply.sport) not in wanted:
                continue
            original = NFCTAttrTuple.from_netlink(socket.AF_INET, entry.get_attr("CTA_TUPLE_ORIG"))
            try:
                await self._socket.entry("del", tuple_orig=original)
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
        await self._connect()
        result = await self._socket.dump(status=0, status_mask=IPS_ASSURED)
        count = 0
        if hasattr(result, "__aiter__"):
            async for _entry in result:
                count += 1
                if count >= limit:
                    break
        else:
            count = min(limit, sum(1 for _ in result))
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
        if self._socket is not None:
            self._socket.close()
            self._socket = None
