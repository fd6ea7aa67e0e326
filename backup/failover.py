"""Primary-backup failover as a sans-io core: peer datagrams and ticks in, commands out (pure).

Contract
--------
:class:`FailoverCore` holds one distributor's role (:class:`~backup.roles.RoleMachine`), its
replication stream (:class:`~backup.sync.SyncSender` while active, :class:`~backup.sync.SyncReceiver`
while a standby) and the takeover timeline.  It takes events and returns commands, in the order the
adapters must carry them out:

* events: :class:`~common.sansio.Tick`, :class:`PeerDatagram` (anything that arrived on the
  distributor-to-distributor socket; it is verified here, rejections counted by reason),
  :class:`PacketsHandled` (the data path finished a batch), :class:`FirstForward`,
  :class:`~common.sansio.CommandDone` and :class:`~common.sansio.StopRequested`; table changes come
  in through :meth:`FailoverCore.record_opened` / :meth:`FailoverCore.record_ended`;
* commands: :class:`~common.sansio.Send` (sealed datagrams: heartbeats and resigns broadcast on the
  cluster LAN, the sync stream unicast to each peer), :class:`InstallRules`, :class:`RemoveRules`,
  :class:`ClaimAddresses`, :class:`ReleaseAddresses`, :class:`Announce`, :class:`HoldNewSyns`,
  :class:`ReleaseNewSyns`, :class:`ArmFirstForward`, :class:`DrainQueue`,
  :class:`~common.sansio.Alert`, :class:`~common.sansio.Log`, :class:`~common.sansio.WakeUpAt`.

Decisions, all here:

* TAKE_OVER, in this order (state first, then rules, then addresses, then announcements): the
  replica is already the interposer's table and its idle timers start now; new SYNs are held until
  their sync batch is sent; the rules go in; once they are in (InstallRules' CommandDone), the
  floating addresses are claimed and gratuitous ARP is sent at once and again ``garp_repeat``
  seconds later.  An install that fails leaves the addresses unclaimed (claimed without the rules,
  this host's own stack would reset the clients) and is tried again every ``RULES_RETRY`` seconds.
* GIVE_UP: drop the addresses first (stop attracting packets), then the rules (stop forwarding); the
  table is kept until a snapshot of the new active's replaces it.
* RESIGN: send what the sync stream still holds, tell the peers (three copies), give up.
* While active: every batch of packets ends with the sync records it produced being sent, and only
  then are the SYNs of new connections released, so a standby knows every connection before its node
  does.  Ended connections and snapshot chunks go out every ``SYNC_FLUSH`` seconds.
* While a standby: the replica's idle timers are held; a snapshot is asked for when an active is
  followed, whenever a gap shows in the stream, and again every dead window until one completes (a
  lost request or a lost snapshot shows no gap); caught-up is reported once the replica is complete
  and current.

Mid-stream packets of a connection the new active does not know (its sync datagrams were lost) are
dropped by the interposer (``unknown_flow``): sending them to any node could reach one that does not
hold the connection.
"""

from __future__ import annotations

import collections
import dataclasses
import ipaddress
from typing import Iterable, Mapping

from common.sansio import Alert, Command, CommandDone, Level, Log, Send, StopRequested, Tick, WakeUpAt
from common.wire import (AdminChunk, DistHeartbeat, Keys, Kind, Reject, Resign, SequenceCounter, SyncBatch, SyncRequest,
                         Verifier, seal)

from .roles import Action, Decision, FailoverSettings, PeerBeat, Role, RoleMachine
from .sync import MAX_PENDING, Replica, SyncReceiver, SyncSender

MAX_PENDING_TEXT = f"{MAX_PENDING:,}"

__all__ = ["FailoverOptions", "FailoverCore", "PeerDatagram", "PacketsHandled", "FirstForward", "InstallRules",
           "RemoveRules", "ClaimAddresses", "ReleaseAddresses", "Announce", "HoldNewSyns", "ReleaseNewSyns",
           "ArmFirstForward", "DrainQueue", "AdminStateReceived", "Takeover", "FailoverStats", "PeerStats", "SYNC_FLUSH",
           "TAKEOVER_HISTORY"]

