"""Prometheus metrics: an observer that reads snapshots at scrape time (adapter).

Contract: :class:`DistributorCollector` costs nothing on the packet path; when Prometheus scrapes,
it reads ``core.stats(now)`` (frozen dataclasses) and the adapters' own counters (the queue, the
alerts, the runtime) and turns them into metric families.  :func:`start_metrics_server` serves
``/metrics`` from the daemon's own asyncio loop (aiohttp), so no extra thread touches the core.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable, Iterator

from aiohttp import web
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from backup.failover import FailoverStats
from backup.roles import Role
from common.wire import Reject

from .heartbeat import HealthStats, NodeState
from .reroute import Reason
from .rules import GUARD_TAG, UNKNOWN_REPLY_TAG

if TYPE_CHECKING:
    from .alerts import Alerts
    from .core import DistributorCore
    from .datapath import PacketQueue
    from .runtime import Runtime

log = logging.getLogger("distributor.metrics")


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


class DistributorCollector:
    def __init__(self, core: "DistributorCore", queue: "PacketQueue | None" = None, alerts: "Alerts | None" = None,
                 runtime: "Runtime | None" = None, chains: "list | None" = None,
                 clock: Callable[[], float] = time.monotonic, queue_number: int = 0):
        self.core = core
        self.chains = [c for c in (chains or []) if c is not None]
        self.kernel_counts: dict[str, int] = {}  # refreshed off the loop before each scrape (refresh_kernel_counts)
        self.queue = queue
        self.alerts = alerts
        self.runtime = runtime
        self.clock = clock
        self.queue_number = queue.queue if queue is not None else queue_number

    def collect(self) -> Iterator:
        stats = self.core.stats(self.clock())
        interposer = stats.interposer
        packets = CounterMetricFamily(
            "distributor_packets", "Queued packets by the reason for their verdict", labels=["reason", "verdict"]
        )
        kernel_counts = self.kernel_counts
        for reason in Reason:
            verdict = "accept" if reason.verdict else "drop"
            # Kernel mode drops unknown node replies in the kernel; its rule's counter is added here.
            extra = kernel_counts.get(UNKNOWN_REPLY_TAG, 0) if reason is Reason.UNKNOWN_REPLY else 0
            packets.add_metric([reason.name.lower(), verdict], interposer.packets[reason] + extra)
        yield packets
        refused = CounterMetricFamily("distributor_guard_dropped", "Packets from outside the cluster refused by the "
                                      "guard: control ports, the cluster's own addresses, forged cluster sources", labels=["what"])
        for what in ("control_port", "cluster_address", "spoofed_source"):
            refused.add_metric([what], kernel_counts.get(f"{GUARD_TAG}:{what}", 0))
        yield refused
        yield GaugeMetricFamily("distributor_connections", "Connections in the table", value=interposer.connections)
        yield GaugeMetricFamily("distributor_connections_capacity", "Connection table capacity", value=interposer.capacity)
        yield CounterMetricFamily("distributor_connections_expired", "Connections removed after idling past their timeout",
                                  value=interposer.expired)
        yield CounterMetricFamily("distributor_connections_evicted", "Finished connections evicted early to make room",
                                  value=interposer.evicted)
        if self.runtime is not None:
            yield GaugeMetricFamily("distributor_timer_lateness_max_seconds",
                                    "Longest delay between a deadline of the core and its tick (the event loop's worst "
                                    "stall)", value=self.runtime.late_ticks_max)
        if self.queue is not None:
            yield CounterMetricFamily("distributor_handler_errors", "Packets dropped because handling them raised",
                                      value=self.queue.errors)
            yield CounterMetricFamily("distributor_nfqueue_reads", "Wake-ups that read the queue", value=self.queue.drains)
            yield CounterMetricFamily("distributor_nfqueue_packets_read", "Packets read from the queue",
                                      value=self.queue.packets)
        outstanding = GaugeMetricFamily("distributor_backend_connections_open", "Open connections per backend",
                                        labels=["service", "node"])
        eligible = GaugeMetricFamily("distributor_backend_eligible", "1 when the backend may take new connections",
                                     labels=["service", "node"])
        weight = GaugeMetricFamily("distributor_backend_weight", "Configured weight", labels=["service", "node"])
        acquired = CounterMetricFamily("distributor_backend_connections", "New connections given to each backend",
                                       labels=["service", "node"])
        for backend in interposer.backends:
            labels = [backend.service, backend.node]
            acquired.add_metric(labels, backend.acquired)
            outstanding.add_metric(labels, backend.outstanding)
            eligible.add_metric(labels, 1 if backend.eligible else 0)
            weight.add_metric(labels, backend.weight)
        yield from (acquired, outstanding, eligible, weight)
        if stats.health is not None:
            yield from self._health(stats.health)
        if stats.failover is not None:
            yield from self._failover(stats.failover)
        if self.alerts is not None:
            mails = CounterMetricFamily("distributor_alert_mails", "Alert e-mails by outcome", labels=["result"])
            for result, value in (("sent", self.alerts.sent), ("retried", self.alerts.retried),
                                  ("failed", self.alerts.failed)):
                mails.add_metric([result], value)
            yield mails
            yield CounterMetricFamily("distributor_alert_log_errors", "State changes the alert log file could not take",
                                      value=self.alerts.file_errors)
        queue_stats = read_queue_stats().get(self.queue_number)
        if queue_stats is not None:
            yield GaugeMetricFamily("distributor_nfqueue_waiting", "Packets waiting in the kernel queue",
                                    value=queue_stats["waiting"])
            yield CounterMetricFamily("distributor_nfqueue_dropped",
                                      "Packets the kernel dropped: queue full or socket buffer full",
                                      value=queue_stats["queue_dropped"] + queue_stats["user_dropped"])

    def refresh_kernel_counts(self) -> None:
        """Read the rules' counters (iptables-save, a subprocess: run it in a worker thread, never on the loop)."""
        self.kernel_counts = self._kernel_counters()

    def _kernel_counters(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for chains in self.chains:
            try:
                for tag, value in chains.counters().items():
                    counts[tag] = counts.get(tag, 0) + value
            except Exception as exc:  # iptables unavailable for a moment: the scrape still answers
                log.debug("cannot read rule counters: %s", exc)
        return counts

    def _health(self, health: HealthStats) -> Iterator:
        state = GaugeMetricFamily("distributor_node_state", "1 for the node's current health state", labels=["node", "state"])
        counter = GaugeMetricFamily("distributor_node_heartbeat_counter", "Ticks since the node's last heartbeat",
                                    labels=["node"])
        beats = CounterMetricFamily("distributor_node_heartbeats", "Verified heartbeats per node", labels=["node"])
        load = GaugeMetricFamily("distributor_node_load1", "Load average the node last reported", labels=["node"])
        cpu = GaugeMetricFamily("distributor_node_cpu_busy_ratio", "CPU busy fraction the node last reported",
                                labels=["node"])
        probe = GaugeMetricFamily("distributor_node_probe_seconds", "Probe response time the node last reported",
                                  labels=["node"])
        for node in health.nodes:
            for candidate in NodeState:
                state.add_metric([node.node, candidate.value], 1 if node.state is candidate else 0)
            counter.add_metric([node.node], node.counter)
            beats.add_metric([node.node], node.heartbeats)
            if node.report is not None:
                load.add_metric([node.node], node.report.load1)
                cpu.add_metric([node.node], node.report.cpu)
                probe.add_metric([node.node], node.report.response_ms / 1000)
        yield from (state, counter, beats, load, cpu, probe)
        transitions = CounterMetricFamily("distributor_node_transitions", "Node state changes", labels=["from", "to"])
        for (old, new), value in health.transitions.items():
            transitions.add_metric([old.value, new.value], value)
        yield transitions
        rejected = CounterMetricFamily("distributor_heartbeats_rejected", "Rejected heartbeat datagrams", labels=["reason"])
        for reason in Reject:
            rejected.add_metric([reason.value], health.rejected[reason])
        yield rejected
        yield CounterMetricFamily("distributor_connections_reset", "Connections reset because their node died",
                                  value=health.reset_connections)

    def _failover(self, failover: FailoverStats) -> Iterator:
        role = GaugeMetricFamily("distributor_failover_role", "1 for this distributor's current role", labels=["role"])
        for candidate in Role:
            role.add_metric([candidate.name.lower()], 1 if failover.role is candidate else 0)
        yield role
        yield GaugeMetricFamily("distributor_failover_term", "Term of this distributor's last takeover", value=failover.term)
        peers = GaugeMetricFamily("distributor_failover_peer_alive", "1 while the peer heartbeats", labels=["peer", "role"])
        for peer in failover.peers:
            peers.add_metric([peer.name, peer.role.name.lower()], 1 if peer.alive else 0)
        yield peers
        if failover.lag_batches is not None:
            yield GaugeMetricFamily("distributor_sync_lag_batches", "Sync batches the replica is behind the active",
                                    value=failover.lag_batches)
        yield GaugeMetricFamily("distributor_sync_caught_up", "1 when this standby's replica is complete and current",
                                value=1 if failover.caught_up else 0)
        yield GaugeMetricFamily("distributor_sync_active_connections", "Connections the active distributor reports",
                                value=failover.active_connections)
        yield CounterMetricFamily("distributor_sync_gaps", "Gaps found in the sync stream", value=failover.gaps)
        yield CounterMetricFamily("distributor_sync_records_applied", "Replicated changes applied",
                                  value=failover.records_applied)
        yield CounterMetricFamily("distributor_sync_records_sent", "Changes sent to the standbys", value=failover.records_sent)
        yield CounterMetricFamily("distributor_sync_snapshots_sent", "Table snapshots streamed on a standby's request",
                                  value=failover.snapshots_sent)
        yield CounterMetricFamily("distributor_sync_records_rejected",
                                  "Replicated connections this distributor could not install (unknown service or full table)",
                                  value=failover.rejected_records)
        yield CounterMetricFamily("distributor_failover_announcements", "Bursts of gratuitous ARP sent",
                                  value=failover.announcements)
        yield GaugeMetricFamily("distributor_failover_heartbeat_gap_max_seconds",
                                "Longest wait between two heartbeats of the active seen by this backup",
                                value=failover.heartbeat_gap_max)
        sent = CounterMetricFamily("distributor_failover_datagrams_sent", "Datagrams sent to the peers", labels=["kind"])
        for kind, value in failover.sent.items():
            sent.add_metric([kind.name.lower()], value)
        yield sent
        rejected = CounterMetricFamily("distributor_failover_datagrams_rejected", "Rejected peer datagrams", labels=["reason"])
        for reason in Reject:
            rejected.add_metric([reason.value], failover.rejected[reason])
        yield rejected
        takeover = failover.last_takeover
        if takeover is not None and takeover.last_heartbeat is not None:
            phases = GaugeMetricFamily("distributor_failover_takeover_seconds",
                                       "Last takeover, from the old active's last heartbeat", labels=["phase"])
            phases.add_metric(["decided"], takeover.started - takeover.last_heartbeat)
            if takeover.claimed is not None:
                phases.add_metric(["claimed"], takeover.claimed - takeover.last_heartbeat)
            if takeover.first_forward is not None:
                phases.add_metric(["first_forward"], takeover.first_forward - takeover.last_heartbeat)
            yield phases


def render(collector: DistributorCollector) -> bytes:
    registry = CollectorRegistry()
    registry.register(collector)
    return generate_latest(registry)


async def start_metrics_server(core: "DistributorCore", queue: "PacketQueue | None", alerts: "Alerts | None",
                               runtime: "Runtime | None", chains: list, host: str, port: int) -> web.AppRunner:
    registry = CollectorRegistry()
    collector = DistributorCollector(core, queue, alerts, runtime, chains)
    registry.register(collector)

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
