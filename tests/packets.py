"""Test packets: crafted with scapy, checksums verified by an independent RFC 1071 sum."""

from __future__ import annotations

import struct

from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
from scapy.packet import Raw

VIP = "203.0.113.1"
CLIENT = "203.0.113.10"
WEB = {"web1": "198.51.100.11", "web2": "198.51.100.12", "web3": "198.51.100.13"}


def tcp(src, dst, sport, dport, flags="A", payload=b"", options=(), seq=1000, ack=2000, ip=None) -> bytes:
    """An IPv4/TCP packet; ``ip`` holds extra IP header fields (id, frag, flags, options...)."""
    layer = IP(src=src, dst=dst, **(ip or {})) / TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, options=list(options))
    if payload:
        layer = layer / Raw(payload)
    return bytes(layer)


def udp(src, dst, sport, dport, payload=b"x") -> bytes:
    return bytes(IP(src=src, dst=dst) / UDP(sport=sport, dport=dport) / Raw(payload))


def rfc1071(data: bytes) -> int:
    """The Internet checksum of ``data`` (odd length padded with a zero byte)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def checksums_valid(packet: bytes) -> bool:
    """True when both the IPv4 header checksum and the TCP checksum verify."""
    ihl = (packet[0] & 0x0F) * 4
    if rfc1071(packet[:ihl]) != 0:
        return False
    segment = packet[ihl:]
    pseudo = packet[12:20] + struct.pack("!BBH", 0, packet[9], len(segment))
    return rfc1071(pseudo + segment) == 0


def record_route() -> list:
    return [IPOption_RR()]
