"""Scale: a connection table of 1,000,000 entries, and new connections balanced over 1,000 nodes.

Builds the distributor's real core (interposer, table, balancer) for one
service with ``--nodes`` backends and opens ``--connections`` connections
through it, SYN by SYN, as the data path does; then looks every one up again
with an established segment (the per-packet path) and expires them all.
Reports the resident memory the table takes (whole process, measured), and
the cost of each step per connection.  Run it in a fresh process: RSS only
grows.

    python -m bench.table_scale [--connections 1000000] [--nodes 1000] [--policy least-outstanding]
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import random
import struct
import time

from distributor.balancer import Policy
from distributor.conntable import ConnectionTable, Timeouts
from distributor.reroute import BackendSpec, Interposer, Reason, ServiceSpec


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


_IP_TCP = struct.Struct("!BBHHHBBH4s4sHHIIBBHHH")


def segment(src: bytes, dst: bytes, sport: int, dport: int, flags: int) -> bytes:
    """A 40-byte IPv4/TCP header; checksums are not checked by the core, so zeros do."""
    return _IP_TCP.pack(0x45, 0, 40, 0, 0x4000, 64, 6, 0, src, dst, sport, dport, 1, 1, 5 << 4, flags, 65535, 0, 0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.table_scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=1_000_000)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--policy", default="least-outstanding", choices=[p.value for p in Policy])
    args = parser.parse_args(argv)

    vip = ipaddress.IPv4Address("203.0.113.1")
    backends = tuple(BackendSpec(f"n{i}", ipaddress.IPv4Address(int(ipaddress.IPv4Address("10.0.0.0")) + i + 1), 80)
                     for i in range(args.nodes))
    # The clients: 1,000 addresses x up to 60,000 ports each, as a large site would see.
    clients = [(ipaddress.IPv4Address(int(ipaddress.IPv4Address("100.64.0.0")) + i).packed, 1024 + p)
               for i in range(args.connections // 60_000 + 1) for p in range(60_000)][: args.connections]
    random.Random(1).shuffle(clients)
    syns = [segment(ip, vip.packed, port, 80, 0x02) for ip, port in clients]
    acks = [segment(ip, vip.packed, port, 80, 0x10) for ip, port in clients]
    gc.collect()
    before = rss_mb()

    interposer = Interposer([ServiceSpec("web", vip, 80, Policy.parse(args.policy), backends)],
                            ConnectionTable(args.connections, Timeouts()))
    started = time.perf_counter()
    for packet in syns:
        interposer.decide(packet, 0.0)
    opened = time.perf_counter() - started
    assert interposer.count(Reason.NEW_CONNECTION) == args.connections, interposer.counts
    gc.collect()
    table_mb = rss_mb() - before

    started = time.perf_counter()
    for packet in acks:
        interposer.decide(packet, 1.0)
    looked_up = time.perf_counter() - started
    assert interposer.count(Reason.TO_BACKEND) == args.connections

    started = time.perf_counter()
    lookups = interposer.table.get
    for packet in acks:
        lookups(packet[12:24])
    raw_lookup = time.perf_counter() - started

    started = time.perf_counter()
    ended = 0
    while len(interposer.table):
        ended += interposer.expire(10_000.0, budget=100_000)
    expired = time.perf_counter() - started

    balancer = interposer.services[0].balancer
    spread = [balancer.acquired[i] for i in range(args.nodes)]
    n = args.connections
    print(f"| connections | {n:,} in one table, {args.nodes:,} nodes, {args.policy} |")
    print("|---|---|")
    print(f"| resident memory of the table | {table_mb:,.0f} MB ({table_mb * 1024 * 1024 / n:,.0f} bytes per connection) |")
    print(f"| open (SYN through the interposer: balance, insert, rewrite) | {opened / n * 1e6:.2f} us per connection |")
    print(f"| established segment (lookup + rewrite) | {looked_up / n * 1e6:.2f} us per packet |")
    print(f"| table lookup alone | {raw_lookup / n * 1e6:.3f} us |")
    print(f"| expire all | {expired / n * 1e6:.2f} us per connection ({ended:,} ended) |")
    print(f"| connections per node | min {min(spread):,}, max {max(spread):,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
