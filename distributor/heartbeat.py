"""Node health: per-node heartbeat counters, node states, and the heartbeat receiver (pure).

Contract
--------
:class:`HealthBoard` keeps one counter per node.  :meth:`~HealthBoard.tick` adds one to every
counter; :meth:`~HealthBoard.heartbeat` resets a node's counter.  Both take ``now`` from the caller
and return the :class:`Transition` list they caused, each exactly once.

:class:`NodeHealth` is the sans-io core around the board: it takes :class:`~common.sansio.Tick`
and :class:`NodeDatagram` events and returns commands (:class:`SetNodeEligible`,
:class:`SetNodeRamp`, :class:`ResetNode`, :class:`~common.sansio.Alert`,
:class:`~common.sansio.Log`, :class:`~common.sansio.WakeUpAt`).  It verifies every datagram
(:class:`~common.wire.Verifier`: cheap checks first, the MAC last), counts rejections by reason and
never raises for any bytes.

States (:class:`NodeState`), moved only through the table ``node_moves`` keyed by
(state, :class:`NodeEvent`)::

    UP --counter > warning--> WARNING --counter > dead--> DEAD
    WARNING --heartbeat--> UP (or back to SLOW_START if its ramp was unfinished)
    DEAD --heartbeat--> RISING --`rise` consecutive heartbeats--> SLOW_START --slow_start s--> UP
    RISING --counter > warning (a heartbeat missed)--> DEAD
    SLOW_START --counter > warning--> WARNING

A node may take new connections in UP and SLOW_START only; in SLOW_START its share ramps linearly
from ``MIN_RAMP`` to 1 (:meth:`~HealthBoard.ramp`) so a node that returns with no connections is
not flooded by least-outstanding.  Nodes start UP with a zero counter: a node that never
heartbeats is excluded after the warning window, and a healthy cluster serves from the first second.

Ticks never catch up: a :class:`Tick` that arrives late (the event loop stalled) advances the
counters once, and the next tick is due one tick later.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Iterable, Mapping

from common.machine import TransitionTable
from common.sansio import Alert, Command, Level, Log, Tick, WakeUpAt
from common.wire import Keys, Kind, NodeHeartbeat, Reject, Verifier

__all__ = ["NodeState", "NodeEvent", "OnDead", "HealthSettings", "Transition", "HealthBoard", "MIN_RAMP",
           "NodeHealth", "NodeDatagram", "SetNodeEligible", "SetNodeRamp", "ResetNode", "NodeHealthStats",
           "HealthStats", "node_moves"]

MIN_RAMP = 0.05
REJECT_LOG_INTERVAL = 5.0  # seconds between two log lines about rejected heartbeats


class NodeState(enum.Enum):
    UP = "up"
    WARNING = "warning"
    DEAD = "dead"
    RISING = "rising"
    SLOW_START = "slow_start"


class NodeEvent(enum.Enum):
    HEARTBEAT = "heartbeat"  # a verified heartbeat that changes nothing else
    RESUMED = "resumed"  # a heartbeat ends a warning; the node had finished its ramp
    RESUMED_RAMPING = "resumed_ramping"  # a heartbeat ends a warning during an unfinished slow start
    LATE = "late"  # the counter passed the warning threshold
    SILENT = "silent"  # the counter passed the dead threshold
    RISEN = "risen"  # `rise` consecutive heartbeats since the node was dead
    RAMPED = "ramped"  # slow start finished


class OnDead(enum.Enum):
    """What happens to a dead node's open connections."""

    KEEP = "keep"  # left alone: they end by themselves or time out
    RESET = "reset"  # every client is sent an RST, so it reconnects at once (to a live node)


ELIGIBLE = frozenset({NodeState.UP, NodeState.SLOW_START})


