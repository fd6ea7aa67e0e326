"""Micro-benchmark: the interposer core's cost per packet, without the kernel.

Times :meth:`Interposer.decide` in rewrite mode and in kernel mode on established segments of both directions and on SYNs, medians
of interleaved rounds.  The data path's full cost per packet adds NFQUEUE's
round trip (see bench.nfqueue_floor and docs/performance.md).

    python -m bench.core_bench [--packets 200000] [--rounds 5]
"""

from __future__ import annotations

import argparse
import ipaddress
import statistics
import time

from distributor.balancer import Policy
from distributor.conntable import ConnectionTable
from distributor.reroute import BackendSpec, Interposer, Mode, ServiceSpec

from .table_scale import segment

VIP = ipaddress.IPv4Address("203.0.113.1")
CLIENT = ipaddress.IPv4Address("203.0.113.10").packed


def interposer(mode: Mode = Mode.REWRITE) -> Interposer:
    backends = tuple(BackendSpec(f"web{i}", ipaddress.IPv4Address(f"198.51.100.{11 + i}"), 80) for i in range(3))
    return Interposer([ServiceSpec("web", VIP, 80, Policy.LEAST_OUTSTANDING, backends)], ConnectionTable(1_000_000),
                      mode)


def established(count: int) -> float:
    ip = interposer()
    ip.decide(segment(CLIENT, VIP.packed, 40000, 80, 0x02), 0.0)
    ip.decide(segment(CLIENT, VIP.packed, 40000, 80, 0x10), 0.0)
    node = ip.table.get(segment(CLIENT, VIP.packed, 40000, 80, 0x10)[12:24]).backend.addr_bytes
    forward = segment(CLIENT, VIP.packed, 40000, 80, 0x18) + b"x" * 100
    reply = segment(node, CLIENT, 80, 40000, 0x18) + b"y" * 1100
    forward = forward[:2] + len(forward).to_bytes(2, "big") + forward[4:]
    reply = reply[:2] + len(reply).to_bytes(2, "big") + reply[4:]
    decide = ip.decide
    started = time.perf_counter()
    for _ in range(count // 2):
        decide(forward, 1.0)
        decide(reply, 1.0)
    return (time.perf_counter() - started) / count * 1e6


def syns(count: int, kernel: bool) -> float:
    ip = interposer(Mode.KERNEL if kernel else Mode.REWRITE)
    packets = [segment(CLIENT, VIP.packed, 1024 + i % 60000, 80, 0x02) for i in range(count)]
    decide = ip.decide
    started = time.perf_counter()
    for i, packet in enumerate(packets):
        if i % 60000 == 0 and i:
            ip.clear()
        decide(packet, 1.0)
    return (time.perf_counter() - started) / count * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.core_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--packets", type=int, default=200_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    runs: dict[str, list[float]] = {"established segment, rewrite": [], "SYN, rewrite": [], "SYN, kernel mode": []}
    for _ in range(args.rounds):
        runs["established segment, rewrite"].append(established(args.packets))
        runs["SYN, rewrite"].append(syns(args.packets // 4, kernel=False))
        runs["SYN, kernel mode"].append(syns(args.packets // 4, kernel=True))
    print("| packet | us per packet (median) | range |")
    print("|---|---|---|")
    for name, values in runs.items():
        print(f"| {name} | {statistics.median(values):.2f} | {min(values):.2f}-{max(values):.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