SYNC_FLUSH = 0.01  # seconds between sends of ended connections and snapshot chunks while active
TAKEOVER_HISTORY = 16  # takeovers kept for observers (a scrape between two takeovers misses none)
SNAPSHOT_CHUNK = 16  # snapshot datagrams per flush (about 1,500 connections)
RESIGN_COPIES = 3  # a lost resign would cost the backup a dead window
NACK_RETRY_TICKS = 2  # a missing batch is asked for again after this many ticks without it
NACK_LIMIT = 8  # after this many requests for one batch, a snapshot is asked for instead

# Heartbeats and resigns are broadcast on the cluster LAN (every distributor hears them); the
# state-sync stream and snapshot requests go unicast to the configured peers: broadcast, every
# batch would be flooded to every node of the LAN, in the sender's context, on the data path.
_BROADCAST_KINDS = frozenset({Kind.DIST_HEARTBEAT, Kind.RESIGN})
_PEER_KINDS = frozenset({Kind.DIST_HEARTBEAT, Kind.STATE_SYNC, Kind.RESIGN, Kind.SYNC_REQUEST, Kind.ADMIN_STATE})
ADMIN_REFRESH = 1.0  # while active, the runtime state goes out again this often (a lost piece costs a second)
RULES_RETRY = 1.0  # a takeover whose rules failed to install tries again after this many seconds


# -- events ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PeerDatagram:
    """A datagram arrived on the distributor-to-distributor socket from ``source``."""

    data: bytes
    source: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class PacketsHandled:
    """The data path gave every packet of one batch its verdict (SYNs of new connections may be held)."""

    now: float
    wall: float
    effects: tuple = ()  # the interposer's effects of the batch (the distributor core routes them)


@dataclasses.dataclass(frozen=True)
class FirstForward:
    """The first packet forwarded after ArmFirstForward, at monotonic time ``at``.

    ``arrived``: when the data path read that packet from the queue (a held SYN: when it was held),
    so an observer can tell the takeover's own work from time spent waiting for traffic.
    """

    at: float
    arrived: float | None = None


# -- commands -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class InstallRules(Command):
    """Install the data path's rules for ``layout`` (one transaction, replacing any left over).

    The failover core issues it without a layout; the distributor core fills in its current one.
    """

    layout: tuple = ()


@dataclasses.dataclass(frozen=True)
class RemoveRules(Command):
    """Remove the data path's rules."""


@dataclasses.dataclass(frozen=True)
class ClaimAddresses(Command):
    """Add (or renew) the floating addresses (VIPs, internal gateway) on their interfaces.

    ``lifetime`` seconds (valid and preferred lifetime), renewed while active, so that a daemon that
    dies without giving them up loses them by itself: a dead man's switch.  None: permanent.
    """

    lifetime: float | None = None


@dataclasses.dataclass(frozen=True)
class ReleaseAddresses(Command):
    """Remove the floating addresses (idempotent)."""


@dataclasses.dataclass(frozen=True)
class Announce(Command):
    """Send a burst of gratuitous ARP for every floating address."""


@dataclasses.dataclass(frozen=True)
class HoldNewSyns(Command):
    """While ``hold``, the data path keeps each new connection's SYN until ReleaseNewSyns."""

    hold: bool


@dataclasses.dataclass(frozen=True)
class ReleaseNewSyns(Command):
    """Give the held SYNs their verdict (their sync batch has been sent)."""


@dataclasses.dataclass(frozen=True)
class ArmFirstForward(Command):
    """Report the next forwarded packet's time as a FirstForward event (the takeover timeline)."""


@dataclasses.dataclass(frozen=True)
class AdminStateReceived(Command):
    """A standby assembled the active's runtime state (JSON): the distributor core adopts it."""

    version: int
    text: str


@dataclasses.dataclass(frozen=True)
class DrainQueue(Command):
    """Give a verdict to every packet still queued (the rules just went away)."""


# -- configuration and observation --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FailoverOptions:
    name: str
    address: ipaddress.IPv4Address  # this distributor's cluster-LAN address: its identity and last tie-breaker
    settings: FailoverSettings
    destination: tuple[str, int]  # heartbeats and resigns: the cluster LAN's broadcast address
    peers: Mapping[str, ipaddress.IPv4Address]  # the sync stream goes to each, unicast, on `port`
    port: int
    freshness: float = 5.0
    garp_repeat: float = 5.0  # seconds to the second burst of gratuitous ARP; 0: none
    garp_refresh: float = 10.0  # while active, announce again every so many seconds; 0: never
    address_lifetime: float = 1.0  # seconds a claimed address lives unless renewed; 0: permanent

    def __post_init__(self) -> None:
        if self.address_lifetime and self.address_lifetime < 1:
            raise ValueError(f"failover.address_lifetime = {self.address_lifetime!r} must be 0 (permanent) or "
                             ">= 1 second (the kernel counts address lifetimes in whole seconds)")

    @property
    def renew_every(self) -> float | None:
        """Renewals come eight times per lifetime: a loop stalled for 7/8 of it keeps the addresses."""
        return self.address_lifetime / 8 if self.address_lifetime else None


