"""Saturate the cluster and measure the worst heartbeat delay, in the namespace testbed (issue 9, item 10).

For ``--seconds`` (default 300: the issue's five minutes), wrk drives the VIP at full rate with
keep-alive connections and with a new connection per request at once, while the client sends the 27
malformed kinds of :mod:`testbed.hostile` at ``--malformed-rate`` frames/s.  Reports per mode: any
takeover (a term or role change), node state changes and alerts, the deliberate drops counted, wrk's
figures, and the worst heartbeat delay: the largest gap between two heartbeats of the active as they
arrived at the backup's cluster interface (kernel receive timestamps), the largest gap of each node's
heartbeats at the active, and ``distributor_failover_heartbeat_gap_max_seconds`` when the daemon exports
it.  Exits 1 when a takeover or a node state change happened.

    python -m bench.saturation [--seconds 300] [--mode rewrite|kernel|both] [--json]   (root)
"""

from __future__ import annotations

import argparse
import json
import sys

from testbed import hostile
from testbed.runner import Options, Testbed, wait_until


def run(mode: str, args: argparse.Namespace) -> hostile.SaturationReport:
    bed = Testbed(f"{args.project}{mode[0]}", Options(nodes=3, policy="round-robin", mode=mode))
    bed.up()
    try:
        active, _ = bed.wait_settled(30)

        def all_up() -> bool:
            states = [dict(labels)["state"] for (name, labels), value in bed.metrics(active).items()
                      if name == "distributor_node_state" and value == 1]
            return states.count("up") == len(bed.topology.web_nodes)

        wait_until(all_up, 30, "every node to be up (out of slow start)")
        return hostile.saturate(bed, args.seconds, args.keepalive, args.close, args.malformed_rate)
    finally:
        bed.down()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0, help="length of the run (default: %(default)g)")
    parser.add_argument("--mode", choices=["rewrite", "kernel", "both"], default="both")
    parser.add_argument("--keepalive", type=int, default=32, help="wrk keep-alive connections (default: %(default)d)")
    parser.add_argument("--close", type=int, default=16, help="wrk new-connection clients (default: %(default)d)")
    parser.add_argument("--malformed-rate", type=float, default=2000.0, help="malformed frames/s (default: %(default)g)")
    parser.add_argument("--project", default="hsat", help="testbed project prefix; the mode's initial is appended")
    parser.add_argument("--json", action="store_true", help="print one JSON object per mode instead of text")
    args = parser.parse_args(argv)
    failed = False
    for mode in (["rewrite", "kernel"] if args.mode == "both" else [args.mode]):
        report = run(mode, args)
        failed |= report.took_over or any(report.node_transitions.values()) or bool(report.new_alerts)
        if args.json:
            print(json.dumps({"mode": mode, "seconds": report.seconds, "took_over": report.took_over,
                              "node_transitions": report.node_transitions, "alerts": len(report.new_alerts),
                              "dist_heartbeat_gap_seconds": report.dist_heartbeat_gap,
                              "dist_heartbeats": report.dist_heartbeats,
                              "node_heartbeat_gap_seconds": report.node_heartbeat_gaps,
                              "metric_gap_seconds": report.metric_gap, "drops": report.drops,
                              "wrk_keepalive_rps": report.keepalive.rps, "wrk_close_rps": report.close.rps,
                              "wrk_errors": report.keepalive.errors + report.close.errors, "flood": report.flood}))
        else:
            print(f"== {mode} mode ==")
            print(report.text())
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
