"""Primary-backup failover in the daemon (adapter around the role machine and the sync core).

Contract
--------
:class:`FailoverController` owns the distributor-to-distributor UDP socket.
Every ``interval`` it ticks the :class:`~backup.roles.RoleMachine` and
broadcasts its own heartbeat on the cluster LAN (resigns are broadcast too;
the state-sync stream goes unicast to each configured peer); it verifies every
datagram it receives (own broadcasts are ignored), feeds heartbeats and resigns to the role machine,
sync batches to the :class:`~backup.sync.SyncReceiver` and snapshot requests
to the :class:`~backup.sync.SyncSender`, and carries out the decisions:

* TAKE_OVER, in this order: the replicated table is already the interposer's
  table (its idle timers start now); install the rules (the queue is bound
  since start); claim the VIP(s) and the internal gateway; announce them with
  a burst of gratuitous ARP, and a second burst ``garp_repeat`` seconds later.
* GIVE_UP: drop the addresses first (stop attracting packets), then the rules
  (stop forwarding); the table is kept until a snapshot of the new active's
  replaces it.
* RESIGN: send what the sync stream still holds, tell the peers, give up.

While active it releases each new connection's SYN only after the sync batch
announcing it has been sent (``PacketQueue.before_release``), sends ended
connections every ``SYNC_FLUSH`` seconds, and streams snapshots on request.
While a standby it holds its replica's idle timers and asks for a snapshot
when it starts following an active or finds a gap in the stream; it reports
itself caught up once its replica is complete and current.

Mid-stream packets of a connection the new active does not know (its sync
datagrams were lost) are dropped and counted as ``unknown_flow``: sending
them to any node could reach one that does not hold the connection.  The
client's retransmissions get through once a snapshot brings the entry in.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from dataclasses import dataclass
from typing import Callable

from distributor.config import Config
from distributor.datapath import PacketQueue, Rules
from distributor.reroute import Interposer
from distributor.udp import open_endpoint
from distributor.wire import (DistHeartbeat, Keys, Kind, Reject, Resign, SequenceCounter, SyncBatch, Verifier, seal)

from .roles import Action, Decision, Role, RoleMachine
from .sync import SyncReceiver, SyncSender
from .takeover import AddressOwner

log = logging.getLogger("distributor.failover")

# Heartbeats and resigns are broadcast on the cluster LAN (every distributor hears them); the
# state-sync stream and snapshot requests go unicast to the configured peers.
_BROADCAST_KINDS = frozenset({Kind.DIST_HEARTBEAT, Kind.RESIGN})

SYNC_FLUSH = 0.01  # seconds between sends of ended connections and snapshot chunks
SNAPSHOT_CHUNK = 16  # snapshot datagrams per flush (about 1,500 connections)
RESIGN_COPIES = 3


@dataclass
class Takeover:
    """Timings of the last takeover, on this distributor's monotonic clock."""

    last_heartbeat: float | None  # the last heartbeat heard from the active that went away
    started: float
    claimed: float | None = None
    first_forward: float | None = None
    reported: bool = False


