"""Hostile tools for the testbed: floods, loss, replays, probes and captures, each bounded in count and time.

Contract
--------
Everything here acts inside the namespaces of one testbed run and removes what it adds:

* **Floods** run as a separate process inside a host (``python -m testbed.hostile syn-flood|malformed-flood``,
  started by :func:`start_syn_flood` / :func:`start_malformed_flood`).  Their packets are built once before
  the first send (scapy builds a template, the pool is derived from it with ``struct``), then sent paced
  from a precomputed pool: no per-packet allocation, no per-packet scapy.  A flood stops by itself after
  ``seconds`` and prints one JSON summary line with the rate it really reached; :meth:`Flood.stop` ends it
  early, by pid.
* **Rules** (:func:`udp_loss`, :func:`partition`, :class:`PacketCounters`) live in chains named ``H*`` in
  the host's own namespace, installed and removed with ``iptables-restore --noflush`` in one transaction
  each; the context managers remove them also when the body raises.  Loss and partitions sit in the raw
  table (PREROUTING and OUTPUT), the first hook a packet meets, so no later ACCEPT of the daemon's own
  filter rules can bypass them; counters sit in filter INPUT and decide nothing.
* **Captures** (:class:`Capture`) read one interface of one host with an ``AF_PACKET`` socket and a
  classic BPF filter attached before the socket is bound, so nothing unfiltered is queued; each frame is
  kept with its kernel receive timestamp (``SO_TIMESTAMPNS``).  A capture keeps at most ``limit`` frames
  and counts the rest.
* **Classifiers** (:func:`lan_leak`, :func:`heartbeat_times`, :func:`largest_gap`) are pure functions of
  captured bytes, unit-tested without root.
* **Probes**: :func:`arp_answerers` asks who has an address the way RFC 5227 probes do (sender address
  0.0.0.0, from a made-up MAC), so the asking host's own neighbour table and the answerers' tables are
  left alone; :func:`send_ttl1_syn`, :func:`replay`, :func:`route_via`.
* **Load**: :class:`ConnectionRecorder` keeps opening a new connection per request through the VIP from
  the client and records when each request started and ended, whether it succeeded and which node served
  it.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import errno
import ipaddress
import json
import os
import random
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator, Sequence

from . import netns
from .topology import EXT_NET, INT_NET, VIP, VIP_PORT

ETH_P_ALL = 0x0003
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
PACKET_OUTGOING = 4  # sll_pkttype of a frame this host sends (linux/if_packet.h)
SO_ATTACH_FILTER = 26
SO_TIMESTAMPNS = 35
CLIENT = ipaddress.IPv4Address("203.0.113.10")
# Addresses of the outside network that belong to real testbed hosts: a spoofed source never uses them.
_REAL_OUTSIDE = {VIP, ipaddress.IPv4Address("203.0.113.2"), ipaddress.IPv4Address("203.0.113.3"), CLIENT}
# Client port of the malformed kinds: above the client's ephemeral range (1024-65000, topology.py), so
# a malformed segment can never be taken for one of a real connection's.
SPOOF_PORT = 65300
MAX_SECONDS = 900.0  # no flood, capture or load runs longer than this, whatever it is asked
MAX_RATE = 200_000
ICMP_ERRORS = {3, 4, 5, 11, 12}  # types that quote the offending datagram (RFC 792)


# --------------------------------------------------------------------------------------------------------
# Checksums and packet pools (built once, before any send)
# --------------------------------------------------------------------------------------------------------

def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """RFC 1071 checksum of ``data`` (an odd length is padded with a zero byte)."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _fix_checksums(packet: bytearray) -> None:
    """Recompute the IPv4 header and TCP checksums of an IPv4/TCP packet in place."""
    ihl = (packet[0] & 0x0F) * 4
    packet[10:12] = b"\0\0"
    packet[10:12] = struct.pack("!H", internet_checksum(packet[:ihl]))
    segment_length = len(packet) - ihl
    packet[ihl + 16:ihl + 18] = b"\0\0"
    pseudo = packet[12:20] + struct.pack("!BBH", 0, 6, segment_length)
    packet[ihl + 16:ihl + 18] = struct.pack("!H", internet_checksum(pseudo + packet[ihl:]))


def spoofable_sources(network: ipaddress.IPv4Network = EXT_NET) -> list[ipaddress.IPv4Address]:
    """Every host address of ``network`` that no testbed host uses."""
    return [a for a in network.hosts() if a not in _REAL_OUTSIDE]


def spoofed_syn_pool(count: int, target: ipaddress.IPv4Address = VIP, port: int = VIP_PORT,
                     sources: Sequence[ipaddress.IPv4Address] | None = None, seed: int = 9) -> list[bytes]:
    """``count`` distinct SYNs to ``target:port`` from random ``sources`` and source ports.

    Scapy builds one template (with the options a Linux client sends, so the SYN looks like one); every
    packet of the pool is the template with another source address, source port, IP id and sequence
    number, and checksums recomputed.  Distinct (source, port) pairs: each SYN is a new connection.
    """
    from scapy.layers.inet import IP, TCP

    if not 1 <= count <= 2_000_000:
        raise ValueError(f"count {count} is not valid: a pool holds from 1 to 2,000,000 packets")
    sources = list(sources if sources is not None else spoofable_sources())
    template = bytearray(bytes(IP(src=str(sources[0]), dst=str(target), ttl=64, flags="DF") /
                               TCP(sport=1024, dport=port, flags="S", window=64240,
                                   options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("NOP", None),
                                            ("WScale", 7)])))
    rng = random.Random(seed)
    seen: set[tuple[int, int]] = set()
    pool = []
    packed_sources = [a.packed for a in sources]
    while len(pool) < count:
        source = rng.randrange(len(packed_sources))
        sport = rng.randrange(1024, 65536)
        if (source, sport) in seen:
            continue
        seen.add((source, sport))
        packet = bytearray(template)
        packet[4:6] = struct.pack("!H", rng.randrange(65536))
        packet[12:16] = packed_sources[source]
        packet[20:22] = struct.pack("!H", sport)
        packet[24:28] = struct.pack("!I", rng.randrange(1 << 32))
        _fix_checksums(packet)
        pool.append(bytes(packet))
    return pool


