"""Measure node failure handling at the default settings, in the namespace testbed.

For each trial, clients keep requesting through the VIP (a new connection per
request) while one node's web server is stopped; the distributor's alert log
gives the moments the node was excluded (warning) and removed (dead).  The
report gives failure -> exclusion and failure -> removal (median, worst) and
the share of requests started in each window that failed.

    python -m bench.health_bench [--trials N] [--mode stop|kill]   (root)
"""

from __future__ import annotations

import argparse
import statistics
import time

from testbed.loadgen import Recorder
from testbed.runner import Options, Testbed


def trial(bed: Testbed, node: str, mode: str) -> dict:
    with Recorder(bed, clients=4) as recorder:
        time.sleep(1.0)
        failed_at = time.time()
        if mode == "kill":
            bed.kill(node)
        else:
            bed.run(node, ["kill", "-TERM", str(bed.service_pid(node, "nginx"))])
        warning = bed.wait_alert(node, "warning", failed_at, 10)
        dead = bed.wait_alert(node, "dead", failed_at, 10)
        time.sleep(0.5)
    restarted = time.time()
    bed.start(node)
    bed.wait_alert(node, "up", restarted, 30)  # rise, then the full slow start

    def failed_share(end: float) -> tuple[int, int]:
        window = recorder.between(failed_at, end)
        return sum(1 for r in window if not r[1]), len(window)

    return {"node": node, "exclusion": warning["time"] - failed_at, "removal": dead["time"] - failed_at,
            "to_exclusion": failed_share(warning["time"]), "to_removal": failed_share(dead["time"]),
            "after_exclusion": failed_share(float("inf"))[0] - failed_share(warning["time"])[0]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--mode", choices=["stop", "kill"], default="stop",
                        help="stop: SIGTERM nginx; kill: SIGKILL the whole node host and take its links down")
    args = parser.parse_args(argv)
    bed = Testbed("bhealth", Options(nodes=3))
    bed.up()
    try:
        results = [trial(bed, f"web{1 + i % 3}", args.mode) for i in range(args.trials)]
    finally:
        bed.down()
    print("| trial | node | failure -> exclusion (s) | failure -> removal (s) | failed before exclusion | failed before removal | failed after exclusion |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['node']} | {r['exclusion']:.2f} | {r['removal']:.2f} | {r['to_exclusion'][0]}/{r['to_exclusion'][1]} "
              f"| {r['to_removal'][0]}/{r['to_removal'][1]} | {r['after_exclusion']} |")
    exclusion = [r["exclusion"] for r in results]
    removal = [r["removal"] for r in results]
    failed = sum(r["to_exclusion"][0] for r in results)
    total = sum(r["to_exclusion"][1] for r in results)
    print(f"\nexclusion: median {statistics.median(exclusion):.2f} s, worst {max(exclusion):.2f} s; "
          f"removal: median {statistics.median(removal):.2f} s, worst {max(removal):.2f} s; "
          f"requests failed between failure and exclusion: {failed}/{total} ({failed / max(total, 1):.1%}); "
          f"after exclusion: {sum(r['after_exclusion'] for r in results)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
