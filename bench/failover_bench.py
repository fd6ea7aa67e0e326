"""Measure takeovers at the default settings, in the namespace testbed.

Each trial kills (SIGKILL) the active distributor while wrk keeps 16
keep-alive connections busy through the VIP, and reads the new active's
takeover timeline, as its log line gives it: from the last heartbeat it heard
from the old active to its decision, to the addresses being claimed (and
announced), and to the first packet it forwarded, waits for the clients'
retransmissions included (the takeover histogram of /metrics leaves the idle
wait out, see distributor/metrics.py; here wrk keeps traffic flowing).  The killed one is restarted and must catch up before the
next trial kills the other.  Reports each trial, median and worst, and wrk's
errors.

    python -m bench.failover_bench [--trials 20] [--close]   (root)
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import statistics
import subprocess
import time

from testbed import wrk
from testbed.runner import Options, Testbed, wait_until

PHASES = ("decided", "claimed", "first_forward")
TIMELINE = re.compile(r"takeover timeline from the last heartbeat of the old active: decided \+([\d.]+) ms, "
                      r"addresses claimed \+([\d.?]+) ms, first packet forwarded \+([\d.]+) ms")


def trial(bed: Testbed, close: bool) -> dict:
    active, backup = bed.wait_settled(30)
    load = bed.popen("client", wrk.command(f"http://{bed.vip}/1k.bin", duration=3, connections=16, close=close, timeout=5),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    time.sleep(1.0)
    log_path = bed.log_path(backup, "distributor")
    offset = log_path.stat().st_size
    os.kill(bed.service_pid(active, "distributor"), signal.SIGKILL)
    result = wrk.parse(load.communicate(timeout=60)[0])

    def timeline() -> dict | None:
        with open(log_path, "rb") as f:
            f.seek(offset)
            found = TIMELINE.search(f.read().decode(errors="replace"))
        if found is None or "?" in found.group(2):
            return None
        return {phase: float(ms) / 1000 for phase, ms in zip(PHASES, found.groups())}

    phases = wait_until(timeline, 10, f"{backup}'s takeover timeline")
    wait_until(lambda: bed.service_pid(active, "distributor") is None, 10, "the killed distributor to be gone")
    bed.start(active)
    return {"killed": active, **phases, "requests": result.requests,
            "errors": sum(result.socket_errors.values()) + result.non_2xx}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--close", action="store_true", help="wrk with Connection: close (a new connection per request)")
    args = parser.parse_args(argv)
    bed = Testbed("bfail", Options(nodes=3, policy="least-outstanding"))
    bed.up()
    try:
        results = [trial(bed, args.close) for _ in range(args.trials)]
    finally:
        bed.down()
    print("| trial | killed | decided (ms) | addresses claimed (ms) | first packet forwarded (ms) | wrk requests | wrk errors |")
    print("|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['killed']} | {r['decided'] * 1000:.0f} | {r['claimed'] * 1000:.0f} | "
              f"{r['first_forward'] * 1000:.0f} | {r['requests']} | {r['errors']} |")
    print()
    for phase in PHASES:
        values = [r[phase] * 1000 for r in results]
        print(f"{phase}: median {statistics.median(values):.0f} ms, worst {max(values):.0f} ms, best {min(values):.0f} ms")
    print(f"wrk errors over all trials: {sum(r['errors'] for r in results)} of {sum(r['requests'] for r in results)} requests")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
