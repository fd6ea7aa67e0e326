"""The packet interposer's core: parse, decide, rewrite, verdict (pure).

Contract
--------
:meth:`Interposer.handle` takes the bytes of one IPv4 packet that the kernel
queued and the current time, and returns ``(verdict, new_bytes)``: the verdict
is :data:`ACCEPT` or :data:`DROP`; ``new_bytes`` is ``None`` when the packet
goes on unchanged.  It never raises for any input bytes; every outcome is
counted in :attr:`Interposer.counts` under a :class:`Reason`.

* client -> VIP:port of a service: a SYN opens a connection on the backend
  the service's balancer picks; every packet of a known connection gets its
  destination (and port, when the backend listens on another one) rewritten
  to that backend.
* backend -> client of a known connection: the source becomes the VIP:port.
* IP and TCP checksums are patched incrementally (RFC 1624), never recomputed.
* Packets not for a service (and not from a backend) pass untouched.

Deliberate drops (TCP retransmits, so a drop costs a delay, never data):

* malformed: truncated copies (the kernel would trim the packet to what we
  hand back), IP options (source-route and record-route options carry
  addresses this rewrite would leave stale), fragments (no ports to key on),
  impossible TCP flag combinations;
* a mid-stream segment of a connection the table does not know: passing it
  would let the distributor's own stack answer with RST, or another backend
  receive it; dropping lets the client retransmit until the flow is known
  again (after a takeover, replication may still be filling the table);
* a backend's reply to a connection the table does not know: passing it
  would leak the backend's address to the client;
* a new connection when no backend is eligible, or when the table is full.

Only IHL = 5 headers are rewritten, so a connection's 4-tuple is always
``packet[12:24]`` (source, destination, source port, destination port).
"""

from __future__ import annotations

import enum
import ipaddress
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

from . import checksum
from .balancer import Balancer, Policy
from .conntable import ACK, FIN, RST, SYN, Connection, ConnectionTable, TcpState

__all__ = [
    "ACCEPT",
    "DROP",
    "Reason",
    "BackendSpec",
    "ServiceSpec",
    "Backend",
    "Service",
    "Interposer",
]

# Verdict values match the kernel's NF_DROP / NF_ACCEPT.
DROP = 0
ACCEPT = 1

_IPPROTO_TCP = 6
_ESTABLISHED = TcpState.ESTABLISHED
_NOT_PLAIN = SYN | FIN | RST
_IP_CHECKSUM = 10
_TCP_CHECKSUM = 20 + 16


class Reason(enum.IntEnum):
    """Why a packet got its verdict; each has a counter."""

    NEW_CONNECTION = 0  # SYN opened a connection (rewritten, accepted)
    TO_BACKEND = 1  # client -> backend of a known connection (rewritten)
    TO_CLIENT = 2  # backend -> client of a known connection (rewritten)
    NOT_SERVICE = 3  # not for a service: passed untouched
    NOT_TCP = 4  # not TCP: passed untouched
    TRUNCATED = 5  # shorter than its headers or its IP total length
    BAD_IP_HEADER = 6  # not IPv4 or IHL < 5
    IP_OPTIONS = 7
    FRAGMENT = 8
    BAD_TCP_HEADER = 9  # data offset < 5 or past the end
    BAD_FLAGS = 10  # SYN+FIN, SYN+RST, or none of SYN/ACK/RST
    UNKNOWN_FLOW = 11  # mid-stream client segment of an unknown connection
    UNKNOWN_REPLY = 12  # backend segment of an unknown connection
    NO_BACKEND = 13  # new connection but no eligible backend
    TABLE_FULL = 14  # new connection refused: the table is at capacity
    RESET_CONNECTION = 15  # segment of a connection the distributor reset (its node died)
    CONNECTION_END = 16  # kernel mode: the first FIN or RST of a connection, seen and passed

    @property
    def verdict(self) -> int:
        return ACCEPT if self in _ACCEPTED else DROP


