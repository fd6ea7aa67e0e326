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

Roles (:class:`Role`; moves outside ``TRANSITIONS`` raise): a distributor
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

__all__ = ["Role", "Action", "Decision", "FailoverSettings", "RoleMachine", "IllegalRoleTransition", "PeerView"]


class Role(enum.IntEnum):
    STARTING = 0
    BACKUP = 1
    ACTIVE = 2
    STOPPED = 3


TRANSITIONS: dict[Role, frozenset[Role]] = {
    Role.STARTING: frozenset({Role.BACKUP, Role.ACTIVE, Role.STOPPED}),
    Role.BACKUP: frozenset({Role.ACTIVE, Role.STOPPED}),
    Role.ACTIVE: frozenset({Role.BACKUP, Role.STOPPED}),
    Role.STOPPED: frozenset(),
}


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


class IllegalRoleTransition(RuntimeError):
    pass


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
        self.transitions: collections.Counter[tuple[Role, Role]] = collections.Counter()

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
                decisions += self._become(Role.BACKUP, Action.REQUEST_SYNC, "a higher-ranked distributor is starting")
        elif self.role is Role.BACKUP and self.active_peer() is None and not self._outranked():
            lost = self.following[0] if self.following else "the active distributor"
            decisions += self._take_over(f"{lost} is silent")
        return decisions

    def heartbeat(self, name: str, role: Role, priority: int, term: int, address: int, caught_up: bool,
                  preempt: bool) -> list[Decision]:
        decisions: list[Decision] = []
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
                    decisions += self._become(Role.BACKUP, Action.GIVE_UP, f"{name} is active with term {term} > ours {self.term}"
                                              if term > self.term else f"{name} is active and outranks us at term {term}")
                    decisions.append(Decision(Action.REQUEST_SYNC, f"follow {name}", name))
                    self.following = (name, term)
                else:
                    decisions.append(Decision(Action.ANNOUNCE, f"{name} also claims to be active (term {term})", name))
            elif self.role is Role.STARTING:
                decisions += self._become(Role.BACKUP, Action.REQUEST_SYNC, f"{name} is active (term {term})")
                self.following = (name, term)
            elif self.role is Role.BACKUP and self.following != (name, term):
                self.following = (name, term)
                self.caught_up = False
                decisions.append(Decision(Action.REQUEST_SYNC, f"{name} is active now (term {term})", name))
        elif (self.role is Role.ACTIVE and role is Role.BACKUP and preempt and caught_up
              and priority > self.settings.priority):
            decisions += self._become(Role.BACKUP, Action.RESIGN, f"{name} has priority {priority} > ours "
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
        if self.role is Role.ACTIVE:
            return self._become(Role.STOPPED, Action.RESIGN, "shutting down")
        if self.role is Role.STOPPED:
            return []
        self._move(Role.STOPPED)
        return []

    # -- internals -------------------------------------------------------------
    def _take_over(self, reason: str) -> list[Decision]:
        self.term = self.max_term + 1
        self.max_term = self.term
        self.following = None
        return self._become(Role.ACTIVE, Action.TAKE_OVER, f"{reason}; term {self.term}")

    def _become(self, role: Role, action: Action, reason: str) -> list[Decision]:
        old = self.role
        self._move(role)
        return [Decision(action, reason, role_change=(old, role))]

    def _move(self, role: Role) -> None:
        if role not in TRANSITIONS[self.role]:
            raise IllegalRoleTransition(f"{self.name}: {self.role.name} -> {role.name} is not allowed")
        self.transitions[(self.role, role)] += 1
        self.role = role
        self._ticks_in_role = 0
        if role is not Role.BACKUP:
            self.caught_up = False