def malformed_packets(client: str = str(CLIENT), vip: str = str(VIP), port: int = VIP_PORT,
                      node: str = "198.51.100.11") -> list[tuple[str, bytes]]:
    """The 27 kinds of malformed or foreign IPv4 packets of the hostile tests, as (name, IP bytes).

    The kinds of ``tests/unit/test_reroute.py``'s MALFORMED table, plus bad checksums, lengths that lie,
    a land attack, a Christmas-tree segment and a segment with an impossible TCP option.  Several never
    reach the distributor's queue (the kernel's ``ip_rcv`` drops bad versions, header lengths and
    checksums first): they are here because an attacker sends them too.
    """
    from scapy.layers.inet import IP, TCP, UDP, IPOption_RR
    from scapy.packet import Raw

    def tcp(tcp_flags="A", payload=b"", src=client, dst=vip, sport=SPOOF_PORT, dport=port, **ip) -> bytes:
        layer = IP(src=src, dst=dst, **ip) / TCP(sport=sport, dport=dport, flags=tcp_flags, seq=1000, ack=2000)
        return bytes(layer / Raw(payload)) if payload else bytes(layer)

    def patched(packet: bytes, offset: int, value: bytes, fix: bool = False) -> bytes:
        data = bytearray(packet)
        data[offset:offset + len(value)] = value
        if fix:
            _fix_checksums(data)
        return bytes(data)

    syn = tcp("S")
    data = tcp("PA", b"x" * 100)
    kinds = [
        ("empty", b""),
        ("19 bytes", syn[:19]),
        ("header cut", syn[:30]),
        ("payload cut", data[:-1]),
        ("ipv6 version", bytes([0x60]) + syn[1:]),
        ("ihl 4", bytes([0x44]) + syn[1:]),
        ("ip options", bytes(IP(src=client, dst=vip, options=[IPOption_RR()]) / TCP(sport=SPOOF_PORT, dport=port, flags="S"))),
        ("more fragments", tcp("S", flags="MF")),
        ("fragment offset", tcp("PA", b"abc", frag=100)),
        ("syn+fin", tcp("SF")),
        ("syn+rst", tcp("SR")),
        ("no flags", tcp("")),
        ("fin without ack", tcp("F")),
        ("psh only", tcp("P", b"data")),
        ("christmas tree", tcp("FSRPAUEC")),
        ("mid-stream unknown", tcp("PA", b"GET /")),
        ("syn+ack to vip", tcp("SA")),
        ("rst to vip unknown", tcp("R")),
        ("spoofed node reply", tcp("SA", src=node, dst=client, sport=port, dport=SPOOF_PORT)),
        ("other port", tcp("S", dport=443)),
        ("other address", tcp("S", dst="203.0.113.99")),
        ("udp to vip", bytes(IP(src=client, dst=vip) / UDP(sport=5000, dport=port) / Raw(b"x"))),
        ("data offset 4", patched(syn, 32, bytes([(4 << 4) | (syn[32] & 0x0F)]), fix=True)),
        ("data offset past end", patched(syn, 32, bytes([(15 << 4) | (syn[32] & 0x0F)]), fix=True)),
        ("bad ip checksum", patched(syn, 10, struct.pack("!H", struct.unpack("!H", syn[10:12])[0] ^ 0xFFFF))),
        ("bad tcp checksum", patched(syn, 36, struct.pack("!H", struct.unpack("!H", syn[36:38])[0] ^ 0x5A5A))),
        ("land", tcp("S", src=vip, dst=vip, sport=port, dport=port)),
    ]
    assert len(kinds) == 27, len(kinds)
    return kinds


def ethernet(destination_mac: str, source_mac: str, payload: bytes, ethertype: int = ETH_P_IP) -> bytes:
    return mac_bytes(destination_mac) + mac_bytes(source_mac) + struct.pack("!H", ethertype) + payload


def mac_bytes(mac: str) -> bytes:
    parts = mac.split(":")
    if len(parts) != 6:
        raise ValueError(f"MAC address {mac!r} is not valid; expected six hex bytes such as 02:00:00:00:00:01")
    return bytes(int(p, 16) for p in parts)


def mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


# --------------------------------------------------------------------------------------------------------
# Pacing: send from a pool at a rate for a time, and say what rate was reached
# --------------------------------------------------------------------------------------------------------

@dataclass
class PaceReport:
    sent: int
    errors: int
    seconds: float
    rate_asked: float
    started_wall: float
    worst_backlog: int  # most packets that were due but not yet sent at one wake-up

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict:
        return {"sent": self.sent, "errors": self.errors, "seconds": round(self.seconds, 4),
                "rate_asked": self.rate_asked, "rate": round(self.rate, 1), "started": self.started_wall,
                "worst_backlog": self.worst_backlog}


def pace(send: Callable[[bytes], object], pool: Sequence[bytes], rate: float, seconds: float,
         stop: threading.Event | None = None) -> PaceReport:
    """Send ``pool`` round-robin at ``rate`` packets/s for ``seconds``; a wake-up sends every packet due.

    Sleeping about a millisecond between wake-ups keeps the CPU cost to the sends themselves; a late
    wake-up catches up at once (the due count is computed from the elapsed time, not incremented).
    """
    if not 0 < rate <= MAX_RATE:
        raise ValueError(f"rate {rate} is not valid: from 1 to {MAX_RATE} packets/s")
    if not 0 < seconds <= MAX_SECONDS:
        raise ValueError(f"seconds {seconds} is not valid: from 0 to {MAX_SECONDS:.0f}")
    total = int(rate * seconds)
    size = len(pool)
    sent = errors = worst = 0
    started_wall = time.time()
    started = time.monotonic()
    while sent < total and not (stop is not None and stop.is_set()):
        elapsed = time.monotonic() - started
        due = min(total, int(elapsed * rate) + 1)
        worst = max(worst, due - sent)
        while sent < due:
            try:
                send(pool[sent % size])
            except OSError:  # ENOBUFS under pressure: counted, the pacing goes on
                errors += 1
            sent += 1
        next_due = sent / rate
        delay = next_due - (time.monotonic() - started)
        if delay > 0:
            time.sleep(min(delay, 0.05))
    return PaceReport(sent - errors, errors, time.monotonic() - started, rate, started_wall, worst)


