"""Per-node heartbeat counters and node states (pure: events in, transitions out).

Contract
--------
:class:`HealthBoard` keeps one counter per node.  The caller reports
:meth:`~HealthBoard.tick` every ``tick`` seconds (each adds one to every
counter) and :meth:`~HealthBoard.heartbeat` for each *verified* heartbeat
(resets the node's counter).  Both take ``now`` from the caller and return
the :class:`Transition` list they caused; every transition is returned
exactly once, so the caller logs and alerts once per change.

States (:class:`NodeState`; moves outside ``TRANSITIONS`` raise)::

    UP --counter > warning--> WARNING --counter > dead--> DEAD
    WARNING --heartbeat--> UP (or back to SLOW_START if its ramp was unfinished)
    DEAD --heartbeat--> RISING --`rise` consecutive heartbeats--> SLOW_START --slow_start s--> UP
    RISING --counter > warning (a heartbeat missed)--> DEAD
    SLOW_START --counter > warning--> WARNING

A node may take new connections in UP and SLOW_START only; in SLOW_START its
share ramps linearly from ``MIN_RAMP`` to 1 (:meth:`~HealthBoard.ramp`) so a
node that returns with no connections is not flooded by least-outstanding.
Nodes start UP with a zero counter: a node that never heartbeats is excluded
after the warning window, and a healthy cluster serves from the first second.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
from typing import Iterable

__all__ = ["NodeState", "HealthSettings", "Transition", "HealthBoard", "IllegalNodeTransition", "MIN_RAMP"]

MIN_RAMP = 0.05


class NodeState(enum.Enum):
    UP = "up"
    WARNING = "warning"
    DEAD = "dead"
    RISING = "rising"
    SLOW_START = "slow_start"


TRANSITIONS: dict[NodeState, frozenset[NodeState]] = {
    NodeState.UP: frozenset({NodeState.WARNING}),
    NodeState.WARNING: frozenset({NodeState.UP, NodeState.SLOW_START, NodeState.DEAD}),
    NodeState.DEAD: frozenset({NodeState.RISING, NodeState.SLOW_START, NodeState.UP}),
    NodeState.RISING: frozenset({NodeState.DEAD, NodeState.SLOW_START, NodeState.UP}),
    NodeState.SLOW_START: frozenset({NodeState.UP, NodeState.WARNING}),
}

ELIGIBLE = frozenset({NodeState.UP, NodeState.SLOW_START})


class IllegalNodeTransition(RuntimeError):
    pass


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
    __slots__ = ("name", "state", "counter", "rises", "slow_start_since", "heartbeats", "report")

    def __init__(self, name: str):
        self.name = name
        self.state = NodeState.UP
        self.counter = 0
        self.rises = 0
        self.slow_start_since: float | None = None
        self.heartbeats = 0
        self.report: object = None


class HealthBoard:
    def __init__(self, settings: HealthSettings, nodes: Iterable[str]):
        self.settings = settings
        self._nodes = {name: _Node(name) for name in nodes}
        self.transitions: collections.Counter[tuple[NodeState, NodeState]] = collections.Counter()

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

    def report(self, node: str) -> object:
        """The payload of the node's last heartbeat (opaque to the board)."""
        return self._nodes[node].report

    def eligible(self, node: str) -> bool:
        return self._nodes[node].state in ELIGIBLE

    def ramp(self, node: str, now: float) -> float:
        entry = self._nodes[node]
        if entry.state is not NodeState.SLOW_START or entry.slow_start_since is None:
            return 1.0
        return min(1.0, max(MIN_RAMP, (now - entry.slow_start_since) / self.settings.slow_start))

    def heartbeat(self, node: str, now: float, report: object = None) -> list[Transition]:
        entry = self._nodes[node]
        late = entry.counter
        entry.counter = 0
        entry.heartbeats += 1
        entry.report = report
        state = entry.state
        if state is NodeState.WARNING:
            back_to = NodeState.SLOW_START if entry.slow_start_since is not None else NodeState.UP
            return [self._move(entry, back_to, now, f"heartbeat after {late} ticks")]
        if state is NodeState.DEAD:
            entry.rises = 1
            if self.settings.rise == 1:
                return [self._promote(entry, now)]
            return [self._move(entry, NodeState.RISING, now, f"heartbeat 1 of {self.settings.rise}")]
        if state is NodeState.RISING:
            entry.rises += 1
            if entry.rises >= self.settings.rise:
                return [self._promote(entry, now)]
        return []

    def tick(self, now: float) -> list[Transition]:
        settings = self.settings
        changes: list[Transition] = []
        for entry in self._nodes.values():
            entry.counter += 1
            state = entry.state
            if state in (NodeState.UP, NodeState.SLOW_START) and entry.counter > settings.warning:
                changes.append(self._move(entry, NodeState.WARNING, now, f"no heartbeat for {entry.counter} ticks"))
            elif state is NodeState.WARNING and entry.counter > settings.dead:
                entry.slow_start_since = None
                changes.append(self._move(entry, NodeState.DEAD, now, f"no heartbeat for {entry.counter} ticks"))
            elif state is NodeState.RISING and entry.counter > settings.warning:
                changes.append(
                    self._move(entry, NodeState.DEAD, now, f"heartbeats stopped after {entry.rises} of {settings.rise}")
                )
            elif state is NodeState.SLOW_START and entry.slow_start_since is not None:
                if now - entry.slow_start_since >= settings.slow_start:
                    entry.slow_start_since = None
                    changes.append(self._move(entry, NodeState.UP, now, "slow start finished"))
        return changes

    def _promote(self, entry: _Node, now: float) -> Transition:
        reason = f"{entry.rises} consecutive heartbeat(s)"
        if self.settings.slow_start > 0:
            entry.slow_start_since = now
            return self._move(entry, NodeState.SLOW_START, now, reason)
        return self._move(entry, NodeState.UP, now, reason)

    def _move(self, entry: _Node, new: NodeState, now: float, reason: str) -> Transition:
        old = entry.state
        if new not in TRANSITIONS[old]:
            raise IllegalNodeTransition(f"node {entry.name}: {old.value} -> {new.value} is not allowed")
        entry.state = new
        self.transitions[(old, new)] += 1
        return Transition(entry.name, old, new, now, entry.counter, reason)
