"""Prometheus metrics: an observer that reads snapshots at scrape time (adapter).

Contract
--------
:class:`DistributorCollector` costs nothing on the packet path: when Prometheus scrapes, it reads
``core.stats(now)`` (frozen dataclasses) and the adapters' own counters (the queue, the alerts, the
runtime, the rules' kernel counters) and turns them into metric families.
:func:`start_metrics_server` serves ``/metrics`` from the daemon's own asyncio loop (aiohttp), so
no extra thread touches the core, with prometheus_client's process, platform and GC collectors
beside it.  docs/metrics.md lists every family; ``promtool check metrics`` passes on the output
(tests/unit/test_metrics.py).

Naming follows what operators know from HAProxy's exporter and node_exporter's IPVS collector:
counters end in ``_total``, values are in base units (seconds, bytes), and a state is a label set
with one series per possible state, always all present (``distributor_node_state{state=...}``,
``distributor_failover_role{role=...}``, ``distributor_failover_peer_role{peer,role}``), so a
change of state changes values, never the set of series.  Counters whose labels come from a fixed
table (transitions, reasons) are exported for every label value from the start, at 0, because
``increase()`` cannot see a series' first increment.

Bytes per backend: client -> node is counted by the interposer as it rewrites (rewrite mode); node
-> client never reaches user space (the nft return path rewrites it), so its rules' counters are
read at scrape time (:meth:`~distributor.rules.Rules.return_path_bytes`) and kept monotonic across
reinstalls (:class:`KernelCounters`).  Kernel mode sees neither: both families are left out.

Takeover durations are a histogram by phase, observed from the core's recent takeovers
(``FailoverStats.recent_takeovers``, the last 16) at each scrape; phases (seconds):

* ``decided``: from the old active's last heartbeat to the decision (the detection time);
* ``claimed``: from the decision to the floating addresses claimed;
* ``first_forward``: from the decision to the first packet forwarded, less the time the data path
  was ready and waited for a packet (from the claim to the packet's arrival): a takeover with no
  traffic for a minute is not a minute long.
"""

from __future__ import annotations

import asyncio
import logging
import platform
import time
from typing import TYPE_CHECKING, Callable, Iterable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, InfoMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backup.failover import FailoverStats, Takeover
from backup.roles import ROLE_MOVES, Role
from common.wire import Kind, Reject

from . import __version__
from .admin import AdminState
from .contentcore import REFUSAL_REASONS, SYNC_RESULTS
from .heartbeat import HealthStats, NodeState, node_moves
from .reroute import Mode, Reason
from .rules import ECHO_REFUSED_TAG, GUARD_TAG, ICMP_FLOOD_TAG, UNKNOWN_REPLY_TAG

if TYPE_CHECKING:
    from .alerts import Alerts
    from .contentcore import ContentStats
    from .core import DistributorCore, DistributorStats
    from .datapath import PacketQueue
    from .runtime import Runtime

__all__ = ["DistributorCollector", "TakeoverHistogram", "KernelCounters", "takeover_phases", "read_queue_stats", "build_registry",
           "render", "start_metrics_server", "TAKEOVER_BUCKETS", "HEARTBEAT_FAILURE_MOVES"]

log = logging.getLogger("distributor.metrics")

# Seconds; the failover path is built to finish well under one (README: median 432 ms end to end).
TAKEOVER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0)
PHASES = ("decided", "claimed", "first_forward")

# A heartbeat failure is what HAProxy counts as a failed check: the node's heartbeat came later than
# its warning allowance (the LATE event of the node machine, whichever state it hit).
HEARTBEAT_FAILURE_MOVES = frozenset({(NodeState.UP, NodeState.WARNING), (NodeState.SLOW_START, NodeState.WARNING),
                                     (NodeState.RISING, NodeState.DEAD)})
