"""Node health in the daemon: the heartbeat receiver and the tick loop (adapter).

Contract: :class:`HealthMonitor` owns a UDP socket that receives node
heartbeats, checks each with :class:`~distributor.wire.Verifier` (rejections
are counted by reason, never raised), feeds the verified ones and a tick
every ``tick`` seconds to the pure :class:`~distributor.heartbeat.HealthBoard`,
and applies the transitions it returns: gate the node in the interposer, set
its slow-start ramp, notify the observers (alerts, metrics) once per change,
and reset a dead node's connections when ``on_dead = "reset"``.

Ticks never catch up: after a stall of the event loop the next tick is one
tick, not a burst, because asyncio runs ready socket callbacks before due
timers, heartbeats that waited during the stall are counted first anyway.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Callable

from .config import Config
from .heartbeat import HealthBoard, NodeState, Transition
from .reroute import Interposer
from .udp import open_endpoint
from .wire import Keys, Kind, Message, NodeHeartbeat, Reject, Verifier

log = logging.getLogger("distributor.health")

TransitionListener = Callable[[Transition], None]


class HealthMonitor(asyncio.DatagramProtocol):
    def __init__(self, config: Config, interposer: Interposer, keys: Keys,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        assert config.health is not None
        self.health = config.health
        self.interposer = interposer
        self.board = HealthBoard(config.health.settings, config.nodes)
        self.verifier = Verifier(keys, {name: str(address) for name, address in config.nodes.items()},
                                 {Kind.NODE_HEARTBEAT}, config.health.freshness)
        self.clock = clock
        self.wall_clock = wall_clock
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self.listeners: list[TransitionListener] = []
        self.reset_connections = 0
        self.on_reset: Callable[[list], None] | None = None  # kernel mode: forget them in conntrack too
        self._transport: asyncio.DatagramTransport | None = None
        self._last_reject_log = 0.0

    async def start(self) -> None:
        host, port = self.health.listen
        self._transport = await open_endpoint(self, host, port, "node heartbeats")
        log.info("listening for node heartbeats on udp %s:%d (tick %.2f s, warning %d, dead %d, rise %d, slow start %.0f s)",
                 host, port, self.health.settings.tick, self.health.settings.warning, self.health.settings.dead,
                 self.health.settings.rise, self.health.settings.slow_start)

    def close(self) -> None:
        if self._transport is not None:
            self._transport.close()
            self._transport = None

    # -- heartbeats ----------------------------------------------------------
    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        message, reject = self.verifier.verify(data, addr[0], self.wall_clock())
        if message is not None:
            report = NodeHeartbeat.unpack(message.payload)
            if report is None:
                reject = Reject.BAD_PAYLOAD
            else:
                self._accept(message, report)
                return
        self.rejected[reject] += 1
        now = self.clock()
        if now - self._last_reject_log > 5.0:
            self._last_reject_log = now
            log.warning("rejected heartbeat from %s:%d: %s (rejections so far: %s)", addr[0], addr[1], reject.value,
                        dict((r.value, n) for r, n in self.rejected.items()))

    def _accept(self, message: Message, report: NodeHeartbeat) -> None:
        self.apply(self.board.heartbeat(message.sender, self.clock(), report))

    # -- ticks -----------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> None:
        tick = self.health.settings.tick
        next_tick = self.clock() + tick
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, next_tick - self.clock()))
                return
            except asyncio.TimeoutError:
                pass
            now = self.clock()
            next_tick = max(next_tick + tick, now)
            self.apply(self.board.tick(now))
            for node in self.board.nodes:
                if self.board.state(node) is NodeState.SLOW_START:
                    self.interposer.set_node_ramp(node, self.board.ramp(node, now))

    def apply(self, changes: list[Transition]) -> None:
        for change in changes:
            self.interposer.set_node_available(change.node, self.board.eligible(change.node))
            if change.new is NodeState.SLOW_START:
                self.interposer.set_node_ramp(change.node, self.board.ramp(change.node, change.at))
            elif change.old is NodeState.SLOW_START or change.new is NodeState.UP:
                self.interposer.set_node_ramp(change.node, 1.0)
            if change.new is NodeState.DEAD and self.health.on_dead == "reset":
                reset = self.interposer.reset_node(change.node, change.at)
                self.reset_connections += len(reset)
                log.warning("node %s is dead: reset %d open connection(s)", change.node, len(reset))
                if reset and self.on_reset is not None:
                    self.on_reset(reset)
            for listener in self.listeners:
                listener(change)
