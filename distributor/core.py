"""The distributor's core: the interposer, node health and failover composed (pure).

Contract
--------
:class:`DistributorCore` is the one object the daemon's adapters talk to.  It owns the
:class:`~distributor.reroute.Interposer` (connection table and balancers), the health core
(:class:`~distributor.heartbeat.NodeHealth`, when ``[health]`` is configured) and the failover core
(:class:`~backup.failover.FailoverCore`, when ``[failover]`` is configured), and routes the commands
they address to each other (a dead node's gate and reset, table changes to replication), so what
comes out of :meth:`DistributorCore.handle` is only what an adapter must execute:

* events in: :class:`~common.sansio.Tick`, :class:`~distributor.heartbeat.NodeDatagram`,
  :class:`~backup.failover.PeerDatagram`, :class:`~backup.failover.PacketsHandled` (with the
  interposer's effects of one batch of packets), :class:`~backup.failover.FirstForward`,
  :class:`ConntrackAnswered`, :class:`~common.sansio.CommandDone`,
  :class:`~common.sansio.StopRequested`;
* commands out: :class:`~common.sansio.Send`, :class:`~distributor.reroute.SendPacket`,
  :class:`~distributor.reroute.ForgetInConntrack`, :class:`~distributor.reroute.ConfirmWithConntrack`,
  the failover core's rule, address and SYN-holding commands, :class:`SetConntrackLiberal`,
  :class:`~common.sansio.Alert`, :class:`~common.sansio.Log`, and exactly one
  :class:`~common.sansio.WakeUpAt` at the end of every answer (the earliest deadline of all parts).

The packet path does not go through :meth:`handle`: the data-path adapter calls
``core.interposer.decide`` for each packet and hands the batch's effects over in one
:class:`~backup.failover.PacketsHandled`.  Observers read :meth:`DistributorCore.stats`.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable, Mapping

from backup.failover import DrainQueue, FailoverCore, FailoverOptions, FailoverStats, FirstForward, InstallRules, \
    PacketsHandled, PeerDatagram, RemoveRules
from common.sansio import Command, CommandDone, Level, Log, StopRequested, Tick, WakeUpAt
from common.wire import Keys

from .conntable import ConnectionTable, Timeouts
from .heartbeat import HealthSettings, HealthStats, NodeDatagram, NodeHealth, OnDead, ResetNode, SetNodeEligible, \
    SetNodeRamp
from .reroute import (ConnectionEnded, ConnectionOpened, ForgetHandshakes, Interposer, InterposerStats, Mode, Reason,
                      ServiceSpec)

__all__ = ["HealthOptions", "DistributorCore", "DistributorStats", "ConntrackAnswered", "SetConntrackLiberal",
           "HOUSEKEEPING"]

HOUSEKEEPING = 1.0  # seconds between expiry sweeps and drop reports

# Reasons worth a warning when they happen: the operator must act on them.
_WARN_REASONS = (Reason.TABLE_FULL, Reason.NO_BACKEND)
_INFO_REASONS = tuple(r for r in Reason if r.verdict == 0 and r not in _WARN_REASONS)


@dataclasses.dataclass(frozen=True)
class HealthOptions:
    settings: HealthSettings
    nodes: Mapping[str, str]  # node name -> the address its heartbeats come from
    freshness: float = 5.0
    on_dead: OnDead = OnDead.KEEP


@dataclasses.dataclass(frozen=True)
class ConntrackAnswered:
    """Kernel mode: conntrack's answer to ConfirmWithConntrack (keys still tracked, and gone)."""

    alive: tuple[bytes, ...]
    gone: tuple[bytes, ...]
    now: float


@dataclasses.dataclass(frozen=True)
class SetConntrackLiberal(Command):
    """Kernel mode: let conntrack pick up connections mid-stream without window history (after a takeover)."""


@dataclasses.dataclass(frozen=True)
class DistributorStats:
    name: str
    interposer: InterposerStats
    health: HealthStats | None
    failover: FailoverStats | None