# Every legal change of state (with and without slow start), exported at 0 from the start.
NODE_MOVES = tuple(sorted({(old, new) for slow in (True, False) for (old, _), (new, _) in node_moves(slow).items()
                           if old is not new}, key=lambda move: (move[0].value, move[1].value)))
ROLE_CHANGES = tuple(sorted({(old, new) for (old, _), (new, _) in ROLE_MOVES.items() if old is not new}))
REFUSALS = (Reason.TABLE_FULL, Reason.NO_BACKEND)
_KERNEL_DROPS = {Reason.UNKNOWN_REPLY: UNKNOWN_REPLY_TAG, Reason.ICMP_UNKNOWN: ICMP_FLOOD_TAG}


def read_queue_stats(path: str = "/proc/net/netfilter/nfnetlink_queue") -> dict[int, dict[str, int]]:
    """Per bound queue: packets waiting, dropped by the kernel (queue full), dropped for lack of socket buffer."""
    stats: dict[int, dict[str, int]] = {}
    try:
        with open(path) as f:
            for line in f:
                fields = line.split()
                if len(fields) < 7:
                    continue
                stats[int(fields[0])] = {
                    "waiting": int(fields[2]),
                    "queue_dropped": int(fields[5]),
                    "user_dropped": int(fields[6]),
                }
    except FileNotFoundError:
        pass
    return stats


def takeover_phases(takeover: Takeover) -> dict[str, float]:
    """The phases of one takeover known so far, in seconds (see the module docstring)."""
    phases: dict[str, float] = {}
    if takeover.last_heartbeat is not None:
        phases["decided"] = max(0.0, takeover.started - takeover.last_heartbeat)
    if takeover.claimed is not None:
        phases["claimed"] = max(0.0, takeover.claimed - takeover.started)
    if takeover.first_forward is not None:
        ready = takeover.claimed if takeover.claimed is not None else takeover.started
        arrived = takeover.first_arrival if takeover.first_arrival is not None else takeover.first_forward
        idle = max(0.0, arrived - ready)
        phases["first_forward"] = max(0.0, takeover.first_forward - takeover.started - idle)
    return phases


class TakeoverHistogram:
    """Cumulative takeover durations by phase, fed with the core's recent takeovers at each scrape.

    Each takeover is numbered by its place in the core's count (``takeovers``); a phase is observed
    once, when it is first known.  Takeovers that fell out of the core's history before a scrape saw
    them (more than 16 between two scrapes) are not observed.
    """

    def __init__(self, buckets: Iterable[float] = TAKEOVER_BUCKETS):
        self.buckets = tuple(sorted(buckets))
        self.counts = {phase: [0] * (len(self.buckets) + 1) for phase in PHASES}  # the last: +Inf
        self.sums = {phase: 0.0 for phase in PHASES}
        self._observed: dict[int, set[str]] = {}

    def update(self, total: int, recent: tuple[Takeover, ...]) -> None:
        first = total - len(recent) + 1
        for number, takeover in enumerate(recent, start=first):
            seen = self._observed.setdefault(number, set())
            for phase, seconds in takeover_phases(takeover).items():
                if phase not in seen:
                    seen.add(phase)
                    self._observe(phase, seconds)
        self._observed = {n: seen for n, seen in self._observed.items() if n >= first}

    def _observe(self, phase: str, seconds: float) -> None:
        counts = self.counts[phase]
        for i, bound in enumerate(self.buckets):
            if seconds <= bound:
                counts[i] += 1
        counts[-1] += 1
        self.sums[phase] += seconds

    def family(self) -> HistogramMetricFamily:
        family = HistogramMetricFamily(
            "distributor_failover_takeover_duration_seconds",
            "Takeovers by phase: decided (old active's last heartbeat to the decision), claimed (decision to the "
            "addresses claimed), first_forward (decision to the first packet forwarded, without idle time)",
            labels=["phase"])
        for phase in PHASES:
            counts = self.counts[phase]
            buckets = [(_bound(bound), count) for bound, count in zip(self.buckets, counts)]
            buckets.append(("+Inf", counts[-1]))
            family.add_metric([phase], buckets, self.sums[phase])
        return family


