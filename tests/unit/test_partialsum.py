"""Partial (CHECKSUM_PARTIAL) checksum rules, against sums recomputed from scratch.

Expected values come from the definitions, not from the code under test: the
pseudo-header sum is summed here word by word from the RFC 793 layout, and
complete checksums are verified with the RFC 1071 sum of tests.packets over
pseudo-header + segment (a correct checksum makes that sum zero).
"""

from __future__ import annotations

import struct

import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from distributor import partialsum
from distributor.partialsum import DESTINATION, SOURCE
from tests.packets import checksums_valid, rfc1071, tcp

CSUMNOTREADY = 1
GSO = 2

addresses = st.binary(min_size=4, max_size=4)


def pseudo_sum_from_scratch(source: bytes, destination: bytes, protocol: int, length: int) -> int:
    """Folded, uncomplemented sum of the 12-byte pseudo-header, word by word."""
    header = source + destination + bytes([0, protocol]) + length.to_bytes(2, "big")
    total = sum(struct.unpack("!6H", header))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return total


def as_partial(packet: bytes) -> bytearray:
    """A packet as the kernel queues it with CHECKSUM_PARTIAL: the TCP field holds the pseudo-header sum."""
    out = bytearray(packet)
    ihl = (out[0] & 0x0F) * 4
    length = len(out) - ihl
    out[ihl + 16:ihl + 18] = pseudo_sum_from_scratch(bytes(out[12:16]), bytes(out[16:20]), 6, length).to_bytes(2, "big")
    return out


def tcp_field(packet) -> int:
    ihl = (packet[0] & 0x0F) * 4
    return int.from_bytes(packet[ihl + 16:ihl + 18], "big")


def ip_header_valid(packet) -> bool:
    ihl = (packet[0] & 0x0F) * 4
    return rfc1071(bytes(packet[:ihl])) == 0


@given(addresses, addresses, st.integers(20, 0xFFFF))
def test_pseudo_header_sum_matches_the_definition(source, destination, length):
    assert partialsum.pseudo_header_sum(source, destination, 6, length) == pseudo_sum_from_scratch(source, destination, 6, length)


@given(addresses, addresses, addresses, st.integers(20, 0xFFFF))
@example(b"\0\0\0\0", b"\0\0\0\1", b"\xff\xff\xff\xff", 20)
@example(b"\xff\xff\xff\xff", b"\xff\xff\xff\xff", b"\0\0\0\0", 0xFFFF)
def test_partial_rule_gives_the_new_pseudo_header_sum(source, destination, new_destination, length):
    # What inet_proto_csum_replace4(..., pseudohdr=true) must give for CHECKSUM_PARTIAL:
    # exactly the pseudo-header sum of the rewritten header, uncomplemented.
    field = pseudo_sum_from_scratch(source, destination, 6, length)
    delta = partialsum.address_delta(destination, new_destination)
    assert partialsum.replace_partial(field, delta) == pseudo_sum_from_scratch(source, new_destination, 6, length)


@given(st.binary(min_size=20, max_size=20), addresses)
def test_full_rule_matches_a_recomputed_header_checksum(header, new_source):
    header = bytearray(header)
    header[0] = 0x45  # a real header's sum is never zero, so the -0 form cannot arise
    header[10:12] = b"\0\0"
    header[10:12] = rfc1071(bytes(header)).to_bytes(2, "big")
    delta = partialsum.address_delta(bytes(header[12:16]), new_source)
    header[12:16] = new_source
    patched = partialsum.replace_full(int.from_bytes(header[10:12], "big"), delta)
    header[10:12] = b"\0\0"
    assert patched == rfc1071(bytes(header))


@given(st.binary(min_size=0, max_size=3000))
@example(b"")
@example(b"\xff")
@example(b"\xff" * 2999)
def test_complete_turns_a_partial_field_into_the_checksum_a_receiver_accepts(payload):
    packet = as_partial(tcp("203.0.113.10", "198.51.100.11", 40000, 80, "PA", payload=payload))
    value = partialsum.complete(packet, 20, len(packet) - 20)
    assert checksums_valid(bytes(packet))
    assert value == tcp_field(packet)


def test_complete_of_a_segment_whose_checksum_is_zero_writes_the_0xffff_form():
    # Find a payload word that makes the one's-complement sum 0xFFFF: the checksum is then -0 (0xFFFF),
    # never +0 (RFC 768/1071 practice; TCP accepts both, a full recomputation gives 0xFFFF here too).
    packet = as_partial(tcp("203.0.113.10", "198.51.100.11", 40000, 80, "PA", payload=b"\0\0"))
    segment = bytes(packet[20:])
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, len(segment))
    rest = rfc1071(pseudo + segment[:16] + b"\0\0" + segment[18:])  # ~sum without the two payload bytes' value
    word = (~rest) & 0xFFFF  # ... so that sum + word = 0xFFFF
    packet[-2:] = ((~word) & 0xFFFF).to_bytes(2, "big")
    packet = as_partial(bytes(packet))
    assert partialsum.complete(packet, 20, len(packet) - 20) == 0xFFFF
    assert checksums_valid(bytes(packet))