def raw_ip_sender() -> tuple[socket.socket, Callable[[bytes], object]]:
    """A raw IPv4 socket that sends whole packets (IPPROTO_RAW implies IP_HDRINCL; source addresses as given)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)

    def send(packet: bytes) -> None:
        sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))

    return sock, send


def packet_sender(ifname: str) -> tuple[socket.socket, Callable[[bytes], object]]:
    """An AF_PACKET socket that puts frames on ``ifname`` exactly as given (nothing fixed up)."""
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    sock.bind((ifname, 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    return sock, sock.send


# --------------------------------------------------------------------------------------------------------
# Flood processes
# --------------------------------------------------------------------------------------------------------

class Flood:
    """A flood process running inside a host; its first stdout line says it started, its last what it did."""

    def __init__(self, bed, host: str, argv: list[str], seconds: float):
        self.bed = bed
        self.host = host
        self.seconds = seconds
        self._process = bed.popen(host, argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self._lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        self.started: float | None = None

    def _read(self) -> None:
        assert self._process.stdout is not None
        for line in self._process.stdout:
            self._lines.append(line)

    def wait_started(self, timeout: float = 30.0) -> float:
        """Wait for the first packet to go out; returns its wall time."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in self._lines:
                event = _json_line(line)
                if "started" in event:
                    self.started = float(event["started"])
                    return self.started
            if self._process.poll() is not None and not self._lines:
                raise RuntimeError(f"the flood on {self.host} exited with {self._process.returncode}: "
                                   f"{self._process.stderr.read() if self._process.stderr else ''}")
            time.sleep(0.02)
        raise RuntimeError(f"the flood on {self.host} did not start within {timeout:.0f} s")

    def result(self, timeout: float | None = None) -> dict:
        """Wait for the flood to end by itself; returns its summary (sent, rate, errors, seconds, worst_backlog)."""
        try:
            self._process.wait(timeout=timeout if timeout is not None else self.seconds + 60)
        except subprocess.TimeoutExpired:
            self.stop()
            raise
        self._reader.join(timeout=5)
        for line in reversed(self._lines):
            event = _json_line(line)
            if "sent" in event:
                return event
        errors = self._process.stderr.read() if self._process.stderr else ""
        raise RuntimeError(f"the flood on {self.host} ended ({self._process.returncode}) without a summary: {errors}")

    def stop(self) -> None:
        if self._process.poll() is None:
            self._process.send_signal(signal.SIGTERM)
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()

    def __enter__(self) -> "Flood":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _json_line(line: str) -> dict:
    try:
        event = json.loads(line)
    except ValueError:  # a stray line (a library's warning): not one of ours
        return {}
    return event if isinstance(event, dict) else {}


def start_syn_flood(bed, rate: float, seconds: float, host: str = "client", target: str | None = None,
                    port: int | None = None) -> Flood:
    """Spoofed SYNs from random outside addresses to the VIP, ``rate`` per second for ``seconds``."""
    argv = [sys.executable, "-m", "testbed.hostile", "syn-flood", "--rate", f"{rate:g}", "--seconds", f"{seconds:g}",
            "--target", f"{target or bed.vip}:{port or bed.topology.vip_port}"]
    return Flood(bed, host, argv, seconds)


def start_malformed_flood(bed, rate: float, seconds: float, destination_mac: str, host: str = "client",
                          ifname: str = "eth0") -> Flood:
    """The 27 malformed kinds round-robin, ``rate`` frames per second for ``seconds``, to ``destination_mac``."""
    argv = [sys.executable, "-m", "testbed.hostile", "malformed-flood", "--rate", f"{rate:g}", "--seconds",
            f"{seconds:g}", "--interface", ifname, "--destination-mac", destination_mac]
    return Flood(bed, host, argv, seconds)


def _flood_main(args: argparse.Namespace) -> int:
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if args.verb == "syn-flood":
        address, _, port = args.target.rpartition(":")
        target = ipaddress.IPv4Address(address)
        pool = spoofed_syn_pool(min(int(args.rate * args.seconds) + 1, 2_000_000), target, int(port))
        sock, send = raw_ip_sender()
    else:
        sock, send = packet_sender(args.interface)
        source_mac = _read_mac(args.interface)
        pool = [ethernet(args.destination_mac, source_mac, packet) for _, packet in malformed_packets()]
    with sock:
        print(json.dumps({"started": time.time(), "pool": len(pool)}), flush=True)
        report = pace(send, pool, args.rate, args.seconds, stop)
    print(json.dumps(report.as_dict()), flush=True)
    return 0


def _read_mac(ifname: str) -> str:
    with open(f"/sys/class/net/{ifname}/address") as f:
        return f.read().strip()


def host_mac(bed, host: str, ifname: str) -> str:
    return bed.run(host, ["cat", f"/sys/class/net/{ifname}/address"]).stdout.strip()


# --------------------------------------------------------------------------------------------------------
# Rules in a host's namespace: loss, partitions, counters
# --------------------------------------------------------------------------------------------------------

def _restore(bed, host: str, lines: list[str]) -> None:
    bed.run(host, ["iptables-restore", "--noflush"], input="\n".join(lines) + "\n")


_HOOKS = {"in": "PREROUTING", "out": "OUTPUT"}  # raw table: what arrives, what this host sends


@contextlib.contextmanager
def _raw_drop(bed, hosts: Iterable[str], chain: str, match: str, directions: Sequence[str]) -> Iterator[None]:
    hooks = [_HOOKS[d] for d in directions]
    installed = []
    try:
        for host in hosts:
            _restore(bed, host, ["*raw", f":{chain} - [0:0]", f"-A {chain} {match} -j DROP",
                                 *[f"-I {hook} 1 -j {chain}" for hook in hooks], "COMMIT"])
            installed.append(host)
        yield
    finally:
        for host in installed:
            _restore(bed, host, ["*raw", *[f"-D {hook} -j {chain}" for hook in hooks], f"-F {chain}", f"-X {chain}",
                                 "COMMIT"])


def udp_loss(bed, hosts: str | Iterable[str], port: int, probability: float, directions: Sequence[str] = ("in", "out")):
    """Drop each UDP datagram to or from ``port`` with ``probability`` on each host, in ``directions`` ("in", "out")."""
    if not 0 < probability <= 1:
        raise ValueError(f"probability {probability} is not valid: from 0 (excluded) to 1")
    unknown = set(directions) - set(_HOOKS)
    if unknown or not directions:
        raise ValueError(f"directions {tuple(directions)} are not valid: expected some of {tuple(_HOOKS)}")
    hosts = [hosts] if isinstance(hosts, str) else list(hosts)
    # multiport --ports matches source OR destination port: one draw per datagram, not two.
    match = f"-p udp -m multiport --ports {port}"
    if probability < 1:
        match += f" -m statistic --mode random --probability {probability:.4f}"
    chain = f"HLOSS{port}{'' if len(directions) == 2 else directions[0].upper()}"
    return _raw_drop(bed, hosts, chain, match, list(directions))


def partition(bed, host: str, port: int):
    """Cut ``host`` off from every datagram to or from UDP ``port`` (a split brain, if it is the failover port)."""
    return udp_loss(bed, host, port, 1.0)


