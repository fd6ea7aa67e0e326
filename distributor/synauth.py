"""SYN authentication under a flood: new clients prove their address before their SYN goes on (pure).

Contract
--------
:class:`SynAuth` is consulted by the interposer for every SYN that would open a connection.  While
it is not *active* it lets every SYN through.  It becomes active when the table holds more than
``threshold`` half-open connections (a spoofed SYN flood fills the table with them; real clients
finish their handshakes in a round trip), and inactive again once the half-open count stayed below
a quarter of that for ``calm`` seconds.

While active, a SYN from a client address that has not proved itself is dropped and answered with
a SYN-ACK whose acknowledgment number is a cookie (HMAC-SHA256 of the 4-tuple and a 64-second time
slot, with a secret of this distributor).  That acknowledgment is wrong for the client's SYN, so a
real client answers with an RST carrying it as its sequence number (RFC 793, 3.4: "If the
connection is in a non-synchronized state ... and the incoming segment acknowledges something not
yet sent, ... a reset is sent ... <SEQ=SEG.ACK><CTL=RST>") and retransmits its SYN after its
retransmission timeout (1 s).  The RST proves the address is real; the client is then *verified*
for ``trust`` seconds and its SYNs pass at once.  A spoofed source never sees the SYN-ACK, so its
SYNs never reach a node nor fill the table.  Clients that complete a handshake are verified too,
so returning clients are not delayed by a flood.

The cost of this is one retransmission timeout for a new client's first connection during a flood,
and one SYN-ACK sent per spoofed SYN (no amplification).  Until the threshold is crossed, SYNs go
on as usual: at 3,000 SYN/s a threshold of 64 admits about 64 spoofed SYNs (Linux's own SYN cookies
also start only once the SYN queue overflows).  Kernel-assisted mode answers the same way, and a
dropped SYN frees its unconfirmed conntrack entry, so conntrack does not fill either.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import struct

from . import checksum
from .conntable import ACK, RST, SYN, client_of, segment_key

__all__ = ["SynAuth", "SLOT"]

SLOT = 64.0  # seconds per cookie time slot; the current and the previous one are accepted


class SynAuth:
    def __init__(self, secret: bytes, threshold: int = 64, trust: float = 300.0, calm: float = 10.0,
                 capacity: int = 65536):
        if len(secret) < 16:
            raise ValueError("the SYN authentication secret needs at least 16 bytes")
        if threshold < 1:
            raise ValueError(f"syn_auth threshold {threshold!r} must be >= 1 half-open connection")
        self.secret = secret
        self.threshold = threshold
        self.trust = trust
        self.calm = calm
        self.capacity = capacity
        self.active = False
        self.always = False  # configured to authenticate every new client, flood or not
        self._quiet_since: float | None = None
        self._verified: collections.OrderedDict[bytes, float] = collections.OrderedDict()
        self.challenged = 0
        self.verified_by_rst = 0
        self.activations = 0

    def _cookie(self, key: bytes, slot: int) -> int:
        digest = hmac.new(self.secret, key + struct.pack("!q", slot), hashlib.sha256).digest()
        return int.from_bytes(digest[:4], "big")

    # -- the interposer's questions ---------------------------------------------------------------------
    def admits(self, client: bytes, half_open: int, now: float) -> bool:
        """May a SYN from ``client`` go on now?  (May switch authentication on.)"""
        if not self.active and (self.always or half_open > self.threshold):
            self.active = True
            self.activations += 1
            self._quiet_since = None
        if not self.active:
            return True
        until = self._verified.get(client)
        return until is not None and until > now

    def challenge(self, packet: bytes, now: float) -> bytes:
        """The SYN-ACK answering this SYN, from the VIP it was sent to, its acknowledgment a cookie."""
        self.challenged += 1
        key, _ = segment_key(packet)
        size = len(client_of(key))
        cookie = self._cookie(key, int(now // SLOT))
        return checksum.tcp_segment(key[size:2 * size], key[:size], int.from_bytes(key[-2:], "big"),
                                    int.from_bytes(key[-4:-2], "big"), cookie ^ 0x5A5A5A5A, cookie, SYN | ACK,
                                    window=1024)

    def answer(self, packet: bytes, now: float) -> bool:
        """A client's RST to a VIP: True (and the client verified) when it carries a cookie of ours."""
        key, tcp = segment_key(packet)
        if not packet[tcp + 13] & RST:
            return False
        seq = int.from_bytes(packet[tcp + 4:tcp + 8], "big")
        slot = int(now // SLOT)
        if seq not in (self._cookie(key, slot), self._cookie(key, slot - 1)):
            return False
        self.verified_by_rst += 1
        self.verify(client_of(key), now)
        return True

    def verify(self, client: bytes, now: float) -> None:
        """A client proved its address (a cookie, or a completed handshake)."""
        verified = self._verified
        verified[client] = now + self.trust
        verified.move_to_end(client)
        if len(verified) > self.capacity:
            verified.popitem(last=False)

    # -- housekeeping ---------------------------------------------------------------------------------------
    def settle(self, half_open: int, now: float) -> bool | None:
        """Called now and then: switches off once calm; returns the new state when it changed, else None."""
        verified = self._verified
        while verified and next(iter(verified.values())) <= now:
            verified.popitem(last=False)
        if not self.active or self.always:
            return None
        if half_open * 4 >= self.threshold:
            self._quiet_since = None
            return None
        if self._quiet_since is None:
            self._quiet_since = now
            return None
        if now - self._quiet_since >= self.calm:
            self.active = False
            return False
        return None

    @property
    def verified_clients(self) -> int:
        return len(self._verified)

