"""Checksums of packets the kernel queues with a partial checksum (CHECKSUM_PARTIAL), pure.

Contract
--------
When NFQUEUE runs with ``F_GSO``, the kernel hands packets over without
completing their checksum first.  Such a packet is flagged
``SKB_CSUMNOTREADY``: its TCP (or UDP) checksum field holds the folded,
uncomplemented sum of the IPv4 pseudo-header only (source, destination,
protocol, L4 length; ``__tcp_v4_send_check``), and the device was to add the
segment's own words and complement at transmit time.

Rewriting an address of such a packet:

* the IPv4 header checksum is always a complete checksum: patch it fully
  (RFC 1624, equation 3) -- :func:`replace_full`;
* the L4 field is patched the way the kernel's
  ``inet_proto_csum_replace4(..., pseudohdr=true)`` does for
  CHECKSUM_PARTIAL: the difference is added and the result is NOT
  complemented -- :func:`replace_partial`.  Ports are not in the
  pseudo-header, so a port rewrite needs no change to a partial field.

What the kernel does next (Linux 6.18, measured by ``tests/e2e/test_nfqueue_binding.py``):
a verdict that carries a payload makes ``nfqnl_mangle`` set
``ip_summed = CHECKSUM_NONE``, so the kernel forgets that the field was
partial.  Then:

* a GSO packet that leaves through a device is segmented in software, and
  ``tcp4_gso_segment`` recomputes every segment's checksum from the
  (rewritten) addresses: the partial field's value does not matter, but the
  partial rule keeps it right anyway;
* any other packet is taken as it stands, so its checksum must be complete:
  a packet that is not GSO, and a GSO packet whose checksum the kernel
  verifies before it is segmented -- delivered to a local socket, or tracked
  by conntrack after the queue (``nf_conntrack_checksum=1``, the default,
  verifies TCP checksums in PREROUTING and marks a bad one INVALID, so NAT
  skips it: measured, see docs/performance.md).  Rewrite mode keeps its flows out of conntrack (``CT
  --notrack``) and forwards them, so only its non-GSO packets need it.
  :func:`complete` turns a correct partial field into the complete checksum
  (one pass over the segment).

:func:`rewrite_address` does all of this for one address of a TCP/IPv4
packet given the packet's skb info flags; :func:`needs_completion` states the
rule.  Sums here are one's-complement sums of big-endian 16-bit words
(RFC 1071); "folded" means reduced to 16 bits with end-around carry.
"""

from __future__ import annotations

__all__ = [
    "fold",
    "address_delta",
    "pseudo_header_sum",
    "replace_partial",
    "replace_full",
    "patch_partial",
    "patch_full",
    "complete",
    "needs_completion",
    "rewrite_address",
    "SOURCE",
    "DESTINATION",
]

# Same values as distributor.nfqueue's SKB_* flags (NFQA_SKB_INFO); repeated so the core imports no adapter.
SKB_CSUMNOTREADY = 1 << 0
SKB_GSO = 1 << 1

SOURCE = 12  # offset of the source address in an IPv4 header
DESTINATION = 16
_IP_CHECKSUM = 10
_TCP_CHECKSUM = 16  # offset of the checksum in a TCP header
_TCP = 6


def fold(total: int) -> int:
    """A non-negative sum folded to 16 bits with end-around carry (RFC 1071)."""
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def address_delta(old: bytes, new: bytes) -> int:
    """The folded sum ~old + new over the two 16-bit words of an IPv4 address (RFC 1624's ~m + m')."""
    if len(old) != 4 or len(new) != 4:
        raise ValueError(f"IPv4 addresses are 4 bytes: got {bytes(old).hex()} and {bytes(new).hex()}")
    return fold((~((old[0] << 8) | old[1]) & 0xFFFF) + (~((old[2] << 8) | old[3]) & 0xFFFF)
                + ((new[0] << 8) | new[1]) + ((new[2] << 8) | new[3]))


def pseudo_header_sum(source: bytes, destination: bytes, protocol: int, l4_length: int) -> int:
    """What a partial checksum field holds: the folded, uncomplemented IPv4 pseudo-header sum (RFC 793 3.1)."""
    return fold(((source[0] << 8) | source[1]) + ((source[2] << 8) | source[3])
                + ((destination[0] << 8) | destination[1]) + ((destination[2] << 8) | destination[3])
                + protocol + l4_length)


def replace_partial(field: int, delta: int) -> int:
    """A partial (pseudo-header) field after an address change of sum ``delta``: added, not complemented.

    The kernel: ``*sum = ~csum_fold(csum_partial(diff, csum_unfold(*sum)))``, and
    ``~csum_fold`` is the plain folded sum.
    """
    return fold(field + delta)


