"""The node agent: probe the local web server, check the load, heartbeat while healthy.

Contract
--------
``node-agent --config FILE`` loops until SIGTERM/SIGINT.  Each round it GETs
``probe_url`` on a new connection and times the answer; when the status is
200, the body contains ``expect``, the response time is at most
``max_response_time``, the 1-minute load average is at most ``max_load`` and
the CPU busy fraction since the last round at most ``max_cpu``, it sends one
authenticated :class:`~common.wire.NodeHeartbeat` datagram to
``destination`` (the cluster LAN's broadcast address, so every distributor
hears it).  Otherwise it sends nothing, and the distributors' counters climb.

The next round starts ``interval`` after this one started, with
``interval = max(this response time, previous one) x multiplier`` held within
``[min_interval, max_interval]`` (:func:`next_interval`): a slow node probes,
and heartbeats, less often, so it gets less new work before it is cut off.

The decisions (:func:`next_interval`, :func:`assess`, :class:`CpuSampler`) are
pure; the probe, the clock, ``/proc`` and the socket are adapters around them.

With a ``[broker]`` section the same process also runs the administration
endpoint (:mod:`node.broker`, docs/administration.md) beside the heartbeat loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from common.keyfile import load_keys
from common.realtime import set_realtime
from common.tomlconfig import ConfigError, TableReader, loads, parse_endpoint
from common.wire import Keys, KeysError, Kind, NodeHeartbeat, SequenceCounter, seal

if TYPE_CHECKING:
    from .broker import BrokerConfig

log = logging.getLogger("node-agent")


@dataclass(frozen=True)
class AgentConfig:
    node_id: str
    probe_url: str
    expect: str
    probe_timeout: float
    min_interval: float
    max_interval: float
    multiplier: float
    max_response_time: float
    max_load: float
    max_cpu: float
    destination: tuple[str, int]
    keys_file: str
    key_id: int | None
    log_level: str
    realtime_priority: int = 5  # SCHED_FIFO priority (0: normal), so heartbeats do not wait behind load
    broker: "BrokerConfig | None" = None  # [broker]: the administration endpoint (node/broker.py)
    metrics_listen: tuple[str, int] | None = None  # [metrics] listen: the agent's /metrics (node/metrics.py)


# -- pure decisions ----------------------------------------------------------
def next_interval(response_time: float, previous: float, multiplier: float, low: float, high: float) -> float:
    return min(high, max(low, max(response_time, previous) * multiplier))


@dataclass(frozen=True)
class Assessment:
    healthy: bool
    reason: str


def assess(status: int | None, body_ok: bool, response_time: float, load1: float, cpu: float,
           config: AgentConfig, error: str | None = None) -> Assessment:
    if error is not None:
        return Assessment(False, f"probe failed: {error}")
    if status != 200:
        return Assessment(False, f"probe answered HTTP {status}")
    if not body_ok:
        return Assessment(False, f"probe body lacks {config.expect!r}")
    if response_time > config.max_response_time:
        return Assessment(False, f"response time {response_time * 1000:.0f} ms > {config.max_response_time * 1000:.0f} ms")
    if load1 > config.max_load:
        return Assessment(False, f"load average {load1:.2f} > {config.max_load:.2f}")
    if cpu > config.max_cpu:
        return Assessment(False, f"CPU busy {cpu:.0%} > {config.max_cpu:.0%}")
    return Assessment(True, "healthy")


class CpuSampler:
    """Busy fraction of all CPUs between two readings of /proc/stat's first line."""

    def __init__(self) -> None:
        self._last: tuple[int, int] | None = None

    def sample(self, proc_stat: str) -> float:
        fields = [int(v) for v in proc_stat.split("\n", 1)[0].split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        total = sum(fields[:8])  # guest time is already counted in user
        last, self._last = self._last, (idle, total)
        if last is None or total == last[1]:
            return 0.0
        return max(0.0, min(1.0, 1.0 - (idle - last[0]) / (total - last[1])))


# -- config -------------------------------------------------------------------
def parse_config(text: str, source: str = "<config>") -> AgentConfig:
    top = TableReader(loads(text, source), "")
    agent = top.table("agent", required=True)
    node_id = agent.string("id")
    if len(node_id.encode()) > 16 or not node_id.isascii():
        raise ConfigError(f"agent.id: {node_id!r} is not valid; expected 1 to 16 ASCII characters (the node's name)")
    probe_url = agent.string("probe_url")
    if not probe_url.startswith("http://"):
        raise ConfigError(f"agent.probe_url: {probe_url!r} is not valid; expected an http:// URL of the local web server")
    config = dict(
        node_id=node_id,
        probe_url=probe_url,
        expect=agent.get("expect", "ok"),
        probe_timeout=agent.number("probe_timeout", 2.0, 0),
        # At most an hour: the heartbeat carries the interval in milliseconds (32 bits).
        min_interval=agent.number("min_interval", 0.2, 0, high=3600),
        max_interval=agent.number("max_interval", 2.0, 0, high=3600),
        multiplier=agent.number("multiplier", 10.0, 0),
        max_response_time=agent.number("max_response_time", 1.0, 0),
        max_load=agent.number("max_load", 2.0 * (os.cpu_count() or 1), 0),
        max_cpu=agent.number("max_cpu", 0.98, 0),
        log_level=agent.string("log_level", "info", ("debug", "info", "warning", "error")),
        realtime_priority=agent.integer("realtime_priority", 5, 0, 99),
    )
    if not isinstance(config["expect"], str):
        raise ConfigError(f"agent.expect: {config['expect']!r} is not valid; expected a string the probe body contains")
    if config["max_interval"] < config["min_interval"]:
        raise ConfigError(f"agent.max_interval: {config['max_interval']} is below agent.min_interval {config['min_interval']}")
    if config["max_cpu"] > 1:
        raise ConfigError(f"agent.max_cpu: {config['max_cpu']} is not valid; expected a fraction in (0, 1]")
    agent.done()
    beat = top.table("heartbeat", required=True)
    destination = parse_endpoint(beat.string("destination", "198.51.100.255:8405"))
    if destination is None:
        raise ConfigError(f"heartbeat.destination: {beat.data.get('destination')!r} is not valid; expected \"ADDRESS:PORT\"")
    key_id = beat.get("key_id", None)
    if key_id is not None and (isinstance(key_id, bool) or not isinstance(key_id, int)):
        raise ConfigError(f"heartbeat.key_id: {key_id!r} is not valid; expected an integer key id of the keys file")
    keys_file = beat.string("keys_file")
    beat.done()
    broker = None
    if top.has("broker"):
        from .broker import parse_broker_config

        broker = parse_broker_config(top.table("broker"))
    metrics = top.table("metrics")
    metrics_listen = metrics.endpoint("listen")
    metrics.done()
    top.done()
    return AgentConfig(destination=destination, keys_file=keys_file, key_id=key_id, broker=broker,
                       metrics_listen=metrics_listen, **config)


# -- adapters -------------------------------------------------------------------
async def probe(session, url: str, expect: str, timeout: float) -> tuple[int | None, bool, float, str | None]:
    import aiohttp

    started = time.monotonic()
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as response:
            body = await response.text(errors="replace")
            return response.status, expect in body, time.monotonic() - started, None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
        return None, False, time.monotonic() - started, f"{type(exc).__name__}: {exc}".rstrip(": ")


async def run(config: AgentConfig, keys: Keys) -> None:
    import aiohttp

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    sock.setblocking(False)
    sequence = SequenceCounter()
    cpu = CpuSampler()
    cpu.sample(Path("/proc/stat").read_text())
    previous_rt: float | None = None
    last: Assessment | None = None
    sent = 0
    metrics = metrics_server = None
    if config.metrics_listen is not None:
        from importlib.metadata import version

        from .metrics import AgentMetrics, start_agent_metrics_server

        metrics = AgentMetrics(config.node_id, version("distributor"))
        metrics_server = await start_agent_metrics_server(metrics, *config.metrics_listen)
    log.info("node agent %s: probing %s, heartbeats to %s:%d", config.node_id, config.probe_url, *config.destination)
    broker = await start_broker(config, keys)
    if metrics is not None and broker is not None:
        metrics.watch_tasks(broker.tasks.scheduler.counts)
    # A new connection per probe: a web server that stopped must fail the next probe.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        while not stop.is_set():
            started = time.monotonic()
            status, body_ok, rt, error = await probe(session, config.probe_url, config.expect, config.probe_timeout)
            load1 = os.getloadavg()[0]
            busy = cpu.sample(Path("/proc/stat").read_text())
            verdict = assess(status, body_ok, rt, load1, busy, config, error)
            interval = next_interval(rt, previous_rt if previous_rt is not None else rt,
                                     config.multiplier, config.min_interval, config.max_interval)
            previous_rt = rt
            if metrics is not None:
                metrics.probed(verdict.healthy, verdict.reason, rt, interval, load1, busy)
            if last is None or verdict.healthy != last.healthy:
                (log.info if verdict.healthy else log.warning)(
                    "%s: %s; %s", config.node_id, verdict.reason,
                    "sending heartbeats" if verdict.healthy else "heartbeats stop")
            last = verdict
            if verdict.healthy:
                report = NodeHeartbeat(load1, busy, rt * 1000, int(interval * 1000))
                wall = time.time()
                datagram = seal(keys, Kind.NODE_HEARTBEAT, config.node_id, sequence.next(wall), wall, report.pack())
                try:
                    sock.sendto(datagram, config.destination)
                    sent += 1
                    if metrics is not None:
                        metrics.heartbeat_sent()
                except OSError as exc:  # e.g. the link is down: the distributors will notice the silence
                    log.warning("cannot send heartbeat to %s:%d: %s", *config.destination, exc)
                    if metrics is not None:
                        metrics.heartbeat_failed()
            delay = max(0.0, started + interval - time.monotonic())
            try:
                await asyncio.wait_for(stop.wait(), delay)
            except asyncio.TimeoutError:
                pass
    sock.close()
    if broker is not None:
        await broker.stop()
    if metrics_server is not None:
        await metrics_server.cleanup()
    log.info("node agent %s stopping after %d heartbeats", config.node_id, sent)


async def start_broker(config: AgentConfig, heartbeat_keys: Keys):
    """The administration endpoint in this process, when [broker] is configured (see node/broker.py)."""
    if config.broker is None:
        return None
    from .broker import Broker

    keys = heartbeat_keys if config.broker.keys_file is None else load_keys(config.broker.keys_file, config.broker.key_id)
    broker = Broker(config.broker, config.node_id, keys, config.max_load, config.max_cpu, CpuSampler())
    try:
        await broker.start()
    except OSError as exc:  # e.g. the address is not this node's: the config is wrong, say so and stop
        log.error("%s", exc)
        raise SystemExit(1) from None
    return broker


def load_secrets(config: AgentConfig) -> Keys:
    """The heartbeat keys, after checking the broker's own keys file loads too; raises KeysError naming the file."""
    keys = load_keys(config.keys_file, config.key_id)
    if config.broker is not None and config.broker.keys_file is not None:
        load_keys(config.broker.keys_file, config.broker.key_id)
    return keys


def files_missing(config: AgentConfig) -> list[str]:
    """What --check reports without failing: keys files the config names that this host cannot load (yet)."""
    try:
        load_secrets(config)
    except KeysError as exc:
        return [str(exc)]
    return []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="node-agent",
        description="Node agent: probes the local web server and, while it answers well and the load is under "
        "the thresholds, sends authenticated heartbeats to the distributors.",
    )
    parser.add_argument("-c", "--config", required=True, help="TOML config file (see docs/node-agent.example.toml)")
    parser.add_argument("--check", action="store_true",
                        help="validate the config, warn of keys files this host cannot load, then exit")
    args = parser.parse_args(argv)
    try:
        config = parse_config(Path(args.config).read_text(encoding="utf-8"), args.config)
    except OSError as exc:
        print(f"node-agent: cannot read config file {args.config!r}: {exc.strerror}", file=sys.stderr)
        return 2
    except UnicodeDecodeError as exc:
        print(f"node-agent: config file {args.config!r} is not UTF-8 text (byte {exc.start})", file=sys.stderr)
        return 2
    except ConfigError as exc:
        print(f"node-agent: config error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        # As the distributor's --check: the config is checked here, the files it names on the host
        # that runs the agent (a config is often checked before the keys are installed).
        print(f"config OK: node {config.node_id}, probe {config.probe_url}, heartbeats to {config.destination[0]}:{config.destination[1]}")
        for problem in files_missing(config):
            print(f"  warning: {problem} (the agent needs it to start)")
        return 0
    try:
        keys = load_secrets(config)
    except KeysError as exc:
        print(f"node-agent: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = set_realtime(config.realtime_priority)
    if problem:
        log.warning("%s; heartbeats may wait behind load (set agent.realtime_priority = 0 to silence this)", problem)
    asyncio.run(run(config, keys))
    return 0


if __name__ == "__main__":
    sys.exit(main())
