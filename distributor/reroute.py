"""The packet interposer's core: parse, decide, rewrite, verdict (pure).

Contract
--------
:meth:`Interposer.decide` takes the bytes of one IPv4 or IPv6 packet that the
kernel queued and the current time, and returns one verdict, ``(reason, out,
extra)``, the only way out of the interposer:

* ``reason`` (a :class:`Reason`) gives the verdict, ``reason.verdict``
  (:data:`ACCEPT` or :data:`DROP`), and is counted (:meth:`Interposer.stats`);
* ``out`` is what to hand back with the verdict: the rewritten bytes in
  :attr:`Mode.REWRITE`, the mark that selects the node's DNAT rule in
  :attr:`Mode.KERNEL` or the node's route in :attr:`Mode.DSR`, or ``None``
  when the packet goes on unchanged;
* ``extra`` is ``None`` or a tuple of effects the packet caused:
  :class:`ConnectionOpened` / :class:`ConnectionEnded` (the distributor's core
  replicates them) and :class:`SendPacket` (a crafted RST to send).

It never raises for any input bytes.  Work that is not driven by a packet
(expiry, a dead node's reset, replicated connections) returns its effects the
same way, as lists.

* client -> VIP:port of a service: a SYN opens a connection on the backend
  the service's balancer picks; every packet of a known connection gets its
  destination (and port, when the backend listens on another one) rewritten
  to that backend.
* backend -> client: the kernel rewrites the source to the VIP:port
  statelessly (rules.py); the interposer sees a connection's SYN-ACK, FIN and
  RST only, to follow its state, and hands them back unchanged.
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
* a new connection when no backend is eligible, or when the table is full;
* a client packet to a VIP whose TTL would expire here: forwarding it after the
  rewrite would make the kernel answer "time exceeded" quoting the node's
  address (a traceroute towards the VIP reveals nothing of the cluster);
* rewrite mode: a segment of a connection that idled out of the table: the
  client gets an RST at once (rather than retransmitting into nothing), and
  the node too, so neither end waits for its own timeout;
* rewrite mode: an ICMP error about no known connection, or about a segment
  sent to a node other than "fragmentation needed" (see ``_icmp``; the errors
  that belong to a connection are translated for the host they concern).

Direct server return (:attr:`Mode.DSR`, the active-active data path, docs/scale-out.md): every
client packet to a VIP:port is queued, decided on its headers and handed back unchanged with the
mark of its node's route (the kernel forwards it to the node's MAC; the node holds the VIP on its
loopback and answers the client itself, so no reply crosses the distributor).  The connection
table is a cache there: a mid-stream segment of a connection this distributor does not know
(another distributor had it until the router moved the flow, or its entry idled out) goes to the
node the service's Maglev table names for the flow (``ADOPTED_FLOW``), which is the node every
distributor chose for it; a connection ends at the client's FIN or RST (its node's are never seen).

Only IHL = 5 headers are rewritten (of an ICMP error, the outer one; the
quoted header may carry options), so a connection's 4-tuple is always
``packet[12:24]`` (source, destination, source port, destination port).

IPv6 (rewrite and kernel modes; dsr mode is IPv4 only): the same decisions on the same kind of
key, ``packet[8:44]`` (16-byte addresses, then the ports: back to back as in IPv4), for packets
without extension headers (a packet bearing one is refused by reason: ``EXTENSION_HEADERS``, or
``FRAGMENT``); the rewrite patches only the TCP checksum (IPv6 has no header checksum; the TCP one
covers the addresses through its pseudo-header).  ICMPv6 errors (RFC 4443) are matched and
translated as ICMP ones are, "packet too big" (RFC 8201) for the client.  The hop limit stands for
the TTL.  A service and its nodes are of one family; a dual-stack service is two services.
"""

from __future__ import annotations

import collections
import enum
import ipaddress
from dataclasses import dataclass
from typing import Iterable, Sequence

from common.sansio import Command

from . import checksum
from .balancer import Balancer, Policy
from .maglev import MaglevBalancer
from .conntable import ACK, FIN, RST, SYN, Connection, ConnectionTable, TcpState, client_of, segment_key
from .synauth import SynAuth

__all__ = [
    "ACCEPT",
    "DROP",
    "Mode",
    "Reason",
    "ConnectionOpened",
    "ConnectionEnded",
    "SendPacket",
    "PassiveKind",
    "PassiveFailure",
    "ForgetInConntrack",
    "ForgetHandshakes",
    "ConfirmWithConntrack",
    "InterposerStats",
    "BackendStats",
    "RuleService",
    "RuleBackend",
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
_IPPROTO_ICMP = 1
_IPPROTO_ICMPV6 = 58
# IPv6 next-header values that announce an extension header (RFC 8200 section 4, IANA's list):
# hop-by-hop, routing, fragment, destination options, AH, ESP, mobility, HIP, shim6.  A routing
# header carries addresses this rewrite would leave stale (as IPv4's source-route option does), a
# fragment carries no ports past the first; none is used by a plain TCP connection, so packets
# bearing one are refused by reason (EXTENSION_HEADERS, FRAGMENT) rather than walked.
_IPV6_EXTENSIONS = frozenset({0, 43, 44, 60, 51, 50, 135, 139, 140})
_IPV6_FRAGMENT = 44
# ICMP errors (RFC 792) that quote the packet they are about: destination unreachable (code 4:
# fragmentation needed, RFC 1191 path MTU discovery), time exceeded, parameter problem.
_ICMP_UNREACHABLE, _ICMP_FRAG_NEEDED = 3, 4
ICMP_ERROR_TYPES = (_ICMP_UNREACHABLE, 11, 12)  # what rewrite mode's rules queue (rules.py)
_ICMP_ERRORS = frozenset(ICMP_ERROR_TYPES)
# ICMPv6 errors (RFC 4443 section 3): destination unreachable, packet too big (RFC 8201 path MTU
# discovery: the only one that goes to a client, as IPv4's "fragmentation needed"), time exceeded,
# parameter problem.  Neighbour discovery (133-137) is never queued (rules.py).
_ICMPV6_PACKET_TOO_BIG = 2
ICMPV6_ERROR_TYPES = (1, _ICMPV6_PACKET_TOO_BIG, 3, 4)
_ICMPV6_ERRORS = frozenset(ICMPV6_ERROR_TYPES)
_ESTABLISHED = TcpState.ESTABLISHED
_NOT_PLAIN = SYN | FIN | RST
_IP_CHECKSUM = 10
_TCP_CHECKSUM = 20 + 16
_TCP6_CHECKSUM = 40 + 16


class Reason(enum.IntEnum):
    """Why a packet got its verdict; each has a counter."""

    NEW_CONNECTION = 0  # SYN opened a connection (rewritten, accepted)
    TO_BACKEND = 1  # client -> backend of a known connection (rewritten)
    TO_CLIENT = 2  # backend -> client of a known connection (rewritten)
    NOT_SERVICE = 3  # not for a service: passed untouched
    NOT_TCP = 4  # not TCP: passed untouched
    TRUNCATED = 5  # shorter than its headers or its IP total length
    BAD_IP_HEADER = 6  # neither IPv4 nor IPv6, or IPv4 with IHL < 5 (dsr mode: IPv6)
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
    TTL_EXPIRED = 17  # a client packet to a VIP with TTL <= 1: forwarded, the kernel's "time exceeded" would quote a node
    EXPIRED_FLOW = 18  # rewrite mode: a segment of a connection that idled out; both ends get an RST
    SYN_CHALLENGED = 19  # under a SYN flood: a new client's SYN, answered with a cookie (synauth.py)
    SYN_VERIFIED = 20  # the client's RST carrying our cookie: its address is real, its next SYN passes
    NODE_REFUSED = 21  # a node reset a client's SYN: dropped; rewrite mode sends the SYN to another node
    SYN_REDISPATCHED = 22  # rewrite mode: a retransmitted SYN its node left unanswered, sent to another node
    SYN_UNANSWERED = 23  # kernel mode: a retransmitted SYN its node left unanswered: dropped, forgotten by conntrack
    ICMP_TO_NODE = 24  # rewrite mode: an ICMP error about a segment the VIP sent a client, translated for its node
    ICMP_TO_CLIENT = 25  # rewrite mode: "fragmentation needed" about a segment sent to a node, translated for the client
    ICMP_UNKNOWN = 26  # rewrite mode: an ICMP error about no known connection, or about a node (or past the rules' rate limit): dropped
    ADOPTED_FLOW = 27  # dsr mode: a mid-stream segment of a connection not in the table, sent to the node its flow hash names
    EXTENSION_HEADERS = 28  # IPv6 with an extension header (hop-by-hop, routing, options, AH, ESP): refused

    @property
    def verdict(self) -> int:
        return ACCEPT if self in _ACCEPTED else DROP


class Mode(enum.Enum):
    """The data path: which packets reach user space and what user space hands back."""

    REWRITE = "rewrite"  # every packet of a VIP connection; user space rewrites it
    KERNEL = "kernel"  # a connection's first packet and first FIN/RST; a mark selects the node's DNAT rule
    DSR = "dsr"  # direct server return: every client packet, unchanged; a mark selects the node's route

    @property
    def marks(self) -> bool:
        """The verdict carries a mark (the packet goes on unchanged) rather than new bytes, so a copy of
        the headers is enough."""
        return self is not Mode.REWRITE

    @property
    def repeats_end(self) -> bool:
        """A connection's first FIN or RST is sent through the hook again (NF_REPEAT) with END_MARK, so
        the rules stop queueing the connection (kernel mode: its later segments are conntrack's)."""
        return self is Mode.KERNEL

    @classmethod
    def parse(cls, text: str) -> "Mode":
        for mode in cls:
            if mode.value == text:
                return mode
        raise ValueError(f"unknown data-path mode {text!r}; valid modes: {', '.join(m.value for m in cls)}")


_ACCEPTED = frozenset({Reason.NEW_CONNECTION, Reason.TO_BACKEND, Reason.TO_CLIENT, Reason.NOT_SERVICE, Reason.NOT_TCP,
                       Reason.CONNECTION_END, Reason.SYN_REDISPATCHED, Reason.ICMP_TO_NODE, Reason.ICMP_TO_CLIENT,
                       Reason.ADOPTED_FLOW})

_TO_BACKEND = Reason.TO_BACKEND
_TO_CLIENT = Reason.TO_CLIENT

EXPIRED_MEMORY = 600.0  # seconds a connection that idled out is remembered, to reset its late segments

# Passive health.  A client retransmits an unanswered SYN after its initial RTO: 1 s (RFC 6298
# section 2.1, Linux's TCP_TIMEOUT_INIT); a "retransmission" sooner than this is no evidence
# against the node (a client, or someone forging one, sending the same SYN twice).
SYN_RETRY_MIN = 0.5
# A connection is sent to another node at most this many times; then the node's answer (or the
# client's timeout) stands.  Two failing nodes must not bounce one SYN between them forever.
MAX_REDISPATCHES = 2

# Kernel mode: the verdict's mark selects a backend's DNAT rule (low 16 bits)
# or, with END_MARK, tells the rules to stop queueing the connection's FINs.
MARK_BASE = 0x1000
MARK_MASK = 0xFFFF
END_MARK = 0x40000000


@dataclass(frozen=True)
class BackendSpec:
    name: str
    address: ipaddress.IPv4Address | ipaddress.IPv6Address  # the service VIP's family
    port: int
    weight: int = 1


@dataclass(frozen=True)
class ServiceSpec:
    name: str
    vip: ipaddress.IPv4Address | ipaddress.IPv6Address
    port: int
    policy: Policy
    backends: tuple[BackendSpec, ...]
    persistence: float = 0.0  # seconds a client's new connections follow its last one; 0: off


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
        "removed",
        "to_backend_ip_delta",
        "to_backend_tcp_delta",
        "bytes_in",
        "alive_at",
    )

    def __init__(self, index: int, spec: BackendSpec, vip_bytes: bytes, vport_bytes: bytes, mark: int = 0):
        self.index = index
        self.mark = mark
        self.removed = False  # taken out of its service at run time: drains, takes no new connection
        self.name = spec.name
        self.address = spec.address
        self.port = spec.port
        self.addr_bytes = spec.address.packed
        self.port_bytes = spec.port.to_bytes(2, "big")
        self.rewrites_port = self.port_bytes != vport_bytes
        self.vip_bytes = vip_bytes
        self.vport_bytes = vport_bytes
        ip_in = checksum.delta(vip_bytes, self.addr_bytes)
        # The TCP checksum covers the addresses through the pseudo-header
        # (RFC 793 section 3.1) and the ports directly.
        self.to_backend_ip_delta = ip_in
        self.to_backend_tcp_delta = checksum.combine(ip_in, checksum.delta(vport_bytes, self.port_bytes))
        # Rewrite mode only (kernel mode never sees the data segments): IP bytes client -> node, as
        # IPVS counts them (whole packets, headers included).  Node -> client bytes never reach
        # user space (the nft return path rewrites them): its rules count them (rules.py).
        self.bytes_in = 0
        # Passive health: when this node last showed life on the data path (its SYN-ACK seen, in
        # rewrite mode, or a FIN it sent, in both).  A node that did so after a SYN it left
        # unanswered is alive: that SYN was lost, damaged on its way (a bad checksum) or slowed by
        # load, which is no evidence against the node (kernel mode never sees a SYN-ACK).
        self.alive_at = float("-inf")

    def __repr__(self) -> str:
        return f"Backend({self.name}, {self.address}:{self.port})"