class PacketCounters:
    """Counting rules in filter INPUT of some hosts: ``{name: iptables match}``; :meth:`read` gives packets per host and name."""

    CHAIN = "HCOUNT"

    def __init__(self, bed, hosts: Iterable[str], matches: dict[str, str]):
        self.bed = bed
        self.hosts = list(hosts)
        self.matches = matches
        self._installed: list[str] = []

    def __enter__(self) -> "PacketCounters":
        try:
            for host in self.hosts:
                rules = [f"-A {self.CHAIN} {match} -m comment --comment {name}" for name, match in self.matches.items()]
                _restore(self.bed, host, ["*filter", f":{self.CHAIN} - [0:0]", *rules,
                                          f"-I INPUT 1 -j {self.CHAIN}", "COMMIT"])
                self._installed.append(host)
        except BaseException:
            self.__exit__()
            raise
        return self

    def read(self) -> dict[str, dict[str, int]]:
        found: dict[str, dict[str, int]] = {}
        for host in self._installed:
            counts = {name: 0 for name in self.matches}
            for line in self.bed.run(host, ["iptables-save", "-c", "-t", "filter"]).stdout.splitlines():
                if f"-A {self.CHAIN} " in line and "--comment" in line:
                    packets = int(line[1:line.index(":")])
                    name = line.rsplit("--comment", 1)[1].split()[0].strip('"')
                    counts[name] = packets
            found[host] = counts
        return found

    def total(self, name: str) -> int:
        return sum(counts[name] for counts in self.read().values())

    def __exit__(self, *exc) -> None:
        for host in self._installed:
            with contextlib.suppress(Exception):  # a host whose namespace is gone has nothing left to remove
                _restore(self.bed, host, ["*filter", f"-D INPUT -j {self.CHAIN}", f"-F {self.CHAIN}",
                                          f"-X {self.CHAIN}", "COMMIT"])
        self._installed.clear()


@contextlib.contextmanager
def route_via(bed, host: str, network: str, gateway: str) -> Iterator[None]:
    """A route to ``network`` via ``gateway`` in ``host``, removed after."""
    bed.run(host, ["ip", "route", "replace", network, "via", gateway])
    try:
        yield
    finally:
        bed.run(host, ["ip", "route", "del", network, "via", gateway], check=False)


# --------------------------------------------------------------------------------------------------------
# BPF: a tiny assembler for classic socket filters
# --------------------------------------------------------------------------------------------------------

LDH_ABS, LDB_ABS, LDW_ABS, LDXB_MSH, LDH_IND, LDB_IND = 0x28, 0x30, 0x20, 0xB1, 0x48, 0x50
AND_K, JEQ_K, RET_K = 0x54, 0x15, 0x06
SKF_AD_PKTTYPE = (-0x1000 + 4) & 0xFFFFFFFF  # ancillary load: the frame's sll_pkttype
ACCEPT, REJECT = "accept", "reject"
_ENDING = [(ACCEPT,), (RET_K, 0xFFFF), (REJECT,), (RET_K, 0)]


def assemble(program: list[tuple]) -> list[tuple[int, int, int, int]]:
    """(code, k[, jump-if-true label, jump-if-false label]) and (label,) entries -> sock_filter tuples."""
    labels: dict[str, int] = {}
    index = 0
    for entry in program:
        if len(entry) == 1:
            labels[entry[0]] = index
        else:
            index += 1
    out = []
    for entry in program:
        if len(entry) == 1:
            continue
        code, k, *jumps = entry
        here = len(out)
        jt, jf = ((labels[j] - here - 1) if j is not None else 0 for j in (jumps + [None, None])[:2])
        if not (0 <= jt <= 255 and 0 <= jf <= 255):
            raise ValueError(f"BPF jump out of range at instruction {here}: {entry}")
        out.append((code, jt, jf, k))
    return out


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    blob = b"".join(struct.pack("HBBI", code, jt, jf, k) for code, jt, jf, k in program)
    buffer = ctypes.create_string_buffer(blob)
    fprog = struct.pack("HL", len(program), ctypes.addressof(buffer))  # struct sock_fprog; the kernel copies it
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


def _in_network(offset: int, network: ipaddress.IPv4Network, then: str, otherwise: str) -> list[tuple]:
    return [(LDW_ABS, offset), (AND_K, int(network.netmask)), (JEQ_K, int(network.network_address), then, otherwise)]


def leak_filter(lan: ipaddress.IPv4Network = INT_NET) -> list[tuple[int, int, int, int]]:
    """Frames this host sends: ARP, every non-TCP IPv4 packet, and TCP from or to ``lan``.

    The common frame (TCP between the VIP and a client) is left in the kernel: under load a user-space
    reader would otherwise drop what matters.  What passes is decided by :func:`lan_leak`.
    """
    return assemble([
        (LDH_ABS, SKF_AD_PKTTYPE), (JEQ_K, PACKET_OUTGOING, "out", REJECT), ("out",),
        (LDH_ABS, 12), (JEQ_K, ETH_P_ARP, ACCEPT, "ip"), ("ip",), (JEQ_K, ETH_P_IP, "proto", REJECT), ("proto",),
        (LDB_ABS, 23), (JEQ_K, 6, "src", ACCEPT), ("src",),
        *_in_network(26, lan, ACCEPT, "dst"), ("dst",), *_in_network(30, lan, ACCEPT, REJECT),
        *_ENDING,
    ])


def udp_filter(port: int, source: str | None = None, incoming_only: bool = True,
               wire_kind: int | None = None) -> list[tuple[int, int, int, int]]:
    """IPv4 UDP frames to ``port`` (from ``source``, and carrying a datagram of ``wire_kind``, when given).

    ``wire_kind`` is the kind byte of common/wire.py's header (offset 5 of the UDP payload): a capture
    of heartbeats alone stays small when sync batches share their port.
    """
    program: list[tuple] = []
    if incoming_only:
        program += [(LDH_ABS, SKF_AD_PKTTYPE), (JEQ_K, PACKET_OUTGOING, REJECT, "in"), ("in",)]
    program += [(LDH_ABS, 12), (JEQ_K, ETH_P_IP, "ip", REJECT), ("ip",), (LDB_ABS, 23), (JEQ_K, 17, "udp", REJECT), ("udp",)]
    if source is not None:
        program += [(LDW_ABS, 26), (JEQ_K, int(ipaddress.IPv4Address(source)), "port", REJECT), ("port",)]
    program += [(LDXB_MSH, 14), (LDH_IND, 16)]
    if wire_kind is None:
        program += [(JEQ_K, port, ACCEPT, REJECT)]
    else:  # Ethernet 14 + UDP header 8 + the kind's offset 5, past the IP header in X
        program += [(JEQ_K, port, "kind", REJECT), ("kind",), (LDB_IND, 14 + 8 + 5), (JEQ_K, wire_kind, ACCEPT, REJECT)]
    return assemble(program + _ENDING)


def arp_filter() -> list[tuple[int, int, int, int]]:
    return assemble([(LDH_ABS, 12), (JEQ_K, ETH_P_ARP, ACCEPT, REJECT), *_ENDING])


def incoming_ip_filter() -> list[tuple[int, int, int, int]]:
    return assemble([(LDH_ABS, SKF_AD_PKTTYPE), (JEQ_K, PACKET_OUTGOING, REJECT, "in"), ("in",),
                     (LDH_ABS, 12), (JEQ_K, ETH_P_IP, ACCEPT, REJECT), *_ENDING])


# --------------------------------------------------------------------------------------------------------
# Captures
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Frame:
    time: float  # kernel receive time, wall clock (SO_TIMESTAMPNS)
    outgoing: bool
    data: bytes


