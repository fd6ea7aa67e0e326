"""Distributor roles: who owns the addresses (pure: events in, decisions out).

Contract
--------
:class:`RoleMachine` takes the events of one distributor's life, each with
``now`` from the caller, and returns the :class:`Decision` list the adapter
must carry out, in order:

* :meth:`~RoleMachine.tick` every ``interval`` seconds (the peers' missed
  heartbeats are counted in ticks, with ``warning`` and ``dead`` thresholds,
  as node heartbeats are);
* :meth:`~RoleMachine.heartbeat` for each verified peer heartbeat;
* :meth:`~RoleMachine.resign` for a peer's resign datagram;
* :meth:`~RoleMachine.set_caught_up` when the local replica becomes complete
  and current (or stops being so);
* :meth:`~RoleMachine.shutdown` on SIGTERM.

Roles (:class:`Role`) move only through the table ``ROLE_MOVES`` keyed by
(role, :class:`RoleEvent`), whose values also name the :class:`Action` the move
requires (see :mod:`common.machine`); any other move raises.  A distributor
starts in STARTING and listens for one dead window.  If it hears an ACTIVE
peer it becomes BACKUP and asks for a snapshot of the connection table;
otherwise the highest-ranked one takes over.  A BACKUP takes over when no
ACTIVE peer is alive (no heartbeat for ``dead`` ticks) or the active resigns,
unless a live standby outranks it.  Taking over sets ``term`` to one more
than any term seen, so terms only grow.

Conflicts resolve deterministically: of two ACTIVE distributors the one with
the higher ``(term, priority, address)`` stays; the other gives up at once
(drops the addresses, stops forwarding) and the one that stays re-announces
its addresses.  Rank among standbys is ``(priority, address)``.  Preemption:
an ACTIVE distributor resigns in favour of a BACKUP of strictly higher
priority that asks for it (``preempt``) and has caught up; equal priorities
never preempt, so the roles cannot flap.
"""

from __future__ import annotations

import collections
import dataclasses
import enum

from common.machine import IllegalTransition, TransitionTable

__all__ = ["Role", "RoleEvent", "Action", "Decision", "FailoverSettings", "RoleMachine", "IllegalRoleTransition",
           "PeerView", "PeerBeat", "ROLE_MOVES"]

IllegalRoleTransition = IllegalTransition


class Role(enum.IntEnum):
    STARTING = 0
    BACKUP = 1
    ACTIVE = 2
    STOPPED = 3


class RoleEvent(enum.Enum):
    ELECTED = "elected"  # no active peer is alive and no live standby outranks us
    ACTIVE_SEEN = "active_seen"  # while starting: an active peer heartbeats
    OUTRANKED = "outranked"  # while starting: a higher-ranked standby will take over
    SUPERSEDED = "superseded"  # while active: another active has a higher (term, priority, address)
    PREEMPTED = "preempted"  # while active: a caught-up standby of higher priority asks for the addresses
    STOP = "stop"  # shutting down


class Action(enum.Enum):
    TAKE_OVER = "take_over"  # install the table and rules, claim the addresses, announce them
    GIVE_UP = "give_up"  # drop the addresses, stop forwarding
    RESIGN = "resign"  # flush the sync stream, tell the peers, then give up
    ANNOUNCE = "announce"  # re-announce the addresses (a conflicting owner was seen)
    REQUEST_SYNC = "request_sync"  # ask the active for a snapshot of its table
    PEER_LATE = "peer_late"  # a peer missed more than `warning` heartbeats (information)
    PEER_LOST = "peer_lost"  # a peer missed more than `dead` heartbeats (information)
    PEER_BACK = "peer_back"  # a lost peer heartbeats again (information)


@dataclasses.dataclass(frozen=True)
class Decision:
    action: Action
    reason: str
    peer: str | None = None
    role_change: tuple[Role, Role] | None = None

    def describe(self) -> str:
        change = f" ({self.role_change[0].name.lower()} -> {self.role_change[1].name.lower()})" if self.role_change else ""
        return f"{self.action.value}{change}: {self.reason}"


