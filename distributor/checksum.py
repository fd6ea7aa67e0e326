"""Incremental Internet checksum updates (RFC 1624), for the per-packet path.

Contract: ``delta(old, new)`` precomputes, once per address/port pair, the
one's-complement sum ``~m + m'`` of RFC 1624 equation 3 over the 16-bit words
that change; ``patch(buf, offset, delta)`` applies it to the checksum stored
big-endian at ``buf[offset:offset+2]``.  Equation 3, HC' = ~(~HC + ~m + m'),
is used rather than equation 2 because it never produces the -0 (0xFFFF)
form that a full recomputation would not produce either.
"""

from __future__ import annotations

__all__ = ["delta", "combine", "patch"]


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