class Service:
    __slots__ = ("name", "vip", "port", "vip_bytes", "port_bytes", "balancer", "backends", "persistence", "sticky",
                 "flow_secret")

    def __init__(self, spec: ServiceSpec, marks: Sequence[int], flow_secret: bytes = b""):
        self.persistence = spec.persistence
        # Persistence (as IPVS's -p and HAProxy's stick tables): client address -> (backend index, until).
        self.sticky: collections.OrderedDict[bytes, tuple[int, float]] = collections.OrderedDict()
        self.name = spec.name
        self.vip = spec.vip
        self.port = spec.port
        self.vip_bytes = spec.vip.packed
        self.port_bytes = spec.port.to_bytes(2, "big")
        self.backends = [Backend(i, b, self.vip_bytes, self.port_bytes, marks[i]) for i, b in enumerate(spec.backends)]
        self.flow_secret = flow_secret  # keys the maglev policy's flow hash (the same on every distributor)
        self.balancer: Balancer | MaglevBalancer = _balancer(spec.policy, [b.name for b in spec.backends],
                                                             [b.weight for b in spec.backends], secret=flow_secret)

    @property
    def policy(self) -> Policy:
        return self.balancer.policy

    def set_policy(self, policy: Policy) -> None:
        """Change the policy at run time; weights, availability, ramps and open-connection counts stay.

        To or from ``maglev`` the balancer itself is replaced (a hash table, not a pick order)."""
        old = self.balancer
        if policy is old.policy:
            return
        if Policy.MAGLEV not in (policy, old.policy):
            old.set_policy(policy)
            return
        count = len(old)
        new = _balancer(policy, [b.name for b in self.backends], [old.weight(i) for i in range(count)],
                        [old.is_available(i) for i in range(count)], self.flow_secret)
        for i in range(count):
            new.set_ramp(i, old.ramp(i))
            new.set_feedback(i, old.feedback(i))
            for _ in range(old.outstanding(i)):
                new.take(i)
            new.acquired[i] = old.acquired[i]
        self.balancer = new

    def find(self, node: str) -> "Backend | None":
        """The node's backend in this service: the one in service, else the last one removed."""
        found = None
        for backend in self.backends:
            if backend.name == node:
                if not backend.removed:
                    return backend
                found = backend
        return found

    def __repr__(self) -> str:
        return f"Service({self.name}, {self.vip}:{self.port})"


def _balancer(policy: Policy, names: Sequence[str], weights: Sequence[int],
              available: Sequence[bool] | None = None, secret: bytes = b"") -> "Balancer | MaglevBalancer":
    if policy is Policy.MAGLEV:
        return MaglevBalancer(names, weights, available=available, secret=secret)
    balancer = Balancer(policy, weights)
    for index, up in enumerate(available or ()):
        balancer.set_available(index, up)
    return balancer


# Not frozen: a frozen dataclass's __init__ costs several times more, and these are made per connection.
@dataclass(slots=True)
class ConnectionOpened:
    """A new connection was placed on a node (the core replicates it)."""

    conn: Connection


@dataclass(slots=True)
class ConnectionEnded:
    """A connection stopped being open (both FINs, an RST, expiry, reset, replacement)."""

    conn: Connection


class PassiveKind(enum.Enum):
    """What a node did to a connection that counts against its health, seen on the data path."""

    REFUSED = "refused"  # it answered the client's SYN with an RST (nothing listens, or it is shutting down)
    UNANSWERED = "unanswered"  # it left the SYN unanswered until the client retransmitted it


@dataclass(frozen=True, slots=True)
class PassiveFailure:
    """A node failed one connection (passive health): the health core excludes it until a heartbeat clears it.

    The connection itself has already been dealt with: sent to another node where one could take it.
    """

    node: str
    kind: PassiveKind
    key: bytes  # the connection's client -> VIP 4-tuple
    redispatched: bool
    # UNANSWERED: when the node was given the SYN it failed (None: the failure is the moment it is
    # reported, as a refusal is).  A node whose web server answered a heartbeat probe after that
    # moment was serving meanwhile: the SYN was lost or slowed by load.
    since: float | None = None


@dataclass(frozen=True, slots=True)
class SendPacket(Command):
    """Send a complete IPv4 packet the core crafted (an RST, a probe) through a raw socket."""

    packet: bytes


@dataclass(frozen=True)
class ForgetInConntrack(Command):
    """Kernel mode: delete these connections (client -> VIP keys) from conntrack, then send each probe.

    The probe makes the client answer with a segment that conntrack no longer
    knows, so it is queued and the core can reset it (see :func:`probe_for`).
    ``probes`` may be shorter than ``keys``: the keys past its end are only deleted
    (a handshake to forget, so the client's retransmitted SYN is new again).
    """

    keys: tuple[bytes, ...]
    probes: tuple[bytes, ...]


@dataclass(frozen=True)
class ForgetHandshakes(Command):
    """Kernel mode: delete from conntrack the connections to these nodes (address, port) still in their handshake.

    A client whose SYN went to a node that then failed retransmits it on the same 4-tuple; conntrack
    would send the retransmission after the first, to the dead node.  Without the entry the
    retransmission is a new connection again: it is queued, and placed on a live node.
    """

    nodes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class ConfirmWithConntrack(Command):
    """Kernel mode: ask conntrack whether it still tracks these idle-looking connections."""

    keys: tuple[bytes, ...]


@dataclass(frozen=True)
class BackendStats:
    service: str
    node: str
    address: str
    port: int
    weight: int
    available: bool  # health and admin allow new connections
    eligible: bool  # available and weight > 0
    ramp: float
    outstanding: int  # open connections
    acquired: int  # connections ever placed on it
    bytes_in: int = 0  # rewrite mode: IP bytes forwarded client -> node (kernel mode: 0, the kernel forwards them)


@dataclass(frozen=True)
class InterposerStats:
    mode: Mode
    packets: dict[Reason, int]
    connections: int
    capacity: int
    expired: int
    evicted: int
    backends: tuple[BackendStats, ...]


def backend_marks(services: Sequence[ServiceSpec]) -> dict[tuple[str, int], int]:
    """The kernel-mode marks of the configured backends, (service name, backend index) -> mark, in order."""
    marks = {}
    next_mark = MARK_BASE
    for spec in services:
        for index in range(len(spec.backends)):
            marks[(spec.name, index)] = next_mark
            next_mark += 1
    if next_mark - 1 > MARK_MASK:
        raise ValueError(f"{next_mark - MARK_BASE} backends exceed the {MARK_MASK - MARK_BASE + 1} kernel-mode marks")
    return marks


@dataclass(frozen=True)
class RuleBackend:
    address: str
    port: int
    mark: int


