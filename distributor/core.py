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
:class:`~backup.failover.PacketsHandled`.  Observers read snapshots: :meth:`DistributorCore.stats`,
:meth:`~DistributorCore.node_view`, :meth:`~DistributorCore.service_views`,
:meth:`~DistributorCore.connections`, :meth:`~DistributorCore.explain`.

Runtime changes (:class:`~distributor.admin.AdminRequest`) are taken only by the active distributor
(or one without failover), which replicates them; a standby refuses them (409, naming the active)
and adopts the active's whole state instead, keeping it to re-send should it take over.

With ``administration`` (``[administration]``), the core also composes the content core
(:class:`~distributor.contentcore.ContentCore`): it routes the operator's content and task requests
to it (refused on a standby like any change), the brokers' answers (:class:`SyncReported`,
:class:`TaskReported`), ticks, the layout, each node's liveness (the health core's dead or not) and
whether this distributor is the active one; it applies its :class:`SetContentGate` to the balancer
(a node serves only while healthy, ready *and* its content allows) and passes :class:`SyncNode`,
:class:`RunTask`, :class:`FetchTask`, :class:`SaveAdministration` and :class:`CollectBlobs` on to
the adapters.  The desired content rides along with the runtime state to the standbys.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import json
from typing import Iterable, Mapping

from backup.failover import AdminStateReceived, DrainQueue, FailoverCore, FailoverOptions, FailoverStats, FirstForward, \
    InstallRules, PacketsHandled, PeerDatagram, RemoveRules
from backup.roles import Role
from common.sansio import Alert, Command, CommandDone, Level, Log, StopRequested, Tick, WakeUpAt
from common.wire import Keys

from .admin import AdminOp, AdminReply, AdminRequest, AdminState, LayoutView, RuntimeState, SaveState, validate
from .announce import AnnounceCore, ServingChanged
from .balancer import Policy
from .conntable import ConnectionTable, Timeouts
from .contentcore import (ActiveChanged, AdministrationOptions, BundleAdd, BundleRemove, ContentCore, ContentDelete,
                          ContentPut, ContentRefused, ContentStats, DesiredReplicated, NodeLiveness, NodesChanged,
                          SetContentGate, SyncReported, TaskReported, TaskRequested)
from .heartbeat import PASSIVE_LOG_INTERVAL, HealthSettings, HealthStats, NodeDatagram, NodeHealth, NodeState, OnDead, \
    ResetNode, SetNodeEligible, SetNodeFeedback, SetNodeRamp
from .synauth import SynAuth
from .reroute import (BackendSpec, ConnectionEnded, ConnectionOpened, ForgetHandshakes, Interposer, InterposerStats, Mode,
                      PassiveFailure, PassiveKind, Reason, ServiceSpec)

__all__ = ["HealthOptions", "DistributorCore", "DistributorStats", "ServiceView", "ConnectionView", "ConntrackAnswered",
           "SetConntrackLiberal", "HOUSEKEEPING"]

HOUSEKEEPING = 1.0  # seconds between expiry sweeps and drop reports
# The desired content goes to the standbys with the runtime state (resent every second) only up to this many
# characters of JSON (about 7,000 paths); a larger one is kept on the active alone (docs/administration.md).
MAX_REPLICATED_CONTENT = 1 << 20

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
class Reconfigure:
    """The configuration was read again (SIGHUP): its services and nodes, and the health settings.

    What only a restart can change (the mode, the queue, failover) the program refuses before it
    gets here.  Health state and open connections stay; runtime changes apply on top again.
    """

    services: tuple[ServiceSpec, ...]
    health: HealthSettings | None
    now: float
    node_addresses: Mapping[str, str] | None = None  # name -> control (IPv4) address, as DistributorCore takes it


@dataclasses.dataclass(frozen=True)
class CountHalfOpen(Command):
    """Kernel mode: count conntrack's half-open connections, not ASSURED (up to ``limit``): SYN authentication's
    trigger."""

    limit: int


@dataclasses.dataclass(frozen=True)
class HalfOpenCounted:
    count: int
    now: float


@dataclasses.dataclass(frozen=True)
class SetConntrackLiberal(Command):
    """Kernel mode: let conntrack pick up connections mid-stream without window history (after a takeover)."""


@dataclasses.dataclass(frozen=True)
class NodeAdminStats:
    node: str
    address: str
    admin: AdminState
    serving: bool  # may take new connections: healthy and ready (and in a service)
    open_connections: int
    drain_started: float | None  # monotonic
    drained_at: float | None  # monotonic: when its last connection ended


@dataclasses.dataclass(frozen=True)
class DistributorStats:
    name: str
    interposer: InterposerStats
    health: HealthStats | None
    failover: FailoverStats | None
    nodes: tuple[NodeAdminStats, ...] = ()
    state_version: int = 0
    content: ContentStats | None = None  # content management ([administration]); None when off
    announced: tuple[tuple[str, bool], ...] | None = None  # active-active: (VIP, announced) each; None when off
    announce_moves: tuple[tuple[str, str, int], ...] = ()  # active-active: (from, to, times) of the announce table

    @property
    def role(self) -> str:
        """This distributor's role as observers name it: active, backup, starting, stopped, or alone (no failover)."""
        return self.failover.role.name.lower() if self.failover is not None else "alone"


@dataclasses.dataclass(frozen=True)
class ServiceView:
    """One service as observers see it: its address, its policy now, and the nodes in its layout now."""

    name: str
    vip: str
    port: int
    policy: str
    nodes: tuple[str, ...]  # configured or added at run time, not removed


