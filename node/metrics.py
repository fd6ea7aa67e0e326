"""The node agent's Prometheus metrics: what its loop records, served on ``[metrics] listen`` (adapter).

Contract
--------
:class:`AgentMetrics` holds the agent's own figures in a private registry; the agent's loop calls
:meth:`AgentMetrics.probed` after each probe and :meth:`AgentMetrics.heartbeat_sent` /
:meth:`AgentMetrics.heartbeat_failed` after each send, which cost a few additions.  ``/proc/loadavg``
is read at scrape time only.  :func:`start_agent_metrics_server` serves ``/metrics`` from the
agent's asyncio loop (aiohttp).  Families (``promtool check metrics`` passes on them,
tests/unit/test_agent_metrics.py), beside prometheus_client's ``process_*`` and ``python_*``:

* ``distributor_agent_build_info{version}`` (the node's name is the scrape target's ``node`` label,
  deploy/prometheus/targets/node-agents.json);
* ``distributor_agent_probes_total{result}``: every probe by outcome, one series per outcome
  (``ok``, ``error``, ``bad_status``, ``bad_body``, ``slow``, ``load``, ``cpu``): the agent's own
  check failures, as HAProxy counts ``check_failures_total``;
* ``distributor_agent_probe_duration_seconds``: a histogram of probe response times;
* ``distributor_agent_probe_interval_seconds``: the adaptive interval to the next probe;
* ``distributor_agent_healthy``: 1 while the last probe allowed a heartbeat;
* ``distributor_agent_load1``, ``distributor_agent_cpu_busy_ratio``: what the last probe measured;
* ``distributor_agent_processes``, ``distributor_agent_processes_runnable``: scheduling entities
  that exist and that are runnable (``/proc/loadavg``, as node_exporter's ``node_procs_running``);
* ``distributor_agent_tasks{state}``: with a broker, the administration task records the agent
  holds, by state (queued, running, and the finished ones it keeps: done, failed, ...);
* ``distributor_agent_heartbeats_sent_total``, ``distributor_agent_heartbeat_send_errors_total``.
"""

from __future__ import annotations

import logging
from typing import Callable, Iterator

from aiohttp import web
from prometheus_client import (CollectorRegistry, Counter, GCCollector, Gauge, Histogram, Info, PlatformCollector,
                               ProcessCollector, generate_latest)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

log = logging.getLogger("node-agent.metrics")

__all__ = ["AgentMetrics", "probe_result", "read_tasks", "start_agent_metrics_server", "PROBE_RESULTS"]

PROBE_RESULTS = ("ok", "error", "bad_status", "bad_body", "slow", "load", "cpu")
PROBE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

# node.agent.assess's reasons, by their first words (tests/unit/test_agent_metrics.py runs assess
# for every outcome, so a reworded reason fails there, not silently here).
_REASON_PREFIXES = (("healthy", "ok"), ("probe failed", "error"), ("probe answered HTTP", "bad_status"),
                    ("probe body lacks", "bad_body"), ("response time", "slow"), ("load average", "load"),
                    ("CPU busy", "cpu"))


def probe_result(healthy: bool, reason: str) -> str:
    """The ``result`` label of one assessment (see node.agent.assess)."""
    if healthy:
        return "ok"
    for prefix, result in _REASON_PREFIXES:
        if reason.startswith(prefix):
            return result
    return "error"


def read_tasks(path: str = "/proc/loadavg") -> tuple[int, int] | None:
    """(runnable, existing) scheduling entities from the fourth field of /proc/loadavg ("2/345")."""
    try:
        with open(path) as f:
            runnable, _, existing = f.read().split()[3].partition("/")
        return int(runnable), int(existing)
    except (OSError, IndexError, ValueError):
        return None


class _ScrapeTimeCollector:
    """What is read when Prometheus scrapes: /proc/loadavg, and the broker's task records."""

    def __init__(self, read: Callable[[], tuple[int, int] | None]):
        self.read = read
        self.task_counts: Callable[[], dict[str, int]] | None = None

    def describe(self) -> list:
        return []

    def collect(self) -> Iterator:
        processes = self.read()
        if processes is not None:
            yield GaugeMetricFamily("distributor_agent_processes", "Scheduling entities (processes, threads) that "
                                    "exist", value=processes[1])
            yield GaugeMetricFamily("distributor_agent_processes_runnable", "Scheduling entities that are runnable",
                                    value=processes[0])
        if self.task_counts is not None:
            tasks = GaugeMetricFamily("distributor_agent_tasks", "Administration task records the agent holds, by "
                                      "state", labels=["state"])
            for state, count in sorted(self.task_counts().items()):
                tasks.add_metric([state], count)
            yield tasks


class AgentMetrics:
    def __init__(self, node_id: str, version: str, process: bool = True,
                 tasks: Callable[[], tuple[int, int] | None] = read_tasks):
        registry = self.registry = CollectorRegistry()
        Info("distributor_agent_build", "The node agent's version", registry=registry).info({"version": version})
        self.node_id = node_id
        self.probes = Counter("distributor_agent_probes", "Probes of the local web server by outcome", ["result"],
                              registry=registry)
        for result in PROBE_RESULTS:
            self.probes.labels(result)  # every outcome from the start: increase() needs the zero
        self.duration = Histogram("distributor_agent_probe_duration_seconds", "Probe response times",
                                  buckets=PROBE_BUCKETS, registry=registry)
        self.interval = Gauge("distributor_agent_probe_interval_seconds", "Seconds to the next probe (adaptive)",
                              registry=registry)
        self.healthy = Gauge("distributor_agent_healthy", "1 while the last probe allowed a heartbeat",
                             registry=registry)
        self.load1 = Gauge("distributor_agent_load1", "1-minute load average at the last probe", registry=registry)
        self.cpu = Gauge("distributor_agent_cpu_busy_ratio", "CPU busy fraction since the previous probe",
                         registry=registry)
        self.sent = Counter("distributor_agent_heartbeats_sent", "Heartbeats sent", registry=registry)
        self.send_errors = Counter("distributor_agent_heartbeat_send_errors", "Heartbeats the socket refused",
                                   registry=registry)
        self._scrape_time = _ScrapeTimeCollector(tasks)
        registry.register(self._scrape_time)
        if process:
            ProcessCollector(registry=registry)
            PlatformCollector(registry=registry)
            GCCollector(registry=registry)

    def probed(self, healthy: bool, reason: str, response_time: float, interval: float, load1: float,
               cpu: float) -> None:
        self.probes.labels(probe_result(healthy, reason)).inc()
        self.duration.observe(response_time)
        self.interval.set(interval)
        self.healthy.set(1 if healthy else 0)
        self.load1.set(load1)
        self.cpu.set(cpu)

    def watch_tasks(self, counts: Callable[[], dict[str, int]]) -> None:
        """Export the broker's task records by state (``counts()`` is read at scrape time)."""
        self._scrape_time.task_counts = counts

    def heartbeat_sent(self) -> None:
        self.sent.inc()

    def heartbeat_failed(self) -> None:
        self.send_errors.inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)


async def start_agent_metrics_server(metrics: AgentMetrics, host: str, port: int) -> web.AppRunner:
    async def serve(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/metrics", serve)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    log.info("metrics on http://%s:%d/metrics", host, port)
    return runner
