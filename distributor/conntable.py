"""The connection table: which backend serves which TCP connection (pure).

Contract
--------
* A connection is keyed twice, by its 4-tuple's bytes exactly as they appear
  in an IPv4 header followed by the TCP header (source address, destination
  address, source port, destination port: 12 bytes), or in an IPv6 header
  followed by the TCP header (36 bytes, the same order; :func:`segment_key`):

  - ``key``: client -> VIP packets, ``client_ip vip client_port vip_port``;
  - ``reply_key``: backend -> client packets,
    ``node_ip client_ip node_port client_port``.

  so the interposer can look a packet up with one slice of its bytes.
* Entries follow the TCP lifecycle (:class:`TcpState`); the legal moves are
  the table ``MOVES`` keyed by (state, :class:`ConnEvent`) (see
  :mod:`common.machine`) and any other move raises ``IllegalTransition``.
  A connection is *open* (counted as outstanding on its backend) from its SYN
  until both FINs, an RST, or idle expiry, and :meth:`ConnectionTable.advance`
  and :meth:`ConnectionTable.expire` report the moment it stops being open,
  exactly once.
* Every state has an idle timeout (:class:`Timeouts`).  Expiry is amortised:
  each state keeps a FIFO of entries in the order they entered it; the sweep
  only looks at the front, re-queues entries that saw traffic since, and stops
  at the first entry whose queue time is younger than the timeout.  A sweep
  takes a ``budget`` so one call never stalls the data path.  An entry that
  leaves a state leaves a stale reference in that state's FIFO; a FIFO is
  compacted when its stale references outnumber its live ones, so memory stays
  proportional to the number of connections, whatever the churn.
* The table holds at most ``capacity`` connections.  When it is full, a new
  connection evicts the oldest entry that is already finished (RST or both
  FINs), else the oldest half-open one (SYN seen, never acknowledged by its
  client: under a spoofed SYN flood these fill the table, and a legitimate
  handshake completes in a round trip, long before it becomes the oldest);
  evicted half-open entries are listed in :attr:`ConnectionTable.evicted_open`
  for the caller to release.  Only when every entry is established does
  :meth:`ConnectionTable.open` return ``None`` and the caller refuses the
  connection.  The table never grows past capacity.
* A half-open entry's idle timer runs from its client's last packet only: the
  node's SYN-ACK retransmissions to a spoofed client do not keep it alive.
* The table takes ``now`` from the caller and does no I/O.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Any, Iterator

from common.machine import IllegalTransition, TransitionTable

__all__ = [
    "TcpState",
    "ConnEvent",
    "Timeouts",
    "Connection",
    "ConnectionTable",
    "IllegalTransition",
    "FIN",
    "SYN",
    "RST",
    "PSH",
    "ACK",
    "segment_key",
    "client_of",
]

FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10


def segment_key(packet: bytes) -> tuple[bytes, int]:
    """A checked TCP segment's key (client -> VIP direction: source, destination, ports) and its TCP
    header's offset, for IPv4 without options and IPv6 without extension headers (the only segments
    the interposer lets past its checks)."""
    if packet[0] >> 4 == 6:
        return packet[8:44], 40
    return packet[12:24], 20


def client_of(key: bytes) -> bytes:
    """The first address of a key (the client's, of a client -> VIP key): 4 or 16 bytes."""
    return key[:(len(key) - 4) >> 1]


class TcpState(enum.IntEnum):
    SYN_SEEN = 0  # client SYN seen, handshake not finished
    ESTABLISHED = 1  # client acknowledged: data flows
    FIN_WAIT = 2  # one side sent FIN (half-closed)
    CLOSING = 3  # both sides sent FIN: only the last ACKs remain
    CLOSED = 4  # RST seen
    GONE = 5  # removed from the table (never stored)


class ConnEvent(enum.Enum):
    CLIENT_ACK = "client_ack"  # the client acknowledged the node's SYN-ACK: the handshake is done
    FIRST_FIN = "first_fin"  # one side sent FIN
    SECOND_FIN = "second_fin"  # the other side sent FIN too
    RESET = "reset"  # an RST was seen, or the distributor reset the connection
    REMOVE = "remove"  # expiry, eviction, or a new connection replacing a finished one


_S, _E = TcpState, ConnEvent
# The TCP lifecycle as the distributor follows it; anything else is a bug in the caller.
MOVES: dict[tuple[TcpState, ConnEvent], tuple[TcpState, None]] = {
    (_S.SYN_SEEN, _E.CLIENT_ACK): (_S.ESTABLISHED, None),
    (_S.SYN_SEEN, _E.FIRST_FIN): (_S.FIN_WAIT, None),
    (_S.ESTABLISHED, _E.FIRST_FIN): (_S.FIN_WAIT, None),
    (_S.FIN_WAIT, _E.SECOND_FIN): (_S.CLOSING, None),
    **{(state, _E.RESET): (_S.CLOSED, None) for state in (_S.SYN_SEEN, _S.ESTABLISHED, _S.FIN_WAIT, _S.CLOSING)},
    **{(state, _E.REMOVE): (_S.GONE, None) for state in (_S.SYN_SEEN, _S.ESTABLISHED, _S.FIN_WAIT, _S.CLOSING,
                                                        _S.CLOSED)},
}

OPEN_STATES = frozenset({TcpState.SYN_SEEN, TcpState.ESTABLISHED, TcpState.FIN_WAIT})
FINISHED_STATES = (TcpState.CLOSED, TcpState.CLOSING)

# Stale FIFO references tolerated beyond the live count before a compaction;
# keeps compaction rare (amortised O(1) per move) for small tables.
_COMPACT_SLACK = 1024

_FIN_FROM_CLIENT = 1
_FIN_FROM_NODE = 2


@dataclasses.dataclass(frozen=True)
class Timeouts:
    """Idle timeouts in seconds, per state (defaults follow IPVS and conntrack)."""

    syn: float = 30.0
    established: float = 900.0
    fin_wait: float = 120.0
    closing: float = 30.0
    closed: float = 10.0

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"timeout {field.name} = {value!r} must be a number of seconds > 0")

    def for_state(self, state: TcpState) -> float:
        return (self.syn, self.established, self.fin_wait, self.closing, self.closed)[state]


