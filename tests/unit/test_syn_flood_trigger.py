"""Kernel mode's SYN-flood trigger: conntrack is counted when open connections grow, not as connections come.

Counting walks conntrack's whole table in the kernel; at thousands of short connections a second a
count every 50 ms cost more than the connections themselves.  Short connections must not trigger it;
a flood of handshakes that never end must, within tens of milliseconds.
"""

from __future__ import annotations

from backup.failover import PacketsHandled
from distributor.core import CountHalfOpen, DistributorCore
from distributor.reroute import Mode
from distributor.synauth import SynAuth
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.unit.test_reroute import service_spec

WALL = 1_800_000_000.0
THRESHOLD = 64


def make() -> DistributorCore:
    core = DistributorCore("dist1", Mode.KERNEL, [service_spec()], 100_000, syn_auth=SynAuth(b"s" * 32, THRESHOLD))
    core.start(0.0, WALL)
    return core


def batch(core: DistributorCore, packets: list[bytes], now: float) -> list:
    effects = []
    for packet in packets:
        _, _, extra = core.interposer.decide(packet, now)
        effects += list(extra or ())
    return core.handle(PacketsHandled(now, WALL + now, tuple(effects)))


def counts(commands) -> int:
    return sum(isinstance(c, CountHalfOpen) for c in commands)


def test_short_connections_at_a_high_rate_never_make_the_distributor_walk_conntrack():
    core = make()
    asked, port, now = 0, 10000, 0.0
    for _ in range(60):  # 0.6 s of 5,000 connections a second, each ended by its first FIN, in 10 ms batches
        now += 0.01
        packets = []
        for _ in range(50):
            packets.append(tcp(CLIENT, VIP, port, 80, "S"))
            node = WEB["web1"] if port % 2 == 0 else WEB["web2"]
            packets.append(tcp(node, CLIENT, 80, port, "FA"))
            port += 1
        asked += counts(batch(core, packets, now))
    assert asked == 0


def test_handshakes_that_never_end_make_it_count_within_tens_of_milliseconds():
    core = make()
    asked_at = None
    for step in range(1, 20):  # 3,000 spoofed SYNs a second, in 10 ms batches of 30
        now = 0.01 * step
        packets = [tcp(f"192.0.2.{(step * 30 + i) % 250 + 1}", VIP, 20000 + step * 30 + i, 80, "S") for i in range(30)]
        if counts(batch(core, packets, now)) and asked_at is None:
            asked_at = now
    assert asked_at is not None and asked_at <= 0.05, asked_at


def test_a_burst_of_real_keepalive_connections_is_counted_once_not_every_50_ms():
    core = make()
    asked = 0
    for step in range(1, 101):  # 500 connections opened in the first 100 ms, then kept open for 900 ms
        now = 0.01 * step
        packets = [tcp(CLIENT, VIP, 30000 + step * 50 + i, 80, "S") for i in range(50)] if step <= 10 else []
        asked += counts(batch(core, packets, now))
    assert 1 <= asked <= 500 // THRESHOLD