class Capture:
    """Frames of one interface of one host that pass ``program``, read by a thread for at most ``seconds``."""

    def __init__(self, bed, host: str, ifname: str, program: list[tuple[int, int, int, int]],
                 seconds: float = 60.0, limit: int = 200_000):
        if not 0 < seconds <= MAX_SECONDS:
            raise ValueError(f"seconds {seconds} is not valid: from 0 to {MAX_SECONDS:.0f}")
        self.host, self.ifname = host, ifname
        self.frames: list[Frame] = []
        self.overflow = 0
        self.link_downs = 0
        self.error: str | None = None
        self.limit = limit
        self._deadline = time.monotonic() + seconds
        self._stop = threading.Event()

        def open_socket() -> socket.socket:
            # Protocol 0 receives nothing until bind names one: the filter is in place before the first frame.
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
                sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
                attach_filter(sock, program)
                sock.bind((ifname, ETH_P_ALL))
            except BaseException:
                sock.close()
                raise
            return sock

        self._sock = netns.call_in(bed.ns(host), open_socket)
        self._thread = threading.Thread(target=self._read, name=f"capture-{host}-{ifname}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        sock = self._sock
        try:
            while not self._stop.is_set() and time.monotonic() < self._deadline:
                ready, _, _ = select.select([sock], [], [], 0.1)
                if not ready:
                    continue
                try:
                    data, ancillary, _flags, address = sock.recvmsg(65535, 64)
                except OSError as exc:
                    # The link went down (a killed host): the kernel reports it once and resumes
                    # delivery when the link comes back up (net/packet/af_packet.c, packet_notifier).
                    if exc.errno == errno.ENETDOWN:
                        self.link_downs += 1
                        continue
                    raise
                stamp = time.time()
                for level, kind, value in ancillary:
                    if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                        seconds, nanoseconds = struct.unpack("qq", value[:16])
                        stamp = seconds + nanoseconds / 1e9
                if len(self.frames) < self.limit:
                    self.frames.append(Frame(stamp, address[2] == PACKET_OUTGOING, data))
                else:
                    self.overflow += 1
        except OSError as exc:  # the interface or its namespace went away
            self.error = f"{type(exc).__name__}: {exc}"

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def stop(self) -> list[Frame]:
        self._stop.set()
        self._thread.join(timeout=5)
        self._sock.close()
        return self.frames

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def capture_leaks(bed, host: str, ifname: str = "ext0", seconds: float = 600.0) -> Capture:
    """Everything ``host`` sends on ``ifname`` that could carry or quote a cluster-LAN address (see :func:`lan_leak`)."""
    return Capture(bed, host, ifname, leak_filter(INT_NET), seconds)


def lan_leak(frame: bytes, lan: ipaddress.IPv4Network = INT_NET) -> str | None:
    """Why an Ethernet frame carries or quotes an address of ``lan`` (None when it does not).

    Looks at the IPv4 source and destination, at the datagram quoted by an ICMP error (RFC 792: the
    offending IP header and 8 bytes follow the ICMP header), and at ARP sender and target addresses.
    """
    if len(frame) < 14:
        return None
    ethertype = struct.unpack_from("!H", frame, 12)[0]

    def inside(raw: bytes) -> bool:
        return len(raw) == 4 and ipaddress.IPv4Address(raw) in lan

    if ethertype == ETH_P_ARP and len(frame) >= 42:
        sender, target = frame[28:32], frame[38:42]
        for what, raw in (("ARP sender", sender), ("ARP target", target)):
            if inside(raw):
                return f"{what} {ipaddress.IPv4Address(raw)}"
        return None
    if ethertype != ETH_P_IP or len(frame) < 34:
        return None
    ip = frame[14:]
    for what, raw in (("source", ip[12:16]), ("destination", ip[16:20])):
        if inside(raw):
            return f"IPv4 {what} {ipaddress.IPv4Address(raw)}"
    ihl = (ip[0] & 0x0F) * 4
    if ip[9] == 1 and len(ip) >= ihl + 8 + 20 and ip[ihl] in ICMP_ERRORS:
        quoted = ip[ihl + 8:]
        for what, raw in (("source", quoted[12:16]), ("destination", quoted[16:20])):
            if inside(raw):
                return f"ICMP type {ip[ihl]} quotes {what} {ipaddress.IPv4Address(raw)}"
    return None


def describe_frame(frame: bytes) -> str:
    """A one-line summary for assertion messages (scapy, only when a test has already failed)."""
    try:
        from scapy.layers.l2 import Ether

        return Ether(frame).summary()
    except Exception:  # a summary must never hide the finding
        return frame[:64].hex()


# --------------------------------------------------------------------------------------------------------
# Heartbeats seen on the wire
# --------------------------------------------------------------------------------------------------------

WIRE_MAGIC = b"DSTB"  # common/wire.py: magic, version, kind, ...
DIST_HEARTBEAT_KIND = 2  # common.wire.Kind.DIST_HEARTBEAT
NODE_HEARTBEAT_KIND = 1


def udp_payload(frame: bytes) -> bytes | None:
    if len(frame) < 42 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP or frame[23] != 17:
        return None
    ihl = (frame[14] & 0x0F) * 4
    return frame[14 + ihl + 8:]


def heartbeat_times(frames: Iterable[Frame], kind: int = DIST_HEARTBEAT_KIND, sender: str | None = None) -> list[float]:
    """Receive times of the datagrams of ``kind`` (from ``sender``, by the wire header's sender id)."""
    times = []
    for frame in frames:
        payload = udp_payload(frame.data)
        if payload is None or len(payload) < 24 or payload[:4] != WIRE_MAGIC or payload[5] != kind:
            continue
        if sender is not None and payload[8:24].rstrip(b"\0").decode(errors="replace") != sender:
            continue
        times.append(frame.time)
    return times


def largest_gap(times: Sequence[float]) -> float:
    """The longest silence between consecutive times (0 with fewer than two)."""
    ordered = sorted(times)
    return max((b - a for a, b in zip(ordered, ordered[1:])), default=0.0)


def heartbeat_senders(frames: Iterable[Frame], kind: int) -> dict[str, list[float]]:
    found: dict[str, list[float]] = {}
    for frame in frames:
        payload = udp_payload(frame.data)
        if payload is None or len(payload) < 24 or payload[:4] != WIRE_MAGIC or payload[5] != kind:
            continue
        found.setdefault(payload[8:24].rstrip(b"\0").decode(errors="replace"), []).append(frame.time)
    return found


# --------------------------------------------------------------------------------------------------------
# Replays, ARP probes, TTL-1 SYN
# --------------------------------------------------------------------------------------------------------

def with_valid_checksums(frame: bytes) -> bytes:
    """A captured Ethernet frame with its UDP or TCP checksum recomputed (RFC 768 / RFC 793).

    A frame captured as it left a veth carries only the partial checksum the kernel leaves for the
    device to finish (checksum offload, CHECKSUM_PARTIAL); veth never finishes it.  Put back on a
    link from a packet socket, such a frame is dropped by the receiver's UDP or TCP layer.  A
    replay must send what a wire would have carried.
    """
    if len(frame) < 34 or struct.unpack_from("!H", frame, 12)[0] != ETH_P_IP:
        return frame
    data = bytearray(frame)
    ip = memoryview(data)[14:]
    ihl = (ip[0] & 0x0F) * 4
    total = struct.unpack_from("!H", ip, 2)[0]
    protocol = ip[9]
    if protocol not in (6, 17) or total > len(ip) or struct.unpack_from("!H", ip, 6)[0] & 0x3FFF:
        return frame  # not UDP/TCP, cut short, or a fragment: leave it as captured
    segment = ip[ihl:total]
    offset = 6 if protocol == 17 else 16
    segment[offset:offset + 2] = b"\0\0"
    pseudo = bytes(ip[12:20]) + struct.pack("!BBH", 0, protocol, len(segment))
    checksum = internet_checksum(pseudo + bytes(segment))
    if protocol == 17 and checksum == 0:
        checksum = 0xFFFF  # RFC 768: a computed zero is sent as all ones
    segment[offset:offset + 2] = struct.pack("!H", checksum)
    del segment, ip
    return bytes(data)


def replay(bed, host: str, ifname: str, frames: Sequence[Frame], speed: float = 1.0,
           until: Callable[[], bool] | None = None) -> int:
    """Put captured ``frames`` back on ``ifname`` of ``host``, at their recorded pace / ``speed``.

    Byte for byte but for the UDP/TCP checksum (see :func:`with_valid_checksums`).  Stops early when
    ``until()`` turns true; returns how many frames were sent.
    """
    if not frames:
        return 0
    wire = [with_valid_checksums(frame.data) for frame in frames]
    sock = netns.call_in(bed.ns(host), lambda: packet_sender(ifname)[0])
    sent = 0
    try:
        first = frames[0].time
        started = time.monotonic()
        for frame in frames:
            if until is not None and until():
                break
            delay = (frame.time - first) / speed - (time.monotonic() - started)
            if delay > 0:
                time.sleep(delay)
            sock.send(wire[sent])
            sent += 1
    finally:
        sock.close()
    return sent


PROBE_MAC = "02:00:5e:00:53:99"  # locally administered: no host of the testbed has it


def arp_probe_frame(address: str, probe_mac: str = PROBE_MAC) -> bytes:
    """An RFC 5227 ARP probe for ``address``: sender address 0.0.0.0, so no one learns anything from it."""
    arp = struct.pack("!HHBBH6s4s6s4s", 1, ETH_P_IP, 6, 4, 1, mac_bytes(probe_mac), b"\0\0\0\0", b"\0" * 6,
                      ipaddress.IPv4Address(address).packed)
    return ethernet("ff:ff:ff:ff:ff:ff", probe_mac, arp, ETH_P_ARP)


def arp_answerers(bed, host: str, ifname: str, address: str, wait: float = 0.3, probes: int = 2) -> set[str]:
    """MACs that answer an ARP probe for ``address`` sent from ``host`` within ``wait`` seconds."""
    with Capture(bed, host, ifname, arp_filter(), seconds=wait * probes + 5) as capture:
        sock = netns.call_in(bed.ns(host), lambda: packet_sender(ifname)[0])
        try:
            for _ in range(probes):
                sock.send(arp_probe_frame(address))
                time.sleep(wait)
        finally:
            sock.close()
    wanted = ipaddress.IPv4Address(address).packed
    answers = set()
    for frame in capture.frames:
        data = frame.data
        # An ARP reply (op 2) from the owner of ``address``, addressed to the probe's MAC.
        if len(data) >= 42 and struct.unpack_from("!H", data, 20)[0] == 2 and data[28:32] == wanted \
                and data[0:6] == mac_bytes(PROBE_MAC):
            answers.add(mac_text(data[22:28]))
    return answers


def gratuitous_arps(frames: Iterable[Frame], address: str) -> list[tuple[float, str]]:
    """(time, sender MAC) of every gratuitous ARP for ``address``: sender and target address both ``address``."""
    wanted = ipaddress.IPv4Address(address).packed
    found = []
    for frame in frames:
        data = frame.data
        if len(data) >= 42 and struct.unpack_from("!H", data, 12)[0] == ETH_P_ARP and data[28:32] == wanted \
                and data[38:42] == wanted:
            found.append((frame.time, mac_text(data[22:28])))
    return found


def neighbour_mac(bed, host: str, address: str) -> str | None:
    """The MAC ``host``'s neighbour table holds for ``address`` (None when it holds none)."""
    out = bed.run(host, ["ip", "-j", "neigh", "show", address]).stdout
    for entry in json.loads(out or "[]"):
        if entry.get("lladdr"):
            return entry["lladdr"].lower()
    return None


def send_ttl1_syn(bed, host: str = "client", destination: str | None = None, port: int = VIP_PORT,
                  ifname: str = "eth0", wait: float = 1.5, source_port: int = 65201) -> list[Frame]:
    """A SYN with TTL 1 to ``destination`` (default the VIP); returns every IPv4 frame ``host`` receives in ``wait`` s."""
    from scapy.layers.inet import IP, TCP

    destination = destination or bed.vip
    source = str(bed.topology.host(host).links[0].address.ip)
    packet = bytes(IP(src=source, dst=destination, ttl=1) / TCP(sport=source_port, dport=port, flags="S", seq=12345))
    with Capture(bed, host, ifname, incoming_ip_filter(), seconds=wait + 5) as capture:
        sock, send = netns.call_in(bed.ns(host), raw_ip_sender)
        try:
            send(packet)
        finally:
            sock.close()
        time.sleep(wait)
    return capture.frames


def icmp_echo_answered(bed, host: str, destination: str, wait: float = 1.0) -> bool:
    """True when an ICMP echo request from ``host`` to ``destination`` draws a reply within ``wait`` s."""
    identifier = os.getpid() & 0xFFFF
    header = struct.pack("!BBHHH", 8, 0, 0, identifier, 1) + b"hostile-probe"
    message = header[:2] + struct.pack("!H", internet_checksum(header)) + header[4:]

    def exchange() -> bool:
        with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP) as sock:
            sock.settimeout(0.1)
            sock.sendto(message, (destination, 0))
            deadline = time.monotonic() + wait
            while time.monotonic() < deadline:
                try:
                    data, (source, _) = sock.recvfrom(2048)
                except socket.timeout:
                    continue
                ihl = (data[0] & 0x0F) * 4
                if source == destination and data[ihl] == 0 and struct.unpack_from("!H", data, ihl + 4)[0] == identifier:
                    return True
        return False

    return netns.call_in(bed.ns(host), exchange)