_ACCEPTED = frozenset({Reason.NEW_CONNECTION, Reason.TO_BACKEND, Reason.TO_CLIENT, Reason.NOT_SERVICE, Reason.NOT_TCP,
                       Reason.CONNECTION_END})

_TO_BACKEND = Reason.TO_BACKEND
_TO_CLIENT = Reason.TO_CLIENT

# Kernel mode: the verdict's mark selects a backend's DNAT rule (low 16 bits)
# or, with END_MARK, tells the rules to stop queueing the connection's FINs.
MARK_BASE = 0x1000
MARK_MASK = 0xFFFF
END_MARK = 0x40000000


@dataclass(frozen=True)
class BackendSpec:
    name: str
    address: ipaddress.IPv4Address
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    vip: ipaddress.IPv4Address
    port: int
    policy: Policy
    backends: tuple[BackendSpec, ...]


class Backend:
    """A node as one service sees it, with its rewrite constants precomputed."""

    __slots__ = (
        "index",
        "name",
        "address",
        "port",
        "addr_bytes",
        "port_bytes",
        "rewrites_port",
        "vip_bytes",
        "vport_bytes",
        "mark",
        "to_backend_ip_delta",
        "to_backend_tcp_delta",
        "to_client_ip_delta",
        "to_client_tcp_delta",
    )

    def __init__(self, index: int, spec: BackendSpec, vip_bytes: bytes, vport_bytes: bytes, mark: int = 0):
        self.index = index
        self.mark = mark
        self.name = spec.name
        self.address = spec.address
        self.port = spec.port
        self.addr_bytes = spec.address.packed
        self.port_bytes = spec.port.to_bytes(2, "big")
        self.rewrites_port = self.port_bytes != vport_bytes
        self.vip_bytes = vip_bytes
        self.vport_bytes = vport_bytes
        ip_in = checksum.delta(vip_bytes, self.addr_bytes)
        ip_out = checksum.delta(self.addr_bytes, vip_bytes)
        # The TCP checksum covers the addresses through the pseudo-header
        # (RFC 793 section 3.1) and the ports directly.
        self.to_backend_ip_delta = ip_in
        self.to_backend_tcp_delta = checksum.combine(ip_in, checksum.delta(vport_bytes, self.port_bytes))
        self.to_client_ip_delta = ip_out
        self.to_client_tcp_delta = checksum.combine(ip_out, checksum.delta(self.port_bytes, vport_bytes))

    def __repr__(self) -> str:
        return f"Backend({self.name}, {self.address}:{self.port})"


class Service:
    __slots__ = ("name", "vip", "port", "vip_bytes", "port_bytes", "balancer", "backends")

    def __init__(self, spec: ServiceSpec, first_mark: int = MARK_BASE):
        self.name = spec.name
        self.vip = spec.vip
        self.port = spec.port
        self.vip_bytes = spec.vip.packed
        self.port_bytes = spec.port.to_bytes(2, "big")
        self.backends = [Backend(i, b, self.vip_bytes, self.port_bytes, first_mark + i) for i, b in enumerate(spec.backends)]
        self.balancer = Balancer(spec.policy, [b.weight for b in spec.backends])

    def __repr__(self) -> str:
        return f"Service({self.name}, {self.vip}:{self.port})"


ConnectionListener = Callable[[Connection], None]


def backend_marks(services: Sequence[ServiceSpec]) -> dict[tuple[str, int], int]:
    """The kernel-mode mark of every (service name, backend index); the rules use the same."""
    marks = {}
    next_mark = MARK_BASE
    for spec in services:
        for index in range(len(spec.backends)):
            marks[(spec.name, index)] = next_mark
            next_mark += 1
    if next_mark - 1 > MARK_MASK:
        raise ValueError(f"{next_mark - MARK_BASE} backends exceed the {MARK_MASK - MARK_BASE + 1} kernel-mode marks")
    return marks


