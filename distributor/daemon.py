"""The ``distributor`` gateway daemon: one asyncio loop around the interposer core.

Contract: ``distributor --config FILE`` binds the NFQUEUE, installs its rules,
reroutes until SIGTERM or SIGINT, then removes its rules and exits 0.  A bad
config exits 2 with a message naming the key and value; a failure to set up
the data path (not root, queue taken, iptables missing) exits 1.  ``--check``
validates the config and exits.  Under systemd (``Type=notify``) it reports
readiness once its rules are in place.
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

from . import __version__
from .alerts import Alerts
from .config import Config, ConfigError, load
from .conntable import ConnectionTable
from .datapath import Conntrack, PacketQueue, RawSender, Rules, RulesError
from .health import HealthMonitor
from .reroute import Interposer, Reason, probe_for
from .wire import Keys, KeysError

log = logging.getLogger("distributor")

TICK_SECONDS = 1.0
# Reasons worth a warning when they happen: the operator must act on them.
_WARN_REASONS = (Reason.TABLE_FULL, Reason.NO_BACKEND)
_INFO_REASONS = tuple(r for r in Reason if r.verdict == 0 and r not in _WARN_REASONS)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="distributor",
        description="Cluster web-server distributor: reroutes TCP connections for virtual IPs to healthy "
        "backend nodes through an NFQUEUE packet interposer. Needs root (CAP_NET_ADMIN).",
    )
    parser.add_argument("-c", "--config", required=True, help="TOML config file (see docs/distributor.example.toml)")
    parser.add_argument("--check", action="store_true", help="validate the config, print a summary and exit")
    parser.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], help="override distributor.log_level of the config"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = load(args.config)
        keys = Keys.load(config.health.keys_file) if config.health else None
        failover_keys = Keys.load(config.failover.keys_file) if config.failover else None
    except (ConfigError, KeysError) as exc:
        print(f"distributor: config error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=(args.log_level or config.log_level).upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if args.check:
        print(describe(config))
        return 0
    try:
        asyncio.run(serve(config, keys, failover_keys))
    except (RulesError, OSError) as exc:
        log.error("%s", exc)
        return 1
    return 0


def describe(config: Config) -> str:
    lines = [f"config OK: distributor {config.name!r}, {config.mode} mode, queue {config.queue}, "
             f"table capacity {config.capacity}"]
    for service in config.services:
        backends = ", ".join(f"{b.name}={b.address}:{b.port}(w{b.weight})" for b in service.backends)
        lines.append(f"  service {service.name}: {service.vip}:{service.port} {service.policy.value} -> {backends}")
    if config.health:
        h = config.health.settings
        lines.append(f"  health: heartbeats on udp {config.health.listen[0]}:{config.health.listen[1]}, excluded after "
                     f"{h.warning_seconds:.2f} s of silence, dead after {h.dead_seconds:.2f} s, rise {h.rise}, "
                     f"slow start {h.slow_start:g} s, dead node's connections: {config.health.on_dead}")
    else:
        lines.append("  health: off (no [health] section): every node is always a candidate")
    if config.failover:
        f = config.failover
        addresses = ", ".join(f"{a.address} on {a.interface}" for a in f.addresses)
        lines.append(f"  failover: priority {f.settings.priority}{', preempts' if f.settings.preempt else ''}, peers "
                     f"{', '.join(f.peers)}, takes over after {f.settings.dead_seconds:.2f} s of silence; floating: {addresses}")
    else:
        lines.append("  failover: off (no [failover] section): this distributor serves alone")
    return "\n".join(lines)


async def serve(config: Config, keys: Keys | None = None, failover_keys: Keys | None = None) -> None:
    loop = asyncio.get_running_loop()
    table = ConnectionTable(config.capacity, config.timeouts)
    interposer = Interposer(config.services, table)
    clock = time.monotonic
    raw = RawSender()
    kernel_mode = config.mode == "kernel"
    if kernel_mode:
        queue = PacketQueue(config.queue, interposer.decide_mark, config.queue_length, marks=True, clock=clock)
    else:
        queue = PacketQueue(config.queue, interposer.decide, config.queue_length, clock=clock)
    conntrack = Conntrack() if kernel_mode else None

    def on_readable() -> None:
        queue.drain()
        if interposer.outbox:
            raw.send_all(interposer.outbox)

    rules = Rules(config.queue, config.services, config.mode)
    alerts = Alerts(config.name, config.alert_log, config.smtp)
    monitor = None
    if config.health is not None and keys is not None:
        monitor = HealthMonitor(config, interposer, keys, clock)
        monitor.listeners.append(lambda t: alerts.notify(t.node, t.old.value, t.new.value, t.reason))
        monitor.listeners.append(lambda t: raw.send_all(interposer.outbox) if interposer.outbox else None)
        if conntrack is not None:
            monitor.on_reset = lambda conns: loop.create_task(forget_in_conntrack(conntrack, raw, conns))
    else:
        log.warning("health checking is off (no [health] section): every node is always a candidate")
    failover = None
    if config.failover is not None and failover_keys is not None:
        from backup.controller import FailoverController

        failover = FailoverController(
            config, interposer, rules, queue, failover_keys,
            on_role_change=lambda old, new, reason: alerts.notify(config.name, old.name.lower(), new.name.lower(), reason),
            clock=clock,
        )
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    metrics_runner = None
    reporter = DropReporter(interposer, config.capacity)
    tasks: list[asyncio.Task] = []
    try:
        alerts.start()
        if monitor is not None:
            await monitor.start()
            tasks.append(loop.create_task(monitor.run(stop), name="health-ticks"))
        if failover is not None:
            await failover.start()
            tasks.append(loop.create_task(failover.run(stop), name="failover"))
        else:
            rules.install()
        if kernel_mode:
            Conntrack.be_liberal()
        loop.add_reader(queue.fileno(), on_readable)
        if config.metrics_listen:
            from prometheus_client import CollectorRegistry

            from .metrics import InterposerCollector, start_metrics_server

            registry = CollectorRegistry()
            registry.register(InterposerCollector(interposer, config.queue, lambda: queue.errors, monitor, alerts, failover,
                                                  lambda: (queue.drains, queue.packets)))
            metrics_runner = await start_metrics_server(registry, *config.metrics_listen)
        log.info(
            "distributor %s ready: %d service(s) on queue %d: %s",
            config.name,
            len(config.services),
            config.queue,
            ", ".join(f"{s.vip}:{s.port}" for s in config.services),
        )
        _notify_systemd("READY=1")
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), TICK_SECONDS)
            except TimeoutError:
                pass
            if conntrack is None:
                interposer.expire(clock())
            else:
                suspects: list = []
                interposer.expire(clock(), suspects=suspects)
                if suspects:
                    await confirm_with_conntrack(interposer, conntrack, suspects, clock)
            reporter.report()
        log.info("stopping on signal")
        _notify_systemd("STOPPING=1")
    finally:
        stop.set()
        for task in tasks:
            await task
        if failover is not None:
            await failover.shutdown()
        loop.remove_reader(queue.fileno())
        try:
            rules.remove()
        finally:
            # Packets queued before the rules went away still need a verdict.
            queue.drain()
            queue.close()
            raw.close()
            if conntrack is not None:
                conntrack.close()
            if monitor is not None:
                monitor.close()
            await alerts.stop()
            if metrics_runner is not None:
                await metrics_runner.cleanup()


async def confirm_with_conntrack(interposer: Interposer, conntrack: Conntrack, suspects: list, clock) -> None:
    """Kernel mode: an open entry that looks idle ends only if conntrack no longer tracks it."""
    for conn in suspects:
        try:
            alive = await conntrack.tracks(conn.key)
        except Exception as exc:  # netlink trouble: keep the entry rather than miscount
            log.warning("cannot ask conntrack about a connection (%s); keeping it", exc)
            return
        if alive:
            interposer.touch(conn, clock())
        else:
            interposer.end(conn.key, clock())


async def forget_in_conntrack(conntrack: Conntrack, raw: RawSender, conns: list) -> None:
    """Kernel mode, node declared dead with on_dead = "reset": make each client send us a segment we can reset."""
    for conn in conns:
        try:
            await conntrack.forget(conn.key)
        except Exception as exc:
            log.warning("cannot delete a connection from conntrack (%s); its client waits for its own timeout", exc)
            return
        raw.send_all([probe_for(conn)])


class DropReporter:
    """Logs, at most once per tick, the packets dropped since the last report."""

    def __init__(self, interposer: Interposer, capacity: int):
        self.interposer = interposer
        self.capacity = capacity
        self._seen = list(interposer.counts)

    def report(self) -> None:
        counts = self.interposer.counts
        delta = [now - before for now, before in zip(counts, self._seen)]
        self._seen = list(counts)
        if delta[Reason.TABLE_FULL]:
            log.warning(
                "refused %d new connection(s): connection table full (capacity %d)", delta[Reason.TABLE_FULL], self.capacity
            )
        if delta[Reason.NO_BACKEND]:
            log.warning("refused %d new connection(s): no backend is eligible", delta[Reason.NO_BACKEND])
        other = {r.name.lower(): delta[r] for r in _INFO_REASONS if delta[r]}
        if other:
            log.info("dropped packets: %s", ", ".join(f"{k}={v}" for k, v in other.items()))


def _notify_systemd(state: str) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)


if __name__ == "__main__":
    sys.exit(main())
