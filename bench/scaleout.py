"""Measure active-active in the namespace testbed: throughput by number of distributors, and kills.

Brings up ``cluster-testbed up --active-active 3`` (project ``aab``), then:

* **scaling**: for each round, for 3, 2 and 1 announcing distributors (the others stopped, which
  withdraws them), wrk through the VIP for ``--seconds``: 1 KiB keep-alive (32 connections) and
  1 KiB with a new connection per request (32 connections).  Rounds interleave the counts;
  medians are reported.
* **kills**: ``--kills`` trials per load (keep-alive and new connections, 24 connections, 8 s):
  one distributor (taken in turn) is killed (SIGKILL of every process in its host, links down) in
  the middle of the run; reports wrk's requests, errors and slowest request (timed from its
  write: connection set-up is not in it), a recorder's requests beside it (new connections, timed
  whole: a SYN lost on the dead path shows there), and how long the router took to drop the path.

    python -m bench.scaleout [--rounds 3] [--seconds 5] [--kills 3] [--json FILE]   (root)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

from testbed import wrk
from testbed.loadgen import forwarded, kill_under_load
from testbed.runner import Options, Testbed

DISTRIBUTORS = ("dist1", "dist2", "dist3")
LOADS = {"keep-alive": False, "new-connections": True}


def announcing(bed: Testbed, count: int) -> None:
    """Exactly the first ``count`` distributors running and in the router's route."""
    for i, host in enumerate(DISTRIBUTORS):
        running = bed.service_pid(host, "distributor") is not None
        if i < count and not running:
            bed.start(host)
        elif i >= count and running:
            bed.stop(host)
    bed.wait_paths(count, 30)


def scaling(bed: Testbed, rounds: int, seconds: float) -> dict:
    results: dict[str, dict[int, list[float]]] = {load: {n: [] for n in (3, 2, 1)} for load in LOADS}
    shares: dict[str, list[float]] = {host: [] for host in DISTRIBUTORS}  # of the packets, with all 3 announcing
    errors = 0
    for round_number in range(1, rounds + 1):
        for count in (3, 2, 1):
            announcing(bed, count)
            for load, close in LOADS.items():
                before = {host: forwarded(bed, host) for host in DISTRIBUTORS[:count]}
                result = wrk.run(bed, f"http://{bed.vip}/1k.bin", duration=seconds, connections=32, close=close)
                errors += result.errors
                results[load][count].append(result.rps)
                spread = {host: forwarded(bed, host) - before[host] for host in before}
                if count == 3:
                    for host, packets in spread.items():
                        shares[host].append(packets / max(1.0, sum(spread.values())))
                print(f"round {round_number}/{rounds}: {count} distributor(s), {load}: {result.rps:,.0f} req/s, "
                      f"{result.errors} errors, packets per distributor {spread}", flush=True)
    announcing(bed, 3)
    return {"requests_per_second": {load: {n: statistics.median(v) for n, v in by_count.items()}
                                    for load, by_count in results.items()},
            "packet_share_of_3": {host: round(statistics.median(v), 3) for host, v in shares.items() if v},
            "errors": errors}


def kill(bed: Testbed, victim: str, close: bool) -> dict:
    """One kill under load (testbed.loadgen.kill_under_load), then the victim is started again."""
    run = kill_under_load(bed, victim, close)
    bed.start(victim)
    whole = run.recorded
    return {"victim": victim, "requests": run.result.requests, "errors": run.result.errors,
            "slowest_ms": run.result.latency_ms.get("max"), "withdrawn_s": round(run.withdrawn, 3),
            "recorded": len(whole), "recorded_failed": sum(not r.ok for r in whole),
            "slowest_with_setup_ms": round(max((r.seconds for r in whole), default=0.0) * 1000, 1)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the scaling runs (default: 3)")
    parser.add_argument("--seconds", type=float, default=5.0, help="seconds of each wrk run (default: 5)")
    parser.add_argument("--kills", type=int, default=3, help="kill trials per load (default: 3; 0: none)")
    parser.add_argument("--json", help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.rounds < 0 or args.kills < 0 or args.seconds <= 0:
        parser.error("--rounds and --kills must be 0 or more, --seconds above 0")
    bed = Testbed("aab", Options(nodes=3, active_active=3, mode="dsr", policy="maglev"))
    report: dict = {}
    try:
        bed.up()
        if args.rounds:
            report["scaling"] = scaling(bed, args.rounds, args.seconds)
        trials = []
        for i in range(args.kills):
            for load, close in LOADS.items():
                outcome = {"load": load, **kill(bed, DISTRIBUTORS[(i + close) % len(DISTRIBUTORS)], close)}
                print(f"kill {i + 1}/{args.kills}, {load}: {outcome}", flush=True)
                trials.append(outcome)
        report["kills"] = trials
    finally:
        bed.down()
    print(json.dumps(report, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    failed = report.get("scaling", {}).get("errors", 0) + sum(t["errors"] for t in report.get("kills", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