class Interposer:
    """Decides and rewrites every queued packet; see the module docstring."""

    def __init__(self, services: Sequence[ServiceSpec], table: ConnectionTable):
        if not services:
            raise ValueError("the interposer needs at least one service")
        self.table = table
        marks = backend_marks(services)
        self.services = [Service(spec, marks[(spec.name, 0)]) for spec in services]
        self._by_vip: dict[bytes, Service] = {}
        self._backend_sources: set[bytes] = set()
        for service in self.services:
            self._by_vip[service.vip_bytes + service.port_bytes] = service
            for backend in service.backends:
                self._backend_sources.add(backend.addr_bytes + backend.port_bytes)
        self.counts = [0] * len(Reason)
        self._lookup = table.get
        # Packets the core wants sent (RSTs to clients); the adapter drains it.
        self.outbox: list[bytes] = []
        # Observers (metrics, replication) subscribe; the core only calls them.
        self.opened_listeners: list[ConnectionListener] = []
        self.ended_listeners: list[ConnectionListener] = []

    # -- the per-packet path -------------------------------------------------
    def decide(self, packet: bytes, now: float) -> tuple[Reason, bytes | None]:
        """Like :meth:`handle`, but returns the reason (its verdict is ``reason.verdict``).

        The data path calls this for every packet, so the most common one, a
        well-formed data or ACK segment of an established connection, is
        checked and rewritten inline; everything else goes to the full path.
        """
        length = len(packet)
        if (length >= 40 and packet[0] == 0x45 and packet[9] == _IPPROTO_TCP and not (packet[6] & 0x3F or packet[7])
                and (packet[2] << 8 | packet[3]) == length and 80 <= packet[32] and (packet[32] >> 4) * 4 + 20 <= length
                and packet[33] & _NOT_PLAIN == 0 and packet[33] & ACK):
            key = packet[12:24]
            conn = self._lookup(key)
            if conn is not None and conn.state is _ESTABLISHED and not conn.reset_by_us:
                conn.last_seen = now
                backend = conn.backend
                buf = bytearray(packet)
                # RFC 1624 equation 3 on both checksums, with the deltas precomputed per backend.
                ip_sum = ((packet[10] << 8 | packet[11]) ^ 0xFFFF)
                tcp_sum = ((packet[36] << 8 | packet[37]) ^ 0xFFFF)
                if conn.key == key:
                    conn.client_ack = packet[28:32]
                    ip_sum += backend.to_backend_ip_delta
                    tcp_sum += backend.to_backend_tcp_delta
                    buf[16:20] = backend.addr_bytes
                    if backend.rewrites_port:
                        buf[22:24] = backend.port_bytes
                    reason = _TO_BACKEND
                else:
                    ip_sum += backend.to_client_ip_delta
                    tcp_sum += backend.to_client_tcp_delta
                    buf[12:16] = backend.vip_bytes
                    if backend.rewrites_port:
                        buf[20:22] = backend.vport_bytes
                    reason = _TO_CLIENT
                ip_sum = ((ip_sum & 0xFFFF) + (ip_sum >> 16)) ^ 0xFFFF
                tcp_sum = ((tcp_sum & 0xFFFF) + (tcp_sum >> 16)) ^ 0xFFFF
                buf[10] = ip_sum >> 8
                buf[11] = ip_sum & 0xFF
                buf[36] = tcp_sum >> 8
                buf[37] = tcp_sum & 0xFF
                self.counts[reason] += 1
                return reason, bytes(buf)
        reason, out = self._decide(packet, now)
        self.counts[reason] += 1
        return reason, out

    def handle(self, packet: bytes, now: float) -> tuple[int, bytes | None]:
        reason, out = self.decide(packet, now)
        return reason.verdict, out

    def _decide(self, packet: bytes, now: float) -> tuple[Reason, bytes | None]:
        invalid = _invalid(packet, whole=True)
        if invalid is not None:
            return invalid, None
        flags = packet[33]

        key = packet[12:24]
        conn = self.table.get(key)
        if conn is None:
            return self._unknown(packet, key, flags, now)
        if conn.key == key:
            if flags & (SYN | ACK) == SYN and _starts_over(conn):
                if self.table.remove(conn):
                    self._ended(conn)
                return self._unknown(packet, key, flags, now)
            if conn.reset_by_us:
                if flags & ACK and not flags & RST:
                    self.outbox.append(_reset_for(packet, conn.backend))
                return Reason.RESET_CONNECTION, None
            if flags & ACK:
                conn.client_ack = packet[28:32]
            out = _to_backend(packet, conn.backend)
            if self.table.advance(conn, flags, True, now):
                self._ended(conn)
            return Reason.TO_BACKEND, out
        if conn.reset_by_us:
            return Reason.RESET_CONNECTION, None
        out = _to_client(packet, conn.backend)
        if self.table.advance(conn, flags, False, now):
            self._ended(conn)
        return Reason.TO_CLIENT, out

    # -- kernel-assisted mode --------------------------------------------------
    def decide_mark(self, packet: bytes, now: float) -> tuple[Reason, int | None]:
        """Kernel mode: decide a connection's first packet, or note its first FIN/RST; returns a mark, never bytes.

        Only headers are needed (the queue copies 128 bytes), so the copy may
        be shorter than the packet.  The kernel rewrites every packet itself
        (DNAT chosen by the mark, then conntrack).
        """
        reason, mark = self._decide_mark(packet, now)
        self.counts[reason] += 1
        return reason, mark

    def _decide_mark(self, packet: bytes, now: float) -> tuple[Reason, int | None]:
        invalid = _invalid(packet, whole=False)
        if invalid is not None:
            return invalid, None
        flags = packet[33]
        key = packet[12:24]
        conn = self.table.get(key)
        if flags & (FIN | RST):
            # The rules queue only a connection's first FIN or RST, from either side.
            if conn is not None and self.table.close(conn, now):
                self._ended(conn)
            return Reason.CONNECTION_END, END_MARK
        if conn is not None and conn.key == key:
            if conn.reset_by_us and not flags & SYN:
                self.outbox.append(_reset_for(packet, conn.backend))
                return Reason.RESET_CONNECTION, None
            if flags & (SYN | ACK) == SYN and _starts_over(conn):
                if self.table.remove(conn):
                    self._ended(conn)
            else:
                # A retransmitted SYN, or the first segment this distributor's
                # conntrack sees of a replicated connection (after a takeover).
                if self.table.advance(conn, flags, True, now):
                    self._ended(conn)
                return Reason.TO_BACKEND, conn.backend.mark
        reason, _ = self._unknown(packet, key, flags, now, rewrite=False)
        if reason is Reason.NEW_CONNECTION:
            return reason, self.table.get(key).backend.mark
        return reason, None

    def _unknown(self, packet: bytes, key: bytes, flags: int, now: float,
                 rewrite: bool = True) -> tuple[Reason, bytes | None]:
        service = self._by_vip.get(packet[16:20] + packet[22:24])
        if service is None:
            if packet[12:16] + packet[20:22] in self._backend_sources:
                return Reason.UNKNOWN_REPLY, None
            return Reason.NOT_SERVICE, None
        if flags & (SYN | ACK) != SYN:
            return Reason.UNKNOWN_FLOW, None
        index = service.balancer.acquire()
        if index is None:
            return Reason.NO_BACKEND, None
        backend = service.backends[index]
        reply_key = backend.addr_bytes + packet[12:16] + backend.port_bytes + packet[20:22]
        stale = self.table.get(reply_key)
        if stale is not None and self.table.remove(stale):
            self._ended(stale)
        conn = self.table.open(key, reply_key, service, backend, now)
        if conn is None:
            service.balancer.release(index)
            return Reason.TABLE_FULL, None
        for listener in self.opened_listeners:
            listener(conn)
        return Reason.NEW_CONNECTION, _to_backend(packet, backend) if rewrite else None

    # -- housekeeping ------------------------------------------------------
    def expire(self, now: float, budget: int = 10_000, suspects: list[Connection] | None = None) -> int:
        """Expire idle connections; returns how many open ones ended (see ConnectionTable.expire for ``suspects``)."""
        ended = self.table.expire(now, budget, suspects)
        for conn in ended:
            self._ended(conn)
        return len(ended)

    def touch(self, conn: Connection, now: float) -> None:
        """Conntrack still tracks this connection: it is alive, whatever user space saw of it."""
        conn.last_seen = now

    def _ended(self, conn: Connection) -> None:
        conn.service.balancer.release(conn.backend.index)
        for listener in self.ended_listeners:
            listener(conn)

    def set_node_available(self, name: str, available: bool) -> int:
        """Gate a node (by name) for new connections in every service; returns how many services have it."""
        found = 0
        for service in self.services:
            for backend in service.backends:
                if backend.name == name:
                    service.balancer.set_available(backend.index, available)
                    found += 1
        return found

    def set_node_ramp(self, name: str, factor: float) -> None:
        """Scale a node's share of new connections (slow start) in every service that has it."""
        for service in self.services:
            for backend in service.backends:
                if backend.name == name:
                    service.balancer.set_ramp(backend.index, factor)

    def reset_node(self, name: str, now: float) -> list[Connection]:
        """End every open connection on a node: RST to each client, and to any later segment of it.

        Returns the connections reset.  The entries stay (CLOSED) so a client
        that missed the RST gets another on its next segment.  In kernel mode
        the core never saw the client's sequence numbers: the caller must also
        delete the connections from conntrack, so their next segment is queued.
        """
        reset = [c for c in self.table if c.backend.name == name and c.is_open]
        for conn in reset:
            if self.table.close(conn, now):
                self._ended(conn)
            conn.reset_by_us = True
            if conn.client_ack:
                self.outbox.append(_rst_to_client(conn))
        return reset

    # -- replication (the backup's table follows the active's) -----------------
    def install(self, key: bytes, backend_index: int, now: float) -> bool:
        """Insert a connection the active distributor opened; False when the key or index fits no service."""
        service = self._by_vip.get(key[4:8] + key[10:12])
        if service is None or not 0 <= backend_index < len(service.backends):
            return False
        existing = self.table.get(key)
        if existing is not None and self.table.remove(existing):
            self._ended(existing)
        backend = service.backends[backend_index]
        reply_key = backend.addr_bytes + key[0:4] + backend.port_bytes + key[8:10]
        stale = self.table.get(reply_key)
        if stale is not None and self.table.remove(stale):
            self._ended(stale)
        conn = self.table.open(key, reply_key, service, backend, now)
        if conn is None:
            return False
        self.table.advance(conn, ACK, True, now)  # it is past its SYN on the active
        service.balancer.take(backend_index)
        return True

    def end(self, key: bytes, now: float) -> None:
        """A connection ended on the active distributor: keep its entry briefly for the last segments."""
        conn = self.table.get(key)
        if conn is not None and conn.key == key and self.table.close(conn, now):
            self._ended(conn)

    def clear(self) -> int:
        """Forget every connection (before a snapshot replaces the table); returns how many."""
        conns = list(self.table)
        for conn in conns:
            if self.table.remove(conn):
                self._ended(conn)
        return len(conns)

    def count(self, reason: Reason) -> int:
        return self.counts[reason]

    def backends(self) -> Iterable[tuple[Service, Backend]]:
        for service in self.services:
            for backend in service.backends:
                yield service, backend