class FailoverController(asyncio.DatagramProtocol):
    def __init__(self, config: Config, interposer: Interposer, rules: Rules, queue: PacketQueue, keys: Keys,
                 on_role_change: Callable[[Role, Role, str], None] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time):
        assert config.failover is not None
        self.config = config.failover
        self.name = config.name
        self.interposer = interposer
        self.table = interposer.table
        self.rules = rules
        self.queue = queue
        self.keys = keys
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_role_change = on_role_change
        self.machine = RoleMachine(config.name, int(self.config.address), self.config.settings)
        self.sender = SyncSender()
        self.receiver = SyncReceiver(interposer)
        self.verifier = Verifier(keys, {peer: str(address) for peer, address in self.config.peers.items()},
                                 {Kind.DIST_HEARTBEAT, Kind.STATE_SYNC, Kind.RESIGN, Kind.SYNC_REQUEST},
                                 self.config.freshness)
        self.sequence = SequenceCounter()
        self.owner = AddressOwner(list(self.config.addresses), self.config.garp_count)
        # Decisions run in order, one at a time, on a worker task: some await netlink.
        self._decisions: asyncio.Queue[list[Decision]] = asyncio.Queue()
        self.rejected: collections.Counter[Reject] = collections.Counter()
        self.sent = collections.Counter()
        self.last_takeover: Takeover | None = None
        self.active_batch = 0  # the followed active's last advertised batch
        self.active_connections = 0
        self._last_active_heartbeat: float | None = None
        self._last_sync_request = -1e9
        self._transport: asyncio.DatagramTransport | None = None
        self._own_address = str(self.config.address)
        # The sync stream goes to each peer, unicast: broadcast, every batch would be flooded to every
        # node of the LAN, in our own context, on the data path's critical section.
        self._sync_destinations = [(str(address), self.config.listen[1]) for address in self.config.peers.values()]
        self._second_burst: asyncio.TimerHandle | None = None
        interposer.opened_listeners.append(self._opened)
        interposer.ended_listeners.append(self._ended)
        queue.before_release = self.flush_live

    @property
    def role(self) -> Role:
        return self.machine.role

    # -- life cycle ----------------------------------------------------------------
    async def start(self) -> None:
        await self.owner.prepare()
        # Whatever a crashed run left: we own nothing until the role machine says so.
        await self.owner.release()
        self.rules.remove()
        host, port = self.config.listen
        self._transport = await open_endpoint(self, host, port, "distributor datagrams", broadcast=True)
        settings = self.config.settings
        log.info("failover: %s priority %d%s, heartbeats every %.2f s to %s:%d, sync to %s, peer dead after %.2f s; "
                 "starting", self.name, settings.priority, " (preempts)" if settings.preempt else "", settings.interval,
                 *self.config.destination, ", ".join(f"{peer} {address}" for peer, address in self.config.peers.items()),
                 settings.dead_seconds)

    def decide(self, decisions: list[Decision]) -> None:
        if decisions:
            self._decisions.put_nowait(decisions)

    async def _worker(self) -> None:
        while True:
            decisions = await self._decisions.get()
            try:
                await self.carry_out(decisions)
            except Exception:
                log.exception("failover: could not carry out %s", [d.describe() for d in decisions])

    async def run(self, stop: asyncio.Event) -> None:
        worker = asyncio.get_running_loop().create_task(self._worker(), name="failover-decisions")
        try:
            await self._ticks(stop)
        finally:
            while not self._decisions.empty():
                await asyncio.sleep(0.01)
            worker.cancel()
            try:
                await worker
            except asyncio.CancelledError:
                pass

    async def _ticks(self, stop: asyncio.Event) -> None:
        interval = self.config.settings.interval
        next_tick = self.clock() + interval
        next_flush = self.clock() + SYNC_FLUSH
        while not stop.is_set():
            wake = min(next_tick, next_flush)
            try:
                await asyncio.wait_for(stop.wait(), max(0.0, wake - self.clock()))
                break
            except asyncio.TimeoutError:
                pass
            now = self.clock()
            if now >= next_flush:
                next_flush = max(next_flush + SYNC_FLUSH, now)
                if self.role is Role.ACTIVE:
                    self.flush_live()
                    self._send_snapshot_chunk()
            if now >= next_tick:
                next_tick = max(next_tick + interval, now)
                if self.role is not Role.ACTIVE:
                    self.table.hold_expiry(now)
                self.decide(self.machine.tick(now))
                self._send_heartbeat()
                self._report_takeover()

    async def shutdown(self) -> None:
        """On SIGTERM (after :meth:`run` ended): resign if active, so a backup takes over at once; release the addresses.

        The daemon removes the rules afterwards, whatever the role was.
        """
        await self.carry_out(self.machine.shutdown())
        if self._second_burst is not None:
            self._second_burst.cancel()
        await self.owner.release()  # a standby never claimed them; an active resigned above: both idempotent
        if self._transport is not None:
            self._transport.close()
            self._transport = None
        self.owner.close()

    # -- decisions -------------------------------------------------------------------
    async def carry_out(self, decisions: list[Decision]) -> None:
        for decision in decisions:
            action = decision.action
            if action in (Action.PEER_LATE, Action.PEER_LOST, Action.PEER_BACK):
                (log.warning if action is Action.PEER_LOST else log.info)("failover: %s", decision.reason)
                continue
            if decision.role_change is not None and self.on_role_change is not None:
                self.on_role_change(decision.role_change[0], decision.role_change[1], decision.reason)
            if action is Action.TAKE_OVER:
                await self._take_over()
            elif action is Action.RESIGN:
                await self._resign(stopping=decision.role_change is not None and decision.role_change[1] is Role.STOPPED)
            elif action is Action.GIVE_UP:
                await self._give_up()
            elif action is Action.ANNOUNCE:
                log.warning("failover: %s; announcing our addresses again", decision.reason)
                self.owner.announce()
            elif action is Action.REQUEST_SYNC:
                self.receiver.reset()
                self._request_sync(force=True)

    async def _take_over(self) -> None:
        started = self.clock()
        self.last_takeover = Takeover(self._last_active_heartbeat, started)
        # 1. The replica is the interposer's table: from now on its idle timers run.
        self.table.hold_expiry(started)
        # 2. Rules: the queue has been bound since start; no old chains exist (removed at start and on give-up).
        self.queue.first_forward_at = None
        self.queue.await_forward = self.clock
        self.queue.hold_new = True
        self.rules.install(known_absent=True)
        # 3. Addresses, 4. announcements.
        await self.owner.claim()
        self.owner.announce()
        self.last_takeover.claimed = self.clock()
        if self.config.garp_repeat > 0:
            self._second_burst = asyncio.get_running_loop().call_later(self.config.garp_repeat, self._announce_again)
        self._send_heartbeat()
        log.warning("failover: %s took over (term %d) with %d replicated connection(s); addresses claimed %.1f ms after "
                    "the decision", self.name, self.machine.term, len(self.table),
                    (self.last_takeover.claimed - started) * 1000)

    def _announce_again(self) -> None:
        self._second_burst = None
        if self.role is Role.ACTIVE:
            self.owner.announce()

    async def _give_up(self) -> None:
        if self._second_burst is not None:
            self._second_burst.cancel()
            self._second_burst = None
        await self.owner.release()
        self.queue.hold_new = False
        self.rules.remove()
        self.queue.drain()  # packets queued before the rules went away still get their verdict
        log.warning("failover: %s gave up the addresses and stopped forwarding", self.name)

    async def _resign(self, stopping: bool) -> None:
        self.flush_live()
        for _ in range(RESIGN_COPIES):  # a lost resign would cost the backup a dead window
            self._send(Kind.RESIGN, Resign(self.machine.term, stopping).pack())
        await self._give_up()

    # -- sync ------------------------------------------------------------------------
    def _opened(self, conn) -> None:
        if self.machine.role is Role.ACTIVE:
            self.sender.opened(conn)

    def _ended(self, conn) -> None:
        if self.machine.role is Role.ACTIVE:
            self.sender.ended(conn)

    def flush_live(self) -> None:
        for payload in self.sender.live_batches():
            self._send(Kind.STATE_SYNC, payload)

    def _send_snapshot_chunk(self) -> None:
        for payload in self.sender.snapshot_batches(SNAPSHOT_CHUNK):
            self._send(Kind.STATE_SYNC, payload)

    def _request_sync(self, force: bool = False) -> None:
        now = self.clock()
        if not force and now - self._last_sync_request < self.config.settings.dead_seconds:
            return
        self._last_sync_request = now
        self._send(Kind.SYNC_REQUEST, b"")

    # -- datagrams -------------------------------------------------------------------
    def _send_heartbeat(self) -> None:
        machine = self.machine
        batch = self.sender.batch if machine.role is Role.ACTIVE else (self.receiver.applied or 0)
        beat = DistHeartbeat(int(machine.role), self.config.settings.priority, machine.term, self.config.address.packed,
                             machine.caught_up, self.config.settings.preempt, batch, len(self.table))
        self._send(Kind.DIST_HEARTBEAT, beat.pack())

    def _send(self, kind: Kind, payload: bytes) -> None:
        if self._transport is None:
            return
        datagram = seal(self.keys, kind, self.name, self.sequence.next(), self.wall_clock(), payload)
        if kind in _BROADCAST_KINDS:
            self._transport.sendto(datagram, self.config.destination)
        else:
            for destination in self._sync_destinations:
                self._transport.sendto(datagram, destination)
        self.sent[kind] += 1

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if addr[0] == self._own_address:
            return  # our own broadcast, looped back
        message, reject = self.verifier.verify(data, addr[0], self.wall_clock())
        if message is None:
            self.rejected[reject] += 1
            return
        kind = message.kind
        if kind is Kind.DIST_HEARTBEAT:
            beat = DistHeartbeat.unpack(message.payload)
            if beat is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return
            self._on_heartbeat(message.sender, beat)
        elif kind is Kind.STATE_SYNC:
            batch = SyncBatch.unpack(message.payload)
            if batch is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return
            if self.role is not Role.ACTIVE:
                if self.receiver.receive(batch, self.clock()):
                    log.warning("failover: gap in the sync stream before batch %d; asking for a snapshot", batch.batch)
                    self._request_sync()
                self._update_caught_up()
        elif kind is Kind.RESIGN:
            resign = Resign.unpack(message.payload)
            if resign is None:
                self.rejected[Reject.BAD_PAYLOAD] += 1
                return
            log.warning("failover: %s resigned (term %d%s)", message.sender, resign.term,
                        ", stopping" if resign.stopping else "")
            self.decide(self.machine.resign(message.sender, resign.term, resign.stopping))
        elif kind is Kind.SYNC_REQUEST and self.role is Role.ACTIVE:
            log.info("failover: %s asked for a snapshot of %d connection(s)", message.sender, len(self.table))
            self.sender.start_snapshot(list(self.table))

    def _on_heartbeat(self, sender: str, beat: DistHeartbeat) -> None:
        try:
            role = Role(beat.role)
        except ValueError:
            self.rejected[Reject.BAD_PAYLOAD] += 1
            return
        if role is Role.ACTIVE:
            self._last_active_heartbeat = self.clock()
            self.active_batch = beat.sync_batch
            self.active_connections = beat.connections
        self.decide(self.machine.heartbeat(sender, role, beat.priority, beat.term,
                                              int.from_bytes(beat.address, "big"), beat.caught_up, beat.preempt))
        if role is Role.ACTIVE and self.role is Role.BACKUP:
            self._update_caught_up()

    def _update_caught_up(self) -> None:
        self.machine.set_caught_up(self.role is Role.BACKUP and self.receiver.caught_up(self.active_batch))

    def _report_takeover(self) -> None:
        takeover = self.last_takeover
        if takeover is None or takeover.reported or self.queue.first_forward_at is None:
            return
        takeover.first_forward = self.queue.first_forward_at
        takeover.reported = True
        if takeover.last_heartbeat is None:
            log.info("failover: first packet forwarded %.1f ms after taking over",
                     (takeover.first_forward - takeover.started) * 1000)
            return
        log.warning("failover: takeover timeline from the last heartbeat of the old active: decided +%.1f ms, "
                    "addresses claimed +%.1f ms, first packet forwarded +%.1f ms",
                    (takeover.started - takeover.last_heartbeat) * 1000,
                    (takeover.claimed - takeover.last_heartbeat) * 1000 if takeover.claimed else float("nan"),
                    (takeover.first_forward - takeover.last_heartbeat) * 1000)

    def lag(self) -> int | None:
        return self.receiver.lag(self.active_batch) if self.role is not Role.ACTIVE else 0