def replace_full(field: int, delta: int) -> int:
    """A complete checksum after a change of sum ``delta``: RFC 1624 equation 3, HC' = ~(~HC + ~m + m')."""
    return ~fold((~field & 0xFFFF) + delta) & 0xFFFF


def patch_partial(buf, offset: int, delta: int) -> None:
    """:func:`replace_partial` on the big-endian field at ``buf[offset:offset+2]``, in place."""
    value = fold(((buf[offset] << 8) | buf[offset + 1]) + delta)
    buf[offset] = value >> 8
    buf[offset + 1] = value & 0xFF


def patch_full(buf, offset: int, delta: int) -> None:
    """:func:`replace_full` on the big-endian field at ``buf[offset:offset+2]``, in place."""
    value = ~fold((~((buf[offset] << 8) | buf[offset + 1]) & 0xFFFF) + delta) & 0xFFFF
    buf[offset] = value >> 8
    buf[offset + 1] = value & 0xFF


def complete(buf, l4_offset: int, l4_length: int, check_offset: int = _TCP_CHECKSUM) -> int:
    """Turn the correct partial field of the segment at ``buf[l4_offset:l4_offset+l4_length]`` into its complete checksum.

    The device would have summed the segment (its field holding the pseudo-header
    sum) and stored the complement; this does the same, writes the result in
    place and returns it.  An odd-length segment is summed as if padded with a
    zero byte (RFC 1071).  ``int.from_bytes(...) % 0xFFFF`` is the one's-complement
    sum because 2**16 = 1 (mod 0xFFFF); it is one C-level pass, ~3 us for 1,460
    bytes on the project's VM.
    """
    segment = buf[l4_offset:l4_offset + l4_length]
    total = int.from_bytes(segment, "big")
    if l4_length & 1:
        total <<= 8
    # % 0xFFFF maps a sum of 0xFFFF to 0; both are one's-complement zero, and ~0 = 0xFFFF
    # is the form a real segment's checksum takes then (a real segment's sum is never 0).
    value = ~(total % 0xFFFF) & 0xFFFF
    field = l4_offset + check_offset
    buf[field] = value >> 8
    buf[field + 1] = value & 0xFF
    return value


def needs_completion(skb_info: int, verified_later: bool = False) -> bool:
    """Whether a mangled packet's partial L4 checksum must be completed before it goes back to the kernel.

    The kernel forgets CHECKSUM_PARTIAL on a mangled packet; only a GSO packet
    that is segmented on its way out has its checksum recomputed.
    ``verified_later``: the kernel checks this packet's checksum before any
    segmentation (local delivery, or conntrack tracks the flow after the queue).
    """
    if not skb_info & SKB_CSUMNOTREADY:
        return False
    return verified_later or not skb_info & SKB_GSO


def rewrite_address(packet, which: int, new: bytes, skb_info: int, *, verified_later: bool = False) -> None:
    """Rewrite the source (:data:`SOURCE`) or destination (:data:`DESTINATION`) of a TCP/IPv4 ``packet`` in place.

    ``packet`` is a writable buffer holding the whole packet (IPv4 header first).
    The IPv4 header checksum is patched fully; the TCP checksum by the partial
    rule when ``skb_info`` has CSUMNOTREADY, by RFC 1624 otherwise; a partial
    checksum is then completed when the kernel would not recompute it
    (:func:`needs_completion`, which says what ``verified_later`` means).
    """
    if which not in (SOURCE, DESTINATION):
        raise ValueError(f"which={which!r}: expected SOURCE ({SOURCE}) or DESTINATION ({DESTINATION})")
    if len(packet) < 20 or packet[0] >> 4 != 4 or packet[9] != _TCP:
        raise ValueError(f"not a TCP/IPv4 packet: {bytes(packet[:20]).hex()}")
    ihl = (packet[0] & 0x0F) * 4
    total_length = (packet[2] << 8) | packet[3]
    if ihl < 20 or total_length < ihl + 20 or total_length > len(packet):
        raise ValueError(f"IPv4 header length {ihl} and total length {total_length} do not fit a "
                         f"{len(packet)}-byte TCP packet")
    delta = address_delta(packet[which:which + 4], new)
    packet[which:which + 4] = new
    patch_full(packet, _IP_CHECKSUM, delta)
    check = ihl + _TCP_CHECKSUM
    if skb_info & SKB_CSUMNOTREADY:
        patch_partial(packet, check, delta)
        if verified_later or not skb_info & SKB_GSO:
            complete(packet, ihl, total_length - ihl)
    else:
        patch_full(packet, check, delta)