def _starts_over(conn: Connection) -> bool:
    """A client SYN on this entry opens a new connection, balanced afresh.

    Either the entry is finished (both FINs or an RST), or its node may take no
    new connection: a client that gave up on an unanswered SYN reuses its port
    at once (there is no TIME_WAIT for it), and must not be sent back there.
    """
    return conn.state >= TcpState.CLOSING or not conn.service.balancer.eligible(conn.backend.index)


def _invalid(packet: bytes, whole: bool) -> Reason | None:
    """Why the IPv4 and TCP headers of ``packet`` cannot be handled, or None when they can.

    ``whole``: the copy must be the entire packet (rewrite mode hands it back, and the
    kernel would trim the packet to a shorter copy); kernel mode needs the headers only.
    """
    length = len(packet)
    if length < 20:
        return Reason.TRUNCATED
    first = packet[0]
    if first != 0x45:
        if first >> 4 != 4 or first & 0x0F < 5:
            return Reason.BAD_IP_HEADER
        return Reason.IP_OPTIONS
    if whole and (packet[2] << 8 | packet[3]) != length:
        return Reason.TRUNCATED
    if packet[9] != _IPPROTO_TCP:
        return Reason.NOT_TCP
    if packet[6] & 0x3F or packet[7]:
        return Reason.FRAGMENT
    if length < 40:
        return Reason.TRUNCATED
    tcp_header = (packet[32] >> 4) * 4
    if tcp_header < 20 or (whole and 20 + tcp_header > length):
        return Reason.BAD_TCP_HEADER
    flags = packet[33]
    if (flags & SYN and flags & (FIN | RST)) or not flags & (SYN | ACK | RST):
        return Reason.BAD_FLAGS
    return None