_R, _V, _A = Role, RoleEvent, Action
# Every legal move of a distributor's role, and what it must do for it.
ROLE_MOVES: dict[tuple[Role, RoleEvent], tuple[Role, Action | None]] = {
    (_R.STARTING, _V.ELECTED): (_R.ACTIVE, _A.TAKE_OVER),
    (_R.BACKUP, _V.ELECTED): (_R.ACTIVE, _A.TAKE_OVER),
    (_R.STARTING, _V.ACTIVE_SEEN): (_R.BACKUP, _A.REQUEST_SYNC),
    (_R.STARTING, _V.OUTRANKED): (_R.BACKUP, _A.REQUEST_SYNC),
    (_R.ACTIVE, _V.SUPERSEDED): (_R.BACKUP, _A.GIVE_UP),
    (_R.ACTIVE, _V.PREEMPTED): (_R.BACKUP, _A.RESIGN),
    (_R.STARTING, _V.STOP): (_R.STOPPED, None),
    (_R.BACKUP, _V.STOP): (_R.STOPPED, None),
    (_R.ACTIVE, _V.STOP): (_R.STOPPED, _A.RESIGN),
}


@dataclasses.dataclass(frozen=True)
class PeerBeat:
    """What a verified peer heartbeat says about its sender."""

    name: str
    role: Role
    priority: int
    term: int
    address: int
    caught_up: bool
    preempt: bool


@dataclasses.dataclass(frozen=True)
class FailoverSettings:
    priority: int = 100
    preempt: bool = False
    interval: float = 0.05  # seconds between heartbeats, and per tick
    warning: int = 3  # a peer silent for more ticks is late (0.2 s)
    dead: int = 6  # a peer silent for more ticks is gone: the backup takes over (0.35 s)

    def __post_init__(self) -> None:
        if not 0 <= self.priority <= 65535:
            raise ValueError(f"failover.priority = {self.priority!r} must be from 0 to 65535")
        if not self.interval > 0:
            raise ValueError(f"failover.interval = {self.interval!r} must be > 0 seconds")
        if not 0 <= self.warning < self.dead:
            raise ValueError(f"failover.warning = {self.warning!r} must be >= 0 and below failover.dead = {self.dead!r}")

    @property
    def warning_seconds(self) -> float:
        return (self.warning + 1) * self.interval

    @property
    def dead_seconds(self) -> float:
        return (self.dead + 1) * self.interval


@dataclasses.dataclass
class PeerView:
    name: str
    role: Role
    priority: int
    term: int
    address: int
    caught_up: bool
    preempt: bool
    counter: int = 0
    alive: bool = True

    @property
    def rank(self) -> tuple[int, int]:
        return (self.priority, self.address)