def tcp_probe(bed, host: str, destination: str, port: int, source_port: int, timeout: float = 1.5) -> str:
    """Open a TCP connection from ``host`` with a fixed source port: "connected", "refused" or "no answer"."""

    def attempt() -> str:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind(("0.0.0.0", source_port))
            sock.settimeout(timeout)
            try:
                sock.connect((destination, port))
                return "connected"
            except ConnectionRefusedError:
                return "refused"
            except OSError:
                return "no answer"

    return netns.call_in(bed.ns(host), attempt)


# --------------------------------------------------------------------------------------------------------
# Legitimate load with per-request timing
# --------------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    started: float  # wall clock
    ended: float
    ok: bool
    node: str | None
    error: str | None = None


@dataclass
class ConnectionRecorder:
    """``clients`` threads in ``host``, each requesting ``path`` from the VIP on a new connection, back to back."""

    bed: object
    clients: int = 4
    path: str = "/1k.bin"
    timeout: float = 3.0
    host: str = "client"
    pause: float = 0.0  # seconds each client waits between requests (0: back to back)
    outcomes: list[Outcome] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=netns.call_in, args=(self.bed.ns(self.host), self._loop), daemon=True)
                         for _ in range(self.clients)]
        for thread in self._threads:
            thread.start()

    def _loop(self) -> None:
        request = (f"GET {self.path} HTTP/1.1\r\nHost: {self.bed.vip}\r\nConnection: close\r\n\r\n").encode()
        address = (self.bed.vip, self.bed.topology.vip_port)
        while not self._stop.is_set():
            started = time.time()
            try:
                ok, node = _one_request(address, request, self.timeout)
                self.outcomes.append(Outcome(started, time.time(), ok, node))
            except OSError as exc:
                self.outcomes.append(Outcome(started, time.time(), False, None, type(exc).__name__))
            if self.pause:
                self._stop.wait(self.pause)

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=self.timeout + 5)
        return self.outcomes

    def __enter__(self) -> "ConnectionRecorder":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def started_between(self, start: float, end: float = float("inf")) -> list[Outcome]:
        return [o for o in list(self.outcomes) if start <= o.started < end]

    def longest_silence(self, start: float, end: float) -> float:
        """The longest time within [start, end] with no request completing successfully."""
        times = sorted(o.ended for o in list(self.outcomes) if o.ok and start <= o.ended <= end)
        return largest_gap([start, *times, end])


