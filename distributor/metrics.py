"""Prometheus metrics: an observer that reads the core's counters at scrape time.

Contract: :class:`InterposerCollector` costs nothing on the packet path; it
reads the interposer's counters, table and balancers when Prometheus scrapes.
:func:`start_metrics_server` serves ``/metrics`` from the daemon's own asyncio
loop (aiohttp), so no extra thread touches the core.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from .reroute import Reason

if TYPE_CHECKING:
    from aiohttp import web

    from .reroute import Interposer

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


class InterposerCollector:
    def __init__(self, interposer: "Interposer", queue: int, handler_errors: Callable[[], int]):
        self.interposer = interposer
        self.queue = queue
        self.handler_errors = handler_errors

    def collect(self) -> Iterator:
        interposer = self.interposer
        table = interposer.table
        packets = CounterMetricFamily(
            "distributor_packets", "Queued packets by the reason for their verdict", labels=["reason", "verdict"]
        )
        for reason in Reason:
            verdict = "accept" if reason.verdict else "drop"
            packets.add_metric([reason.name.lower(), verdict], interposer.counts[reason])
        yield packets
        yield GaugeMetricFamily("distributor_connections", "Connections in the table", value=len(table))
        yield GaugeMetricFamily("distributor_connections_capacity", "Connection table capacity", value=table.capacity)
        yield CounterMetricFamily(
            "distributor_connections_expired", "Connections removed after idling past their timeout", value=table.expired
        )
        yield CounterMetricFamily(
            "distributor_connections_evicted", "Finished connections evicted early to make room", value=table.evicted
        )
        yield CounterMetricFamily(
            "distributor_handler_errors", "Packets dropped because handling them raised", value=self.handler_errors()
        )
        outstanding = GaugeMetricFamily(
            "distributor_backend_connections_open", "Open connections per backend", labels=["service", "node"]
        )
        eligible = GaugeMetricFamily(
            "distributor_backend_eligible", "1 when the backend may take new connections", labels=["service", "node"]
        )
        weight = GaugeMetricFamily("distributor_backend_weight", "Configured weight", labels=["service", "node"])
        for service, backend in interposer.backends():
            labels = [service.name, backend.name]
            outstanding.add_metric(labels, service.balancer.outstanding(backend.index))
            eligible.add_metric(labels, 1 if service.balancer.eligible(backend.index) else 0)
            weight.add_metric(labels, service.balancer.weight(backend.index))
        yield outstanding
        yield eligible
        yield weight
        stats = read_queue_stats().get(self.queue)
        if stats is not None:
            yield GaugeMetricFamily("distributor_nfqueue_waiting", "Packets waiting in the kernel queue", value=stats["waiting"])
            yield CounterMetricFamily(
                "distributor_nfqueue_dropped",
                "Packets the kernel dropped: queue full or socket buffer full",
                value=stats["queue_dropped"] + stats["user_dropped"],
            )


async def start_metrics_server(registry: CollectorRegistry, host: str, port: int) -> "web.AppRunner":
    from aiohttp import web

    async def metrics(_request: web.Request) -> web.Response:
        body = generate_latest(registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
