"""Measure node failure handling at the default settings, in the namespace testbed.

For each trial, clients keep requesting through the VIP (a new connection per request) while one
node fails, in one of three ways:

* ``stop``: nginx stops as ``systemctl stop nginx`` stops it (Debian's unit: SIGQUIT, a graceful
  shutdown: it stops listening and finishes the requests it has); the node then resets SYNs;
* ``term``: SIGTERM, nginx's fast shutdown: it also closes the connections it has accepted, so the
  requests on them fail whatever the balancer does (they were already on the node; no layer-4
  balancer can replay a request it does not hold);
* ``kill``: SIGKILL of everything in the node's host and its links down: SYNs go unanswered.
  The report gives, per data-path mode and failure kind: the requests started
from the failure until the node was declared dead (plus a second), how many of them failed, the
slowest of them (a request held up by one SYN retransmission takes about 1 s more), and the time
from the failure to the node's exclusion (its first alert: ``warning``) and removal (``dead``).

    python -m bench.health_bench [--trials N] [--failure stop|term|kill|all] [--data-path rewrite|kernel|both]   (root)

Each run has its own testbed project name, so two benches at once do not tear each other down.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from testbed.loadgen import Recorder
from testbed.runner import Options, Testbed, wait_until

FAILURES = ("stop", "term", "kill")
SIGNALS = {"stop": "-QUIT", "term": "-TERM"}
MODES = ("rewrite", "kernel")


def trial(bed: Testbed, node: str, failure: str) -> dict:
    with Recorder(bed, clients=4, timeout=5.0) as recorder:
        time.sleep(1.0)
        failed_at = time.time()
        if failure == "kill":
            bed.kill(node)
        else:
            bed.run(node, ["kill", SIGNALS[failure], str(bed.service_pid(node, "nginx"))])
        warning = bed.wait_alert(node, "warning", failed_at, 10)
        dead = bed.wait_alert(node, "dead", failed_at, 10)
        time.sleep(1.0)
    # After the recorder stopped: it waits for the requests in flight, and a request is recorded
    # when it ends, so one held up by retransmissions or timed out is counted too.
    window = recorder.between(failed_at, dead["time"] + 1.0)
    restarted = time.time()
    bed.start(node)
    bed.wait_alert(node, "slow_start", restarted, 30)  # risen: back in service
    wait_until(lambda: node_state(bed, node) == "up", 30, f"{node} to finish its slow start")
    return {"node": node, "exclusion": warning["time"] - failed_at, "removal": dead["time"] - failed_at,
            "requests": len(window), "failed": sum(1 for r in window if not r.ok),
            "slowest": max((r.seconds for r in window), default=0.0),
            "delayed": sum(1 for r in window if r.seconds > 0.9),
            "failures": [(r.started - failed_at, r.seconds) for r in window if not r.ok]}


def node_state(bed: Testbed, node: str) -> str | None:
    for (name, labels), value in bed.metrics("dist1").items():
        labels = dict(labels)
        if name == "distributor_node_state" and labels.get("node") == node and value == 1:
            return labels["state"]
    return None


def run(mode: str, failure: str, trials: int, project: str) -> list[dict]:
    # No flap damping: each trial fails and restores a node on purpose, and a node held out for
    # "flapping" would make the next trials measure nothing.
    bed = Testbed(project, Options(nodes=3, mode=mode, flap_suppress=0))
    bed.up()
    try:
        results = []
        for i in range(trials):
            print(f"[health_bench] {mode} / {failure}: trial {i + 1} of {trials}", file=sys.stderr, flush=True)
            results.append(trial(bed, f"web{1 + i % 3}", failure))
        return results
    finally:
        bed.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=3, help="trials per mode and failure kind (default 3)")
    parser.add_argument("--failure", choices=[*FAILURES, "all"], default="all",
                        help="stop: nginx's graceful stop (SIGQUIT, as systemctl stop); term: its fast shutdown "
                             "(SIGTERM: accepted requests fail on the node); kill: SIGKILL the whole node host and "
                             "take its links down (SYNs go unanswered); all (default)")
    parser.add_argument("--data-path", choices=[*MODES, "both"], default="both",
                        help="the distributors' mode (default both)")
    args = parser.parse_args(argv)
    if args.trials < 1:
        parser.error(f"--trials {args.trials} must be at least 1")
    modes = MODES if args.data_path == "both" else (args.data_path,)
    failures = FAILURES if args.failure == "all" else (args.failure,)
    project = f"bh{os.getpid() % 100000}"
    table = []
    for mode in modes:
        for failure in failures:
            table.append((mode, failure, run(mode, failure, args.trials, project)))
    print("| mode | failure | trials | requests during the failure | failed | slowest (s) | held up by a "
          "retransmission | failure -> exclusion, median (worst) s | failure -> removal, median (worst) s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, failure, results in table:
        exclusion = [r["exclusion"] for r in results]
        removal = [r["removal"] for r in results]
        print(f"| {mode} | {failure} | {len(results)} | {sum(r['requests'] for r in results)} "
              f"| {sum(r['failed'] for r in results)} | {max(r['slowest'] for r in results):.2f} "
              f"| {sum(r['delayed'] for r in results)} "
              f"| {statistics.median(exclusion):.2f} ({max(exclusion):.2f}) "
              f"| {statistics.median(removal):.2f} ({max(removal):.2f}) |")
    for mode, failure, results in table:
        failed = [f"{r['node']} +{start:.3f} s ({took:.3f} s)" for r in results for start, took in r["failures"]]
        if failed:
            print(f"\n{mode} / {failure}: failed requests, started after the failure at: {', '.join(failed)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