@dataclasses.dataclass(frozen=True)
class ConnectionView:
    """One connection-table entry as observers see it."""

    client: str  # "ADDRESS:PORT"
    vip: str  # "ADDRESS:PORT"
    service: str
    node: str
    state: str  # its TCP state, lower case (syn_seen, established, ...)
    idle: float  # seconds since its last packet


def event_now(event) -> float:
    return getattr(event, "now", getattr(event, "at", 0.0))


def event_wall(event) -> float | None:
    """The event's wall-clock time, for what the failover core seals; None for events that carry none."""
    return getattr(event, "wall", None)


def flow_hash_secret(keys: Keys | None) -> bytes:
    """The key of the maglev policy's flow hash: derived from the keys file every distributor of the
    cluster holds (its lowest key id), so their tables agree and an outsider cannot aim flows at one
    node by choosing source ports.  None given (no [health], no [failover]): no key (b"")."""
    if keys is None:
        return b""
    return hmac.new(keys.secrets[min(keys.secrets)], b"distributor maglev flow hash v1", hashlib.sha256).digest()


class DistributorCore:
    def __init__(self, name: str, mode: Mode, services: Iterable[ServiceSpec], capacity: int,
                 timeouts: Timeouts | None = None, health: HealthOptions | None = None, health_keys: Keys | None = None,
                 failover: FailoverOptions | None = None, failover_keys: Keys | None = None,
                 saved_state: RuntimeState | None = None, syn_auth: SynAuth | None = None,
                 administration: AdministrationOptions | None = None, saved_administration: str | None = None,
                 announce: bool = False, node_addresses: Mapping[str, str] | None = None):
        """``administration``: manage content and tasks on the nodes (the content core); ``saved_administration``:
        its state file's text (ValueError when it is not one).  ``announce``: active-active, the VIPs are
        announced to the router while they can be served (the announce core; no failover then).
        ``node_addresses``: every configured node's control-plane address (name -> its IPv4 address: heartbeats,
        broker, admin API), for a node that serves only IPv6 services (else taken from the services)."""
        self.name = name
        self.mode = mode
        self.base_services = tuple(services)  # the configuration; runtime changes are a difference to it
        self.interposer = Interposer(self.base_services, ConnectionTable(capacity, timeouts), mode, syn_auth,
                                     flow_hash_secret(failover_keys or health_keys))
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
        self.announce: AnnounceCore | None = None
        if announce:
            if failover is not None:
                raise ValueError("an active-active distributor announces its VIPs; it has no failover")
            self.announce = AnnounceCore(dict.fromkeys(str(s.vip) for s in self.base_services))
        self._rules_ok = False  # the data path's rules are in: an InstallRules succeeded since start or RemoveRules
        self._next_housekeeping: float | None = None
        self._reported = list(self.interposer.counts)
        self._control_addresses = dict(node_addresses or {})
        self.base_nodes = _node_addresses(self.base_services, self._control_addresses)
        self.runtime = RuntimeState()
        self._healthy: dict[str, bool] = {}  # the health core's gate per node (True until it says otherwise)
        self._drains: dict[str, tuple[float, float | None]] = {}  # node -> (started, drained at)
        self._rules_installed = False
        self._open_floor = 0  # kernel mode: the fewest open connections since conntrack was last asked
        self._counted_at = -1.0
        # Nodes added to a running layout whose rules are not in the kernel yet: kept out of new
        # connections until the InstallRules naming them is done, or their first SYNs would meet no
        # per-node rule (kernel mode: no DNAT for the mark, the gateway itself answers with an RST;
        # rewrite mode: the node's SYN-ACK leaves un-rewritten).
        self._awaiting_rules: set[str] = set()
        self._passive_logged: dict[str, float] = {}  # node -> when its failures were last logged (no [health])
        self.content: ContentCore | None = None
        if administration is not None:
            self.content = (ContentCore.restore(saved_administration, administration) if saved_administration
                            else ContentCore(administration))
            self.content.handle(NodesChanged(self.nodes(), 0.0))  # inactive until start: nothing to carry out
        self._content_allowed: dict[str, bool] = {}  # the content gate per node (True until it says otherwise)
        if saved_state is not None:
            self._adopt(saved_state, 0.0)

    # -- life cycle ------------------------------------------------------------------------------------
    def start(self, now: float, wall: float) -> list[Command]:
        self._next_housekeeping = now + HOUSEKEEPING
        for node in list(self._drains):
            self._drains[node] = (now, None)  # a drain kept in the state file goes on from now
        commands: list[Command] = []
        if self.announce is not None:
            commands += self.announce.start()
        if self.mode is Mode.KERNEL:
            commands.append(SetConntrackLiberal())
        if self.health is not None:
            commands += self.health.start(now, wall)
        else:
            commands.append(Log(Level.WARNING, "health checking is off (no [health] section): every node is always "
                                               "a candidate"))
        if self.failover is not None:
            commands += self._route(self.failover.start(now, wall), now)
        else:
            self._rules_installed = True  # so that a node added later gets its rules too
            commands.append(InstallRules(self.interposer.rule_layout()))  # serving alone: the addresses are the host's
        commands += self._content_role(now)
        return self._finish(commands)

    def handle(self, event) -> list[Command]:
        if isinstance(event, PacketsHandled):
            commands = self._route(event.effects, event.now) + self._burst_check(event.now)
            if self.failover is not None:
                commands += self._route(self.failover.handle(event))
            # A batch of packets changes no node's eligibility in dsr mode (it has no passive health),
            # so whether a VIP can be served is not asked after every drain of the queue.
            return self._finish(commands, announcements=False)
        if isinstance(event, Tick):
            commands = self._housekeeping(event.now) if self._due(event.now) else []
            if self.health is not None:
                commands += self._route(self.health.handle(event), event.now)
            if self.failover is not None:
                commands += self._route(self.failover.handle(event), event.now, event.wall)
            if self.content is not None:
                commands += self._content_role(event.now) + self._content(event)
            return self._finish(commands)
        if isinstance(event, NodeDatagram):
            commands = self._route(self.health.handle(event), event.now) if self.health is not None else []
            return self._finish(commands)
        if isinstance(event, AdminRequest):
            return self._finish(self._admin(event))
        if isinstance(event, (ContentPut, ContentDelete, TaskRequested, BundleAdd, BundleRemove)):
            return self._finish(self._content_request(event))
        if isinstance(event, (SyncReported, TaskReported, ContentRefused)):
            if self.content is None:
                raise TypeError(f"{type(event).__name__}: content management is off (no [administration])")
            return self._finish(self._content(event))
        if isinstance(event, Reconfigure):
            return self._finish(self._reconfigure(event))
        if isinstance(event, HalfOpenCounted):
            self.interposer.half_open_hint = event.count
            auth = self.interposer.syn_auth
            commands: list[Command] = []
            if auth is not None and not auth.active and event.count > auth.threshold:
                auth.admits(b"", event.count, event.now)
                commands.append(Alert(self.name, "normal", "syn_authentication", f"{event.count}+ half-open "
                                      "connections (a SYN flood?): new clients must answer a cookie first",
                                      Level.WARNING))
            return self._finish(commands)
        if isinstance(event, ConntrackAnswered):
            return self._finish(self._route(self.interposer.confirmed(event.alive, event.gone, event.now)))
        if isinstance(event, StopRequested):
            commands = self._route(self.failover.handle(event), event.now) if self.failover is not None else []
            if self.announce is not None:
                commands += self.announce.handle(event)  # the router stops sending before the rules go
            # Whatever the role was, the rules go, and what was queued before they went gets its verdict.
            return commands + [RemoveRules(), DrainQueue()]
        if isinstance(event, (PeerDatagram, CommandDone, FirstForward)):
            commands: list[Command] = []
            if isinstance(event, CommandDone):
                if isinstance(event.command, InstallRules):
                    # A later install that fails (a node added at run time whose route the kernel
                    # refuses) leaves the rules in place; the new node waits (_rules_done).
                    self._rules_ok = self._rules_ok or event.error is None
                elif isinstance(event.command, RemoveRules):
                    self._rules_ok = False
                commands = self._rules_done(event)
            if self.failover is not None:
                commands += self._route(self.failover.handle(event), event_now(event), event_wall(event))
                commands += self._content_role(event_now(event))
            return self._finish(commands)
        raise TypeError(f"the distributor core takes no {type(event).__name__} event")

    @property
    def next_wakeup(self) -> float | None:
        deadlines = [self._next_housekeeping]
        if self.health is not None:
            deadlines.append(self.health.next_wakeup)
        if self.failover is not None:
            deadlines.append(self.failover.next_wakeup)
        if self.content is not None:
            deadlines.append(self.content.next_wakeup)
        found = [d for d in deadlines if d is not None]
        return min(found) if found else None

    # -- routing ---------------------------------------------------------------------------------------
    def _route(self, items: Iterable, now: float = 0.0, wall: float | None = None) -> list[Command]:
        """Apply what addresses the interposer or replication; pass the rest on.

        ``wall``: the wall-clock time of the event the items answer (what the failover core seals
        carries it); needed for AdminStateReceived, which only a PeerDatagram produces.
        """
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
            elif isinstance(item, PassiveFailure):
                out += self._passive(item, now)
            elif isinstance(item, SetNodeEligible):
                self._healthy[item.node] = item.eligible
                out += self._gate(item.node)
                if self.content is not None and self.health is not None and item.node in self.health.board:
                    # The content core syncs a node whose heartbeats return after it was dead.
                    alive = self.health.board.state(item.node) is not NodeState.DEAD
                    out += self._content(NodeLiveness(item.node, alive, now))
            elif isinstance(item, SetNodeRamp):
                interposer.set_node_ramp(item.node, item.factor)
            elif isinstance(item, SetNodeFeedback):
                interposer.set_node_feedback(item.node, item.factor)
            elif isinstance(item, ResetNode):
                effects = interposer.reset_node(item.node, now)
                ended = sum(isinstance(e, ConnectionEnded) for e in effects)
                if self.health is not None:
                    self.health.count_reset(ended)
                out.append(Log(Level.WARNING, f"node {item.node} is dead: reset {ended} open connection(s)"))
                out += self._route(effects, now)
            elif isinstance(item, InstallRules):
                self._rules_installed = True
                out.append(InstallRules(interposer.rule_layout()))  # the live layout, nodes added at run time too
            elif isinstance(item, RemoveRules):
                self._rules_installed = False
                out.append(item)
            elif isinstance(item, AdminStateReceived):
                assert wall is not None, "AdminStateReceived answers a PeerDatagram, which has a wall time"
                out += self._adopt_replicated(item, now, wall)
            elif isinstance(item, WakeUpAt):
                continue  # one WakeUpAt for the whole core, added by _finish
            else:
                out.append(item)
        return out

    def _passive(self, failure: PassiveFailure, now: float) -> list[Command]:
        """A node failed a connection on the data path: the health core decides about the node."""
        what = ("reset a client's SYN" if failure.kind is PassiveKind.REFUSED
                else "left a client's SYN unanswered until it was retransmitted")
        moved = "the connection went to another node" if failure.redispatched else "the connection stayed"
        if self.health is None:
            # No health core to exclude it: say so, once a node every PASSIVE_LOG_INTERVAL seconds.
            if now - self._passive_logged.get(failure.node, float("-inf")) < PASSIVE_LOG_INTERVAL:
                return []
            self._passive_logged[failure.node] = now
            return [Log(Level.WARNING, f"{failure.node} {what} ({moved}; no [health]: the node stays a candidate)")]
        # Exclude it only if every service it serves keeps another node that may take new
        # connections (healthy, ready, in the layout): passive health never empties a service.
        services = [s for s in self.interposer.services
                    if any(b.name == failure.node and not b.removed for b in s.backends)]
        spare = bool(services) and all(any(self._serving(b.name) for b in s.backends
                                           if b.name != failure.node and not b.removed) for s in services)
        return self._route(self.health.passive_failure(failure.node, f"{what}; {moved}", now, spare, failure.since), now)

    def _finish(self, commands: list[Command], announcements: bool = True) -> list[Command]:
        commands = [c for c in commands if not isinstance(c, WakeUpAt)]
        if self.announce is not None and announcements:
            commands += self._announcements()
        wake = self.next_wakeup
        if wake is not None:
            commands.append(WakeUpAt(wake))
        return commands

    def _announcements(self) -> list[Command]:
        """Active-active: tell the announce core which VIPs can be served now (it acts on changes only)."""
        assert self.announce is not None
        serving: dict[str, str] = {}  # VIP -> why it cannot be served ("" when it can)
        # A node counts once its agent was heard: the health core keeps an unheard node in service (a
        # restarted distributor must not drop the traffic it has), but a distributor that joins the
        # router's paths must not draw flows before it knows that any node answers them.
        board = self.health.board if self.health is not None else None
        for service in self.interposer.services:
            vip = str(service.vip)
            if serving.get(vip) == "":
                continue
            balancer = service.balancer
            if not self._rules_ok:
                serving[vip] = "the data path's rules are not installed"
            elif any(balancer.eligible(b.index) and (board is None or b.name not in board or board.heartbeats(b.name) > 0)
                     for b in service.backends if not b.removed):
                serving[vip] = ""
            else:
                serving[vip] = "no node of its services may take a new connection"
        commands: list[Command] = []
        for vip, why in serving.items():
            if self.announce.announced(vip) != (why == ""):
                commands += self.announce.handle(ServingChanged(vip, why == "", why))
        return commands

    # -- housekeeping ------------------------------------------------------------------------------------
    def _due(self, now: float) -> bool:
        return self._next_housekeeping is None or now >= self._next_housekeeping

    def _housekeeping(self, now: float) -> list[Command]:
        self._next_housekeeping = max((self._next_housekeeping or now) + HOUSEKEEPING, now)
        commands = self._route(self.interposer.expire(now), now)
        return commands + self._check_drains(now) + self._syn_flood(now) + self._drop_report()

    def _burst_check(self, now: float) -> list[Command]:
        """Kernel mode: when the open connections grew by more than the threshold since their low point, count
        conntrack's half-open ones again (at most every 50 ms), so a flood switches authentication on in tens
        of milliseconds.

        Growth, not new connections: counting walks conntrack's whole table in the kernel (its filter
        is applied entry by entry), and at thousands of short connections a second, with as many
        TIME_WAIT entries, a walk every 50 ms cost more than the connections themselves (measured:
        new connections fell from 0.60x to 0.23x of kernel DNAT).  Short connections end as they
        come and do not grow the count; a spoofed flood's entries never end, and do.
        """
        auth = self.interposer.syn_auth
        if auth is None or auth.active or self.mode is not Mode.KERNEL or now - self._counted_at < 0.05:
            return []
        open_now = sum(s.balancer.outstanding(i) for s in self.interposer.services for i in range(len(s.balancer)))
        self._open_floor = min(self._open_floor, open_now)
        if open_now - self._open_floor <= auth.threshold:
            return []
        self._open_floor = open_now  # a burst of real connections is counted once, not every 50 ms
        self._counted_at = now
        return [CountHalfOpen(auth.threshold + 1)]

    def _syn_flood(self, now: float) -> list[Command]:
        auth = self.interposer.syn_auth
        if auth is None:
            return []
        commands: list[Command] = []
        kernel = self.mode is Mode.KERNEL
        half_open = self.interposer.half_open_hint if kernel else self.interposer.table.half_open()
        was_active = auth.active or kernel  # kernel mode alerts when the count arrives (HalfOpenCounted)
        if auth.settle(half_open, now) is False:
            commands.append(Alert(self.name, "syn_authentication", "off", f"{half_open} half-open connection(s): "
                                  "calm again", Level.INFO))
        elif auth.active and not was_active:
            commands.append(Alert(self.name, "normal", "syn_authentication", f"{half_open} half-open connections "
                                  "(a SYN flood?): new clients must answer a cookie first", Level.WARNING))
        if kernel and auth.active:
            # While active, count each second to learn when the flood is over; otherwise growth
            # decides when to count (_burst_check).
            commands.append(CountHalfOpen(auth.threshold + 1))
        return commands

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

    # -- runtime administration ---------------------------------------------------------------------------
    def _serving(self, node: str) -> bool:
        return (self._healthy.get(node, True) and self.runtime.admin_state(node) is AdminState.READY
                and node in self.nodes() and node not in self._awaiting_rules and self._content_allowed.get(node, True))

    # -- content and tasks on the nodes (the content core) ------------------------------------------------
    def _content(self, event) -> list[Command]:
        """Hand an event to the content core; apply its gate here, pass the rest on."""
        assert self.content is not None
        out: list[Command] = []
        for command in self.content.handle(event):
            if isinstance(command, SetContentGate):
                self._content_allowed[command.node] = command.allowed
                out += self._gate(command.node)
            elif not isinstance(command, WakeUpAt):  # one WakeUpAt for the whole core, added by _finish
                out.append(command)
        return out

    def _content_role(self, now: float) -> list[Command]:
        """Only the active distributor (or one alone) syncs nodes, sends tasks and gates on content."""
        if self.content is None:
            return []
        active = self.failover is None or self.failover.role is Role.ACTIVE
        return self._content(ActiveChanged(active, now)) if active != self.content.active else []

    def _content_request(self, event: ContentPut | ContentDelete | TaskRequested | BundleAdd | BundleRemove) -> list[Command]:
        if self.content is None:
            return [AdminReply(event.request_id, 404, {"error": "content and task management is off: the distributor's "
                                                                "config has no [administration] section"})]
        refusal = self._admin_refusal()
        if refusal is not None:
            return [AdminReply(event.request_id, 409, refusal),
                    Log(Level.WARNING, f"refused a {type(event).__name__} by {event.who}: {refusal['error']}")]
        version = self.content.change_count  # the content's or the bundles' version
        commands = self._content(event)
        if self.content.change_count != version:
            commands += self._publish_admin(event.wall)
        return commands

    def change_refusal(self) -> dict | None:
        """Why this distributor takes no change now (the body of a 409), or None: the API asks before a long upload."""
        return self._admin_refusal()

    def _rules_done(self, event: CommandDone) -> list[Command]:
        """Rules installed: the nodes they name may take new connections now."""
        if not isinstance(event.command, InstallRules) or not self._awaiting_rules:
            return []
        if event.error is not None:
            return [Log(Level.ERROR, f"the rules for {', '.join(sorted(self._awaiting_rules))} failed to install "
                                     f"({event.error}): kept out of new connections until rules install")]
        installed = {(b.address, b.port) for service in event.command.layout for b in service.backends}
        commands: list[Command] = []
        for node in sorted(self._awaiting_rules):
            if set(self.interposer.endpoints_of(node)) <= installed:
                self._awaiting_rules.discard(node)
                commands += self._gate(node)
        return commands

    def _gate(self, node: str) -> list[Command]:
        """Apply a node's gate (healthy and ready) to every service that has it."""
        serving = self._serving(node)
        self.interposer.set_node_available(node, serving)
        if not serving and self.mode is Mode.KERNEL:
            # Handshakes in flight to it would follow conntrack to it at the client's next SYN.
            endpoints = tuple(self.interposer.endpoints_of(node))
            if endpoints:
                return [ForgetHandshakes(endpoints)]
        return []

    def nodes(self) -> dict[str, str]:
        """Every node now: the configured ones, less those removed, plus those added (name -> address)."""
        nodes = {n: a for n, a in self.base_nodes.items() if n not in self.runtime.removed}
        nodes.update({n: added.address for n, added in self.runtime.added.items()})
        return nodes

    def layout_view(self) -> LayoutView:
        services = {s.name: {b.name for b in s.backends if not b.removed} for s in self.interposer.services}
        endpoints = {(str(b.address), b.port): s.name for s in self.interposer.services for b in s.backends
                     if not b.removed}
        # dsr mode's table is a cache: a flow it does not know goes where the flow hash says, so maglev stays.
        policies = {Policy.MAGLEV.value} if self.mode is Mode.DSR else {p.value for p in Policy}
        return LayoutView(self.nodes(), services, policies, endpoints,
                          {str(s.vip) for s in self.interposer.services},
                          {s.name for s in self.interposer.services if s.vip.version == 6})

    def _admin(self, request: AdminRequest) -> list[Command]:
        refusal = self._admin_refusal()
        if refusal is not None:
            return [AdminReply(request.request_id, 409, refusal),
                    Log(Level.WARNING, f"refused {request.op.value} by {request.who}: {refusal['error']}")]
        args = dict(request.args)
        if request.op is AdminOp.SET_WEIGHT and args.get("service") is None and isinstance(args.get("node"), str):
            args["services"] = [s.name for s in self.interposer.services
                                if (b := s.find(args["node"])) is not None and not b.removed]
        elif request.op is AdminOp.SET_WEIGHT:
            args["services"] = [args.get("service")]
        request = dataclasses.replace(request, args=args)
        problem = validate(request, self.layout_view())
        if problem is not None:
            status, message = problem
            return [AdminReply(request.request_id, status, {"error": message}),
                    Log(Level.WARNING, f"refused {request.op.value} by {request.who}: {message}")]
        before = {node: self.runtime.admin_state(node) for node in self.nodes()}
        if not self.runtime.apply(request):
            # A repeat (a drain of a draining node): answered like the first, and nothing is saved,
            # replicated or logged as a change.
            body = {"ok": True, "version": self.runtime.version, "unchanged": True}
            node = request.args.get("node")
            if isinstance(node, str):
                body["node"] = self.node_view(node, request.now)
            return [AdminReply(request.request_id, 200, body)]
        commands = self._apply_runtime(request.now, before)
        description = ", ".join(f"{k}={v}" for k, v in sorted(request.args.items()))
        commands.append(Log(Level.INFO, f"{request.op.value} ({description}) by {request.who}; runtime state "
                                        f"version {self.runtime.version}"))
        text = self.runtime.to_json()
        commands.append(SaveState(text))
        commands += self._publish_admin(request.wall)
        body = {"ok": True, "version": self.runtime.version}
        node = request.args.get("node")
        if isinstance(node, str):
            body["node"] = self.node_view(node, request.now)
        return [AdminReply(request.request_id, 200, body), *commands]

    def _admin_refusal(self) -> dict | None:
        """Why this distributor may not take a runtime change now (a reply body), or None.

        Only the active one takes changes: it alone replicates them, and a standby adopts the active's
        whole state at the active's next change, so a change made on a standby would be lost without
        a word.  A distributor without failover has no peer to defer to and always takes them.
        """
        failover = self.failover
        if failover is None or failover.role is Role.ACTIVE:
            return None
        being = {Role.BACKUP: "the backup", Role.STARTING: "starting", Role.STOPPED: "stopping"}[failover.role]
        active = failover.active_peer()
        if active is None:
            message = (f"{self.name} is {being} and no active distributor is known now; make changes on the active "
                       "one once it is elected")
        else:
            message = f"{self.name} is {being}; make changes on the active ({active})"
        return {"error": message, "active": active}

    def _reconfigure(self, event: Reconfigure) -> list[Command]:
        before = {node: self.runtime.admin_state(node) for node in self.nodes()}
        known = {s.name for s in self.interposer.services}
        new = [s.name for s in event.services if s.name not in known]
        if new:
            return [Log(Level.ERROR, f"reload: new services ({', '.join(new)}) need a restart; keeping the running "
                                     "configuration")]
        self.base_services = event.services
        if event.node_addresses is not None:
            self._control_addresses = dict(event.node_addresses)
        self.base_nodes = _node_addresses(self.base_services, self._control_addresses)
        for spec in event.services:  # a port change moves the node: out at the old port, in at the new one
            service = self.interposer.service(spec.name)
            for wanted in spec.backends:
                current = service.find(wanted.name)
                if current is not None and not current.removed and (current.address, current.port) != (wanted.address,
                                                                                                      wanted.port):
                    self.interposer.remove_backend(spec.name, wanted.name)
        if event.health is not None and self.health is not None:
            self.health.reconfigure(event.health)
        commands = self._apply_runtime(event.now, before)
        return commands + [Log(Level.INFO, f"reloaded: {sum(len(s.backends) for s in event.services)} backend(s) in "
                                           f"{len(event.services)} service(s); runtime state version "
                                           f"{self.runtime.version} applied on top")]

    def _adopt_replicated(self, received: AdminStateReceived, now: float, wall: float) -> list[Command]:
        """A standby assembled the active's runtime state: apply it, save it, and keep it to publish.

        Kept for publishing because this standby may be the next active: the failover core then sends
        it every second, so a peer that restarts empty after a takeover still learns the changes made
        on the old active.  While this distributor is a standby, publishing only stores it.
        """
        assert self.failover is not None, "only the failover core delivers the active's state"
        try:
            state = RuntimeState.from_json(received.text)
        except ValueError as exc:
            return [Log(Level.ERROR, f"the active's runtime state is unreadable: {exc}")]
        commands = self._adopt(state, now)
        if self.content is not None:
            commands += self._adopt_replicated_content(received.text, now)
        commands.append(SaveState(self.runtime.to_json()))
        return commands + self._publish_admin(wall)

    # -- what the active replicates to the standbys ----------------------------------------------------------
    def _publish_admin(self, wall: float) -> list[Command]:
        """Hand the failover core what the standbys adopt: the runtime state and, with [administration], the
        desired content (its paths, sizes and digests, not the bytes), so a takeover does not find every node
        "ahead" of an empty desired state.  The replicated version grows with either."""
        if self.failover is None:
            return []
        version, text = self.runtime.version, self.runtime.to_json()
        if self.content is not None:
            desired = self.content.replicated()  # with the desired bundles, once any
            content_text = json.dumps(desired, sort_keys=True)
            if len(content_text) <= MAX_REPLICATED_CONTENT:
                data = json.loads(text)
                data["content"] = desired
                text = json.dumps(data, sort_keys=True)
                version = (self.runtime.version << 32) | (self.content.change_count & 0xFFFF_FFFF)
        return self.failover.publish_admin(version, text, wall)

    def _adopt_replicated_content(self, text: str, now: float) -> list[Command]:
        try:
            desired = json.loads(text).get("content")
        except (ValueError, AttributeError):
            return []
        if desired is None:
            return []
        return self._content(DesiredReplicated(desired, now))

    def _adopt(self, state: RuntimeState, now: float) -> list[Command]:
        """Take a whole runtime state (the state file at start; the active's on a standby)."""
        before = {node: self.runtime.admin_state(node) for node in self.nodes()}
        self.runtime = state
        return self._apply_runtime(now, before)

    def _apply_runtime(self, now: float, before: dict[str, AdminState]) -> list[Command]:
        """Make the interposer and the health core match the configuration plus the runtime state."""
        interposer = self.interposer
        commands: list[Command] = []
        wanted: dict[str, dict[str, tuple[str, int, int]]] = {}  # service -> node -> (address, port, weight)
        for spec in self.base_services:
            wanted[spec.name] = {b.name: (str(b.address), b.port, b.weight) for b in spec.backends
                                 if b.name not in self.runtime.removed}
        for node, added in self.runtime.added.items():
            for service, (port, weight) in added.services.items():
                if service in wanted:
                    wanted[service][node] = (added.address, port, weight)
        layout_changed = False
        added_now: set[str] = set()
        for service in interposer.services:
            targets = wanted.get(service.name, {})
            for backend in list(service.backends):
                if backend.name not in targets and not backend.removed:
                    interposer.remove_backend(service.name, backend.name)
                    layout_changed = True
            for node, (address, port, weight) in targets.items():
                weight = self.runtime.weights.get(node, {}).get(service.name, weight)
                current = service.find(node)
                if current is None or current.removed:
                    try:
                        interposer.add_backend(service.name, BackendSpec(node, ipaddress.ip_address(address), port,
                                                                         weight))
                    except ValueError as exc:
                        commands.append(Log(Level.ERROR, f"cannot put {node} in {service.name}: {exc}"))
                        continue
                    layout_changed = True
                    added_now.add(node)
                elif service.balancer.weight(current.index) != weight:
                    service.balancer.set_weight(current.index, weight)
            policy = Policy.parse(self.runtime.policies.get(service.name, self._base_policy(service.name)))
            service.set_policy(policy)
        if self._rules_installed:
            self._awaiting_rules |= added_now  # released by _rules_done when the InstallRules below is done
        nodes = self.nodes()
        self._awaiting_rules &= set(nodes)
        if self.content is not None:
            commands += self._content(NodesChanged(nodes, now))
            self._content_allowed = {n: a for n, a in self._content_allowed.items() if n in nodes}
        if self.health is not None:
            for node, address in nodes.items():
                if node not in self.health.board:
                    commands += self._route(self.health.add_node(node, address), now)
            for node in list(self.health.board.nodes):
                if node not in nodes:
                    self.health.remove_node(node)
                    self._healthy.pop(node, None)
        for node in nodes:
            commands += self._gate(node)
            old, new = before.get(node, AdminState.READY), self.runtime.admin_state(node)
            if old is not new:
                commands.append(Alert(node, old.value, new.value, "set by an operator", Level.INFO))
                if new is AdminState.DRAIN:
                    self._drains[node] = (now, None)
                else:
                    self._drains.pop(node, None)
                if new is AdminState.MAINT:
                    effects = interposer.reset_node(node, now)
                    ended = sum(isinstance(e, ConnectionEnded) for e in effects)
                    commands.append(Log(Level.WARNING, f"{node} is in maintenance: reset {ended} open connection(s)"))
                    commands += self._route(effects, now)
        commands += self._check_drains(now)
        if layout_changed and self._rules_installed:
            commands.append(InstallRules(interposer.rule_layout()))
        return commands

    def _base_policy(self, service: str) -> str:
        for spec in self.base_services:
            if spec.name == service:
                return spec.policy.value
        return Policy.ROUND_ROBIN.value

    def _open_on(self, node: str) -> int:
        return sum(s.balancer.outstanding(b.index) for s in self.interposer.services for b in s.backends
                   if b.name == node)

    def _check_drains(self, now: float) -> list[Command]:
        commands: list[Command] = []
        for node, (started, drained) in list(self._drains.items()):
            if drained is None and self._open_on(node) == 0:
                self._drains[node] = (started, now)
                commands.append(Alert(node, "drain", "drained", f"its last connection ended {now - started:.1f} s "
                                                                 "after the drain began", Level.INFO))
        return commands

    def node_view(self, node: str, now: float) -> dict:
        """One node as the control API shows it (a JSON-able dict)."""
        health = self.health.board if self.health is not None else None
        admin = self.runtime.admin_state(node)
        state = admin.value if admin is not AdminState.READY else (
            ("flapping" if health.damped(node) else health.state(node).value) if health is not None and node in health
            else "up")
        services = []
        for service in self.interposer.services:
            backend = service.find(node)
            if backend is None or backend.removed:
                continue
            balancer = service.balancer
            services.append({"service": service.name, "port": backend.port, "weight": balancer.weight(backend.index),
                             "effective_weight": round(balancer.effective_weight(backend.index), 3),
                             "feedback": balancer.feedback(backend.index),
                             "connections": balancer.outstanding(backend.index),
                             "connections_total": balancer.acquired[backend.index]})
        started, drained = self._drains.get(node, (None, None))
        view = {"name": node, "address": self.nodes().get(node), "state": state, "admin": admin.value,
                "serving": self._serving(node), "connections": self._open_on(node), "services": services,
                "weight": services[0]["weight"] if services else 0,
                "drain": None if started is None else {"started_ago": round(now - started, 3),
                                                       "drained": drained is not None,
                                                       "drained_after": None if drained is None
                                                       else round(drained - started, 3)}}
        if self.content is not None:
            view["content"] = self.content.node_summary(node)
        if health is not None and node in health:
            view["heartbeat_counter"] = health.counter(node)
            last = health.last_heartbeat(node)
            view["seconds_since_heartbeat"] = None if last is None else round(now - last, 3)
        return view

    def explain(self, client: str, port: int, service_name: str | None = None, now: float = 0.0) -> dict:
        """Which node a new connection from ``client:port`` would reach, and why (for the control API)."""
        address = ipaddress.ip_address(client)
        services = [s for s in self.interposer.services if service_name in (None, s.name)]
        if not services:
            raise KeyError(f"no service {service_name!r}; services: "
                           f"{', '.join(s.name for s in self.interposer.services)}")
        services = [s for s in services if s.vip.version == address.version]
        if not services:
            raise KeyError(f"no IPv{address.version} service{'' if service_name is None else ' ' + repr(service_name)} "
                           f"for client {client}; services: "
                           f"{', '.join(f'{s.name} ({s.vip})' for s in self.interposer.services)}")
        answers = []
        client_bytes = address.packed
        for service in services:
            balancer = service.balancer
            excluded = []
            candidates = []
            for backend in service.backends:
                if backend.removed:
                    continue
                reason = self._exclusion(service, backend)
                (excluded.append({"node": backend.name, "reason": reason}) if reason else candidates.append(backend.name))
            key = client_bytes + service.vip_bytes + port.to_bytes(2, "big") + service.port_bytes
            pick = balancer.peek(key)
            why = self._why(balancer, service, pick)
            sticky = self.interposer.sticky_node(service, client_bytes, now)
            if sticky is not None:
                pick = sticky.index
                why = f"{sticky.name}: the node of this client's last connection (persistence {service.persistence:g} s)"
            conn = self.interposer.table.get(key)
            existing = None
            if conn is not None and conn.key == key:
                existing = {"node": conn.backend.name, "state": conn.state.name.lower(), "open": conn.is_open}
            answers.append({"service": service.name, "vip": f"{service.vip}:{service.port}",
                            "policy": balancer.policy.value, "candidates": candidates, "excluded": excluded,
                            "next": service.backends[pick].name if pick is not None else None,
                            "why": why, "existing": existing})
        return {"client": _endpoint(client_bytes, port.to_bytes(2, "big")), "services": answers}

    def _exclusion(self, service, backend) -> str | None:
        node = backend.name
        admin = self.runtime.admin_state(node)
        if admin is not AdminState.READY:
            return f"admin state {admin.value}"
        if node in self._awaiting_rules:
            return "just added: waiting for its rules to be installed"
        if self.health is not None and node in self.health.board:
            board = self.health.board
            if board.damped(node):
                return "held out for flapping"
            if not board.eligible(node):
                return f"health {board.state(node).value} (heartbeat counter {board.counter(node)})"
        if self.content is not None and not self._content_allowed.get(node, True):
            return self.content.exclusion(node) or "content differs"
        if service.balancer.weight(backend.index) == 0:
            return "weight 0"
        return None

    @staticmethod
    def _why(balancer, service, pick) -> str:
        if pick is None:
            return "no node may take a new connection"
        policy = balancer.policy
        name = service.backends[pick].name
        if policy is Policy.FEEDBACK:
            return (f"{name} has the fewest open connections for its weight scaled by its reports "
                    f"({balancer.outstanding(pick)} open, factor {balancer.feedback(pick):.2f})")
        if policy in (Policy.LEAST_OUTSTANDING, Policy.WEIGHTED_LEAST_OUTSTANDING):
            return f"{name} has the fewest open connections for its weight ({balancer.outstanding(pick)} open)"
        if policy is Policy.MAGLEV:
            return f"{name} owns this connection's slot in the Maglev table (a hash of its address and port)"
        return f"{name} is next in the {policy.value} order"

    # -- observers -----------------------------------------------------------------------------------------
    def service_views(self) -> tuple[ServiceView, ...]:
        """Every service, in configuration order (a snapshot: nothing in it changes afterwards)."""
        return tuple(ServiceView(s.name, str(s.vip), s.port, s.policy.value,
                                 tuple(b.name for b in s.backends if not b.removed))
                     for s in self.interposer.services)

    def connections(self, now: float, node: str | None = None, limit: int = 100) -> tuple[ConnectionView, ...]:
        """Up to ``limit`` entries of the connection table (only ``node``'s when given), in table order."""
        if limit <= 0:
            return ()
        views: list[ConnectionView] = []
        for conn in self.interposer.table:
            if node is not None and conn.backend.name != node:
                continue
            key = conn.key
            size = (len(key) - 4) >> 1
            views.append(ConnectionView(_endpoint(key[:size], key[-4:-2]), _endpoint(key[size:2 * size], key[-2:]),
                                        conn.service.name, conn.backend.name, conn.state.name.lower(),
                                        now - conn.last_seen))
            if len(views) >= limit:
                break
        return tuple(views)

    def stats(self, now: float) -> DistributorStats:
        nodes = tuple(NodeAdminStats(node, address, self.runtime.admin_state(node), self._serving(node),
                                     self._open_on(node), self._drains.get(node, (None, None))[0],
                                     self._drains.get(node, (None, None))[1])
                      for node, address in self.nodes().items())
        return DistributorStats(self.name, self.interposer.stats(),
                                self.health.stats(now) if self.health is not None else None,
                                self.failover.stats() if self.failover is not None else None,
                                nodes, self.runtime.version, self.content.stats() if self.content is not None else None,
                                tuple((vip, self.announce.announced(vip)) for vip in self.announce.states)
                                if self.announce is not None else None,
                                tuple((old.value, new.value, n) for (old, new), n in self.announce.counts.items())
                                if self.announce is not None else ())


def _endpoint(address: bytes, port: bytes) -> str:
    """``198.51.100.7:80`` or ``[2001:db8::7]:80`` (RFC 3986's form for an IPv6 address with a port)."""
    text = str(ipaddress.ip_address(address))
    return f"{text if len(address) == 4 else f'[{text}]'}:{int.from_bytes(port, 'big')}"


def _node_addresses(services: Iterable[ServiceSpec], control: Mapping[str, str]) -> dict[str, str]:
    """Each node of the services as the control plane knows it (name -> address): its IPv4 address, which
    its heartbeats, its broker and the admin API use (control traffic is IPv4): from ``control``, else
    from an IPv4 service it serves; a node in IPv6 services only, and not in ``control``, by its IPv6 one."""
    found: dict[str, str] = {}
    for spec in services:
        for backend in spec.backends:
            if backend.name in control:
                found[backend.name] = control[backend.name]
            elif backend.address.version == 4 or backend.name not in found:
                found[backend.name] = str(backend.address)
    return found
