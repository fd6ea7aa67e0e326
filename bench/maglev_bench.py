"""Micro-benchmark: Maglev table build, rebuild on a health change, lookup, and disruption.

* build: :func:`distributor.maglev.build_table` for N backends of equal
  weight, and of weights 1..5 (the stride-scheduled fill);
* rebuild: :meth:`MaglevBalancer.set_available` taking one backend out, which
  is what a node failing costs the daemon (the table plus its index map);
* acquire: one ``MaglevBalancer.acquire(key) + release``, the per-new-connection
  cost, beside the round-robin ``Balancer`` for scale;
* disruption: removing one backend, the share of slots that move because they
  were its own, and the share of slots of backends that stayed that move too.

Rounds are interleaved (every size in every round) so that noise from other
load hits all sizes alike; medians are printed.

    python -m bench.maglev_bench [--rounds R] [--size M]
"""

from __future__ import annotations

import argparse
import random
import statistics
import struct
import time

from distributor.balancer import Balancer, Policy
from distributor.maglev import TABLE_SIZE, MaglevBalancer, build_table

SIZES = (10, 100, 1000)


def names(count: int) -> list[str]:
    return [f"web{i}" for i in range(1, count + 1)]


def time_build(count: int, size: int, weighted: bool) -> float:
    weights = [1 + i % 5 if weighted else 1 for i in range(count)]
    started = time.perf_counter()
    build_table(list(zip(names(count), weights)), size)
    return time.perf_counter() - started


def time_rebuild(count: int, size: int) -> float:
    balancer = MaglevBalancer(names(count), [1] * count, size)
    started = time.perf_counter()
    balancer.set_available(count // 2, False)
    return time.perf_counter() - started


def flow_keys(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    vip = bytes([203, 0, 113, 1])
    return [struct.pack("!I", 0xCB007100 + rng.randrange(1, 255)) + vip + struct.pack("!HH", rng.randrange(1024, 65536), 80)
            for _ in range(count)]


def time_acquire(balancer, keys: list[bytes]) -> float:
    started = time.perf_counter()
    for key in keys:
        index = balancer.acquire(key)
        balancer.release(index)
    return (time.perf_counter() - started) / len(keys)


def disruption(count: int, size: int, victims: int = 5) -> tuple[float, float]:
    everyone = {name: 1 for name in names(count)}
    before = build_table(everyone, size).owners()
    own, extra = [], []
    for victim in names(count)[:victims]:
        after = build_table({n: w for n, w in everyone.items() if n != victim}, size).owners()
        changed = sum(1 for x, y in zip(before, after) if x != y)
        owned = before.count(victim)
        own.append(owned / size)
        extra.append((changed - owned) / size)
    return statistics.median(own), statistics.median(extra)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--size", type=int, default=TABLE_SIZE, help="table size, a prime (default 65537)")
    parser.add_argument("--lookups", type=int, default=50_000)
    args = parser.parse_args(argv)

    build = {(n, w): [] for n in SIZES for w in (False, True)}
    rebuild = {n: [] for n in SIZES}
    acquire = {name: [] for name in ("maglev", "round-robin")}
    keys = flow_keys(args.lookups, 1)
    for r in range(args.rounds):
        for n in SIZES:
            for weighted in (False, True):
                build[(n, weighted)].append(time_build(n, args.size, weighted))
            rebuild[n].append(time_rebuild(n, args.size))
        acquire["maglev"].append(time_acquire(MaglevBalancer(names(100), [1] * 100, args.size), keys))
        acquire["round-robin"].append(time_acquire(Balancer(Policy.ROUND_ROBIN, [1] * 100), keys))

    print(f"table size M = {args.size}, {args.rounds} interleaved rounds, medians")
    print()
    print("| backends | build, equal weights (ms) | build, weights 1..5 (ms) | rebuild on set_available (ms) |")
    print("|---|---|---|---|")
    for n in SIZES:
        print(f"| {n} | {statistics.median(build[(n, False)]) * 1e3:.1f} | "
              f"{statistics.median(build[(n, True)]) * 1e3:.1f} | {statistics.median(rebuild[n]) * 1e3:.1f} |")
    print()
    print("| per new connection, 100 backends | us |")
    print("|---|---|")
    for name, samples in acquire.items():
        print(f"| {name} acquire + release | {statistics.median(samples) * 1e6:.2f} |")
    print()
    print("| remove 1 of N | its own slots (share of table) | slots of staying backends that move |")
    print("|---|---|---|")
    for n in SIZES:
        own, extra = disruption(n, args.size)
        print(f"| {n} | {own * 100:.2f} % | {extra * 100:.2f} % |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
