"""Incremental Internet checksum updates (RFC 1624), for the per-packet path.

Contract: ``delta(old, new)`` precomputes, once per address/port pair, the
one's-complement sum ``~m + m'`` of RFC 1624 equation 3 over the 16-bit words
that change; ``patch(buf, offset, delta)`` applies it to the checksum stored
big-endian at ``buf[offset:offset+2]``.  Equation 3, HC' = ~(~HC + ~m + m'),
is used rather than equation 2 because it never produces the -0 (0xFFFF)
form that a full recomputation would not produce either.
"""

from __future__ import annotations

import struct
import sys

__all__ = ["delta", "combine", "patch", "full", "tcp_segment"]


def _fold(value: int) -> int:
    while value >> 16:
        value = (value & 0xFFFF) + (value >> 16)
    return value


def delta(old: bytes, new: bytes) -> int:
    """One's-complement sum of ~old + new over 16-bit words (even-length inputs)."""
    if len(old) != len(new) or len(old) % 2:
        raise ValueError(f"cannot compute a checksum delta between {old.hex()} and {new.hex()}")
    total = 0
    for i in range(0, len(old), 2):
        total += (~((old[i] << 8) | old[i + 1]) & 0xFFFF) + ((new[i] << 8) | new[i + 1])
    return _fold(total)


def combine(*deltas: int) -> int:
    return _fold(sum(deltas))


def patch(buf: bytearray, offset: int, change: int) -> None:
    """Apply a precomputed delta to the checksum at ``buf[offset:offset+2]`` in place."""
    total = (~((buf[offset] << 8) | buf[offset + 1]) & 0xFFFF) + change
    total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    buf[offset] = checksum >> 8
    buf[offset + 1] = checksum & 0xFF


def full(data: bytes) -> int:
    """The Internet checksum of ``data`` (RFC 1071), for packets the distributor crafts itself."""
    if len(data) % 2:
        data += b"\0"
    total = sum(memoryview(data).cast("H"))
    # The cast reads host-order words; swap once at the end instead of per word.
    total = _fold(total)
    if sys.byteorder == "little":
        total = ((total & 0xFF) << 8) | (total >> 8)
    return ~total & 0xFFFF


def tcp_segment(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, window: int = 0) -> bytes:
    """A complete IPv4 or IPv6 packet (by the addresses' length, 4 or 16 bytes) carrying a TCP segment
    without options or payload, checksums set (IPv6 has no header checksum: RFC 8200 section 8.1)."""
    tcp = struct.pack("!HHIIBBHHH", sport, dport, seq, ack, 5 << 4, flags, window, 0, 0)
    if len(src) == 16:
        pseudo = src + dst + struct.pack("!IxxxB", len(tcp), 6)  # RFC 8200 section 8.1
        tcp = tcp[:16] + full(pseudo + tcp).to_bytes(2, "big") + tcp[18:]
        return struct.pack("!IHBB16s16s", 6 << 28, len(tcp), 6, 64, src, dst) + tcp
    pseudo = src + dst + struct.pack("!BBH", 0, 6, len(tcp))
    tcp = tcp[:16] + full(pseudo + tcp).to_bytes(2, "big") + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0x4000, 64, 6, 0, src, dst)
    ip = ip[:10] + full(ip).to_bytes(2, "big") + ip[12:]
    return ip + tcp