@dataclass(frozen=True)
class RuleService:
    """What the data path's rules need of a service: its VIP and every backend, removed ones too."""

    name: str
    vip: str
    port: int
    backends: tuple[RuleBackend, ...]


def rule_layout_of(services: Sequence[ServiceSpec]) -> tuple[RuleService, ...]:
    """The layout of configured services, marks in order (what a fresh Interposer's rule_layout() gives)."""
    marks = backend_marks(services)
    return tuple(RuleService(s.name, str(s.vip), s.port,
                             tuple(RuleBackend(str(b.address), b.port, marks[(s.name, i)]) for i, b in enumerate(s.backends)))
                 for s in services)


class Interposer:
    """Decides and rewrites every queued packet; see the module docstring."""

    def __init__(self, services: Sequence[ServiceSpec], table: ConnectionTable, mode: Mode = Mode.REWRITE,
                 syn_auth: "SynAuth | None" = None, flow_secret: bytes = b""):
        if not services:
            raise ValueError("the interposer needs at least one service")
        self.syn_auth = syn_auth
        # Kernel mode cannot see handshakes complete: conntrack's count of unreplied connections,
        # read now and then (SynAuth's trigger there).
        self.half_open_hint = 0
        self.syns_placed = 0  # new connections placed (counted for observers)
        self.table = table
        self.mode = mode
        self._kernel = mode is Mode.KERNEL
        self._dsr = mode is Mode.DSR
        self._rewrite = mode is Mode.REWRITE
        table.evict_half_open = not self._kernel  # kernel mode never sees a handshake complete
        for spec in services:
            for backend in spec.backends:
                if backend.address.version != spec.vip.version:
                    raise ValueError(f"service {spec.name}: {backend.name}'s address {backend.address} is not of the "
                                     f"VIP's family (IPv{spec.vip.version}); a dual-stack service is two services")
        marks = backend_marks(services)
        self.services = [Service(spec, [marks[(spec.name, i)] for i in range(len(spec.backends))], flow_secret)
                         for spec in services]
        self._next_mark = max(marks.values(), default=MARK_BASE - 1) + 1
        self._by_vip: dict[bytes, Service] = {}
        self._backend_sources: set[bytes] = set()
        self._vip_addresses: set[bytes] = set()
        self._node_addresses: set[bytes] = set()
        for service in self.services:
            self._by_vip[service.vip_bytes + service.port_bytes] = service
            self._vip_addresses.add(service.vip_bytes)
            for backend in service.backends:
                self._backend_sources.add(backend.addr_bytes + backend.port_bytes)
                self._node_addresses.add(backend.addr_bytes)
        self.counts = [0] * len(Reason)
        self._lookup = table.get
        # Rewrite mode: connections that idled out, key -> (node address, node port, forget at).
        self._expired: collections.OrderedDict[bytes, tuple[bytes, bytes, float]] = collections.OrderedDict()
        self._expired_limit = max(1024, table.capacity // 4)
        self._adopt_limit = table.capacity * 3 // 4  # dsr: adopted flows get entries only below this

    # -- the per-packet path -------------------------------------------------
    def decide(self, packet: bytes, now: float) -> tuple[Reason, bytes | int | None, tuple | None]:
        """The verdict for one queued packet: ``(reason, out, extra)`` (see the module docstring).

        The data path calls this for every packet, so the most common one in
        rewrite mode, a well-formed data or ACK segment of an established
        connection from its client, is checked and rewritten inline; everything
        else goes to the full path.  (Kernel mode never queues such segments.)
        """
        length = len(packet)
        if (length >= 40 and packet[0] == 0x45 and packet[9] == _IPPROTO_TCP and not (packet[6] & 0x3F or packet[7])
                and (packet[2] << 8 | packet[3]) == length and 80 <= packet[32] and (packet[32] >> 4) * 4 + 20 <= length
                and packet[33] & _NOT_PLAIN == 0 and packet[33] & ACK and packet[8] > 1 and self._rewrite):
            key = packet[12:24]
            conn = self._lookup(key)
            if conn is not None and conn.state is _ESTABLISHED and not conn.reset_by_us and conn.key == key:
                conn.last_seen = now
                conn.client_ack = packet[28:32]
                backend = conn.backend
                buf = bytearray(packet)
                # RFC 1624 equation 3 on both checksums, with the deltas precomputed per backend.
                ip_sum = ((packet[10] << 8 | packet[11]) ^ 0xFFFF) + backend.to_backend_ip_delta
                tcp_sum = ((packet[36] << 8 | packet[37]) ^ 0xFFFF) + backend.to_backend_tcp_delta
                buf[16:20] = backend.addr_bytes
                if backend.rewrites_port:
                    buf[22:24] = backend.port_bytes
                backend.bytes_in += length
                ip_sum = ((ip_sum & 0xFFFF) + (ip_sum >> 16)) ^ 0xFFFF
                tcp_sum = ((tcp_sum & 0xFFFF) + (tcp_sum >> 16)) ^ 0xFFFF
                buf[10] = ip_sum >> 8
                buf[11] = ip_sum & 0xFF
                buf[36] = tcp_sum >> 8
                buf[37] = tcp_sum & 0xFF
                self.counts[_TO_BACKEND] += 1
                return _TO_BACKEND, bytes(buf), None
        elif (self._dsr and length >= 40 and packet[0] == 0x45 and packet[9] == _IPPROTO_TCP
              and not (packet[6] & 0x3F or packet[7]) and 80 <= packet[32] and packet[33] & _NOT_PLAIN == 0
              and packet[33] & ACK and packet[8] > 1):
            # dsr mode's most common packet: the same, handed back unchanged with its node's mark.
            key = packet[12:24]
            conn = self._lookup(key)
            if conn is not None and conn.state is _ESTABLISHED and not conn.reset_by_us and conn.key == key:
                conn.last_seen = now
                conn.client_ack = packet[28:32]
                backend = conn.backend
                backend.bytes_in += packet[2] << 8 | packet[3]
                self.counts[_TO_BACKEND] += 1
                return _TO_BACKEND, backend.mark, None
        elif (self._rewrite and length >= 60 and packet[0] >> 4 == 6 and packet[6] == _IPPROTO_TCP and packet[7] > 1
              and (packet[4] << 8 | packet[5]) + 40 == length and 80 <= packet[52]
              and (packet[52] >> 4) * 4 + 40 <= length and packet[53] & _NOT_PLAIN == 0 and packet[53] & ACK):
            # The same for IPv6 (no extension headers): only the TCP checksum, which covers the
            # addresses through the pseudo-header (RFC 8200 section 8.1).
            key = packet[8:44]
            conn = self._lookup(key)
            if conn is not None and conn.state is _ESTABLISHED and not conn.reset_by_us and conn.key == key:
                conn.last_seen = now
                conn.client_ack = packet[48:52]
                backend = conn.backend
                buf = bytearray(packet)
                tcp_sum = ((packet[56] << 8 | packet[57]) ^ 0xFFFF) + backend.to_backend_tcp_delta
                buf[24:40] = backend.addr_bytes
                if backend.rewrites_port:
                    buf[42:44] = backend.port_bytes
                backend.bytes_in += length
                tcp_sum = ((tcp_sum & 0xFFFF) + (tcp_sum >> 16)) ^ 0xFFFF
                buf[56] = tcp_sum >> 8
                buf[57] = tcp_sum & 0xFF
                self.counts[_TO_BACKEND] += 1
                return _TO_BACKEND, bytes(buf), None
        verdict = self._decide(packet, now)
        self.counts[verdict[0]] += 1
        return verdict

    def handle(self, packet: bytes, now: float) -> tuple[int, bytes | int | None]:
        """``(ACCEPT or DROP, out)``: the verdict alone, for tests and tools that need no effects."""
        reason, out, _ = self.decide(packet, now)
        return reason.verdict, out

    def _decide(self, packet: bytes, now: float) -> tuple[Reason, bytes | int | None, tuple | None]:
        if self._dsr:
            return self._decide_dsr(packet, now)
        if packet[:1] > b"\x5f":  # IPv6 (or garbage, which _invalid6 refuses)
            if len(packet) >= 40 and packet[6] == _IPPROTO_ICMPV6 and not self._kernel:
                return self._icmp6(packet)
            invalid = _invalid6(packet, whole=not self._kernel)
            if invalid is not None:
                return invalid, None, None
            tcp, key, hop_limit = 40, packet[8:44], packet[7]
        else:
            if len(packet) >= 20 and packet[9] == _IPPROTO_ICMP and not self._kernel:
                return self._icmp(packet)
            # Rewrite mode hands the bytes back, so the copy must be the whole packet (the kernel
            # would trim the packet to a shorter one); kernel mode copies the headers only.
            invalid = _invalid(packet, whole=not self._kernel)
            if invalid is not None:
                return invalid, None, None
            tcp, key, hop_limit = 20, packet[12:24], packet[8]
        # The key is the client's address, the VIP, the client's port, the VIP's port (both families
        # keep them in this order, back to back: IPv4 bytes 12-24, IPv6 bytes 8-44).
        flags = packet[tcp + 13]
        if hop_limit <= 1 and _vip_port(key) in self._by_vip:
            return Reason.TTL_EXPIRED, None, None
        conn = self.table.get(key)
        ended: ConnectionEnded | None = None
        if self._kernel and flags & (FIN | RST):
            # The rules queue only a connection's first FIN or RST, from either side (and RSTs to a
            # VIP that conntrack does not know: perhaps the answer to a SYN cookie).
            if conn is None and flags & RST and self.syn_auth is not None and self.syn_auth.answer(packet, now):
                return Reason.SYN_VERIFIED, None, None
            if conn is not None and conn.key == key and flags & FIN and self.syn_auth is not None:
                self.syn_auth.verify(_client(key), now)  # a client that closes a connection was real
            if conn is not None and conn.key != key and flags & FIN:
                conn.backend.alive_at = now  # it finished a connection: alive (passive health)
            if (conn is not None and conn.key != key and flags & RST and flags & ACK and conn.is_open
                    and _acknowledges_syn(packet, conn.isn)):
                verdict = self._refused(conn, now)
                if verdict is not None:
                    return verdict
            if conn is not None and self.table.close(conn, now):
                return Reason.CONNECTION_END, END_MARK, (self._ended(conn),)
            return Reason.CONNECTION_END, END_MARK, None
        if conn is not None and conn.key == key and flags & (SYN | ACK) == SYN and _starts_over(conn):
            # A new connection on a finished entry's 4-tuple, or on one whose node takes no new ones.
            ended = self._drop_entry(conn)
            conn = None
        if conn is None:
            return self._unknown(packet, key, flags, now, ended)
        if conn.key == key:  # client -> VIP
            if conn.reset_by_us:
                if flags & ACK and not flags & RST:
                    return Reason.RESET_CONNECTION, None, (SendPacket(_reset_for(packet, conn.backend)),)
                return Reason.RESET_CONNECTION, None, None
            if flags & ACK and not self._kernel:
                conn.client_ack = packet[tcp + 8:tcp + 12]
                if conn.state is TcpState.SYN_SEEN and self.syn_auth is not None:
                    self.syn_auth.verify(_client(key), now)  # it completed a handshake: a real address
            failure = None
            if (flags & SYN and conn.state is TcpState.SYN_SEEN and not conn.answered and packet[tcp + 4:tcp + 8] == conn.isn
                    and now - conn.last_seen >= SYN_RETRY_MIN):
                verdict = self._unanswered(packet, conn, now)
                if verdict[0] is not Reason.TO_BACKEND:
                    return verdict
                failure = verdict[2] or None
            done = self.table.advance(conn, flags, True, now)
            if self._kernel:
                out = conn.backend.mark
            else:
                out = _to_backend(packet, conn.backend)
                conn.backend.bytes_in += len(packet)
            if failure is not None:
                return Reason.TO_BACKEND, out, failure
            return Reason.TO_BACKEND, out, (self._ended(conn),) if done else None
        # node -> client: only its SYN-ACK, FIN and RST are queued, to be seen, not rewritten: the
        # kernel rewrites the source of every node packet statelessly after this (nft, see rules.py;
        # kernel mode: conntrack NAT), so the packet goes on unchanged and keeps its offloads.
        if conn.reset_by_us:
            return Reason.RESET_CONNECTION, None, None
        if flags & FIN:
            conn.backend.alive_at = now  # it finished a connection: alive (passive health)
        failure = None
        if conn.state is TcpState.SYN_SEEN and not conn.answered:
            if flags & SYN:
                conn.answered = True
                conn.syn = None
                conn.backend.alive_at = now
            elif flags & RST and flags & ACK and _acknowledges_syn(packet, conn.isn):
                # RFC 793 section 3.4: the RST a closed port answers a SYN with acknowledges exactly the SYN.
                verdict = self._refused(conn, now)
                if verdict is not None:
                    return verdict
                failure = PassiveFailure(conn.backend.name, PassiveKind.REFUSED, conn.key, False)
        done = self.table.advance(conn, flags, False, now)
        if failure is not None:
            return Reason.TO_CLIENT, None, (failure, self._ended(conn)) if done else (failure,)
        return Reason.TO_CLIENT, None, (self._ended(conn),) if done else None

    # -- direct server return (dsr mode) -------------------------------------------------------------
    def _decide_dsr(self, packet: bytes, now: float) -> tuple[Reason, int | None, tuple | None]:
        """A client segment to a VIP (the rules queue nothing else): the mark of its node's route.

        The packet is never changed, so only its headers were copied.  No passive health: the node's
        answers never pass here (see below); the heartbeat counters alone exclude a node, and a
        node's RST goes to the client directly.
        """
        if len(packet) >= 20 and packet[9] == _IPPROTO_ICMP:
            return self._icmp_dsr(packet)
        invalid = _invalid(packet, whole=False)
        if invalid is not None:
            return invalid, None, None
        service = self._by_vip.get(packet[16:20] + packet[22:24])
        if service is None:
            return Reason.NOT_SERVICE, None, None
        if packet[8] <= 1:
            return Reason.TTL_EXPIRED, None, None
        flags = packet[33]
        key = packet[12:24]
        conn = self.table.get(key)
        ended: ConnectionEnded | None = None
        if conn is not None and flags & (SYN | ACK) == SYN and _starts_over(conn):
            ended = self._drop_entry(conn)
            conn = None
        if conn is None:
            if flags & (SYN | ACK) == SYN:
                return self._unknown(packet, key, flags, now, ended)
            if flags & RST and self.syn_auth is not None and self.syn_auth.answer(packet, now):
                return Reason.SYN_VERIFIED, None, (ended,) if ended is not None else None
            return self._adopt(service, key, flags, packet[2] << 8 | packet[3], now, ended)
        if conn.key != key:
            return Reason.UNKNOWN_REPLY, None, None  # a "reply" to the VIP: only a forged source makes one
        if conn.reset_by_us:
            if flags & ACK and not flags & RST:
                return Reason.RESET_CONNECTION, None, (SendPacket(_reset_for(packet, conn.backend)),)
            return Reason.RESET_CONNECTION, None, None
        if flags & ACK:
            conn.client_ack = packet[28:32]  # the node's next sequence number: what an RST to the client needs
            if conn.state is TcpState.SYN_SEEN and not flags & SYN and self.syn_auth is not None:
                self.syn_auth.verify(key[0:4], now)  # it completed a handshake: a real address
        # A retransmitted SYN stays with its node while the heartbeat counters keep the node in service
        # (one they exclude made the entry start over, above).  This distributor cannot see the node's
        # SYN-ACK: moving the connection on a lost SYN-ACK would split its handshake between two
        # nodes (the client may yet acknowledge the first one's retransmitted SYN-ACK), and anyone
        # could send a SYN twice to have a live node reported; so dsr reports no passive failures.
        if flags & (FIN | RST):
            # The node's FIN never passes here: the client's FIN or RST ends the connection (as IPVS's
            # direct routing does); its last ACKs follow the CLOSED entry, or the flow hash after it.
            done = self.table.close(conn, now)
        else:
            done = self.table.advance(conn, flags, True, now)
        backend = conn.backend
        backend.bytes_in += packet[2] << 8 | packet[3]  # the whole packet's length: only its headers were copied
        return Reason.TO_BACKEND, backend.mark, (self._ended(conn),) if done else None

    def _icmp_dsr(self, packet: bytes) -> tuple[Reason, int | None, None]:
        """An ICMP error addressed to a VIP (the rules queue no other ICMP): the mark of the node it concerns.

        The node sent the quoted segment from the VIP, which it holds, so the error needs no
        translation: it goes on unchanged to that node (the connection's, or the flow hash's for a
        flow this distributor does not know), whose TCP lowers its path MTU or notes the error.
        Without this a router's "fragmentation needed" about a response would meet the VIP's
        blackhole rule here: a path MTU black hole (RFC 2923 section 2.1).  Errors about no VIP
        connection, quoting a later fragment, or with IP options are dropped and counted.
        """
        # Only the headers were copied: the packet's own length cannot be checked against the copy's.
        refused, quoted = _quoted_segment(packet, Reason.ICMP_UNKNOWN, whole=False)
        if refused is not None:
            return refused, None, None
        inner = _ICMP_QUOTE
        if packet[inner + 6] & 0x1F or packet[inner + 7]:
            return Reason.ICMP_UNKNOWN, None, None  # a later fragment quotes no ports; the nodes' segments carry DF
        source, destination = packet[inner + 12:inner + 16], packet[inner + 16:inner + 20]
        sport, dport = packet[quoted:quoted + 2], packet[quoted + 2:quoted + 4]
        service = self._by_vip.get(source + sport)
        if service is None:
            return Reason.ICMP_UNKNOWN, None, None
        key = destination + source + dport + sport  # the connection's client -> VIP key
        conn = self._lookup(key)
        if conn is not None and conn.key == key and not conn.reset_by_us:
            return Reason.ICMP_TO_NODE, conn.backend.mark, None
        index = service.balancer.peek(key)
        if index is None:
            return Reason.ICMP_UNKNOWN, None, None
        return Reason.ICMP_TO_NODE, service.backends[index].mark, None

    def _adopt(self, service: Service, key: bytes, flags: int, length: int, now: float,
               ended: "ConnectionEnded | None") -> tuple[Reason, int | None, tuple | None]:
        """A mid-stream segment of a connection this distributor does not know: the flow hash's node.

        Every distributor computes the same node for the flow (the service's Maglev table, the same
        secret), so a flow that the router moved here keeps its node.  Its entry is opened as
        established (the cache), but for a closing segment, which is sent on and not remembered.
        """
        before = (ended,) if ended is not None else None
        balancer = service.balancer
        if flags & (FIN | RST) or len(self.table) >= self._adopt_limit:
            # A closing segment is sent on without an entry; so is every adopted segment once the table
            # is three quarters full: forged mid-stream segments cost no handshake and must not take
            # the room new connections need (the flow hash names the node again at each segment).
            index = balancer.peek(key)
            if index is None:
                return Reason.NO_BACKEND, None, before
            return Reason.ADOPTED_FLOW, service.backends[index].mark, before
        index = balancer.acquire(key)
        if index is None:
            return Reason.NO_BACKEND, None, before
        backend = service.backends[index]
        effects: list = [] if ended is None else [ended]
        conn = self._open(service, backend, key, now, effects)
        if conn is None:
            balancer.release(index)
            return Reason.TABLE_FULL, None, tuple(effects) or None
        self.table.advance(conn, ACK, True, now)  # past its handshake: established
        conn.answered = True
        backend.bytes_in += length
        effects.append(ConnectionOpened(conn))
        return Reason.ADOPTED_FLOW, backend.mark, tuple(effects)

    # -- ICMP that belongs to a connection (rewrite mode) --------------------------------------------
    def _icmp(self, packet: bytes) -> tuple[Reason, bytes | None, None]:
        """An ICMP message: translate an error about a VIP connection for the host it concerns.

        Rewrite mode keeps the VIP's segments out of conntrack, so the kernel cannot translate the
        errors that belong to them, as conntrack does in kernel mode (and IPVS in its NAT mode): a
        "fragmentation needed" a router on the client's side sends the VIP about a response would
        never reach the node that sent it, and the node would resend full-size segments for ever
        (a path MTU black hole, RFC 2923 section 2.1).  An error is matched to its connection by the
        IP header and the first 8 bytes of TCP it quotes (RFC 792):

        * quoting a segment from a VIP to a client (an error from the outside): its outer
          destination, the quoted source address and port become the node's, and it goes on to
          the node, whose TCP lowers its path MTU or notes the error;
        * quoting a segment sent to a node in a client's name (an error from the cluster LAN, or
          from the distributor's own stack): "fragmentation needed" goes to the client with the
          VIP for the node, as its outer source too; every other error about a node is the
          distributor's to act on (passive health moves a connection a node left unanswered),
          and would make the client abort a connection that can still be moved: dropped;
        * an error about neither a known connection nor a node is not ours: passed untouched.

        Errors about no known connection of a VIP, or a node, are dropped and counted, so no ICMP
        leaves toward the outside quoting a node's address; so are errors with IP options (as on
        the TCP path) and errors quoting a fragment past the first (no TCP header to match).  The
        ICMP checksum is patched, not recomputed: a damaged error stays damaged.  Other ICMP (echo
        to the VIP, which the distributor's own stack answers) passes untouched.
        """
        refused, quoted = _quoted_segment(packet, Reason.NOT_TCP, whole=True)
        if refused is not None:
            return refused, None, None
        inner = _ICMP_QUOTE
        source, destination = packet[inner + 12:inner + 16], packet[inner + 16:inner + 20]
        sport, dport = packet[quoted:quoted + 2], packet[quoted + 2:quoted + 4]
        if packet[inner + 6] & 0x1F or packet[inner + 7]:
            # A fragment past the first quotes no TCP header: its "ports" are data.  The distributor
            # fragments no segment of a VIP connection (TCP sets DF): one that claims so is forged.
            if source in self._vip_addresses or destination in self._node_addresses:
                return Reason.ICMP_UNKNOWN, None, None
            return Reason.NOT_SERVICE, None, None
        if source + sport in self._by_vip:
            key = destination + source + dport + sport  # the connection's client -> VIP key
            conn = self._lookup(key)
            if conn is None or conn.key != key or conn.reset_by_us:
                return Reason.ICMP_UNKNOWN, None, None
            return Reason.ICMP_TO_NODE, _icmp_to_node(packet, quoted, conn.backend), None
        if destination + dport in self._backend_sources:
            conn = self._lookup(destination + source + dport + sport)  # the node -> client key
            if (conn is None or conn.key[0:4] != source or conn.reset_by_us or packet[_ICMP] != _ICMP_UNREACHABLE
                    or packet[_ICMP + 1] != _ICMP_FRAG_NEEDED):
                return Reason.ICMP_UNKNOWN, None, None
            return Reason.ICMP_TO_CLIENT, _icmp_to_client(packet, quoted, conn.backend), None
        return Reason.NOT_SERVICE, None, None

    def _icmp6(self, packet: bytes) -> tuple[Reason, bytes | None, None]:
        """An ICMPv6 message: translate an error about a VIP connection for the host it concerns.

        :meth:`_icmp` for IPv6, with the same rules: an error quoting a segment from a VIP goes to the
        connection's node; "packet too big" (RFC 8201) quoting a segment sent to a node goes to the
        client, from the VIP; every other error about a node, and any about no known connection of a
        VIP or a node, is dropped and counted.  Neighbour discovery never reaches here (the rules
        queue errors only).
        """
        refused = _quoted_segment6(packet, Reason.NOT_TCP, whole=True)
        if refused is not None:
            if refused is Reason.NOT_TCP and len(packet) >= _QUOTED6_TCP and packet[_ICMP6] in _ICMPV6_ERRORS and (
                    packet[_QUOTED6 + 8:_QUOTED6 + 24] in self._vip_addresses
                    or packet[_QUOTED6 + 24:_QUOTED6 + 40] in self._node_addresses):
                # A quote with extension headers (a fragment, a routing header): no segment of a VIP
                # connection carries one; forged, and it must not leave quoting a node.
                return Reason.ICMP_UNKNOWN, None, None
            return refused, None, None
        source, destination = packet[_QUOTED6 + 8:_QUOTED6 + 24], packet[_QUOTED6 + 24:_QUOTED6 + 40]
        sport, dport = packet[_QUOTED6_TCP:_QUOTED6_TCP + 2], packet[_QUOTED6_TCP + 2:_QUOTED6_TCP + 4]
        if source + sport in self._by_vip:
            key = destination + source + dport + sport  # the connection's client -> VIP key
            conn = self._lookup(key)
            if conn is None or conn.key != key or conn.reset_by_us:
                return Reason.ICMP_UNKNOWN, None, None
            return Reason.ICMP_TO_NODE, _icmp6_to_node(packet, conn.backend), None
        if destination + dport in self._backend_sources:
            conn = self._lookup(destination + source + dport + sport)  # the node -> client key
            if (conn is None or _client(conn.key) != source or conn.reset_by_us
                    or packet[_ICMP6] != _ICMPV6_PACKET_TOO_BIG):
                return Reason.ICMP_UNKNOWN, None, None
            return Reason.ICMP_TO_CLIENT, _icmp6_to_client(packet, conn.backend), None
        return Reason.NOT_SERVICE, None, None

    # -- passive health: a node that fails a connection's handshake -----------------------------------
    def _refused(self, conn: Connection, now: float) -> tuple[Reason, None, tuple] | None:
        """A node reset the client's SYN: the verdict that hides the RST, or None to let it reach the client.

        Rewrite mode sends the client's SYN, kept since it came, to another node at once, so the
        client never learns the first node refused it.  Kernel mode drops the RST and forgets the
        entry (the kernel has already killed its conntrack entry: an RST in SYN_SENT): the client's
        retransmitted SYN, after its RTO, is a new connection again, placed on a live node.
        """
        if self._kernel:
            if not self._spare(conn):
                return None  # no other node could take the retransmitted SYN: the client learns at once
            ended = self._drop_entry(conn)
            failure = PassiveFailure(conn.backend.name, PassiveKind.REFUSED, conn.key, True)
            return Reason.NODE_REFUSED, None, (failure, ended) if ended is not None else (failure,)
        syn = conn.syn
        if syn is None:
            return None
        moved = self._redispatch(conn, now)
        if moved is None:
            return None
        backend, effects = moved
        backend.bytes_in += len(syn)
        failure = PassiveFailure(conn.backend.name, PassiveKind.REFUSED, conn.key, True)
        return Reason.NODE_REFUSED, None, (failure, *effects, SendPacket(_to_backend(syn, backend)))

    def _unanswered(self, packet: bytes, conn: Connection, now: float) -> tuple[Reason, bytes | int | None, tuple]:
        """The client retransmitted a SYN its node never answered: send this one to another node.

        Rewrite mode rewrites the retransmission itself to the new node.  Kernel mode cannot move a
        connection conntrack has bound (NAT is decided at a connection's first packet): the
        retransmission is dropped and the entry forgotten, so the client's next one is placed
        afresh.  (Conntrack queues the retransmission at all because a connection whose reply
        direction was never seen is still NEW to it; a SYN with a bad checksum is INVALID there and
        never reaches us.)  When no other node can take it, the retransmission goes to the same node
        (TO_BACKEND) and the failure is still reported.  A node that showed life since this SYN was
        sent (a SYN-ACK in rewrite mode, a FIN in both) is alive: the connection moves, but nothing is
        reported against the node (under saturation a slow handshake is load, not a dead node).
        """
        key, failed, sent = conn.key, conn.backend, conn.last_seen
        alive = failed.alive_at > sent
        if self._kernel:
            if not self._spare(conn):
                return Reason.TO_BACKEND, None, () if alive else (PassiveFailure(failed.name, PassiveKind.UNANSWERED,
                                                                                    key, False, sent),)
            ended = self._drop_entry(conn)
            effects = (ForgetInConntrack((key,), ()),) if alive else (
                PassiveFailure(failed.name, PassiveKind.UNANSWERED, key, True, sent), ForgetInConntrack((key,), ()))
            return Reason.SYN_UNANSWERED, None, (*effects, ended) if ended is not None else effects
        moved = self._redispatch(conn, now)
        if moved is None:
            return Reason.TO_BACKEND, None, () if alive else (PassiveFailure(failed.name, PassiveKind.UNANSWERED, key,
                                                                                False, sent),)
        backend, effects = moved
        backend.bytes_in += len(packet)
        if alive:
            # The connection moves all the same (cheap, and its client waits no longer); the node stays.
            return Reason.SYN_REDISPATCHED, _to_backend(packet, backend), tuple(effects)
        failure = PassiveFailure(failed.name, PassiveKind.UNANSWERED, key, True, sent)
        return Reason.SYN_REDISPATCHED, _to_backend(packet, backend), (failure, *effects)

    @staticmethod
    def _spare(conn: Connection) -> bool:
        """Whether a node of the connection's service other than its own may take new connections now."""
        balancer, failed = conn.service.balancer, conn.backend
        return any(balancer.is_available(b.index) for b in conn.service.backends if b is not failed and not b.removed)

    def _redispatch(self, conn: Connection, now: float) -> "tuple[Backend, list] | None":
        """Move a connection still in its handshake to another node: (new backend, effects), or None.

        The failed node is left out of this one pick whatever its health says (the health core
        decides about the node's other connections; this connection has seen the node fail).
        """
        if conn.redispatches >= MAX_REDISPATCHES:
            return None
        service, failed = conn.service, conn.backend
        balancer = service.balancer
        if isinstance(balancer, MaglevBalancer):
            # The flow's next slot whose node is another: the same on every distributor, and no
            # table rebuilt for one connection (persistence keeps no client on a failed node either).
            index = balancer.acquire(conn.key, avoid=failed.index)
            if index is not None and service.persistence:
                service.sticky[_client(conn.key)] = (index, now + service.persistence)
                service.sticky.move_to_end(_client(conn.key))
        else:
            hidden = balancer.is_available(failed.index)
            if hidden:
                balancer.set_available(failed.index, False)
            try:
                index = self._place(service, conn.key, now) if service.persistence else balancer.acquire(conn.key)
            finally:
                if hidden:
                    balancer.set_available(failed.index, True)
        if index is None:
            return None
        effects: list = []
        ended = self._drop_entry(conn)
        if ended is not None:
            effects.append(ended)
        backend = service.backends[index]
        moved = self._open(service, backend, conn.key, now, effects)
        if moved is None:  # cannot happen (an entry was just freed), but never lose the pick's count
            balancer.release(index)
            return None
        moved.isn, moved.syn, moved.redispatches = conn.isn, conn.syn, conn.redispatches + 1
        effects.append(ConnectionOpened(moved))
        return backend, effects

    def _unknown(self, packet: bytes, key: bytes, flags: int, now: float,
                 ended: "ConnectionEnded | None") -> tuple[Reason, bytes | int | None, tuple | None]:
        before = (ended,) if ended is not None else None
        # Inline, not _client / _vip_port: this is every new connection's path (measured: the calls
        # cost a SYN 0.5 us of its 5).
        if len(key) == 12:
            client, client_port, service = key[0:4], key[8:10], self._by_vip.get(key[4:8] + key[10:12])
        else:
            client, client_port, service = key[0:16], key[32:34], self._by_vip.get(key[16:32] + key[34:36])
        if service is None:
            if client + client_port in self._backend_sources:
                return Reason.UNKNOWN_REPLY, None, before
            return Reason.NOT_SERVICE, None, before
        if flags & (SYN | ACK) != SYN:
            if flags & RST and self.syn_auth is not None and self.syn_auth.answer(packet, now):
                return Reason.SYN_VERIFIED, None, before
            expired = self._expired.get(key)
            if expired is not None and flags & ACK and not flags & RST:
                node, node_port, _ = expired
                return Reason.EXPIRED_FLOW, None, (SendPacket(_reset_for_packet(packet)),
                                                   SendPacket(_reset_to_node(packet, node, node_port)))
            return Reason.UNKNOWN_FLOW, None, before
        auth = self.syn_auth
        if auth is not None and not auth.admits(client, self.half_open_hint if self._kernel else self.table.half_open(),
                                                 now):
            return Reason.SYN_CHALLENGED, None, (*(before or ()), SendPacket(auth.challenge(packet, now)))
        index = self._place(service, key, now) if service.persistence else service.balancer.acquire(key)
        if index is None:
            return Reason.NO_BACKEND, None, before
        self.syns_placed += 1
        backend = service.backends[index]
        reply_key = backend.addr_bytes + client + backend.port_bytes + client_port
        stale = self.table.get(reply_key)
        if stale is not None or ended is not None:
            # Rare: a finished entry holds the reply 4-tuple, or this SYN started over; collect every effect.
            effects: list = [] if ended is None else [ended]
            conn = self._open(service, backend, key, now, effects)
            if conn is None:
                service.balancer.release(index)
                return Reason.TABLE_FULL, None, tuple(effects) or None
            effects.append(ConnectionOpened(conn))
            opened = tuple(effects)
        else:
            conn = self.table.open(key, reply_key, service, backend, now)
            if conn is None:
                service.balancer.release(index)
                return Reason.TABLE_FULL, None, None
            if self.table.evicted_open:
                opened = (*self._released_evictions(), ConnectionOpened(conn))
            else:
                opened = (ConnectionOpened(conn),)
        sequence = 24 if len(key) == 12 else 44  # the TCP sequence number: right after the key, in both families
        conn.isn = packet[sequence:sequence + 4]
        if self._kernel:
            out = backend.mark
        elif self._dsr:
            out = backend.mark
            backend.bytes_in += packet[2] << 8 | packet[3]  # dsr serves IPv4 only (config.py)
        else:
            conn.syn = packet  # until the node answers: sent to another node if this one refuses it
            out = _to_backend(packet, backend)
            backend.bytes_in += len(packet)
        return Reason.NEW_CONNECTION, out, opened

    def _place(self, service: Service, key: bytes, now: float) -> int | None:
        """Persistence: the client's node while its entry lives and the node may take it, else a new pick."""
        client = _client(key)
        entry = service.sticky.get(client)
        balancer = service.balancer
        if entry is not None and entry[1] > now and balancer.eligible(entry[0]):
            index = entry[0]
            balancer.acquire_at(index)
        else:
            index = balancer.acquire(key)  # none yet, expired, or its node is out: the client moves
            if index is None:
                return None
        service.sticky[client] = (index, now + service.persistence)
        service.sticky.move_to_end(client)
        return index

    def _open(self, service: Service, backend: Backend, key: bytes, now: float, effects: list) -> Connection | None:
        """A table entry for ``key`` on ``backend``; a finished entry holding the reply 4-tuple is replaced."""
        reply_key = backend.addr_bytes + _client(key) + backend.port_bytes + key[-4:-2]
        stale = self.table.get(reply_key)
        if stale is not None:
            ended = self._drop_entry(stale)
            if ended is not None:
                effects.append(ended)
        conn = self.table.open(key, reply_key, service, backend, now)
        effects += self._released_evictions()
        return conn

    def _released_evictions(self) -> list:
        """Half-open entries the table evicted to make room: released, and reported ended."""
        evicted, self.table.evicted_open = self.table.evicted_open, []
        return [self._ended(conn) for conn in evicted]

    def _drop_entry(self, conn: Connection) -> "ConnectionEnded | None":
        """Remove an entry at once; the ConnectionEnded effect when it was still open."""
        return self._ended(conn) if self.table.remove(conn) else None

    def _ended(self, conn: Connection) -> ConnectionEnded:
        conn.service.balancer.release(conn.backend.index)
        return ConnectionEnded(conn)

    # -- housekeeping ------------------------------------------------------
    def expire(self, now: float, budget: int = 10_000) -> list:
        """Expire idle connections: a ConnectionEnded effect for each open one that ended.

        In kernel mode the data segments never reach user space, so an open
        entry that looks idle is kept and listed in one ConfirmWithConntrack
        command; :meth:`confirmed` takes the answer.
        """
        suspects: list[Connection] | None = [] if self._kernel else None
        effects: list = []
        for conn in self.table.expire(now, budget, suspects):
            effects.append(self._ended(conn))
            if self._rewrite and conn.client_ack:  # it was past its handshake (dsr mode adopts late segments)
                self._remember_expired(conn, now)
        if suspects:
            effects.append(ConfirmWithConntrack(tuple(conn.key for conn in suspects)))
        expired = self._expired
        while expired and next(iter(expired.values()))[2] <= now:
            expired.popitem(last=False)
        for service in self.services:
            sticky = service.sticky
            while sticky and next(iter(sticky.values()))[1] <= now:
                sticky.popitem(last=False)
        return effects

    def _remember_expired(self, conn: Connection, now: float) -> None:
        # Rewrite mode: a segment of this connection arriving later gets RSTs instead of silence.
        expired = self._expired
        expired[conn.key] = (conn.backend.addr_bytes, conn.backend.port_bytes, now + EXPIRED_MEMORY)
        expired.move_to_end(conn.key)
        if len(expired) > self._expired_limit:
            expired.popitem(last=False)

    def confirmed(self, alive: Iterable[bytes], gone: Iterable[bytes], now: float) -> list:
        """Kernel mode: conntrack's answer to ConfirmWithConntrack; the ended connections' effects."""
        for key in alive:
            conn = self.table.get(key)
            if conn is not None and conn.key == key:
                conn.last_seen = now
        return [effect for key in gone for effect in self._end_key(key, now)]

    def set_node_available(self, name: str, available: bool) -> int:
        """Gate a node (by name) for new connections in every service; returns how many services have it."""
        found = 0
        for service in self.services:
            for backend in service.backends:
                if backend.name == name:
                    service.balancer.set_available(backend.index, available and not backend.removed)
                    found += 1
        return found

    # -- the layout at run time (nodes added, removed, weights and policies changed) -------------------
    def service(self, name: str) -> Service | None:
        for service in self.services:
            if service.name == name:
                return service
        return None

    def add_backend(self, service_name: str, spec: BackendSpec) -> Backend:
        """Put a node in a service; a node removed earlier at the same address and port comes back in place."""
        service = self.service(service_name)
        if service is None:
            raise KeyError(f"no service {service_name!r}")
        if spec.address.version != service.vip.version:
            raise ValueError(f"{spec.name}'s address {spec.address} is IPv{spec.address.version} and {service_name}'s "
                             f"VIP {service.vip} is IPv{service.vip.version}; a service's nodes are of its VIP's family")
        existing = service.find(spec.name)
        if existing is not None and not existing.removed:
            if (existing.address, existing.port) != (spec.address, spec.port):
                raise ValueError(f"{spec.name} is in {service_name} already at {existing.address}:{existing.port}")
            service.balancer.set_weight(existing.index, spec.weight)
            return existing
        for old in service.backends:  # back at the address and port it had: the same backend again
            if old.removed and old.name == spec.name and (old.address, old.port) == (spec.address, spec.port):
                old.removed = False
                service.balancer.set_weight(old.index, spec.weight)
                service.balancer.set_available(old.index, True)
                return old
        taken = {b.addr_bytes + b.port_bytes: s.name for s in self.services for b in s.backends if not b.removed}
        owner = taken.get(spec.address.packed + spec.port.to_bytes(2, "big"))
        if owner is not None:
            raise ValueError(f"{spec.address}:{spec.port} already serves {owner}; replies would be ambiguous")
        if self._next_mark > MARK_MASK:
            raise ValueError(f"no kernel-mode mark left for another backend (at most {MARK_MASK - MARK_BASE + 1})")
        index = service.balancer.add(spec.weight, spec.name)
        backend = Backend(index, spec, service.vip_bytes, service.port_bytes, self._next_mark)
        self._next_mark += 1
        service.backends.append(backend)
        self._backend_sources.add(backend.addr_bytes + backend.port_bytes)
        self._node_addresses.add(backend.addr_bytes)
        return backend

    def remove_backend(self, service_name: str, node: str) -> Backend:
        """Take a node out of a service: no new connection; its open ones finish where they are."""
        service = self.service(service_name)
        backend = service.find(node) if service is not None else None
        if backend is None or backend.removed:
            raise KeyError(f"{node} is not in service {service_name!r}")
        backend.removed = True
        service.balancer.set_available(backend.index, False)
        return backend

    def rule_layout(self) -> tuple[RuleService, ...]:
        """The services as the rules install them (removed backends stay until restart: they may still drain)."""
        return tuple(RuleService(s.name, str(s.vip), s.port,
                                 tuple(RuleBackend(str(b.address), b.port, b.mark) for b in s.backends))
                     for s in self.services)

    def sticky_node(self, service: Service, client: bytes, now: float) -> Backend | None:
        """Persistence: the node a client's next connection stays on, if any (for explain)."""
        entry = service.sticky.get(client) if service.persistence else None
        if entry is None or entry[1] <= now or not service.balancer.eligible(entry[0]):
            return None
        return service.backends[entry[0]]

    def endpoints_of(self, name: str) -> list[tuple[str, int]]:
        """(address, port) of the node in every service that has it."""
        return [(str(backend.address), backend.port) for service in self.services for backend in service.backends
                if backend.name == name]

    def set_node_feedback(self, name: str, factor: float) -> None:
        """Scale a node's weight by its reports (used by services with the feedback policy)."""
        for service in self.services:
            for backend in service.backends:
                if backend.name == name:
                    service.balancer.set_feedback(backend.index, factor)

    def set_node_ramp(self, name: str, factor: float) -> None:
        """Scale a node's share of new connections (slow start) in every service that has it."""
        for service in self.services:
            for backend in service.backends:
                if backend.name == name:
                    service.balancer.set_ramp(backend.index, factor)

    def reset_node(self, name: str, now: float) -> list:
        """End every open connection on a node; the effects and commands that tell its clients.

        Rewrite mode: an RST to each client whose expected sequence number is
        known (SendPacket), and to any later segment of it.  The entries stay
        (CLOSED) so a client that missed the RST gets another on its next
        segment.  Kernel mode never saw the client's sequence numbers: the
        connections are deleted from conntrack and each client is probed
        (ForgetInConntrack), so its answer is queued and reset.
        """
        reset = [c for c in self.table if c.backend.name == name and c.is_open]
        effects: list = []
        for conn in reset:
            if self.table.close(conn, now):
                effects.append(self._ended(conn))
            conn.reset_by_us = True
            if not self._kernel and conn.client_ack:
                effects.append(SendPacket(_rst_to_client(conn)))
        if self._kernel and reset:
            effects.append(ForgetInConntrack(tuple(c.key for c in reset), tuple(probe_for(c) for c in reset)))
        return effects

    # -- replication (a standby's table follows the active's) -----------------
    def install(self, key: bytes, backend_index: int, now: float) -> bool:
        """Insert a connection the active distributor opened; False when the key or index fits no service."""
        service = self._by_vip.get(_vip_port(key))
        if service is None or not 0 <= backend_index < len(service.backends):
            return False
        existing = self.table.get(key)
        if existing is not None:
            self._drop_entry(existing)
        conn = self._open(service, service.backends[backend_index], key, now, [])
        if conn is None:
            return False
        self.table.advance(conn, ACK, True, now)  # it is past its SYN on the active
        service.balancer.take(backend_index)
        if service.persistence:  # the replica learns each client's node from its connections
            service.sticky[_client(key)] = (backend_index, now + service.persistence)
            service.sticky.move_to_end(_client(key))
        return True

    def end(self, key: bytes, now: float) -> None:
        """A connection ended on the active distributor: keep its entry briefly for the last segments."""
        self._end_key(key, now)

    def _end_key(self, key: bytes, now: float) -> list:
        conn = self.table.get(key)
        if conn is not None and conn.key == key and self.table.close(conn, now):
            return [self._ended(conn)]
        return []

    def clear(self) -> int:
        """Forget every connection (before a snapshot replaces the table); returns how many."""
        conns = list(self.table)
        for conn in conns:
            self._drop_entry(conn)
        return len(conns)

    def hold_expiry(self, now: float) -> None:
        """A standby's replica sees no packets: its open entries count as active until now."""
        self.table.hold_expiry(now)

    def open_connections(self) -> list[tuple[bytes, int]]:
        """(key, backend index) of every open connection: what a snapshot streams."""
        return [(conn.key, conn.backend.index) for conn in self.table if conn.is_open]

    def is_open(self, key: bytes) -> bool:
        conn = self.table.get(key)
        return conn is not None and conn.key == key and conn.is_open

    def open_backend(self, key: bytes) -> int | None:
        """The backend index of the open connection with this client -> VIP key, or None."""
        conn = self.table.get(key)
        return conn.backend.index if conn is not None and conn.key == key and conn.is_open else None

    def __len__(self) -> int:
        return len(self.table)

    # -- observers -----------------------------------------------------------
    def count(self, reason: Reason) -> int:
        return self.counts[reason]

    def stats(self) -> InterposerStats:
        backends = []
        for service in self.services:
            balancer = service.balancer
            for backend in service.backends:
                i = backend.index
                backends.append(BackendStats(service.name, backend.name, str(backend.address), backend.port,
                                             balancer.weight(i), balancer.is_available(i), balancer.eligible(i),
                                             balancer.ramp(i), balancer.outstanding(i), balancer.acquired[i],
                                             backend.bytes_in))
        table = self.table
        return InterposerStats(self.mode, {reason: self.counts[reason] for reason in Reason}, len(table),
                               table.capacity, table.expired, table.evicted, tuple(backends))

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


def _invalid6(packet: bytes, whole: bool) -> Reason | None:
    """Why the IPv6 and TCP headers of ``packet`` cannot be handled, or None when they can (see
    :func:`_invalid`).  Only a TCP header right after the fixed header is handled: extension headers
    are refused by reason (``_IPV6_EXTENSIONS`` says why); IPv6 has no header checksum."""
    length = len(packet)
    if length < 40:
        return Reason.TRUNCATED
    if packet[0] >> 4 != 6:
        return Reason.BAD_IP_HEADER
    if whole and (packet[4] << 8 | packet[5]) + 40 != length:
        return Reason.TRUNCATED
    next_header = packet[6]
    if next_header != _IPPROTO_TCP:
        if next_header == _IPV6_FRAGMENT:
            return Reason.FRAGMENT
        return Reason.EXTENSION_HEADERS if next_header in _IPV6_EXTENSIONS else Reason.NOT_TCP
    if length < 60:
        return Reason.TRUNCATED
    tcp_header = (packet[52] >> 4) * 4
    if tcp_header < 20 or (whole and 40 + tcp_header > length):
        return Reason.BAD_TCP_HEADER
    flags = packet[53]
    if (flags & SYN and flags & (FIN | RST)) or not flags & (SYN | ACK | RST):
        return Reason.BAD_FLAGS
    return None


# Offsets in an ICMP error whose outer header has no options (Interposer._icmp refuses options).
_ICMP = 20
_QUOTED_IP = _ICMP + 8


_ICMP_QUOTE = 28  # the quoted IP header of an ICMP error: after the outer header (IHL 5) and 8 bytes of ICMP


def _quoted_segment(packet: bytes, not_ours: Reason, whole: bool) -> tuple[Reason | None, int]:
    """The checks both ICMP paths make of an error: ``(None, offset of the quoted TCP header)``, or the
    reason to refuse it (``not_ours``: not an error quoting a TCP segment).  ``whole``: the copy must be
    the whole packet (rewrite mode hands bytes back).  IP options (a source route) are refused here as
    on the TCP path; the quote must hold the IP header and 64 bits of data (RFC 792)."""
    first = packet[0]
    if first != 0x45:
        return (Reason.BAD_IP_HEADER if first >> 4 != 4 or first & 0x0F < 5 else Reason.IP_OPTIONS), 0
    length = len(packet)
    if whole and (packet[2] << 8 | packet[3]) != length:
        return Reason.TRUNCATED, 0
    if packet[6] & 0x3F or packet[7]:
        return Reason.FRAGMENT, 0
    inner = _ICMP_QUOTE
    if length < inner or packet[20] not in _ICMP_ERRORS:
        return not_ours, 0
    if length < inner + 20 or packet[inner] >> 4 != 4 or packet[inner + 9] != _IPPROTO_TCP:
        return not_ours, 0  # not about a TCP segment: not a VIP connection's
    quoted = inner + (packet[inner] & 0x0F) * 4
    if packet[inner] & 0x0F < 5 or length < quoted + 8:
        return Reason.TRUNCATED, 0
    return None, quoted


def _icmp_to_node(packet: bytes, quoted: int, backend: Backend) -> bytes:
    """An error about a VIP -> client segment, made about the node -> client segment it was."""
    buf = bytearray(packet)
    checksum.patch(buf, _IP_CHECKSUM, checksum.delta(packet[16:20], backend.addr_bytes))
    buf[16:20] = backend.addr_bytes
    buf[_QUOTED_IP + 12:_QUOTED_IP + 16] = backend.addr_bytes
    checksum.patch(buf, _QUOTED_IP + 10, backend.to_backend_ip_delta)
    if backend.rewrites_port:
        buf[quoted:quoted + 2] = backend.port_bytes
    _icmp_finish(buf, packet, quoted, backend.to_backend_tcp_delta, (_QUOTED_IP + 12, quoted))
    return bytes(buf)


def _icmp_to_client(packet: bytes, quoted: int, backend: Backend) -> bytes:
    """An error about a client -> node segment, made about the client -> VIP segment it was, from the VIP."""
    buf = bytearray(packet)
    checksum.patch(buf, _IP_CHECKSUM, checksum.delta(packet[12:16], backend.vip_bytes))
    buf[12:16] = backend.vip_bytes
    buf[_QUOTED_IP + 16:_QUOTED_IP + 20] = backend.vip_bytes
    ip_delta = checksum.delta(backend.addr_bytes, backend.vip_bytes)
    checksum.patch(buf, _QUOTED_IP + 10, ip_delta)
    buf[quoted + 2:quoted + 4] = backend.vport_bytes
    tcp_delta = checksum.combine(ip_delta, checksum.delta(backend.port_bytes, backend.vport_bytes))
    _icmp_finish(buf, packet, quoted, tcp_delta, (_QUOTED_IP + 16, quoted + 2))
    return bytes(buf)


def _icmp_finish(buf: bytearray, packet: bytes, quoted: int, tcp_delta: int, changed: tuple[int, int]) -> None:
    """Patch the quoted TCP checksum, when the error quotes all of it (RFC 792 asks for 8 bytes only;
    Linux and RFC 1812 routers quote more), by the pseudo-header's and ports' change (RFC 1624);
    then the ICMP checksum by everything that changed inside the message, incrementally, so an
    error that arrived with a bad checksum still has one (the host it reaches drops it).
    ``changed``: the offsets of the quoted address and port that were replaced (4 and 2 bytes)."""
    spans = [(_QUOTED_IP + 10, _QUOTED_IP + 12), (changed[0], changed[0] + 4), (changed[1], changed[1] + 2)]
    if len(buf) >= quoted + 18:
        checksum.patch(buf, quoted + 16, tcp_delta)
        spans.append((quoted + 16, quoted + 18))
    # Every span starts at an even offset from the ICMP header (the quoted header's length is a
    # multiple of 4), so the one's-complement sums of old and new line up word for word.
    old = b"".join(packet[a:b] for a, b in spans)
    new = b"".join(bytes(buf[a:b]) for a, b in spans)
    checksum.patch(buf, _ICMP + 2, checksum.delta(old, new))


# Offsets in an ICMPv6 error whose outer header has no extension headers (RFC 4443 section 2.1): the
# ICMPv6 header at 40 (type, code, checksum, 4 bytes of MTU or pointer), the quoted IPv6 header at 48,
# its source at 56 and destination at 72, the quoted TCP header at 88 (the quote has no extension
# headers either: the segments of a VIP connection carry none).
_ICMP6 = 40
_QUOTED6 = 48
_QUOTED6_TCP = 88


def _quoted_segment6(packet: bytes, not_ours: Reason, whole: bool) -> Reason | None:
    """The checks of an ICMPv6 message (rewrite mode): None for an error quoting a TCP segment whose
    addresses and ports can be read, else the reason (``not_ours``: not such an error)."""
    length = len(packet)
    if packet[0] >> 4 != 6:
        return Reason.BAD_IP_HEADER
    if whole and (packet[4] << 8 | packet[5]) + 40 != length:
        return Reason.TRUNCATED
    if length < _QUOTED6 or packet[_ICMP6] not in _ICMPV6_ERRORS:
        return not_ours  # echo, neighbour discovery's (never queued by the rules), ...
    if length < _QUOTED6_TCP or packet[_QUOTED6] >> 4 != 6 or packet[_QUOTED6 + 6] != _IPPROTO_TCP:
        return not_ours
    if length < _QUOTED6_TCP + 8:
        return Reason.TRUNCATED
    return None


def _icmp6_to_node(packet: bytes, backend: Backend) -> bytes:
    """An ICMPv6 error about a VIP -> client segment, made about the node -> client segment it was."""
    buf = bytearray(packet)
    buf[24:40] = backend.addr_bytes
    buf[_QUOTED6 + 8:_QUOTED6 + 24] = backend.addr_bytes
    if backend.rewrites_port:
        buf[_QUOTED6_TCP:_QUOTED6_TCP + 2] = backend.port_bytes
    _icmp6_finish(buf, packet, backend.to_backend_tcp_delta, ((24, 40), (_QUOTED6 + 8, _QUOTED6 + 24),
                                                              (_QUOTED6_TCP, _QUOTED6_TCP + 2)))
    return bytes(buf)


def _icmp6_to_client(packet: bytes, backend: Backend) -> bytes:
    """An ICMPv6 error about a client -> node segment, made about the client -> VIP segment, from the VIP."""
    buf = bytearray(packet)
    buf[8:24] = backend.vip_bytes
    buf[_QUOTED6 + 24:_QUOTED6 + 40] = backend.vip_bytes
    buf[_QUOTED6_TCP + 2:_QUOTED6_TCP + 4] = backend.vport_bytes
    tcp_delta = checksum.combine(checksum.delta(backend.addr_bytes, backend.vip_bytes),
                                 checksum.delta(backend.port_bytes, backend.vport_bytes))
    _icmp6_finish(buf, packet, tcp_delta, ((8, 24), (_QUOTED6 + 24, _QUOTED6 + 40),
                                           (_QUOTED6_TCP + 2, _QUOTED6_TCP + 4)))
    return bytes(buf)


def _icmp6_finish(buf: bytearray, packet: bytes, tcp_delta: int, spans: tuple[tuple[int, int], ...]) -> None:
    """Patch the quoted TCP checksum when it is quoted (an IPv6 error quotes as much as fits in the
    minimum MTU, RFC 4443 section 3), then the ICMPv6 checksum by everything that changed: unlike
    ICMP's, it covers a pseudo-header with both outer addresses (RFC 4443 section 2.3), so the outer
    address rewritten counts too.  Incremental: an error that arrived damaged stays damaged."""
    changed = list(spans)
    if len(buf) >= _QUOTED6_TCP + 18:
        checksum.patch(buf, _QUOTED6_TCP + 16, tcp_delta)
        changed.append((_QUOTED6_TCP + 16, _QUOTED6_TCP + 18))
    old = b"".join(packet[a:b] for a, b in changed)
    new = b"".join(bytes(buf[a:b]) for a, b in changed)
    checksum.patch(buf, _ICMP6 + 2, checksum.delta(old, new))


_client = client_of
_key_of = segment_key


def _vip_port(key: bytes) -> bytes:
    """The VIP and its port in a connection key: how services are looked up."""
    size = (len(key) - 4) >> 1
    return key[size:size + size] + key[-2:]


def _acknowledges_syn(packet: bytes, isn: bytes) -> bool:
    """An RST that answers the client's SYN itself: sequence number 0, acknowledgment the ISN + 1.

    RFC 793 section 3.4 ("Reset Generation"): a segment without ACK is reset with sequence number
    zero and an acknowledgment of the segment; an RST on a connection the node had accepted carries
    its own sequence number instead.
    """
    tcp = _key_of(packet)[1]
    return (len(isn) == 4 and packet[tcp + 4:tcp + 8] == b"\0\0\0\0"
            and int.from_bytes(packet[tcp + 8:tcp + 12], "big") == (int.from_bytes(isn, "big") + 1) & 0xFFFFFFFF)


def _to_backend(packet: bytes, backend: Backend) -> bytes:
    buf = bytearray(packet)
    if len(backend.addr_bytes) == 16:
        # IPv6: no header checksum; the TCP checksum covers the addresses through the pseudo-header
        # (RFC 8200 section 8.1), so the precomputed delta is the same sum over 16-byte addresses.
        buf[24:40] = backend.addr_bytes
        if backend.rewrites_port:
            buf[42:44] = backend.port_bytes
        checksum.patch(buf, _TCP6_CHECKSUM, backend.to_backend_tcp_delta)
        return bytes(buf)
    buf[16:20] = backend.addr_bytes
    if backend.rewrites_port:
        buf[22:24] = backend.port_bytes
    checksum.patch(buf, _IP_CHECKSUM, backend.to_backend_ip_delta)
    checksum.patch(buf, _TCP_CHECKSUM, backend.to_backend_tcp_delta)
    return bytes(buf)


def _rst_to_client(conn: Connection) -> bytes:
    backend = conn.backend
    client_ip, client_port = _client(conn.key), int.from_bytes(conn.key[-4:-2], "big")
    seq = int.from_bytes(conn.client_ack, "big")
    return checksum.tcp_segment(backend.vip_bytes, client_ip, int.from_bytes(backend.vport_bytes, "big"), client_port, seq, 0, RST)


def _reset_for(packet: bytes, backend: Backend) -> bytes:
    # RFC 793: an RST answering a segment that carries ACK takes its sequence
    # number from that ACK field, which is exactly what the client expects.
    key, tcp = _key_of(packet)
    seq = int.from_bytes(packet[tcp + 8:tcp + 12], "big")
    return checksum.tcp_segment(backend.vip_bytes, _client(key), int.from_bytes(backend.vport_bytes, "big"),
                                int.from_bytes(key[-4:-2], "big"), seq, 0, RST)


def _reset_for_packet(packet: bytes) -> bytes:
    """An RST answering this client segment, from the VIP:port it was sent to (RFC 793: seq = its ACK)."""
    key, tcp = _key_of(packet)
    vip_port = _vip_port(key)
    return checksum.tcp_segment(vip_port[:-2], _client(key), int.from_bytes(key[-2:], "big"),
                                int.from_bytes(key[-4:-2], "big"), int.from_bytes(packet[tcp + 8:tcp + 12], "big"), 0, RST)


def _reset_to_node(packet: bytes, node: bytes, node_port: bytes) -> bytes:
    """An RST to the node for the client segment it would have received: seq = the segment's own seq.

    A sequence number equal to the node's RCV.NXT is accepted at once (RFC 5961 section 3.2); one
    merely inside the window draws a challenge ACK, which this side leaves unanswered.
    """
    key, tcp = _key_of(packet)
    return checksum.tcp_segment(_client(key), node, int.from_bytes(key[-4:-2], "big"),
                                int.from_bytes(node_port, "big"), int.from_bytes(packet[tcp + 4:tcp + 8], "big"), 0, RST)


def probe_for(conn: Connection) -> bytes:
    """Kernel mode, after a reset: an ACK from the VIP far outside the client's window.

    The client answers it with a duplicate ACK carrying the sequence number it
    expects (RFC 793 section 3.9, "If an incoming segment is not acceptable, an
    acknowledgment should be sent"); that ACK, no longer known to conntrack,
    is queued and gets an RST the client accepts.
    """
    backend = conn.backend
    return checksum.tcp_segment(backend.vip_bytes, _client(conn.key), int.from_bytes(backend.vport_bytes, "big"),
                                int.from_bytes(conn.key[-4:-2], "big"), 0, 0, ACK, window=0)