def _bound(value: float) -> str:
    return repr(float(value))


class KernelCounters:
    """Kernel counters that restart at 0 whenever their rules are installed again, kept monotonic.

    ``update(generation, values)``: ``generation`` counts the installs; when it changed since the
    last reading, the last values are banked first (bytes between that reading and the removal of
    the rules are lost: at most one scrape interval's worth per takeover or give-up).
    """

    def __init__(self) -> None:
        self.banked: dict = {}
        self.last: dict = {}
        self.generation: int | None = None

    def update(self, generation: int, values: dict) -> None:
        if generation != self.generation:
            for key, value in self.last.items():
                self.banked[key] = self.banked.get(key, 0) + value
            self.last = {}
            self.generation = generation
        for key, value in values.items():
            if value < self.last.get(key, 0):  # reinstalled between two readings of the same generation
                self.banked[key] = self.banked.get(key, 0) + self.last[key]
            self.last[key] = value

    def value(self, key) -> int:
        return self.banked.get(key, 0) + self.last.get(key, 0)


class DistributorCollector:
    def __init__(self, core: "DistributorCore", queue: "PacketQueue | None" = None, alerts: "Alerts | None" = None,
                 runtime: "Runtime | None" = None, chains: "list | None" = None,
                 clock: Callable[[], float] = time.monotonic, queue_number: int = 0,
                 queue_stats: Callable[[], dict[int, dict[str, int]]] = read_queue_stats):
        self.core = core
        self.chains = [c for c in (chains or []) if c is not None]
        self.kernel_counts: dict[str, int] = {}  # refreshed off the loop before each scrape (refresh_kernel_counts)
        self.queue = queue
        self.alerts = alerts
        self.runtime = runtime
        self.clock = clock
        self.queue_number = queue.queue if queue is not None else queue_number
        self.queue_stats = queue_stats
        self.takeovers = TakeoverHistogram()
        self.bytes_out = KernelCounters()  # rewrite mode's return path, per (service, address, port)
        self._rule_counters = [KernelCounters() for _ in self.chains]  # per chains: packets per rule tag

    def describe(self) -> list:
        return []  # families are built at scrape time; registering must not take a snapshot

    def collect(self) -> Iterator:
        now = self.clock()
        stats = self.core.stats(now)
        yield from self._identity(stats)
        yield from self._packets(stats)
        yield from self._table(stats)
        yield from self._backends(stats)
        yield from self._admin(stats)
        if stats.health is not None:
            yield from self._health(stats.health)
        if stats.failover is not None:
            yield from self._failover(stats.failover, now)
        if stats.content is not None:
            yield from self._content(stats.content)
        if stats.announced is not None:
            announced = GaugeMetricFamily("distributor_vip_announced", "Active-active: 1 while this distributor "
                                          "announces the VIP to the router (it can serve it)", labels=["vip"])
            for vip, on in stats.announced:
                announced.add_metric([vip], 1 if on else 0)
            yield announced
            moves = CounterMetricFamily("distributor_vip_announce_transitions", "Active-active: the announce "
                                        "state machine's transitions (withdrawn, announced, stopped)",
                                        labels=["from", "to"])
            for old, new, times in stats.announce_moves:
                moves.add_metric([old, new], times)
            yield moves
        yield from self._adapters()

    # -- families --------------------------------------------------------------------------------
    def _identity(self, stats: "DistributorStats") -> Iterator:
        info = InfoMetricFamily("distributor_build", "The distributor's version", labels=["version"])
        info.add_metric([__version__], {"python_version": platform.python_version()})
        yield info
        mode = GaugeMetricFamily("distributor_datapath_mode", "1 for the data path this distributor runs",
                                 labels=["mode"])
        for candidate in Mode:
            mode.add_metric([candidate.value], 1 if stats.interposer.mode is candidate else 0)
        yield mode

    def _packets(self, stats: "DistributorStats") -> Iterator:
        interposer = stats.interposer
        kernel_counts = self.kernel_counts
        packets = CounterMetricFamily("distributor_packets", "Queued packets by the reason for their verdict",
                                      labels=["reason", "verdict"])
        for reason in Reason:
            verdict = "accept" if reason.verdict else "drop"
            # Kernel mode drops unknown node replies in the kernel, and rewrite mode the ICMP errors
            # past the queue's rate limit: their rules' counters are added here.
            extra = kernel_counts.get(_KERNEL_DROPS.get(reason, ""), 0)
            packets.add_metric([reason.name.lower(), verdict], interposer.packets[reason] + extra)
        yield packets
        refused = CounterMetricFamily("distributor_connections_refused",
                                      "New connections refused: no eligible node, or the connection table full",
                                      labels=["reason"])
        for reason in REFUSALS:
            refused.add_metric([reason.name.lower()], interposer.packets[reason])
        yield refused
        guard = CounterMetricFamily("distributor_guard_dropped_packets", "Packets from outside the cluster refused "
                                    "by the guard: control ports, the cluster's own addresses, forged cluster sources", labels=["what"])
        for what in ("control_port", "cluster_address", "spoofed_source"):
            guard.add_metric([what], kernel_counts.get(f"{GUARD_TAG}:{what}", 0))
        yield guard
        yield CounterMetricFamily("distributor_echo_refused_packets", "ICMP echo requests to a VIP dropped "
                                  "([distributor] vip_echo = \"drop\")", value=kernel_counts.get(ECHO_REFUSED_TAG, 0))

    def _table(self, stats: "DistributorStats") -> Iterator:
        interposer = stats.interposer
        yield GaugeMetricFamily("distributor_connection_table_entries", "Entries in the connection table",
                                value=interposer.connections)
        yield GaugeMetricFamily("distributor_connection_table_capacity", "Entries the connection table can hold",
                                value=interposer.capacity)
        yield CounterMetricFamily("distributor_connections_expired", "Connections removed after idling past their "
                                  "timeout", value=interposer.expired)
        yield CounterMetricFamily("distributor_connections_evicted", "Finished connections evicted early to make "
                                  "room", value=interposer.evicted)

    def _backends(self, stats: "DistributorStats") -> Iterator:
        labels = ["service", "node"]
        acquired = CounterMetricFamily("distributor_backend_connections", "Connections placed on each backend",
                                       labels=labels)
        outstanding = GaugeMetricFamily("distributor_backend_connections_open", "Open connections per backend",
                                        labels=labels)
        eligible = GaugeMetricFamily("distributor_backend_eligible", "1 while the backend may take new connections "
                                     "(health and weight allow it)", labels=labels)
        weight = GaugeMetricFamily("distributor_backend_weight", "Configured weight", labels=labels)
        ramp = GaugeMetricFamily("distributor_backend_ramp_ratio", "Share of its weight a backend gets (below 1 in "
                                 "slow start)", labels=labels)
        rewrite = stats.interposer.mode is Mode.REWRITE
        counts_in = rewrite or stats.interposer.mode is Mode.DSR  # both see every client segment
        bytes_in = CounterMetricFamily("distributor_backend_bytes_in", "IP bytes forwarded from clients to the "
                                       "backend (rewrite and dsr modes)", labels=labels)
        bytes_out = CounterMetricFamily("distributor_backend_bytes_out", "IP bytes forwarded from the backend to "
                                        "clients (rewrite mode only; counted by the nft return path while this "
                                        "distributor is active)", labels=labels)
        for backend in stats.interposer.backends:
            values = [backend.service, backend.node]
            acquired.add_metric(values, backend.acquired)
            outstanding.add_metric(values, backend.outstanding)
            eligible.add_metric(values, 1 if backend.eligible else 0)
            weight.add_metric(values, backend.weight)
            ramp.add_metric(values, backend.ramp)
            if counts_in:
                bytes_in.add_metric(values, backend.bytes_in)
            if rewrite:
                bytes_out.add_metric(values, self.bytes_out.value((backend.service, backend.address, backend.port)))
        yield from (acquired, outstanding, eligible, weight, ramp)
        # Kernel mode: the kernel forwards the data segments, nothing counts them here; dsr mode: the
        # responses go from the nodes to the clients without crossing this host.
        if counts_in:
            yield bytes_in
        if rewrite:
            yield bytes_out

    def _admin(self, stats: "DistributorStats") -> Iterator:
        """The operator's state of each node (HAProxy's READY / DRAIN / MAINT), and whether it serves."""
        admin = GaugeMetricFamily("distributor_node_admin_state", "1 for the administrative state an operator set "
                                  "(ready, drain, maint)", labels=["node", "state"])
        serving = GaugeMetricFamily("distributor_node_serving", "1 while the node may take new connections: healthy, "
                                    "ready and (with content management) not held out for its content", labels=["node"])
        for node in stats.nodes:
            for candidate in AdminState:
                admin.add_metric([node.node, candidate.value], 1 if node.admin is candidate else 0)
            serving.add_metric([node.node], 1 if node.serving else 0)
        yield from (admin, serving)

    def _content(self, content: "ContentStats") -> Iterator:
        """Content on the nodes ([administration]).  Per-node series only on the active distributor: a standby
        checks no node, and DistributorContentMismatch takes the max over every scraped distributor."""
        yield GaugeMetricFamily("distributor_content_version", "The desired content's version (grows with every "
                                "change)", value=content.version)
        yield GaugeMetricFamily("distributor_content_paths", "Managed paths in the desired content",
                                value=content.paths)
        yield GaugeMetricFamily("distributor_content_bytes", "Bytes of the desired content", value=content.bytes)
        mismatch = GaugeMetricFamily("distributor_node_content_mismatch", "1 while the node is not confirmed to hold "
                                     "the desired content (behind, updating or ahead)", labels=["node"])
        held = GaugeMetricFamily("distributor_node_content_held_out", "1 while the node takes no new connections "
                                 "because its content is behind", labels=["node"])
        confirmed = GaugeMetricFamily("distributor_node_content_version", "The content version the node was last "
                                      "confirmed to hold (-1: never)", labels=["node"])
        if content.active:
            for node in content.nodes:
                mismatch.add_metric([node.node], 1 if node.mismatch else 0)
                held.add_metric([node.node], 1 if node.held_out else 0)
                confirmed.add_metric([node.node], -1 if node.confirmed is None else node.confirmed)
        yield from (mismatch, held, confirmed)
        syncs = CounterMetricFamily("distributor_content_syncs", "Node syncs and checks by result", labels=["result"])
        for result in SYNC_RESULTS:
            syncs.add_metric([result], content.syncs.get(result, 0))
        yield syncs
        refusals = CounterMetricFamily("distributor_content_refusals", "Operator content and task requests the "
                                       "distributor refused, by reason", labels=["reason"])
        for reason in REFUSAL_REASONS:
            refusals.add_metric([reason], content.refusals.get(reason, 0))
        yield refusals
        yield GaugeMetricFamily("distributor_tasks_kept", "Task requests this distributor keeps", value=content.tasks)

    def _health(self, health: HealthStats) -> Iterator:
        node = ["node"]
        state = GaugeMetricFamily("distributor_node_state", "1 for the node's current health state",
                                  labels=["node", "state"])
        held = GaugeMetricFamily("distributor_node_held_out", "1 while the node is held out of service for flapping",
                                 labels=node)
        silent = GaugeMetricFamily("distributor_node_silent_ticks", "Ticks since the node's last valid heartbeat "
                                   "(the health counter)", labels=node)
        age = GaugeMetricFamily("distributor_node_heartbeat_age_seconds", "Seconds since the node's last valid "
                                "heartbeat (absent before the first)", labels=node)
        beats = CounterMetricFamily("distributor_node_heartbeats", "Valid heartbeats per node", labels=node)
        failures = CounterMetricFamily("distributor_node_heartbeat_failures", "Times the node's heartbeat was later "
                                       "than its warning allowance", labels=node)
        moves = CounterMetricFamily("distributor_node_transitions", "Node state changes", labels=["node", "from", "to"])
        failed = CounterMetricFamily("distributor_node_failed_connections", "Connections the data path saw the node "
                                     "fail (it reset or ignored the SYN): passive health", labels=node)
        load = GaugeMetricFamily("distributor_node_load1", "Load average the node last reported", labels=node)
        cpu = GaugeMetricFamily("distributor_node_cpu_busy_ratio", "CPU busy fraction the node last reported",
                                labels=node)
        probe = GaugeMetricFamily("distributor_node_probe_duration_seconds", "Probe response time the node last "
                                  "reported", labels=node)
        interval = GaugeMetricFamily("distributor_node_heartbeat_interval_seconds", "Interval to its next heartbeat "
                                     "the node last announced", labels=node)
        for entry in health.nodes:
            name = [entry.node]
            for candidate in NodeState:
                state.add_metric([entry.node, candidate.value], 1 if entry.state is candidate else 0)
            held.add_metric(name, 1 if entry.held_out else 0)
            silent.add_metric(name, entry.counter)
            if entry.seconds_since_heartbeat is not None:
                age.add_metric(name, entry.seconds_since_heartbeat)
            beats.add_metric(name, entry.heartbeats)
            failed.add_metric(name, entry.failed_connections)
            failures.add_metric(name, sum(entry.moves.get(move, 0) for move in HEARTBEAT_FAILURE_MOVES))
            for old, new in NODE_MOVES:
                moves.add_metric([entry.node, old.value, new.value], entry.moves.get((old, new), 0))
            if entry.report is not None:
                load.add_metric(name, entry.report.load1)
                cpu.add_metric(name, entry.report.cpu)
                probe.add_metric(name, entry.report.response_ms / 1000)
                interval.add_metric(name, entry.report.interval_ms / 1000)
        yield from (state, held, silent, age, beats, failures, failed, moves, load, cpu, probe, interval)
        rejected = CounterMetricFamily("distributor_heartbeats_rejected", "Rejected node heartbeat datagrams",
                                       labels=["reason"])
        for reason in Reject:
            rejected.add_metric([reason.value], health.rejected[reason])
        yield rejected
        yield CounterMetricFamily("distributor_connections_reset", "Connections reset because their node died",
                                  value=health.reset_connections)

    def _failover(self, failover: FailoverStats, now: float) -> Iterator:
        role = GaugeMetricFamily("distributor_failover_role", "1 for this distributor's current role", labels=["role"])
        for candidate in Role:
            role.add_metric([candidate.name.lower()], 1 if failover.role is candidate else 0)
        yield role
        yield GaugeMetricFamily("distributor_failover_term", "Term of this distributor's view (grows at each "
                                "takeover)", value=failover.term)
        changes = CounterMetricFamily("distributor_failover_transitions", "Role changes of this distributor",
                                      labels=["from", "to"])
        for old, new in ROLE_CHANGES:
            changes.add_metric([old.name.lower(), new.name.lower()], failover.transitions.get((old, new), 0))
        yield changes
        peer_up = GaugeMetricFamily("distributor_failover_peer_up", "1 while the peer distributor heartbeats",
                                    labels=["peer"])
        peer_role = GaugeMetricFamily("distributor_failover_peer_role", "1 for the role the peer last announced",
                                      labels=["peer", "role"])
        peer_term = GaugeMetricFamily("distributor_failover_peer_term", "Term the peer last announced",
                                      labels=["peer"])
        peer_lag = GaugeMetricFamily("distributor_sync_peer_lag_records", "While active: replicated records a "
                                     "standby has not applied yet", labels=["peer"])
        for peer in failover.peers:
            peer_up.add_metric([peer.name], 1 if peer.alive else 0)
            for candidate in Role:
                peer_role.add_metric([peer.name, candidate.name.lower()], 1 if peer.role is candidate else 0)
            peer_term.add_metric([peer.name], peer.term)
            if peer.lag_records is not None:
                peer_lag.add_metric([peer.name], peer.lag_records)
        yield from (peer_up, peer_role, peer_term, peer_lag)
        yield CounterMetricFamily("distributor_failover_takeovers", "Times this distributor took the floating "
                                  "addresses (its first election included)", value=failover.takeovers)
        self.takeovers.update(failover.takeovers, failover.recent_takeovers)
        yield self.takeovers.family()
        yield CounterMetricFamily("distributor_failover_announcements", "Bursts of gratuitous ARP sent",
                                  value=failover.announcements)
        yield GaugeMetricFamily("distributor_failover_heartbeat_gap_max_seconds",
                                "Longest wait between two heartbeats of the active seen by this backup",
                                value=failover.heartbeat_gap_max)
        sent = CounterMetricFamily("distributor_failover_datagrams_sent", "Datagrams sent to the peers",
                                   labels=["kind"])
        for kind in (Kind.DIST_HEARTBEAT, Kind.STATE_SYNC, Kind.RESIGN, Kind.SYNC_REQUEST):
            sent.add_metric([kind.name.lower()], failover.sent.get(kind, 0))
        yield sent
        rejected = CounterMetricFamily("distributor_failover_datagrams_rejected", "Rejected peer datagrams",
                                       labels=["reason"])
        for reason in Reject:
            rejected.add_metric([reason.value], failover.rejected[reason])
        yield rejected
        # Replication.
        yield GaugeMetricFamily("distributor_sync_caught_up", "1 when this standby's replica is complete and current",
                                value=1 if failover.caught_up else 0)
        if failover.standby:
            behind = failover.behind_since
            yield GaugeMetricFamily("distributor_sync_lag_seconds", "A standby: seconds its replica has been behind "
                                    "the active's stream (0: current)",
                                    value=0.0 if behind is None else max(0.0, now - behind))
            if failover.lag_batches is not None:
                yield GaugeMetricFamily("distributor_sync_lag_batches", "A standby: sync batches its replica is "
                                        "behind the active", value=failover.lag_batches)
        yield GaugeMetricFamily("distributor_sync_active_connections", "Table entries the active distributor last "
                                "reported", value=failover.active_connections)
        for name, text, value in (
                ("distributor_sync_gaps", "Gaps found in the sync stream", failover.gaps),
                ("distributor_sync_retransmit_requests", "Requests for missing sync batches sent",
                 failover.retransmit_requests),
                ("distributor_sync_batches_retransmitted", "Sync batches sent again on a standby's request",
                 failover.retransmitted),
                ("distributor_sync_records_applied", "Replicated changes applied", failover.records_applied),
                ("distributor_sync_records_sent", "Changes sent to the standbys", failover.records_sent),
                ("distributor_sync_snapshots_sent", "Table snapshots streamed on a standby's request",
                 failover.snapshots_sent),
                ("distributor_sync_records_rejected", "Replicated connections this distributor could not install "
                 "(unknown service or full table)", failover.rejected_records)):
            yield CounterMetricFamily(name, text, value=value)

    def _adapters(self) -> Iterator:
        if self.runtime is not None:
            yield GaugeMetricFamily("distributor_timer_lateness_max_seconds",
                                    "Longest delay between a deadline of the core and its tick (the event loop's worst "
                                    "stall)", value=self.runtime.late_ticks_max)
        if self.queue is not None:
            yield CounterMetricFamily("distributor_handler_errors", "Packets dropped because handling them raised",
                                      value=self.queue.errors)
            yield CounterMetricFamily("distributor_nfqueue_wakeups", "Wake-ups that read the queue",
                                      value=self.queue.drains)
            yield CounterMetricFamily("distributor_nfqueue_packets_read", "Packets read from the queue",
                                      value=self.queue.packets)
        queue_stats = self.queue_stats().get(self.queue_number)
        if queue_stats is not None:
            yield GaugeMetricFamily("distributor_nfqueue_waiting_packets", "Packets waiting in the kernel queue",
                                    value=queue_stats["waiting"])
            dropped = CounterMetricFamily("distributor_nfqueue_dropped_packets", "Packets the kernel dropped at the "
                                          "queue: queue full, or no room in the socket buffer", labels=["cause"])
            dropped.add_metric(["queue_full"], queue_stats["queue_dropped"])
            dropped.add_metric(["socket_buffer"], queue_stats["user_dropped"])
            yield dropped
        if self.alerts is not None:
            mails = CounterMetricFamily("distributor_alert_mails", "Alert e-mails by outcome", labels=["result"])
            for result, value in (("sent", self.alerts.sent), ("retried", self.alerts.retried),
                                  ("failed", self.alerts.failed)):
                mails.add_metric([result], value)
            yield mails
            yield CounterMetricFamily("distributor_alert_log_errors", "State changes the alert log file could not "
                                      "take", value=self.alerts.file_errors)

    # -- the rules' counters ---------------------------------------------------------------------
    def refresh_kernel_counts(self) -> None:
        """Read the rules' counters (iptables-save and nft, subprocesses: run it in a worker thread, never on the loop)."""
        self.kernel_counts = self._kernel_counters()
        for chains in self.chains:
            if hasattr(chains, "return_path_bytes"):
                try:
                    self.bytes_out.update(chains.installs, chains.return_path_bytes())
                except Exception as exc:  # nft unavailable for a moment: the scrape still answers
                    log.debug("cannot read the return path's counters: %s", exc)

    def _kernel_counters(self) -> dict[str, int]:
        """Packets per rule tag, summed over the chains, monotonic: a rule's counter restarts at 0
        when its chains are installed again (a takeover, a node added) or removed (stand-down)."""
        counts: dict[str, int] = {}
        for chains, kept in zip(self.chains, self._rule_counters):
            try:
                kept.update(getattr(chains, "installs", 0), chains.counters())
            except Exception as exc:  # iptables unavailable for a moment: the scrape still answers
                log.debug("cannot read rule counters: %s", exc)
            for tag in kept.banked.keys() | kept.last.keys():
                counts[tag] = counts.get(tag, 0) + kept.value(tag)
        return counts


def build_registry(collector: DistributorCollector, process: bool = True) -> CollectorRegistry:
    """A registry with the collector and, with ``process``, prometheus_client's process_*, python_* collectors."""
    registry = CollectorRegistry()
    registry.register(collector)
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def render(collector: DistributorCollector, process: bool = False) -> bytes:
    return generate_latest(build_registry(collector, process))


async def start_metrics_server(core: "DistributorCore", queue: "PacketQueue | None", alerts: "Alerts | None",
                               runtime: "Runtime | None", chains: list, host: str, port: int) -> web.AppRunner:
    collector = DistributorCollector(core, queue, alerts, runtime, chains)
    registry = build_registry(collector)

    async def metrics(_request: web.Request) -> web.Response:
        await asyncio.to_thread(collector.refresh_kernel_counts)
        # The snapshot itself is read on the loop: the core is only ever touched from there.
        return web.Response(body=generate_latest(registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