class DistributorCore:
    def __init__(self, name: str, mode: Mode, services: Iterable[ServiceSpec], capacity: int,
                 timeouts: Timeouts | None = None, health: HealthOptions | None = None, health_keys: Keys | None = None,
                 failover: FailoverOptions | None = None, failover_keys: Keys | None = None):
        self.name = name
        self.mode = mode
        self.interposer = Interposer(tuple(services), ConnectionTable(capacity, timeouts), mode)
        self.health: NodeHealth | None = None
        if health is not None:
            if health_keys is None:
                raise ValueError("health checking needs the heartbeat keys")
            self.health = NodeHealth(health.settings, health.nodes, health_keys, health.freshness, health.on_dead)
        self.failover: FailoverCore | None = None
        if failover is not None:
            if failover_keys is None:
                raise ValueError("failover needs the distributors' keys")
            self.failover = FailoverCore(failover, failover_keys, self.interposer)
        self._next_housekeeping: float | None = None
        self._reported = list(self.interposer.counts)

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, now: float, wall: float) -> list[Command]:
        self._next_housekeeping = now + HOUSEKEEPING
        commands: list[Command] = []
        if self.mode is Mode.KERNEL:
            commands.append(SetConntrackLiberal())
        if self.health is not None:
            commands += self.health.start(now, wall)
        else:
            commands.append(Log(Level.WARNING, "health checking is off (no [health] section): every node is always "
                                               "a candidate"))
        if self.failover is not None:
            commands += self.failover.start(now, wall)
        else:
            commands.append(InstallRules())  # serving alone: the addresses are the host's own
        return self._finish(commands)

    def handle(self, event) -> list[Command]:
        if isinstance(event, PacketsHandled):
            commands = self._route(event.effects)
            if self.failover is not None:
                commands += self.failover.handle(event)
            return self._finish(commands)
        if isinstance(event, Tick):
            commands = self._housekeeping(event.now) if self._due(event.now) else []
            if self.health is not None:
                commands += self._route(self.health.handle(event), event.now)
            if self.failover is not None:
                commands += self.failover.handle(event)
            return self._finish(commands)
        if isinstance(event, NodeDatagram):
            commands = self._route(self.health.handle(event), event.now) if self.health is not None else []
            return self._finish(commands)
        if isinstance(event, ConntrackAnswered):
            return self._finish(self._route(self.interposer.confirmed(event.alive, event.gone, event.now)))
        if isinstance(event, StopRequested):
            commands = self.failover.handle(event) if self.failover is not None else []
            # Whatever the role was, the rules go, and what was queued before they went gets its verdict.
            return commands + [RemoveRules(), DrainQueue()]
        if isinstance(event, (PeerDatagram, CommandDone, FirstForward)):
            commands = self.failover.handle(event) if self.failover is not None else []
            return self._finish(commands)
        raise TypeError(f"the distributor core takes no {type(event).__name__} event")

    @property
    def next_wakeup(self) -> float | None:
        deadlines = [self._next_housekeeping]
        if self.health is not None:
            deadlines.append(self.health.next_wakeup)
        if self.failover is not None:
            deadlines.append(self.failover.next_wakeup)
        found = [d for d in deadlines if d is not None]
        return min(found) if found else None

    # -- routing ---------------------------------------------------------------------------------------
    def _route(self, items: Iterable, now: float = 0.0) -> list[Command]:
        """Apply what addresses the interposer or replication; pass the rest on."""
        out: list[Command] = []
        interposer = self.interposer
        failover = self.failover
        for item in items:
            if isinstance(item, ConnectionOpened):
                if failover is not None:
                    failover.record_opened(item.conn.key, item.conn.backend.index)
            elif isinstance(item, ConnectionEnded):
                if failover is not None:
                    failover.record_ended(item.conn.key)
            elif isinstance(item, SetNodeEligible):
                interposer.set_node_available(item.node, item.eligible)
                if not item.eligible and self.mode is Mode.KERNEL:
                    # Handshakes in flight to it would follow conntrack to it at the client's next SYN.
                    out.append(ForgetHandshakes(tuple(interposer.endpoints_of(item.node))))
            elif isinstance(item, SetNodeRamp):
                interposer.set_node_ramp(item.node, item.factor)
            elif isinstance(item, ResetNode):
                effects = interposer.reset_node(item.node, now)
                ended = sum(isinstance(e, ConnectionEnded) for e in effects)
                if self.health is not None:
                    self.health.count_reset(ended)
                out.append(Log(Level.WARNING, f"node {item.node} is dead: reset {ended} open connection(s)"))
                out += self._route(effects, now)
            elif isinstance(item, WakeUpAt):
                continue  # one WakeUpAt for the whole core, added by _finish
            else:
                out.append(item)
        return out

    def _finish(self, commands: list[Command]) -> list[Command]:
        commands = [c for c in commands if not isinstance(c, WakeUpAt)]
        wake = self.next_wakeup
        if wake is not None:
            commands.append(WakeUpAt(wake))
        return commands

    # -- housekeeping ------------------------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        return self._next_housekeeping is None or now >= self._next_housekeeping

    def _housekeeping(self, now: float) -> list[Command]:
        self._next_housekeeping = max((self._next_housekeeping or now) + HOUSEKEEPING, now)
        commands = self._route(self.interposer.expire(now), now)
        return commands + self._drop_report()

    def _drop_report(self) -> list[Command]:
        """At most one log line per kind and housekeeping tick about packets dropped since the last one."""
        counts = self.interposer.counts
        delta = [current - before for current, before in zip(counts, self._reported)]
        self._reported = list(counts)
        commands: list[Command] = []
        if delta[Reason.TABLE_FULL]:
            commands.append(Log(Level.WARNING, f"refused {delta[Reason.TABLE_FULL]} new connection(s): connection "
                                               f"table full (capacity {self.interposer.table.capacity})"))
        if delta[Reason.NO_BACKEND]:
            commands.append(Log(Level.WARNING, f"refused {delta[Reason.NO_BACKEND]} new connection(s): no backend "
                                               "is eligible"))
        other = ", ".join(f"{r.name.lower()}={delta[r]}" for r in _INFO_REASONS if delta[r])
        if other:
            commands.append(Log(Level.INFO, f"dropped packets: {other}"))
        return commands

    # -- observers -----------------------------------------------------------------------------------------
    def stats(self, now: float) -> DistributorStats:
        return DistributorStats(self.name, self.interposer.stats(),
                                self.health.stats(now) if self.health is not None else None,
                                self.failover.stats() if self.failover is not None else None)