def node_moves(slow_start: bool) -> dict[tuple[NodeState, NodeEvent], tuple[NodeState, None]]:
    """The legal moves; with ``slow_start`` a risen node ramps up before it is UP."""
    S, E = NodeState, NodeEvent
    risen = S.SLOW_START if slow_start else S.UP
    return {
        (S.UP, E.HEARTBEAT): (S.UP, None),
        (S.UP, E.LATE): (S.WARNING, None),
        (S.WARNING, E.RESUMED): (S.UP, None),
        (S.WARNING, E.RESUMED_RAMPING): (S.SLOW_START, None),
        (S.WARNING, E.SILENT): (S.DEAD, None),
        (S.DEAD, E.HEARTBEAT): (S.RISING, None),
        (S.DEAD, E.RISEN): (risen, None),
        (S.RISING, E.HEARTBEAT): (S.RISING, None),
        (S.RISING, E.RISEN): (risen, None),
        (S.RISING, E.LATE): (S.DEAD, None),
        (S.SLOW_START, E.HEARTBEAT): (S.SLOW_START, None),
        (S.SLOW_START, E.LATE): (S.WARNING, None),
        (S.SLOW_START, E.RAMPED): (S.UP, None),
    }


@dataclasses.dataclass(frozen=True)
class HealthSettings:
    tick: float = 0.25  # seconds per counter increment
    warning: int = 3  # counter above this: skipped for new connections
    dead: int = 8  # counter above this: declared dead
    rise: int = 3  # consecutive heartbeats before a dead node is a candidate again
    slow_start: float = 10.0  # seconds to ramp a returning node to its full share; 0 disables

    def __post_init__(self) -> None:
        if not self.tick > 0:
            raise ValueError(f"health.tick = {self.tick!r} must be > 0 seconds")
        if not 0 <= self.warning < self.dead:
            raise ValueError(f"health.warning = {self.warning!r} must be >= 0 and below health.dead = {self.dead!r}")
        if self.rise < 1:
            raise ValueError(f"health.rise = {self.rise!r} must be >= 1")
        if self.slow_start < 0:
            raise ValueError(f"health.slow_start = {self.slow_start!r} must be >= 0 seconds")

    @property
    def warning_seconds(self) -> float:
        return (self.warning + 1) * self.tick

    @property
    def dead_seconds(self) -> float:
        return (self.dead + 1) * self.tick


@dataclasses.dataclass(frozen=True)
class Transition:
    node: str
    old: NodeState
    new: NodeState
    at: float
    counter: int
    reason: str


class _Node:
    __slots__ = ("name", "state", "counter", "rises", "slow_start_since", "heartbeats", "report", "last_heartbeat")

    def __init__(self, name: str):
        self.name = name
        self.state = NodeState.UP
        self.counter = 0
        self.rises = 0
        self.slow_start_since: float | None = None
        self.heartbeats = 0
        self.report: NodeHeartbeat | None = None
        self.last_heartbeat: float | None = None