def _one_request(address: tuple[str, int], request: bytes, timeout: float) -> tuple[bool, str | None]:
    deadline = time.monotonic() + timeout
    with socket.create_connection(address, timeout=timeout) as sock:
        sock.sendall(request)
        chunks = []
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the answer did not end in time")
            sock.settimeout(left)
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    reply = b"".join(chunks)
    head, _, _ = reply.partition(b"\r\n\r\n")
    node = None
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"x-node":
            node = value.strip().decode()
    return head.startswith(b"HTTP/1.1 200"), node


# --------------------------------------------------------------------------------------------------------
# Whole-run watches and the saturation run
# --------------------------------------------------------------------------------------------------------

def metric_sum(bed, host: str, name: str, **labels: str) -> float:
    """The sum of the samples ``name`` of the distributor on ``host`` whose labels include ``labels``."""
    return sum(value for (sample, sample_labels), value in bed.metrics(host).items()
               if sample == name and labels.items() <= dict(sample_labels).items())


def metric_or_none(bed, host: str, name: str) -> float | None:
    values = [value for (sample, _), value in bed.metrics(host).items() if sample == name]
    return max(values) if values else None


class LeakWatch:
    """A :func:`capture_leaks` on the outside interface of every distributor, for a whole run.

    :meth:`ensure` reopens a capture whose interface went away (its frames are kept); :meth:`restart`
    reopens all of them (after the testbed was rebuilt).  :meth:`findings` names every frame that
    carries or quotes a cluster-LAN address.
    """

    def __init__(self, bed, hosts: Iterable[str] | None = None, ifname: str = "ext0"):
        self.bed = bed
        self.ifname = ifname
        self.hosts = list(hosts) if hosts is not None else [h.name for h in bed.topology.by_role("distributor")]
        self._live: dict[str, Capture] = {}
        self._kept: list[tuple[str, Frame]] = []
        self.errors: list[str] = []
        self.restart()

    def _close(self, host: str) -> None:
        capture = self._live.pop(host, None)
        if capture is not None:
            self._kept += [(host, frame) for frame in capture.stop()]
            if capture.error:
                self.errors.append(f"{host}: {capture.error}")

    def restart(self) -> None:
        for host in self.hosts:
            self._close(host)
            self._live[host] = capture_leaks(self.bed, host, self.ifname, MAX_SECONDS)

    def ensure(self) -> None:
        for host in self.hosts:
            capture = self._live.get(host)
            if capture is None or capture.error or not capture.running:
                self._close(host)
                self._live[host] = capture_leaks(self.bed, host, self.ifname, MAX_SECONDS)

    def frames(self) -> list[tuple[str, Frame]]:
        return self._kept + [(host, frame) for host, capture in self._live.items() for frame in list(capture.frames)]

    def findings(self) -> list[str]:
        found = []
        for host, frame in self.frames():
            why = lan_leak(frame.data)
            if why:
                found.append(f"{host} at {frame.time:.3f}: {why}: {describe_frame(frame.data)}")
        return found

    def stop(self) -> None:
        for host in list(self._live):
            self._close(host)


@dataclass
class SaturationReport:
    seconds: float
    active: str
    backup: str
    roles_after: dict[str, str | None]
    terms_before: dict[str, float]
    terms_after: dict[str, float]
    node_transitions: dict[str, float]  # per distributor: node state changes during the run
    new_alerts: list[dict]
    dist_heartbeats: int  # the active's heartbeats seen arriving at the backup
    dist_heartbeat_gap: float  # the largest gap between two of them (kernel receive times)
    node_heartbeat_gaps: dict[str, float]  # per node, at the active
    metric_gap: float | None  # distributor_failover_heartbeat_gap_max_seconds on the backup, if exported
    drops: dict[str, float]  # deliberate drops counted by reason on the active during the run
    keepalive: object  # wrk.WrkResult
    close: object
    flood: dict

    @property
    def took_over(self) -> bool:
        return self.terms_after != self.terms_before or self.roles_after != {self.active: "active", self.backup: "backup"}

    def text(self) -> str:
        gaps = ", ".join(f"{n} {g * 1000:.0f} ms" for n, g in sorted(self.node_heartbeat_gaps.items()))
        metric = "not exported" if self.metric_gap is None else f"{self.metric_gap * 1000:.0f} ms"
        alerts = dict(collections.Counter(f"{a.get('node')}: {a.get('from')}->{a.get('to')}" for a in self.new_alerts))
        return "\n".join([
            f"saturation run of {self.seconds:g} s, {self.active} active, {self.backup} backup",
            f"  wrk keep-alive: {self.keepalive.requests} requests ({self.keepalive.rps:.0f}/s), "
            f"errors {self.keepalive.socket_errors} non-2xx {self.keepalive.non_2xx}",
            f"  wrk new connections: {self.close.requests} requests ({self.close.rps:.0f}/s), "
            f"errors {self.close.socket_errors} non-2xx {self.close.non_2xx}",
            f"  malformed flood: {self.flood.get('sent')} frames at {self.flood.get('rate')}/s "
            f"(asked {self.flood.get('rate_asked')}/s)",
            f"  drops counted by reason on {self.active}: " + ", ".join(f"{r} {v:.0f}" for r, v in sorted(self.drops.items()) if v),
            f"  worst heartbeat delay: {self.active}'s heartbeats at {self.backup}: largest gap "
            f"{self.dist_heartbeat_gap * 1000:.0f} ms over {self.dist_heartbeats} heartbeats; "
            f"heartbeat_gap_max metric: {metric}",
            f"  node heartbeats at {self.active}, largest gap: {gaps}",
            f"  takeover: {'YES' if self.took_over else 'none'} (terms {self.terms_before} -> {self.terms_after}, "
            f"roles after {self.roles_after})",
            f"  node state changes: {self.node_transitions}; new alerts: {len(self.new_alerts)} {alerts}",
        ])