class Connection:
    """One rerouted connection.  ``backend`` and ``service`` are opaque to the table."""

    __slots__ = ("key", "reply_key", "service", "backend", "state", "last_seen", "queued_at", "fins", "client_ack",
                 "reset_by_us", "isn", "syn", "answered", "redispatches")

    def __init__(self, key: bytes, reply_key: bytes, service: Any, backend: Any, now: float):
        self.key = key
        self.reply_key = reply_key
        self.service = service
        self.backend = backend
        self.state = TcpState.SYN_SEEN
        self.last_seen = now
        self.queued_at = now
        self.fins = 0
        # The ACK field of the client's last segment: the sequence number it
        # expects next from the server, which an RST must carry to be accepted
        # at once (RFC 5961 section 3.2).
        self.client_ack = b""
        self.reset_by_us = False
        # Passive health (reroute.py): the client's initial sequence number (4 bytes), its SYN as
        # it came (rewrite mode, until the node answers: to send it to another node at once),
        # whether the node answered it, and how many times it was sent to another node.
        self.isn = b""
        self.syn: bytes | None = None
        self.answered = False
        self.redispatches = 0

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def __repr__(self) -> str:
        return f"Connection({self.key.hex()}, {self.state.name}, backend={self.backend!r})"


class ConnectionTable:
    def __init__(self, capacity: int, timeouts: Timeouts | None = None):
        if isinstance(capacity, bool) or not isinstance(capacity, int) or capacity < 1:
            raise ValueError(f"table capacity {capacity!r} must be an integer >= 1")
        self.capacity = capacity
        self.timeouts = timeouts or Timeouts()
        self._by_key: dict[bytes, Connection] = {}
        # get(key) -> Connection | None, by either key (client -> VIP or backend -> client
        # 4-tuple): the dict's own method, so a per-packet lookup costs no Python frame.
        self.get = self._by_key.get
        self._count = 0
        self._queues: list[collections.deque[Connection]] = [collections.deque() for _ in TcpState]
        self._live = [0] * len(TcpState)
        self._machine = TransitionTable("connection", MOVES)
        self.transitions: collections.Counter[tuple[TcpState, TcpState]] = self._machine.counts
        self.evicted = 0
        self.evicted_half_open = 0
        self.evicted_open: list[Connection] = []  # half-open entries evicted by open(); the caller drains it
        # Off when the caller cannot see handshakes complete (kernel mode queues a connection's first
        # packet only, so every entry looks half-open to the table).
        self.evict_half_open = True
        self.expired = 0
        # Open connections count as active at least until this time: a backup's
        # replica sees no packets, so its idle timers start at the takeover.
        self.activity_floor = 0.0

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[Connection]:
        for key, conn in self._by_key.items():
            if key is conn.key:
                yield conn

    def open(self, key: bytes, reply_key: bytes, service: Any, backend: Any, now: float) -> Connection | None:
        """Insert a new connection in SYN_SEEN, or return None when the table is full."""
        if key in self._by_key or reply_key in self._by_key:
            raise KeyError(f"connection {key.hex()} / {reply_key.hex()} is already in the table")
        if self._count >= self.capacity and not self._evict_finished():
            return None
        conn = Connection(key, reply_key, service, backend, now)
        self._by_key[key] = conn
        self._by_key[reply_key] = conn
        self._count += 1
        self._live[TcpState.SYN_SEEN] += 1
        self._queues[TcpState.SYN_SEEN].append(conn)
        return conn

    def remove(self, conn: Connection) -> bool:
        """Drop an entry at once; returns True when it was open (the caller releases it)."""
        was_open = conn.is_open
        self._move(conn, ConnEvent.REMOVE, conn.last_seen)
        return was_open

    def close(self, conn: Connection, now: float) -> bool:
        """Mark a connection reset by the distributor; returns True when it was open."""
        if conn.state is TcpState.CLOSED:
            return False
        was_open = conn.is_open
        self._move(conn, ConnEvent.RESET, now)
        return was_open

    def advance(self, conn: Connection, flags: int, from_client: bool, now: float) -> bool:
        """Account one packet of ``conn``; returns True when the connection just stopped being open."""
        state = conn.state
        if from_client or state is not TcpState.SYN_SEEN:
            conn.last_seen = now
        if state is TcpState.CLOSED:
            return False  # reset: stragglers (a late FIN, a retransmission) change nothing
        if flags & RST:
            self._move(conn, ConnEvent.RESET, now)
            return state in OPEN_STATES
        if flags & FIN:
            bit = _FIN_FROM_CLIENT if from_client else _FIN_FROM_NODE
            if conn.fins & bit:
                return False  # retransmitted FIN
            conn.fins |= bit
            if conn.fins == _FIN_FROM_CLIENT | _FIN_FROM_NODE:
                self._move(conn, ConnEvent.SECOND_FIN, now)
                return True
            self._move(conn, ConnEvent.FIRST_FIN, now)
            return False
        if state is TcpState.SYN_SEEN and from_client and not flags & SYN:
            self._move(conn, ConnEvent.CLIENT_ACK, now)
        return False

    def hold_expiry(self, now: float) -> None:
        """Treat every open connection as active at ``now`` (a backup's replica, until it takes over)."""
        self.activity_floor = max(self.activity_floor, now)

    def expire(self, now: float, budget: int = 10_000, suspects: list[Connection] | None = None) -> list[Connection]:
        """Remove idle entries; returns those that were still open when they expired.

        With ``suspects`` (kernel mode, where the data packets never reach user
        space), open entries past their timeout are kept, queued again and
        listed there for the caller to confirm with conntrack.
        """
        ended: list[Connection] = []
        for state in (TcpState.SYN_SEEN, TcpState.ESTABLISHED, TcpState.FIN_WAIT, TcpState.CLOSING, TcpState.CLOSED):
            timeout = self.timeouts.for_state(state)
            floor = self.activity_floor if state in OPEN_STATES else 0.0
            queue = self._queues[state]
            while queue and budget > 0:
                budget -= 1
                conn = queue[0]
                if conn.state is not state:
                    queue.popleft()  # stale reference: the entry moved on or left
                    continue
                if max(conn.queued_at, floor) + timeout > now:
                    break  # everything behind was queued later
                queue.popleft()
                idle = max(conn.last_seen, floor) + timeout <= now
                if not idle or (suspects is not None and state in OPEN_STATES):
                    if idle:
                        suspects.append(conn)  # type: ignore[union-attr]
                    conn.queued_at = now
                    queue.append(conn)
                    continue
                self.expired += 1
                if state in OPEN_STATES:
                    ended.append(conn)
                self._move(conn, ConnEvent.REMOVE, now)
        return ended

    # -- internals ---------------------------------------------------------
    def _move(self, conn: Connection, event: ConnEvent, now: float) -> None:
        old = conn.state
        new, _, _ = self._machine.move(old, event, conn.key.hex())
        conn.state = new
        self._live[old] -= 1
        self._compact_if_stale(old)
        if new is TcpState.GONE:
            del self._by_key[conn.key]
            del self._by_key[conn.reply_key]
            self._count -= 1
            return
        self._live[new] += 1
        conn.queued_at = now
        self._queues[new].append(conn)

    def _compact_if_stale(self, state: TcpState) -> None:
        queue = self._queues[state]
        if len(queue) > 2 * self._live[state] + _COMPACT_SLACK:
            # In place: expire() and _evict_finished() hold this deque.
            live = [c for c in queue if c.state is state]
            queue.clear()
            queue.extend(live)

    def _evict_finished(self) -> bool:
        for state in (*FINISHED_STATES, TcpState.SYN_SEEN) if self.evict_half_open else FINISHED_STATES:
            queue = self._queues[state]
            while queue:
                conn = queue.popleft()
                if conn.state is state:
                    self._move(conn, ConnEvent.REMOVE, conn.last_seen)
                    self.evicted += 1
                    if state is TcpState.SYN_SEEN:
                        self.evicted_half_open += 1
                        self.evicted_open.append(conn)
                    return True
        return False

    def half_open(self) -> int:
        """Entries in SYN_SEEN: handshakes not (yet) acknowledged by their client."""
        return self._live[TcpState.SYN_SEEN]