class HealthBoard:
    def __init__(self, settings: HealthSettings, nodes: Iterable[str]):
        self.settings = settings
        self._nodes = {name: _Node(name) for name in nodes}
        self._machine = TransitionTable("node", node_moves(settings.slow_start > 0))
        self.transitions: collections.Counter[tuple[NodeState, NodeState]] = self._machine.counts
        self.transitions_by_node: collections.Counter[str] = collections.Counter()

    def __contains__(self, node: str) -> bool:
        return node in self._nodes

    @property
    def nodes(self) -> list[str]:
        return list(self._nodes)

    def state(self, node: str) -> NodeState:
        return self._nodes[node].state

    def counter(self, node: str) -> int:
        return self._nodes[node].counter

    def heartbeats(self, node: str) -> int:
        return self._nodes[node].heartbeats

    def report(self, node: str) -> NodeHeartbeat | None:
        """The payload of the node's last heartbeat."""
        return self._nodes[node].report

    def last_heartbeat(self, node: str) -> float | None:
        return self._nodes[node].last_heartbeat

    def eligible(self, node: str) -> bool:
        return self._nodes[node].state in ELIGIBLE

    def ramp(self, node: str, now: float) -> float:
        entry = self._nodes[node]
        if entry.state is not NodeState.SLOW_START or entry.slow_start_since is None:
            return 1.0
        return min(1.0, max(MIN_RAMP, (now - entry.slow_start_since) / self.settings.slow_start))

    def heartbeat(self, node: str, now: float, report: NodeHeartbeat | None = None) -> list[Transition]:
        entry = self._nodes[node]
        late = entry.counter
        entry.counter = 0
        entry.heartbeats += 1
        entry.report = report
        entry.last_heartbeat = now
        state = entry.state
        if state is NodeState.WARNING:
            event = NodeEvent.RESUMED_RAMPING if entry.slow_start_since is not None else NodeEvent.RESUMED
            return self._fire(entry, event, now, f"heartbeat after {late} ticks")
        if state in (NodeState.DEAD, NodeState.RISING):
            entry.rises = 1 if state is NodeState.DEAD else entry.rises + 1
            if entry.rises >= self.settings.rise:
                return self._fire(entry, NodeEvent.RISEN, now, f"{entry.rises} consecutive heartbeat(s)")
            return self._fire(entry, NodeEvent.HEARTBEAT, now, f"heartbeat {entry.rises} of {self.settings.rise}")
        return self._fire(entry, NodeEvent.HEARTBEAT, now, "heartbeat")

    def tick(self, now: float) -> list[Transition]:
        settings = self.settings
        changes: list[Transition] = []
        for entry in self._nodes.values():
            entry.counter += 1
            state = entry.state
            if state in (NodeState.UP, NodeState.SLOW_START) and entry.counter > settings.warning:
                changes += self._fire(entry, NodeEvent.LATE, now, f"no heartbeat for {entry.counter} ticks")
            elif state is NodeState.WARNING and entry.counter > settings.dead:
                changes += self._fire(entry, NodeEvent.SILENT, now, f"no heartbeat for {entry.counter} ticks")
            elif state is NodeState.RISING and entry.counter > settings.warning:
                changes += self._fire(entry, NodeEvent.LATE, now, f"heartbeats stopped after {entry.rises} of {settings.rise}")
            elif (state is NodeState.SLOW_START and entry.slow_start_since is not None
                  and now - entry.slow_start_since >= settings.slow_start):
                changes += self._fire(entry, NodeEvent.RAMPED, now, "slow start finished")
        return changes

    def _fire(self, entry: _Node, event: NodeEvent, now: float, reason: str) -> list[Transition]:
        old = entry.state
        new, _, changed = self._machine.move(old, event, entry.name)
        if not changed:
            return []
        entry.state = new
        if new is NodeState.SLOW_START and old is not NodeState.WARNING:
            entry.slow_start_since = now  # a risen node starts its ramp; a resumed one continues it
        elif new in (NodeState.UP, NodeState.DEAD):
            entry.slow_start_since = None
        self.transitions_by_node[entry.name] += 1
        return [Transition(entry.name, old, new, now, entry.counter, reason)]


# -- the sans-io core ------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeDatagram:
    """A datagram arrived on the node-heartbeat socket from ``source`` (an address string)."""

    data: bytes
    source: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class SetNodeEligible(Command):
    """Gate a node for new connections in every service that has it."""

    node: str
    eligible: bool


@dataclasses.dataclass(frozen=True)
class SetNodeRamp(Command):
    """Scale a node's share of new connections (slow start): a factor in (0, 1]."""

    node: str
    factor: float


@dataclasses.dataclass(frozen=True)
class ResetNode(Command):
    """End every open connection of a dead node so its clients reconnect elsewhere."""

    node: str


@dataclasses.dataclass(frozen=True)
class NodeHealthStats:
    node: str
    state: NodeState
    counter: int
    heartbeats: int
    transitions: int
    seconds_since_heartbeat: float | None
    report: NodeHeartbeat | None


@dataclasses.dataclass(frozen=True)
class HealthStats:
    nodes: tuple[NodeHealthStats, ...]
    transitions: dict[tuple[NodeState, NodeState], int]
    rejected: dict[Reject, int]
    reset_connections: int