class RoleMachine:
    def __init__(self, name: str, address: int, settings: FailoverSettings):
        self.name = name
        self.address = address
        self.settings = settings
        self.role = Role.STARTING
        self.term = 0
        self.max_term = 0
        self.caught_up = False
        self.peers: dict[str, PeerView] = {}
        self.following: tuple[str, int] | None = None  # (active peer, its term) the replica follows
        self._ticks_in_role = 0
        self._machine = TransitionTable("role", ROLE_MOVES)
        self.transitions: collections.Counter[tuple[Role, Role]] = self._machine.counts

    @property
    def rank(self) -> tuple[int, int]:
        return (self.settings.priority, self.address)

    def active_peer(self) -> PeerView | None:
        live = [p for p in self.peers.values() if p.alive and p.role is Role.ACTIVE]
        return max(live, key=lambda p: (p.term, p.rank), default=None)

    def _outranked(self) -> bool:
        """A live standby (starting or backup) with a higher rank exists: it, not we, takes over."""
        return any(p.alive and p.role in (Role.STARTING, Role.BACKUP) and p.rank > self.rank for p in self.peers.values())

    # -- events ------------------------------------------------------------------
    def tick(self, now: float) -> list[Decision]:
        decisions: list[Decision] = []
        settings = self.settings
        for peer in self.peers.values():
            if not peer.alive:
                continue
            peer.counter += 1
            if peer.counter > settings.dead:
                peer.alive = False
                decisions.append(Decision(Action.PEER_LOST, f"{peer.name} silent for {peer.counter} ticks", peer.name))
            elif peer.counter == settings.warning + 1:
                decisions.append(Decision(Action.PEER_LATE, f"{peer.name} silent for {peer.counter} ticks", peer.name))
        self._ticks_in_role += 1
        if self.role is Role.STARTING and self._ticks_in_role > settings.dead:
            if self.active_peer() is None and not self._outranked():
                decisions += self._take_over("no active distributor heard while starting")
            elif self._outranked():
                decisions += self._fire(RoleEvent.OUTRANKED, "a higher-ranked distributor is starting")
        elif self.role is Role.BACKUP and self.active_peer() is None and not self._outranked():
            lost = self.following[0] if self.following else "the active distributor"
            decisions += self._take_over(f"{lost} is silent")
        return decisions

    def heartbeat(self, beat: PeerBeat) -> list[Decision]:
        decisions: list[Decision] = []
        name, role, priority, term, address = beat.name, beat.role, beat.priority, beat.term, beat.address
        caught_up, preempt = beat.caught_up, beat.preempt
        peer = self.peers.get(name)
        if peer is None:
            peer = self.peers[name] = PeerView(name, role, priority, term, address, caught_up, preempt)
        elif not peer.alive:
            decisions.append(Decision(Action.PEER_BACK, f"{name} heartbeats again", name))
        peer.role, peer.priority, peer.term, peer.address = role, priority, term, address
        peer.caught_up, peer.preempt, peer.counter, peer.alive = caught_up, preempt, 0, True
        self.max_term = max(self.max_term, term)

        if role is Role.ACTIVE:
            if self.role is Role.ACTIVE:
                if (term, priority, address) > (self.term, self.settings.priority, self.address):
                    decisions += self._fire(RoleEvent.SUPERSEDED, f"{name} is active with term {term} > ours {self.term}"
                                            if term > self.term else f"{name} is active and outranks us at term {term}")
                    decisions.append(Decision(Action.REQUEST_SYNC, f"follow {name}", name))
                    self.following = (name, term)
                else:
                    decisions.append(Decision(Action.ANNOUNCE, f"{name} also claims to be active (term {term})", name))
            elif self.role is Role.STARTING:
                decisions += self._fire(RoleEvent.ACTIVE_SEEN, f"{name} is active (term {term})")
                self.following = (name, term)
            elif self.role is Role.BACKUP and self.following != (name, term):
                self.following = (name, term)
                self.caught_up = False
                decisions.append(Decision(Action.REQUEST_SYNC, f"{name} is active now (term {term})", name))
        elif (self.role is Role.ACTIVE and role is Role.BACKUP and preempt and caught_up
              and priority > self.settings.priority):
            decisions += self._fire(RoleEvent.PREEMPTED, f"{name} has priority {priority} > ours "
                                    f"{self.settings.priority}, has caught up and preempts")
        return decisions

    def resign(self, name: str, term: int, stopping: bool) -> list[Decision]:
        """A peer resigned: it stops (SIGTERM) or stays as a standby (it was preempted)."""
        peer = self.peers.get(name)
        if peer is not None:
            peer.role = Role.STOPPED if stopping else Role.BACKUP
            peer.alive = not stopping
            peer.counter = 0
        self.max_term = max(self.max_term, term)
        if self.role is Role.BACKUP and self.active_peer() is None and not self._outranked():
            return self._take_over(f"{name} resigned")
        return []

    def set_caught_up(self, caught_up: bool) -> None:
        self.caught_up = caught_up

    def shutdown(self) -> list[Decision]:
        if self.role is Role.STOPPED:
            return []
        return self._fire(RoleEvent.STOP, "shutting down")

    # -- internals -------------------------------------------------------------
    def _take_over(self, reason: str) -> list[Decision]:
        self.term = self.max_term + 1
        self.max_term = self.term
        self.following = None
        return self._fire(RoleEvent.ELECTED, f"{reason}; term {self.term}")

    def _fire(self, event: RoleEvent, reason: str) -> list[Decision]:
        """Move by the table; the decision its action requires (none for a silent move)."""
        old = self.role
        new, action, _ = self._machine.move(old, event, self.name)
        self.role = new
        self._ticks_in_role = 0
        if new is not Role.BACKUP:
            self.caught_up = False
        if action is None:
            return []
        return [Decision(action, reason, role_change=(old, new))]
