"""Micro-benchmark: the cost of choosing a node, per policy, at 10 and 1,000 nodes.

Each timed operation is what one new connection costs the balancer: acquire a
node, then release a connection on a node (so the least-outstanding trees see
an update per pick, as under real churn).  A tournament tree makes both
O(log n); the ratio between 1,000 and 10 nodes should stay near
log2(1024)/log2(16) = 2.5, far from the 100x of a linear scan.

    python -m bench.balancer_bench [--picks N] [--rounds R]
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

from distributor.balancer import Balancer, Policy


def measure(policy: Policy, nodes: int, picks: int, seed: int) -> float:
    rng = random.Random(seed)
    balancer = Balancer(policy, [rng.randint(1, 5) for _ in range(nodes)])
    for _ in range(nodes * 4):  # some open connections everywhere
        balancer.acquire()
    open_on = [i for i in range(nodes) for _ in range(balancer.outstanding(i))]
    rng.shuffle(open_on)
    started = time.perf_counter()
    for k in range(picks):
        chosen = balancer.acquire()
        balancer.release(open_on[k % len(open_on)])
        open_on[k % len(open_on)] = chosen
    return (time.perf_counter() - started) / picks * 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--picks", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    print("| policy | 10 nodes (us/pick) | 1,000 nodes (us/pick) | ratio |")
    print("|---|---|---|---|")
    for policy in (p for p in Policy if p is not Policy.MAGLEV):  # maglev: bench.maglev_bench
        small, large = [], []
        for r in range(args.rounds):  # interleaved rounds: noise hits both sizes alike
            small.append(measure(policy, 10, args.picks, r))
            large.append(measure(policy, 1000, args.picks, r))
        s, l = statistics.median(small), statistics.median(large)
        print(f"| {policy.value} | {s:.2f} | {l:.2f} | {l / s:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