@dataclasses.dataclass
class Takeover:
    """Timings of the last takeover, on this distributor's monotonic clock."""

    last_heartbeat: float | None  # the last heartbeat heard from the active that went away
    started: float
    term: int
    claimed: float | None = None
    first_forward: float | None = None
    first_arrival: float | None = None  # when the first forwarded packet was read from the queue


@dataclasses.dataclass(frozen=True)
class PeerStats:
    name: str
    role: Role
    alive: bool
    counter: int
    term: int
    priority: int
    sync_batch: int = 0  # the batch its last heartbeat advertised (a standby: the last it applied)
    lag_records: int | None = None  # while we are active: records sent that this standby has not applied


@dataclasses.dataclass(frozen=True)
class FailoverStats:
    role: Role
    term: int
    caught_up: bool
    peers: tuple[PeerStats, ...]
    lag_batches: int | None
    active_connections: int
    gaps: int
    retransmit_requests: int
    retransmitted: int
    records_applied: int
    records_sent: int
    snapshots_sent: int
    rejected_records: int
    announcements: int
    heartbeat_gap_max: float
    sent: dict[Kind, int]
    rejected: dict[Reject, int]
    transitions: dict[tuple[Role, Role], int]
    last_takeover: Takeover | None
    takeovers: int = 0  # takeovers since start
    behind_since: float | None = None  # a standby: since when its replica is behind the active's stream (monotonic)
    recent_takeovers: tuple[Takeover, ...] = ()  # the last TAKEOVER_HISTORY of them, oldest first

    @property
    def standby(self) -> bool:
        """Not the active one (starting, backup or stopped): its replica follows a stream, so it has a lag.

        The active is the stream; its figures of how far each standby is behind are ``PeerStats.lag_records``.
        """
        return self.role is not Role.ACTIVE