def _terms(bed, hosts: Iterable[str]) -> dict[str, float]:
    return {h: metric_sum(bed, h, "distributor_failover_term") for h in hosts}


def _transitions(bed, host: str) -> float:
    return metric_sum(bed, host, "distributor_node_transitions_total")


def _drops(bed, host: str) -> dict[str, float]:
    found: dict[str, float] = {}
    for (name, labels), value in bed.metrics(host).items():
        labels = dict(labels)
        if name == "distributor_packets_total" and labels.get("verdict") == "drop":
            found[labels["reason"]] = found.get(labels["reason"], 0.0) + value
    return found


def saturate(bed, seconds: float, keepalive_connections: int = 32, close_connections: int = 16,
             malformed_rate: float = 2000.0) -> SaturationReport:
    """wrk at full rate (keep-alive and new connections at once) plus the malformed flood, for ``seconds``.

    Records what an operator would want to know afterwards: whether anyone took over, whether any node
    changed state, and the worst heartbeat delay (the largest gap between two heartbeats of the active
    as they arrived at the backup's interface, and between two heartbeats of each node at the active).
    """
    from . import wrk
    from .runner import FAILOVER_PORT, HEARTBEAT_PORT

    active, backup = bed.wait_settled()
    dists = (active, backup)
    terms_before = _terms(bed, dists)
    transitions_before = {h: _transitions(bed, h) for h in dists}
    alerts_before = {h: len(bed.alerts(h)) for h in dists}
    drops_before = _drops(bed, active)
    active_lan = str(bed.topology.host(active).address_on("int"))
    # Heartbeats only: the sync batches on the same port would fill the capture's limit in minutes.
    dist_beats = Capture(bed, backup, "int0", udp_filter(FAILOVER_PORT, active_lan, wire_kind=DIST_HEARTBEAT_KIND),
                         seconds + 60)
    node_beats = Capture(bed, active, "int0", udp_filter(HEARTBEAT_PORT, wire_kind=NODE_HEARTBEAT_KIND), seconds + 60)
    url = f"http://{bed.vip}/1k.bin"
    loads = []
    try:
        for connections, close in ((keepalive_connections, False), (close_connections, True)):
            argv = wrk.command(url, duration=seconds, connections=connections, threads=1, close=close, timeout=5)
            loads.append(bed.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        flood = start_malformed_flood(bed, malformed_rate, seconds, host_mac(bed, active, "ext0"))
        with flood:
            flood_result = flood.result(timeout=seconds + 60)
        outputs = [load.communicate(timeout=seconds + 60)[0] for load in loads]
    finally:
        for load in loads:
            if load.poll() is None:
                load.kill()
                load.wait()
        dist_frames = dist_beats.stop()
        node_frames = node_beats.stop()
    missed = dist_beats.overflow + node_beats.overflow
    if missed or dist_beats.error or node_beats.error:
        raise RuntimeError(f"the heartbeat captures lost frames ({missed} over their limit; errors: "
                           f"{dist_beats.error}, {node_beats.error}): the gaps would be wrong")
    dist_times = heartbeat_times(dist_frames, DIST_HEARTBEAT_KIND, sender=active)
    node_times = heartbeat_senders(node_frames, NODE_HEARTBEAT_KIND)
    roles_after = {h: bed.role(h) for h in dists}
    drops_after = _drops(bed, active)
    return SaturationReport(
        seconds=seconds, active=active, backup=backup, roles_after=roles_after,
        terms_before=terms_before, terms_after=_terms(bed, dists),
        node_transitions={h: _transitions(bed, h) - transitions_before[h] for h in dists},
        new_alerts=[a for h in dists for a in bed.alerts(h)[alerts_before[h]:]],
        dist_heartbeats=len(dist_times), dist_heartbeat_gap=largest_gap(dist_times),
        node_heartbeat_gaps={node: largest_gap(times) for node, times in node_times.items()},
        metric_gap=metric_or_none(bed, backup, "distributor_failover_heartbeat_gap_max_seconds"),
        drops={r: v - drops_before.get(r, 0.0) for r, v in drops_after.items()},
        keepalive=wrk.parse(outputs[0]), close=wrk.parse(outputs[1]), flood=flood_result,
    )


# --------------------------------------------------------------------------------------------------------
# Command line (what the flood processes run)
# --------------------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m testbed.hostile",
                                     description="Hostile traffic from inside a testbed host, bounded in rate and time.")
    verbs = parser.add_subparsers(dest="verb", required=True)
    syn = verbs.add_parser("syn-flood", help="spoofed SYNs from random outside addresses")
    syn.add_argument("--target", default=f"{VIP}:{VIP_PORT}", help="ADDRESS:PORT (default: %(default)s)")
    bad = verbs.add_parser("malformed-flood", help="the 27 malformed kinds, round-robin, as Ethernet frames")
    bad.add_argument("--interface", default="eth0")
    bad.add_argument("--destination-mac", required=True, help="the MAC of the VIP's owner")
    for verb in (syn, bad):
        verb.add_argument("--rate", type=float, required=True, help=f"packets per second (1 to {MAX_RATE})")
        verb.add_argument("--seconds", type=float, required=True, help=f"how long (at most {MAX_SECONDS:.0f})")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 < args.rate <= MAX_RATE or not 0 < args.seconds <= MAX_SECONDS:
        print(f"--rate {args.rate:g} / --seconds {args.seconds:g}: expected a rate from 1 to {MAX_RATE} and "
              f"seconds from 0 to {MAX_SECONDS:.0f}", file=sys.stderr)
        return 2
    return _flood_main(args)


if __name__ == "__main__":
    sys.exit(main())
