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
    UP, SLOW_START --a failed connection (passive health)--> WARNING
    WARNING --heartbeat--> UP (or back to SLOW_START if its ramp was unfinished)
    DEAD --heartbeat--> RISING --`rise` consecutive heartbeats--> SLOW_START --slow_start s--> UP
    RISING --counter > warning (a heartbeat missed)--> DEAD
    SLOW_START --counter > warning--> WARNING

A node may take new connections in UP and SLOW_START only; in SLOW_START its share ramps linearly
from ``MIN_RAMP`` to 1 (:meth:`~HealthBoard.ramp`) so a node that returns with no connections is
not flooded by least-outstanding.  Nodes start UP with a zero counter: a node that never
heartbeats is excluded after the warning window, and a healthy cluster serves from the first second.

Passive health (:meth:`NodeHealth.passive_failure`): when the data path sees a node reset a
client's SYN, or leave it unanswered until the client retransmits, the node goes to WARNING at
once, as if it had missed its heartbeats, instead of after the warning window.  Only a heartbeat
whose probe began after that failure clears it (the agent probes the web server, then sends: the
probe began the reported response time before the datagram arrived); one already on its way says
nothing about the failure.  For the same reason a SYN left unanswered that was sent before the
probe of a heartbeat already received excludes nothing: the web server answered since (a lost SYN,
or a saturated node whose handshakes outlast the client's RTO).  Its counter goes on meanwhile, so
a node that has really died is declared dead on the usual schedule.  Like damping, passive health
never takes out the last node that could serve: that node's failures are counted and logged only.

A heartbeat says when the next one is due (``interval_ms``: the agent slows its probes down when
its web server answers slowly).  A node is not late before that interval has passed, plus one tick,
up to ``max_interval``: the thresholds of a node that announced a longer interval stretch, so an
agent that is merely slow is not taken for a dead one, and is still cut off in bounded time.

Flapping is damped as BGP damps routes (RFC 2439): every death adds one to a node's penalty, and a
fall into WARNING half of that; the penalty halves every ``flap_half_life`` seconds.  At ``flap_suppress`` the node is held out of service
whatever its state (unless no other node could serve: damping never empties the cluster), one alert
says so, and its further changes are logged but not alerted, until the penalty has decayed below
``flap_reuse`` and it is healthy: one more alert.  Steps on the way back that change nothing for an
operator (dead -> rising, the end of a slow start) are logged, not alerted.

Ticks never catch up: a :class:`Tick` that arrives late (the event loop stalled) advances the
counters once, and the next tick is due one tick later.
"""

from __future__ import annotations

import collections
import dataclasses
import enum
import math
from typing import Iterable, Mapping

from common.machine import TransitionTable
from common.sansio import Alert, Command, Level, Log, Tick, WakeUpAt
from common.wire import Keys, Kind, NodeHeartbeat, Reject, Verifier

__all__ = ["NodeState", "NodeEvent", "OnDead", "HealthSettings", "Transition", "HealthBoard", "MIN_RAMP",
           "NodeHealth", "NodeDatagram", "SetNodeEligible", "SetNodeRamp", "SetNodeFeedback", "ResetNode", "feedback_factor", "NodeHealthStats",
           "HealthStats", "node_moves"]

MIN_RAMP = 0.05
PASSIVE_LOG_INTERVAL = 10.0  # seconds: at most one log line per node for failures that changed nothing
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
    FAILED = "failed"  # passive health: the node failed a connection (reset or ignored a SYN)
    STALE = "stale"  # a heartbeat whose probe began before the node's last failed connection: proves nothing


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
        (S.UP, E.FAILED): (S.WARNING, None),
        (S.SLOW_START, E.FAILED): (S.WARNING, None),
        (S.WARNING, E.STALE): (S.WARNING, None),
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
    max_interval: float = 2.0  # an announced heartbeat interval is honoured up to this many seconds
    flap_half_life: float = 30.0  # seconds for a node's flap penalty to halve
    flap_suppress: float = 1.8  # penalty at which a flapping node is held out of service; 0 disables damping
    flap_reuse: float = 0.5  # penalty below which a held-out node that is healthy comes back

    def __post_init__(self) -> None:
        if not self.tick > 0:
            raise ValueError(f"health.tick = {self.tick!r} must be > 0 seconds")
        if not 0 <= self.warning < self.dead:
            raise ValueError(f"health.warning = {self.warning!r} must be >= 0 and below health.dead = {self.dead!r}")
        if self.rise < 1:
            raise ValueError(f"health.rise = {self.rise!r} must be >= 1")
        if self.slow_start < 0:
            raise ValueError(f"health.slow_start = {self.slow_start!r} must be >= 0 seconds")
        if self.max_interval < 0:
            raise ValueError(f"health.max_interval = {self.max_interval!r} must be >= 0 seconds")
        if self.flap_suppress and not 0 < self.flap_reuse < self.flap_suppress:
            raise ValueError(f"health.flap_reuse = {self.flap_reuse!r} must be > 0 and below health.flap_suppress = "
                             f"{self.flap_suppress!r}")
        if not self.flap_half_life > 0:
            raise ValueError(f"health.flap_half_life = {self.flap_half_life!r} must be > 0 seconds")

    def allowance(self, announced: float) -> tuple[int, int]:
        """(warning, dead) thresholds in ticks for a node whose last heartbeat announced ``announced`` seconds."""
        stretch = max(0, math.ceil(min(announced, self.max_interval) / self.tick) - self.warning)
        return self.warning + stretch, self.dead + stretch

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
    __slots__ = ("name", "state", "counter", "rises", "slow_start_since", "heartbeats", "report", "last_heartbeat",
                 "penalty", "penalty_at", "damped", "warning", "dead", "failed_at", "failures", "probed_at")

    def __init__(self, name: str, warning: int, dead: int):
        self.name = name
        self.state = NodeState.UP
        self.counter = 0
        self.rises = 0
        self.slow_start_since: float | None = None
        self.heartbeats = 0
        self.report: NodeHeartbeat | None = None
        self.last_heartbeat: float | None = None
        self.probed_at = float("-inf")  # when the probe of its latest heartbeat began
        self.penalty = 0.0  # flap penalty at penalty_at
        self.penalty_at = 0.0
        self.damped = False  # held out of service for flapping
        self.warning = warning  # this node's thresholds, stretched by its announced interval
        self.dead = dead
        self.failed_at: float | None = None  # passive health: its last failed connection, until a heartbeat clears it
        self.failures = 0  # failed connections seen on the data path, ever


class HealthBoard:
    def __init__(self, settings: HealthSettings, nodes: Iterable[str]):
        self.settings = settings
        self._nodes = {name: _Node(name, settings.warning, settings.dead) for name in nodes}
        self._machine = TransitionTable("node", node_moves(settings.slow_start > 0))
        self.transitions: collections.Counter[tuple[NodeState, NodeState]] = self._machine.counts
        self.transitions_by_node: collections.Counter[str] = collections.Counter()
        # Per node, also for nodes added at run time (and kept for a node removed and added again:
        # its counters go on, as a counter must).
        self.moves_by_node: collections.defaultdict[str, collections.Counter[tuple[NodeState, NodeState]]] = \
            collections.defaultdict(collections.Counter)

    def __contains__(self, node: str) -> bool:
        return node in self._nodes

    def add(self, node: str) -> None:
        """A node added at run time: UP with a zero counter, like a configured one at start."""
        if node not in self._nodes:
            self._nodes[node] = _Node(node, self.settings.warning, self.settings.dead)

    def remove(self, node: str) -> None:
        self._nodes.pop(node, None)

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
        entry = self._nodes[node]
        return entry.state in ELIGIBLE and not entry.damped

    def damped(self, node: str) -> bool:
        return self._nodes[node].damped

    def penalty(self, node: str, now: float) -> float:
        entry = self._nodes[node]
        return entry.penalty * 0.5 ** ((now - entry.penalty_at) / self.settings.flap_half_life)

    def ramp(self, node: str, now: float) -> float:
        entry = self._nodes[node]
        if entry.state is not NodeState.SLOW_START or entry.slow_start_since is None:
            return 1.0
        return min(1.0, max(MIN_RAMP, (now - entry.slow_start_since) / self.settings.slow_start))

    def failures(self, node: str) -> int:
        return self._nodes[node].failures

    def passive(self, node: str, now: float, reason: str, spare: bool = True,
                since: float | None = None) -> list[Transition]:
        """The data path saw ``node`` fail a connection: WARNING now, until a later heartbeat clears it.

        ``spare``: whether the caller, which knows the services and the nodes' administrative
        states, sees another node that could take the failed node's new connections.  ``since``:
        when the failure began (the node was given the SYN it left unanswered; None: now); a
        heartbeat whose probe began after that has already cleared it (see :meth:`served_since`).
        """
        entry = self._nodes[node]
        entry.failures += 1
        if self.served_since(node, since):
            return []
        entry.failed_at = now
        if entry.state not in ELIGIBLE:
            return []
        if not spare or not any(other.state in ELIGIBLE and not other.damped for other in self._nodes.values() if other is not entry):
            return []  # the last node that could serve stays: excluding it would refuse every client
        return self._fire(entry, NodeEvent.FAILED, now, reason)

    def served_since(self, node: str, since: float | None) -> bool:
        """Whether a heartbeat whose probe began after ``since`` has arrived from ``node`` (None: now, never).

        Its web server answered that probe: a SYN it was given at ``since`` and left unanswered
        was lost or slowed by load (a saturated cluster), which is no reason to exclude it.
        """
        return since is not None and self._nodes[node].probed_at > since

    def heartbeat(self, node: str, now: float, report: NodeHeartbeat | None = None) -> list[Transition]:
        entry = self._nodes[node]
        late = entry.counter
        entry.counter = 0
        entry.heartbeats += 1
        entry.report = report
        entry.last_heartbeat = now
        entry.warning, entry.dead = self.settings.allowance(report.interval_ms / 1000 if report is not None else 0.0)
        state = entry.state
        probed_at = now - (report.response_ms / 1000 if report is not None else 0.0)
        entry.probed_at = max(entry.probed_at, probed_at)
        if entry.failed_at is not None:
            if probed_at <= entry.failed_at:
                if state is NodeState.WARNING:
                    return self._fire(entry, NodeEvent.STALE, now, "heartbeat from a probe before the failed connection")
            else:
                entry.failed_at = None
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
            if state in (NodeState.UP, NodeState.SLOW_START) and entry.counter > entry.warning:
                changes += self._fire(entry, NodeEvent.LATE, now, f"no heartbeat for {entry.counter} ticks")
            elif state is NodeState.WARNING and entry.counter > entry.dead:
                changes += self._fire(entry, NodeEvent.SILENT, now, f"no heartbeat for {entry.counter} ticks")
            elif state is NodeState.RISING and entry.counter > entry.warning:
                changes += self._fire(entry, NodeEvent.LATE, now, f"heartbeats stopped after {entry.rises} of {settings.rise}")
            elif (state is NodeState.SLOW_START and entry.slow_start_since is not None
                  and now - entry.slow_start_since >= settings.slow_start):
                changes += self._fire(entry, NodeEvent.RAMPED, now, "slow start finished")
        return changes

    def undamp(self, now: float) -> list[str]:
        """Nodes whose flap penalty decayed below the reuse level while healthy: back in service."""
        settings = self.settings
        back = []
        for entry in self._nodes.values():
            if entry.damped and entry.state in ELIGIBLE and self.penalty(entry.name, now) < settings.flap_reuse:
                entry.damped = False
                back.append(entry.name)
        return back

    def _fire(self, entry: _Node, event: NodeEvent, now: float, reason: str) -> list[Transition]:
        old = entry.state
        new, _, changed = self._machine.move(old, event, entry.name)
        if not changed:
            return []
        entry.state = new
        # A failed connection is no flap: anyone able to damage a SYN on its way could otherwise
        # have a healthy node held out for minutes; the heartbeat that clears it is the verdict.
        fall = 0.0 if event is NodeEvent.FAILED else {NodeState.DEAD: 1.0, NodeState.WARNING: 0.5}.get(new, 0.0)
        if fall and self.settings.flap_suppress:
            entry.penalty = self.penalty(entry.name, now) + fall
            entry.penalty_at = now
            others_serve = any(other.state in ELIGIBLE and not other.damped
                               for other in self._nodes.values() if other is not entry)
            if entry.penalty >= self.settings.flap_suppress and not entry.damped and others_serve:
                entry.damped = True
        if new is NodeState.SLOW_START and old is not NodeState.WARNING:
            entry.slow_start_since = now  # a risen node starts its ramp; a resumed one continues it
        elif new in (NodeState.UP, NodeState.DEAD):
            entry.slow_start_since = None
        self.transitions_by_node[entry.name] += 1
        self.moves_by_node[entry.name][(old, new)] += 1
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
class SetNodeFeedback(Command):
    """Scale a node's weight by what it reports (the feedback policy): a factor in (0, 1]."""

    node: str
    factor: float


FEEDBACK_MIN = 0.05  # a node that heartbeats always keeps this share of its weight
FEEDBACK_SMOOTHING = 0.3  # weight of a new report in the moving average of response times
_FEEDBACK_EPSILON_MS = 5.0  # response times this close to the fastest count as equally fast


def feedback_factor(response_ms: float, fastest_ms: float, cpu: float) -> float:
    """How much of its weight a node keeps, from its probe response time (relative to the fastest
    node's) and its CPU: 1 for the fastest, idle node; it falls smoothly as the node slows down
    (halving when its response time, plus 5 ms, doubles) and as its CPU passes half busy (to a tenth
    when fully busy); never below FEEDBACK_MIN while it heartbeats."""
    speed = (fastest_ms + _FEEDBACK_EPSILON_MS) / (max(response_ms, fastest_ms) + _FEEDBACK_EPSILON_MS)
    busy = 1.0 if cpu <= 0.5 else max(0.1, 1.0 - 1.8 * (cpu - 0.5))
    return max(FEEDBACK_MIN, min(1.0, speed * busy))


@dataclasses.dataclass(frozen=True)
class ResetNode(Command):
    """End every open connection of a dead node so its clients reconnect elsewhere."""

    node: str


@dataclasses.dataclass(frozen=True)
class NodeHealthStats:
    node: str
    state: NodeState
    held_out: bool  # held out of service for flapping
    counter: int
    heartbeats: int
    transitions: int
    seconds_since_heartbeat: float | None
    report: NodeHeartbeat | None
    moves: dict[tuple[NodeState, NodeState], int] = dataclasses.field(default_factory=dict)  # (from, to) -> count
    failed_connections: int = 0  # passive health: connections the data path saw it fail


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
        self._held_out: set[str] = set()  # nodes whose hold-out for flapping has been alerted
        self._passive_log: dict[str, tuple[float, int]] = {}  # node -> (last logged, failures not logged since)
        self._response: dict[str, float] = {}  # moving average of each node's reported probe time, ms
        self._feedback: dict[str, float] = {}  # the factor last sent per node

    def start(self, now: float, wall: float) -> list[Command]:
        """Ticks from now on; heartbeats sealed before ``wall`` are refused (the replay marks start empty)."""
        self._next_tick = now + self.settings.tick
        self.verifier.not_before = wall
        return [WakeUpAt(self._next_tick)]

    @property
    def next_wakeup(self) -> float | None:
        return self._next_tick

    def handle(self, event: Tick | NodeDatagram) -> list[Command]:
        if isinstance(event, NodeDatagram):
            return self._datagram(event)
        if self._next_tick is None:
            return self.start(event.now, event.wall)
        return self._tick(event.now)

    def reconfigure(self, settings: HealthSettings) -> None:
        """New thresholds (a reload): counters and states stay; each node's allowance follows at its next heartbeat."""
        self.settings = settings
        self.board.settings = settings

    def add_node(self, node: str, address: str) -> list[Command]:
        """Watch a node added at run time (its heartbeats must come from ``address``)."""
        self.board.add(node)
        self.verifier.add_sender(node, address)
        return [SetNodeEligible(node, self.board.eligible(node))]

    def remove_node(self, node: str) -> None:
        self.board.remove(node)
        self._response.pop(node, None)
        self._feedback.pop(node, None)
        self.verifier.remove_sender(node)
        self._held_out.discard(node)
        self._passive_log.pop(node, None)  # a node added again under this name starts afresh

    def passive_failure(self, node: str, reason: str, now: float, spare: bool = True,
                        since: float | None = None) -> list[Command]:
        """The data path saw ``node`` fail a connection (``reason`` says how): exclude it until a later heartbeat.

        ``spare`` says whether another node could take its new connections (the caller knows the
        services and the administrative states); without one the node stays.  ``since``: when the
        failure began (an unanswered SYN's send time; None: now); a node that answered a heartbeat
        probe after it stays.  A failure the board does not act on (the node is already out, it is the
        last one that could serve, or it was serving since) is logged, at most once per node every
        ``PASSIVE_LOG_INTERVAL`` seconds with the count of those not logged, so an operator sees a
        refusing node and a busy one floods no log.
        """
        if node not in self.board:
            return []
        served = self.board.served_since(node, since)
        changes = self.board.passive(node, now, reason, spare, since)
        if changes:
            return self._apply(changes)
        logged_at, quiet = self._passive_log.get(node, (float("-inf"), 0))
        if now - logged_at < PASSIVE_LOG_INTERVAL:
            self._passive_log[node] = (logged_at, quiet + 1)
            return []
        self._passive_log[node] = (now, 0)
        kept = ("a heartbeat probe answered since: load or a lost packet, kept" if served
                else "out of service" if not self.board.eligible(node) else "the last that can serve: kept")
        more = f"; {quiet} more since the last such message" if quiet else ""
        return [Log(Level.INFO, f"{node}: {reason} (node {self.board.state(node).value}, {kept}{more})")]

    def count_reset(self, connections: int) -> None:
        """The core reports how many connections a ResetNode command ended."""
        self.reset_connections += connections

    # -- events ----------------------------------------------------------------------------------
    def _tick(self, now: float) -> list[Command]:
        assert self._next_tick is not None
        if now < self._next_tick:
            return [WakeUpAt(self._next_tick)]
        # No catch-up: one late tick counts once (a stalled loop is not the nodes' silence).
        self._next_tick = max(self._next_tick + self.settings.tick, now)
        commands = self._apply(self.board.tick(now)) + self._undamp(now) + self._feedback_commands()
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
                previous = self._response.get(message.sender)
                self._response[message.sender] = report.response_ms if previous is None else \
                    previous + FEEDBACK_SMOOTHING * (report.response_ms - previous)
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
            if change.node in self._held_out and change.new is not NodeState.DEAD:
                # Held out for flapping: its changes are logged, not alerted one by one (a death still is).
                commands.append(Log(Level.INFO, f"{change.node}: {change.old.value} -> {change.new.value} "
                                                f"({change.reason}; held out for flapping)"))
            elif self.board.damped(change.node) and change.node not in self._held_out:
                self._held_out.add(change.node)
                commands.append(Alert(change.node, change.old.value, change.new.value,
                                      f"{change.reason}; flapping ({self.board.penalty(change.node, change.at):.1f} "
                                      "recent falls): held out of service until it is stable"))
            elif change.new is NodeState.RISING or (change.old, change.new) == (NodeState.SLOW_START, NodeState.UP):
                # On the way back but nothing changed for service yet (rising), or nothing more (ramped).
                commands.append(Log(Level.INFO, f"{change.node}: {change.old.value} -> {change.new.value} "
                                                f"({change.reason})"))
            else:
                # Falling is a WARNING; coming back into service is news, not a warning.
                level = Level.WARNING if change.new in (NodeState.WARNING, NodeState.DEAD) else Level.INFO
                commands.append(Alert(change.node, change.old.value, change.new.value, change.reason, level))
        return commands

    def _feedback_commands(self) -> list[Command]:
        """The feedback factors that moved by more than 2 % since they were last sent."""
        live = {node: rt for node, rt in self._response.items() if node in self.board and self.board.eligible(node)}
        if not live:
            return []
        fastest = min(live.values())
        commands: list[Command] = []
        for node, rt in live.items():
            report = self.board.report(node)
            factor = round(feedback_factor(rt, fastest, report.cpu if report is not None else 0.0), 3)
            if abs(factor - self._feedback.get(node, 1.0)) > 0.02 * self._feedback.get(node, 1.0):
                self._feedback[node] = factor
                commands.append(SetNodeFeedback(node, factor))
        return commands

    def _undamp(self, now: float) -> list[Command]:
        commands: list[Command] = []
        for node in self.board.undamp(now):
            self._held_out.discard(node)
            state = self.board.state(node)
            commands.append(SetNodeEligible(node, self.board.eligible(node)))
            commands.append(Alert(node, "flapping", state.value, "stable again: back in service", Level.INFO))
        return commands

    # -- observers ---------------------------------------------------------------------------------
    def stats(self, now: float) -> HealthStats:
        board = self.board
        nodes = []
        for node in board.nodes:
            last = board.last_heartbeat(node)
            nodes.append(NodeHealthStats(node, board.state(node), board.damped(node), board.counter(node),
                                         board.heartbeats(node),
                                         board.transitions_by_node[node], None if last is None else max(0.0, now - last),
                                         board.report(node), dict(board.moves_by_node[node]), board.failures(node)))
        return HealthStats(tuple(nodes), dict(board.transitions), {r: self.rejected[r] for r in Reject},
                           self.reset_connections)