class FailoverCore:
    def __init__(self, options: FailoverOptions, keys: Keys, replica: Replica):
        self.options = options
        self.name = options.name
        self.keys = keys
        self.replica = replica
        self.machine = RoleMachine(options.name, int(options.address), options.settings)
        self.sender = SyncSender()
        self.receiver = SyncReceiver(replica)
        self.verifier = Verifier(keys, {peer: str(address) for peer, address in options.peers.items()}, _PEER_KINDS,
                                 options.freshness)
        self.sequence = SequenceCounter()
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self.sent: collections.Counter[Kind] = collections.Counter()
        self.announcements = 0
        self.last_takeover: Takeover | None = None
        self.takeovers = 0
        self.recent_takeovers: collections.deque[Takeover] = collections.deque(maxlen=TAKEOVER_HISTORY)
        self.active_batch = 0  # the followed active's last advertised batch
        self.active_connections = 0
        self._own_address = str(options.address)
        self._peer_destinations = [(str(address), options.port) for address in options.peers.values()]
        self._last_active_heartbeat: float | None = None
        self._next_tick: float | None = None
        self._next_flush: float | None = None
        self._second_burst_at: float | None = None
        self._holding = False
        self._last_sync_request: float | None = None
        self._nacked: dict[int, tuple[float, int]] = {}  # missing batch -> (last asked, times asked)
        self._active_batch_before = 0  # the active's advertised batch one heartbeat ago
        self._refresh_at: float | None = None
        self._renew_at: float | None = None
        # Taking over: the addresses are claimed only once the rules are in (a VIP claimed without them
        # would be answered by this host's own stack: RSTs), and the install is retried until then.
        self._claiming = False
        self._rules_retry_at: float | None = None
        self.retransmit_requests = 0
        self._admin_chunks: list[AdminChunk] = []  # the runtime state this distributor publishes while active
        self._admin_refresh_at: float | None = None
        self._admin_pieces: dict[tuple[str, int], dict[int, AdminChunk]] = {}  # (sender, version) -> pieces
        self._admin_adopted: tuple[str, int] | None = None
        self.heartbeat_gap_max = 0.0  # seconds: the longest wait between two heartbeats of the active, as a backup
        self._peer_batches: dict[str, int] = {}  # peer -> the sync batch its last heartbeat advertised
        self._behind_since: float | None = None

    @property
    def role(self) -> Role:
        return self.machine.role

    def active_peer(self) -> str | None:
        """The live active peer this distributor hears, by name; None when it hears none (or is active itself)."""
        peer = self.machine.active_peer()
        return peer.name if peer is not None else None

    # -- life cycle --------------------------------------------------------------------------------
    def start(self, now: float, wall: float) -> list[Command]:
        """Whatever a crashed run left behind goes first: we own nothing until the role machine says so.

        Datagrams sealed before ``wall`` are refused from now on: this core's replay marks start empty.
        """
        self._next_tick = now + self.options.settings.interval
        self.verifier.not_before = wall
        settings = self.options.settings
        peers = ", ".join(f"{peer} {address}" for peer, address in self.options.peers.items())
        return [ReleaseAddresses(), RemoveRules(),
                Log(Level.INFO, f"failover: {self.name} priority {settings.priority}"
                                f"{' (preempts)' if settings.preempt else ''}, heartbeats every {settings.interval:.2f} s "
                                f"to {self.options.destination[0]}:{self.options.destination[1]}, sync to {peers}, "
                                f"peer dead after {settings.dead_seconds:.2f} s; starting"),
                WakeUpAt(self._next_tick)]

    def handle(self, event) -> list[Command]:
        if isinstance(event, Tick):
            if self._next_tick is None:
                return self.start(event.now, event.wall)
            return self._tick(event.now, event.wall)
        if isinstance(event, PeerDatagram):
            return self._datagram(event)
        if isinstance(event, PacketsHandled):
            return self._packets_handled(event.wall)
        if isinstance(event, FirstForward):
            return self._first_forward(event.at, event.arrived)
        if isinstance(event, CommandDone):
            return self._done(event)
        if isinstance(event, StopRequested):
            return self._decide(self.machine.shutdown(), event.now, event.wall) + [ReleaseAddresses()]
        raise TypeError(f"the failover core takes no {type(event).__name__} event")

    @property
    def next_wakeup(self) -> float | None:
        candidates = [self._next_tick, self._second_burst_at]
        if self.role is Role.ACTIVE:
            candidates += [self._next_flush, self._refresh_at, self._renew_at, self._admin_refresh_at,
                           self._rules_retry_at]
        found = [t for t in candidates if t is not None]
        return min(found) if found else None

    # -- the runtime state (the distributor core publishes; standbys adopt the active's) ---------------
    def publish_admin(self, version: int, text: str, wall: float) -> list[Command]:
        """This distributor's runtime state changed: while active, it goes to the standbys now and every second."""
        self._admin_chunks = AdminChunk.split(version, text)
        if self.role is not Role.ACTIVE:
            return []
        return self._send_admin(wall)

    def _send_admin(self, wall: float) -> list[Command]:
        commands: list[Command] = []
        for chunk in self._admin_chunks:
            commands += self._send(Kind.ADMIN_STATE, chunk.pack(), wall)
        return commands

    def _admin_received(self, sender: str, chunk: AdminChunk) -> list[Command]:
        if self.role is Role.ACTIVE or self.machine.following is None or self.machine.following[0] != sender:
            return []  # only the followed active's state is adopted
        if self._admin_adopted == (sender, chunk.version):
            return []
        pieces = self._admin_pieces.setdefault((sender, chunk.version), {})
        pieces[chunk.index] = chunk
        if len(pieces) < chunk.count:
            return []
        text = AdminChunk.join(list(pieces.values()))
        self._admin_pieces = {}
        if text is None:
            self.rejected[Reject.BAD_PAYLOAD] += 1
            return []
        self._admin_adopted = (sender, chunk.version)
        return [AdminStateReceived(chunk.version, text)]

    # -- table changes (the distributor core feeds the interposer's effects) --------------------------
    def record_opened(self, key: bytes, backend_index: int) -> None:
        if self.machine.role is Role.ACTIVE:
            self.sender.opened(key, backend_index)

    def record_ended(self, key: bytes) -> None:
        if self.machine.role is Role.ACTIVE:
            self.sender.ended(key)

    # -- events ------------------------------------------------------------------------------------------
    def _tick(self, now: float, wall: float) -> list[Command]:
        if self.role is Role.STOPPED:
            return []  # a stopped distributor is silent: no heartbeat, no timer
        commands: list[Command] = []
        active = self.role is Role.ACTIVE
        if active and self._next_flush is not None and now >= self._next_flush:
            self._next_flush = max(self._next_flush + SYNC_FLUSH, now)
            commands += self._flush_live(wall)
            commands += self._snapshot_chunk(wall)
        if now >= self._next_tick:
            self._next_tick = max(self._next_tick + self.options.settings.interval, now)
            if not active:
                self.replica.hold_expiry(now)
            commands += self._decide(self.machine.tick(now), now, wall)
            commands += self._heartbeat(wall)
            if self.role is Role.BACKUP and self.machine.following is not None:
                commands += self._repair(now, wall)
        if self.role is Role.ACTIVE:
            if self._rules_retry_at is not None and now >= self._rules_retry_at:
                self._rules_retry_at = None
                commands.append(InstallRules())
            if self._second_burst_at is not None and now >= self._second_burst_at:
                self._second_burst_at = None
                commands.append(self._announce())
            if self._refresh_at is not None and now >= self._refresh_at:
                self._refresh_at = now + self.options.garp_refresh
                commands.append(self._announce())
            if self._renew_at is not None and now >= self._renew_at:
                self._renew_at = now + self.options.renew_every
                commands.append(ClaimAddresses(self.options.address_lifetime))
            if self._admin_refresh_at is not None and now >= self._admin_refresh_at:
                self._admin_refresh_at = now + ADMIN_REFRESH
                commands += self._send_admin(wall)
        wake = self.next_wakeup
        if wake is not None:
            commands.append(WakeUpAt(wake))
        return commands

    def _datagram(self, event: PeerDatagram) -> list[Command]:
        if event.source == self._own_address:
            return []  # our own broadcast, looped back
        message, reject = self.verifier.verify(event.data, event.source, event.wall)
        if message is None:
            assert reject is not None
            self.rejected[reject] += 1
            return []
        kind = message.kind
        if kind is Kind.DIST_HEARTBEAT:
            beat = DistHeartbeat.unpack(message.payload)
            try:
                role = Role(beat.role) if beat is not None else None
            except ValueError:
                role = None
            if beat is None or role is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return []
            return self._peer_heartbeat(message.sender, role, beat, event.now, event.wall)
        if kind is Kind.STATE_SYNC:
            batch = SyncBatch.unpack(message.payload)
            if batch is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return []
            if self.role is Role.ACTIVE:
                return []  # a stale stream from a former active
            commands: list[Command] = []
            if not self.receiver.receive(batch, event.now):
                commands.append(Log(Level.WARNING, f"failover: {MAX_PENDING_TEXT} batches wait behind a gap in the "
                                                   "sync stream; asking for a snapshot"))
                commands += self._request_sync(event.now, event.wall)
            elif self.receiver.waiting:
                commands += self._ask_again(self.receiver.missing(), event.now, event.wall)
            self._update_caught_up()
            self._track_lag(event.now)
            return commands
        if kind is Kind.RESIGN:
            resign = Resign.unpack(message.payload)
            if resign is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return []
            commands = [Log(Level.WARNING, f"failover: {message.sender} resigned (term {resign.term}"
                                           f"{', stopping' if resign.stopping else ''})")]
            return commands + self._decide(self.machine.resign(message.sender, resign.term, resign.stopping),
                                           event.now, event.wall)
        if kind is Kind.ADMIN_STATE:
            chunk = AdminChunk.unpack(message.payload)
            if chunk is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return []
            return self._admin_received(message.sender, chunk)
        if kind is Kind.SYNC_REQUEST and self.role is Role.ACTIVE:
            request = SyncRequest.unpack(message.payload)
            if request is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return []
            if not request.ranges:
                self.sender.request_snapshot()
                return [Log(Level.INFO, f"failover: {message.sender} asked for a snapshot of {len(self.replica)} "
                                        "connection(s)")]
            payloads, too_old = self.sender.resend(request.ranges)
            destination = (str(self.options.peers[message.sender]), self.options.port)
            commands = [Send(self._seal(Kind.STATE_SYNC, payload, event.wall), destination) for payload in payloads]
            if too_old:
                self.sender.request_snapshot()
                commands.append(Log(Level.WARNING, f"failover: {message.sender} asked for batches older than the "
                                                   "kept history; streaming a snapshot"))
            return commands
        return []

    def _peer_heartbeat(self, sender: str, role: Role, beat: DistHeartbeat, now: float, wall: float) -> list[Command]:
        self._peer_batches[sender] = beat.sync_batch
        if role is Role.ACTIVE:
            if self._last_active_heartbeat is not None and self.role is Role.BACKUP:
                # The worst silence of the active seen so far: what the dead window must stay above.
                self.heartbeat_gap_max = max(self.heartbeat_gap_max, now - self._last_active_heartbeat)
            self._last_active_heartbeat = now
            self.active_batch = beat.sync_batch
            self.active_connections = beat.connections
        commands = self._decide(self.machine.heartbeat(PeerBeat(sender, role, beat.priority, beat.term,
                                                                int.from_bytes(beat.address, "big"), beat.caught_up,
                                                                beat.preempt)), now, wall)
        if role is Role.ACTIVE and self.role is Role.BACKUP:
            self._update_caught_up()
            self._track_lag(now)
        return commands

    def _packets_handled(self, wall: float) -> list[Command]:
        if self.role is not Role.ACTIVE:
            return []
        commands = self._flush_live(wall)
        if self._holding:
            commands.append(ReleaseNewSyns())
        return commands

    def _first_forward(self, at: float, arrived: float | None = None) -> list[Command]:
        takeover = self.last_takeover
        if takeover is None or takeover.first_forward is not None:
            return []
        takeover.first_forward = at
        takeover.first_arrival = arrived
        if takeover.last_heartbeat is None:
            return [Log(Level.INFO, f"failover: first packet forwarded {(at - takeover.started) * 1000:.1f} ms after "
                                    "taking over")]
        base = takeover.last_heartbeat
        claimed = f"{(takeover.claimed - base) * 1000:.1f}" if takeover.claimed is not None else "?"
        return [Log(Level.WARNING, f"failover: takeover timeline from the last heartbeat of the old active: decided "
                                   f"+{(takeover.started - base) * 1000:.1f} ms, addresses claimed +{claimed} ms, "
                                   f"first packet forwarded +{(at - base) * 1000:.1f} ms")]

    def _done(self, event: CommandDone) -> list[Command]:
        command = event.command
        if isinstance(command, InstallRules) and self._claiming and self.role is Role.ACTIVE:
            if event.error is not None:
                self._rules_retry_at = event.now + RULES_RETRY
                return [Log(Level.ERROR, f"failover: taking over, the rules failed to install ({event.error}): the "
                                         f"addresses stay unclaimed (claimed without the rules, this host's own "
                                         f"stack would reset the clients); trying again in {RULES_RETRY:g} s")]
            return self._claim(event.now)
        if event.error is not None:
            return [Log(Level.ERROR, f"failover: {type(command).__name__} failed: {event.error}")]
        takeover = self.last_takeover
        if isinstance(command, ClaimAddresses) and takeover is not None and takeover.claimed is None \
                and self.role is Role.ACTIVE:
            takeover.claimed = event.now
            return [Log(Level.WARNING, f"failover: {self.name} took over (term {takeover.term}) with "
                                       f"{len(self.replica)} replicated connection(s); addresses claimed "
                                       f"{(event.now - takeover.started) * 1000:.1f} ms after the decision")]
        return []

    # -- decisions ------------------------------------------------------------------------------------
    def _decide(self, decisions: Iterable[Decision], now: float, wall: float) -> list[Command]:
        commands: list[Command] = []
        for decision in decisions:
            action = decision.action
            if action in (Action.PEER_LATE, Action.PEER_LOST, Action.PEER_BACK):
                level = Level.WARNING if action is Action.PEER_LOST else Level.INFO
                commands.append(Log(level, f"failover: {decision.reason}"))
                if action is Action.PEER_BACK and self.role is Role.ACTIVE:
                    # A partition healed: whichever of us stays active, clients may hold the other's
                    # MAC; the one that stays must announce even if it never sees the other active.
                    commands.append(self._announce())
                continue
            if decision.role_change is not None:
                old, new = decision.role_change
                # Taking over or giving up is what an operator must hear of; starting as a backup is not.
                level = Level.INFO if new is Role.BACKUP and old is Role.STARTING else Level.WARNING
                commands.append(Alert(self.name, old.name.lower(), new.name.lower(), decision.reason, level))
            if action is Action.TAKE_OVER:
                commands += self._take_over(now, wall)
            elif action is Action.RESIGN:
                stopping = decision.role_change is not None and decision.role_change[1] is Role.STOPPED
                commands += self._flush_live(wall)
                for _ in range(RESIGN_COPIES):
                    commands += self._send(Kind.RESIGN, Resign(self.machine.term, stopping).pack(), wall)
                commands += self._give_up()
            elif action is Action.GIVE_UP:
                commands += self._give_up()
            elif action is Action.ANNOUNCE:
                commands.append(Log(Level.WARNING, f"failover: {decision.reason}; announcing our addresses again"))
                commands.append(self._announce())
            elif action is Action.REQUEST_SYNC:
                self.receiver.reset()
                commands += self._request_sync(now, wall, force=True)
        return commands

    def _take_over(self, now: float, wall: float) -> list[Command]:
        self.last_takeover = Takeover(self._last_active_heartbeat, now, self.machine.term)
        self.takeovers += 1
        self.recent_takeovers.append(self.last_takeover)
        # 1. State: the replica is the interposer's table; from now on its idle timers run.
        self.replica.hold_expiry(now)
        self._holding = True
        self._next_flush = now + SYNC_FLUSH
        # 2. rules; 3. addresses and 4. announcements once the rules are in (_claim, on InstallRules' CommandDone).
        commands: list[Command] = [HoldNewSyns(True), ArmFirstForward(), InstallRules()]
        self._claiming = True
        self._rules_retry_at = None
        self._admin_refresh_at = now + ADMIN_REFRESH
        return commands + self._heartbeat(wall)

    def _claim(self, now: float) -> list[Command]:
        """The takeover's rules are installed: claim the addresses and announce them."""
        self._claiming = False
        self._rules_retry_at = None
        lifetime = self.options.address_lifetime or None
        if self.options.garp_repeat > 0:
            self._second_burst_at = now + self.options.garp_repeat
        self._refresh_at = now + self.options.garp_refresh if self.options.garp_refresh > 0 else None
        self._renew_at = now + self.options.renew_every if lifetime else None
        return [ClaimAddresses(lifetime), self._announce()]

    def _give_up(self) -> list[Command]:
        self._claiming = False
        self._rules_retry_at = None
        self._second_burst_at = None
        self._refresh_at = None
        self._renew_at = None
        self._admin_refresh_at = None
        self._admin_adopted = None
        self._holding = False
        return [ReleaseAddresses(), HoldNewSyns(False), RemoveRules(), DrainQueue(),
                Log(Level.WARNING, f"failover: {self.name} gave up the addresses and stopped forwarding")]

    def _announce(self) -> Announce:
        self.announcements += 1
        return Announce()

    # -- datagrams -------------------------------------------------------------------------------------
    def _flush_live(self, wall: float) -> list[Command]:
        commands: list[Command] = []
        for payload in self.sender.live_batches():
            commands += self._send(Kind.STATE_SYNC, payload, wall)
        return commands

    def _snapshot_chunk(self, wall: float) -> list[Command]:
        commands: list[Command] = []
        for payload in self.sender.snapshot_batches(SNAPSHOT_CHUNK, self.replica.open_connections,
                                                    self.replica.open_backend):
            commands += self._send(Kind.STATE_SYNC, payload, wall)
        return commands

    def _repair(self, now: float, wall: float) -> list[Command]:
        """A standby's tick: ask again for what the stream is missing, or for a snapshot when none completed."""
        receiver = self.receiver
        if not receiver.snapshot_complete and not receiver.in_snapshot:
            # The request or the whole snapshot was lost (the first batch of a stream is never a
            # gap): ask again, at most once per dead window, until a snapshot completes.
            return self._request_sync(now, wall)
        # Batches lost at the tail show no gap until the next one: the active's heartbeat says how far it
        # is.  The one-heartbeat-old figure is used, so a batch still in flight is not asked for.
        up_to, self._active_batch_before = self._active_batch_before, self.active_batch
        return self._ask_again(receiver.missing(up_to), now, wall)

    def _ask_again(self, ranges: list[tuple[int, int]], now: float, wall: float) -> list[Command]:
        """A SyncRequest for the missing batches not asked for in the last few ticks."""
        applied = self.receiver.applied or 0
        self._nacked = {n: v for n, v in self._nacked.items() if n > applied}
        retry = NACK_RETRY_TICKS * self.options.settings.interval
        wanted: list[int] = []
        for first, last in ranges:
            for number in range(first, last + 1):
                asked_at, times = self._nacked.get(number, (None, 0))
                if asked_at is not None and now - asked_at < retry:
                    continue
                if times >= NACK_LIMIT:
                    return self._request_sync(now, wall)  # it does not come: start over from a snapshot
                self._nacked[number] = (now, times + 1)
                wanted.append(number)
                if len(wanted) >= 256:
                    break
        if not wanted:
            return []
        self.retransmit_requests += 1
        merged: list[tuple[int, int]] = []
        for number in wanted:
            if merged and merged[-1][1] + 1 == number:
                merged[-1] = (merged[-1][0], number)
            else:
                merged.append((number, number))
        return self._send(Kind.SYNC_REQUEST, SyncRequest(tuple(merged[:SyncRequest.MAX_RANGES])).pack(), wall)

    def _request_sync(self, now: float, wall: float, force: bool = False) -> list[Command]:
        # At most one request per dead window unless forced: each request restarts the active's
        # snapshot, and under loss a stream of requests would keep it from ever finishing.
        if not force and self._last_sync_request is not None \
                and now - self._last_sync_request < self.options.settings.dead_seconds:
            return []
        self._last_sync_request = now
        self._nacked.clear()
        return self._send(Kind.SYNC_REQUEST, SyncRequest().pack(), wall)

    def _heartbeat(self, wall: float) -> list[Command]:
        machine = self.machine
        batch = self.sender.batch if machine.role is Role.ACTIVE else (self.receiver.applied or 0)
        beat = DistHeartbeat(int(machine.role), self.options.settings.priority, machine.term,
                             self.options.address.packed, machine.caught_up, self.options.settings.preempt, batch,
                             len(self.replica))
        return self._send(Kind.DIST_HEARTBEAT, beat.pack(), wall)

    def _seal(self, kind: Kind, payload: bytes, wall: float) -> bytes:
        self.sent[kind] += 1
        return seal(self.keys, kind, self.name, self.sequence.next(wall), wall, payload)

    def _send(self, kind: Kind, payload: bytes, wall: float) -> list[Command]:
        datagram = self._seal(kind, payload, wall)
        if kind in _BROADCAST_KINDS:
            return [Send(datagram, self.options.destination)]
        return [Send(datagram, destination) for destination in self._peer_destinations]

    def _update_caught_up(self) -> None:
        self.machine.set_caught_up(self.role is Role.BACKUP and self.receiver.caught_up(self.active_batch))

    def _track_lag(self, now: float) -> None:
        """A standby is behind while the active has advertised batches it has not applied (one may be in flight)."""
        lag = self.receiver.lag(self.active_batch)
        if lag is None or lag > 1:
            if self._behind_since is None:
                self._behind_since = now
        else:
            self._behind_since = None

    # -- observers -------------------------------------------------------------------------------------
    def lag(self) -> int | None:
        return self.receiver.lag(self.active_batch) if self.role is not Role.ACTIVE else 0

    def stats(self) -> FailoverStats:
        machine = self.machine
        active = machine.role is Role.ACTIVE
        peers = tuple(PeerStats(p.name, p.role, p.alive, p.counter, p.term, p.priority, self._peer_batches.get(p.name, 0),
                                self.sender.records_after(self._peer_batches[p.name])
                                if active and p.role is Role.BACKUP and self._peer_batches.get(p.name) else None)
                      for p in machine.peers.values())
        return FailoverStats(machine.role, machine.term, machine.caught_up, peers, self.lag(), self.active_connections,
                             self.receiver.gaps, self.retransmit_requests, self.sender.retransmitted,
                             self.receiver.records_applied, self.sender.records_sent,
                             self.sender.snapshots, self.receiver.rejected_records, self.announcements,
                             self.heartbeat_gap_max,
                             dict(self.sent), {r: self.rejected[r] for r in Reject}, dict(machine.transitions),
                             dataclasses.replace(self.last_takeover) if self.last_takeover else None,
                             self.takeovers, self._behind_since if machine.role is not Role.ACTIVE else None,
                             tuple(dataclasses.replace(t) for t in self.recent_takeovers))