class NodeHealth:
    """The health core: heartbeat datagrams and ticks in, gating commands out (see the module docstring)."""

    def __init__(self, settings: HealthSettings, nodes: Mapping[str, str | None], keys: Keys,
                 freshness: float = 5.0, on_dead: OnDead = OnDead.KEEP):
        """``nodes`` maps each node's name to the address its heartbeats must come from (None: any)."""
        self.settings = settings
        self.on_dead = on_dead
        self.board = HealthBoard(settings, nodes)
        self.verifier = Verifier(keys, dict(nodes), {Kind.NODE_HEARTBEAT}, freshness)
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self.reset_connections = 0
        self._next_tick: float | None = None
        self._last_reject_log: float | None = None

    def start(self, now: float) -> list[Command]:
        self._next_tick = now + self.settings.tick
        return [WakeUpAt(self._next_tick)]

    @property
    def next_wakeup(self) -> float | None:
        return self._next_tick

    def handle(self, event: Tick | NodeDatagram) -> list[Command]:
        if isinstance(event, NodeDatagram):
            return self._datagram(event)
        return self._tick(event.now)

    def count_reset(self, connections: int) -> None:
        """The core reports how many connections a ResetNode command ended."""
        self.reset_connections += connections

    # -- events ----------------------------------------------------------------------------------
    def _tick(self, now: float) -> list[Command]:
        if self._next_tick is None:
            return self.start(now)
        if now < self._next_tick:
            return [WakeUpAt(self._next_tick)]
        # No catch-up: one late tick counts once (a stalled loop is not the nodes' silence).
        self._next_tick = max(self._next_tick + self.settings.tick, now)
        commands = self._apply(self.board.tick(now))
        for node in self.board.nodes:
            if self.board.state(node) is NodeState.SLOW_START:
                commands.append(SetNodeRamp(node, self.board.ramp(node, now)))
        commands.append(WakeUpAt(self._next_tick))
        return commands

    def _datagram(self, event: NodeDatagram) -> list[Command]:
        message, reject = self.verifier.verify(event.data, event.source, event.wall)
        if message is not None:
            report = NodeHeartbeat.unpack(message.payload)
            if report is not None:
                return self._apply(self.board.heartbeat(message.sender, event.now, report))
            reject = Reject.BAD_PAYLOAD
        assert reject is not None
        self.rejected[reject] += 1
        if self._last_reject_log is None or event.now - self._last_reject_log > REJECT_LOG_INTERVAL:
            self._last_reject_log = event.now
            so_far = ", ".join(f"{r.value}={n}" for r, n in self.rejected.items())
            return [Log(Level.WARNING, f"rejected a heartbeat from {event.source}: {reject.value} "
                                       f"(rejections so far: {so_far})")]
        return []

    def _apply(self, changes: list[Transition]) -> list[Command]:
        commands: list[Command] = []
        for change in changes:
            commands.append(SetNodeEligible(change.node, self.board.eligible(change.node)))
            if change.new is NodeState.SLOW_START:
                commands.append(SetNodeRamp(change.node, self.board.ramp(change.node, change.at)))
            elif change.old is NodeState.SLOW_START or change.new is NodeState.UP:
                commands.append(SetNodeRamp(change.node, 1.0))
            if change.new is NodeState.DEAD and self.on_dead is OnDead.RESET:
                commands.append(ResetNode(change.node))
            commands.append(Alert(change.node, change.old.value, change.new.value, change.reason))
        return commands

    # -- observers ---------------------------------------------------------------------------------
    def stats(self, now: float) -> HealthStats:
        board = self.board
        nodes = []
        for node in board.nodes:
            last = board.last_heartbeat(node)
            nodes.append(NodeHealthStats(node, board.state(node), board.counter(node), board.heartbeats(node),
                                         board.transitions_by_node[node], None if last is None else max(0.0, now - last),
                                         board.report(node)))
        return HealthStats(tuple(nodes), dict(board.transitions), {r: self.rejected[r] for r in Reject},
                           self.reset_connections)