def _to_backend(packet: bytes, backend: Backend) -> bytes:
    buf = bytearray(packet)
    buf[16:20] = backend.addr_bytes
    if backend.rewrites_port:
        buf[22:24] = backend.port_bytes
    checksum.patch(buf, _IP_CHECKSUM, backend.to_backend_ip_delta)
    checksum.patch(buf, _TCP_CHECKSUM, backend.to_backend_tcp_delta)
    return bytes(buf)


def _to_client(packet: bytes, backend: Backend) -> bytes:
    # The reply's source is the backend (the table key guarantees it), so the
    # precomputed backend -> VIP delta is exact.
    buf = bytearray(packet)
    buf[12:16] = backend.vip_bytes
    if backend.rewrites_port:
        buf[20:22] = backend.vport_bytes
    checksum.patch(buf, _IP_CHECKSUM, backend.to_client_ip_delta)
    checksum.patch(buf, _TCP_CHECKSUM, backend.to_client_tcp_delta)
    return bytes(buf)


def _rst_to_client(conn: Connection) -> bytes:
    backend = conn.backend
    client_ip, client_port = conn.key[0:4], int.from_bytes(conn.key[8:10], "big")
    seq = int.from_bytes(conn.client_ack, "big")
    return checksum.tcp_segment(backend.vip_bytes, client_ip, int.from_bytes(backend.vport_bytes, "big"), client_port, seq, 0, RST)


def _reset_for(packet: bytes, backend: Backend) -> bytes:
    # RFC 793: an RST answering a segment that carries ACK takes its sequence
    # number from that ACK field, which is exactly what the client expects.
    seq = int.from_bytes(packet[28:32], "big")
    return checksum.tcp_segment(backend.vip_bytes, packet[12:16], int.from_bytes(backend.vport_bytes, "big"),
                                int.from_bytes(packet[20:22], "big"), seq, 0, RST)


def probe_for(conn: Connection) -> bytes:
    """Kernel mode, after a reset: an ACK from the VIP far outside the client's window.

    The client answers it with a duplicate ACK carrying the sequence number it
    expects (RFC 793 section 3.9, "If an incoming segment is not acceptable, an
    acknowledgment should be sent"); that ACK, no longer known to conntrack,
    is queued and gets an RST the client accepts.
    """
    backend = conn.backend
    return checksum.tcp_segment(backend.vip_bytes, conn.key[0:4], int.from_bytes(backend.vport_bytes, "big"),
                                int.from_bytes(conn.key[8:10], "big"), 0, 0, ACK, window=0)