@pytest.mark.parametrize("which, new", [(DESTINATION, "198.51.100.12"), (SOURCE, "203.0.113.1")])
@pytest.mark.parametrize("payload", [b"", b"x", b"GET / HTTP/1.1\r\n\r\n", bytes(range(256)) * 5])
def test_rewrite_of_a_partial_non_gso_packet_leaves_complete_valid_checksums(which, new, payload):
    packet = as_partial(tcp("203.0.113.10", "198.51.100.11", 40000, 80, "PA", payload=payload))
    partialsum.rewrite_address(packet, which, bytes(map(int, new.split("."))), CSUMNOTREADY)
    assert bytes(packet[which:which + 4]) == bytes(map(int, new.split(".")))
    assert checksums_valid(bytes(packet))  # what the receiver verifies once the kernel forgot CHECKSUM_PARTIAL


@pytest.mark.parametrize("which", [DESTINATION, SOURCE])
def test_rewrite_of_a_partial_gso_packet_keeps_a_pseudo_header_field_and_a_valid_ip_header(which):
    payload = bytes(range(256)) * 200  # 51,200 bytes: a GSO packet
    packet = as_partial(tcp("198.51.100.11", "203.0.113.10", 80, 40000, "A", payload=payload))
    new = bytes([203, 0, 113, 1])
    partialsum.rewrite_address(packet, which, new, CSUMNOTREADY | GSO)
    assert ip_header_valid(packet)
    length = len(packet) - 20
    assert tcp_field(packet) == pseudo_sum_from_scratch(bytes(packet[12:16]), bytes(packet[16:20]), 6, length)
    assert bytes(packet[20:36]) == bytes(as_partial(tcp("198.51.100.11", "203.0.113.10", 80, 40000, "A"))[20:36])


def test_a_gso_packet_the_kernel_verifies_before_segmenting_is_completed_too():
    packet = as_partial(tcp("198.51.100.11", "203.0.113.10", 80, 40000, "A", payload=bytes(9000)))
    partialsum.rewrite_address(packet, DESTINATION, bytes([203, 0, 113, 2]), CSUMNOTREADY | GSO, verified_later=True)
    assert checksums_valid(bytes(packet))


@given(st.binary(max_size=1500), addresses)
def test_rewrite_of_a_complete_packet_is_rfc1624(payload, new):
    packet = bytearray(tcp("203.0.113.10", "203.0.113.1", 40000, 80, "PA", payload=payload))
    partialsum.rewrite_address(packet, DESTINATION, new, 0)
    assert checksums_valid(bytes(packet))


def test_ports_are_not_in_the_pseudo_header_so_a_port_rewrite_leaves_a_partial_field_alone():
    before = as_partial(tcp("203.0.113.10", "198.51.100.11", 40000, 80, "A"))
    after = as_partial(tcp("203.0.113.10", "198.51.100.11", 40000, 8080, "A"))
    assert tcp_field(before) == tcp_field(after)


def test_the_rules_for_completion():
    assert partialsum.needs_completion(CSUMNOTREADY)
    assert not partialsum.needs_completion(CSUMNOTREADY | GSO)
    assert partialsum.needs_completion(CSUMNOTREADY | GSO, verified_later=True)  # local delivery, conntrack
    assert not partialsum.needs_completion(0)
    assert not partialsum.needs_completion(GSO, verified_later=True)  # GRO'd, CHECKSUM_UNNECESSARY: complete already
    assert not partialsum.needs_completion(4)  # CSUM_NOTVERIFIED: the field is a complete checksum


@pytest.mark.parametrize("packet, match", [
    (bytes(10), "not a TCP/IPv4 packet"),
    (bytes.fromhex("4500001c0000000040110000") + bytes(16), "not a TCP/IPv4 packet"),  # UDP
    (bytes.fromhex("4f0000280000000040060000") + bytes(28), "header length 60"),
])
def test_rewrite_refuses_what_it_cannot_rewrite(packet, match):
    with pytest.raises(ValueError, match=match):
        partialsum.rewrite_address(bytearray(packet), DESTINATION, bytes(4), 0)


def test_rewrite_refuses_an_unknown_field():
    with pytest.raises(ValueError, match="which=14"):
        partialsum.rewrite_address(bytearray(tcp("1.2.3.4", "5.6.7.8", 1, 2)), 14, bytes(4), 0)


def test_address_delta_wants_ipv4_addresses():
    with pytest.raises(ValueError, match="4 bytes"):
        partialsum.address_delta(b"\1\2\3", b"\1\2\3\4")
