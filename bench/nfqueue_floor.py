"""What NFQUEUE itself costs: kernel DNAT, with do-nothing consumers on the distributor's queue points.

A consumer that decides nothing (``netfilterqueue``'s C loop, every packet
accepted, no Python logic) bounds what any user-space distributor on this
queue can reach.  Measured side by side with plain DNAT, in interleaved rounds:

* ``dnat``           -- kernel DNAT alone;
* ``syn``            -- DNAT, every new connection's first packet queued and accepted;
* ``syn+fin``        -- the same plus each connection's first FIN or RST (kernel mode's queue points);
* ``every packet``   -- DNAT, every packet queued, its bytes copied out and handed back
                        (rewrite mode's round trip per packet, with no rewriting).

    python -m bench.nfqueue_floor [--rounds 3] [--duration 4]   (root)
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys

from testbed.runner import Options, Testbed

from .compare import Bench

CONSUMER = """
import sys
from netfilterqueue import NetfilterQueue
copy = sys.argv[1] == "copy"
def accept(packet):
    if copy:
        packet.set_payload(packet.get_payload())
    packet.accept()
queue = NetfilterQueue()
queue.bind(7, accept, max_len=4096, sock_len=4096 * 4096)
queue.run()
"""

_VIP = "-d 203.0.113.1/32 -p tcp -m tcp --dport 80"
_QUEUE = "-j NFQUEUE --queue-num 7"
# Per variant: the table and the rules of a BENCH-Q chain hooked first into its PREROUTING.
RULES = {
    "syn": ("mangle", [f"{_VIP} -m conntrack --ctstate NEW {_QUEUE}"]),
    # One FIN per connection reaches user space, as in kernel mode: the first one marks the connection.
    "syn+fin": ("mangle", [f"{_VIP} -m conntrack --ctstate NEW {_QUEUE}",
                           "-p tcp -m tcp --tcp-flags FIN FIN -m connmark --mark 0x1/0x1 -j RETURN",
                           "-p tcp -m tcp --tcp-flags FIN FIN -j CONNMARK --set-mark 0x1/0x1",
                           f"-p tcp -m tcp --tcp-flags FIN FIN {_QUEUE}"]),
    "every packet": ("raw", [f"{_VIP} {_QUEUE}", f"-s 198.51.100.0/24 -p tcp -m tcp --sport 80 {_QUEUE}"]),
}
VARIANTS = ["dnat", *RULES]


def measure(bench: Bench, bed: Testbed, variant: str) -> tuple[float, float]:
    bench.enter("dnat")
    consumer = None
    try:
        if variant != "dnat":
            table, rules = RULES[variant]
            consumer = bed.popen("dist1", [sys.executable, "-c", CONSUMER, "copy" if variant == "every packet" else "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            script = [f"*{table}", ":BENCH-Q - [0:0]", "-I PREROUTING 1 -j BENCH-Q",
                      *[f"-A BENCH-Q {rule}" for rule in rules], "COMMIT"]
            bed.run("dist1", ["iptables-restore", "--noflush"], input="\n".join(script) + "\n")
            bench._wait_answers("dnat")
        keepalive = sum(r.rps for r in bench._wrk("dnat", close=False))
        close = sum(r.rps for r in bench._wrk("dnat", close=True))
        return keepalive, close
    finally:
        if variant != "dnat":
            bed.run("dist1", ["iptables-restore", "--noflush"], check=False,
                    input=f"*{RULES[variant][0]}\n-D PREROUTING -j BENCH-Q\n-F BENCH-Q\n-X BENCH-Q\nCOMMIT\n")
        if consumer is not None:
            consumer.terminate()
            consumer.wait(timeout=10)
        bench.leave("dnat")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nfqueue_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    args = parser.parse_args(argv)
    bed = Testbed("bfloor", Options(nodes=3))
    results: dict[str, list[tuple[float, float]]] = {v: [] for v in VARIANTS}
    try:
        bed.up()
        bed.stop_service("dist2", "distributor")
        bed.stop_service("dist1", "distributor")
        bench = Bench(bed, args.duration, 1000)
        for r in range(args.rounds):
            for variant in VARIANTS[r % len(VARIANTS):] + VARIANTS[:r % len(VARIANTS)]:
                results[variant].append(measure(bench, bed, variant))
                print(f"round {r + 1} {variant:13}: keep-alive {results[variant][-1][0]:9,.0f}/s, "
                      f"new connections {results[variant][-1][1]:8,.0f}/s", flush=True)
    finally:
        bed.down()
    base_ka = statistics.median(k for k, _ in results["dnat"])
    base_cl = statistics.median(c for _, c in results["dnat"])
    print("\n| queue points (do-nothing consumer) | keep-alive req/s | vs DNAT | new conn/s | vs DNAT |")
    print("|---|---|---|---|---|")
    for variant in VARIANTS:
        ka = statistics.median(k for k, _ in results[variant])
        cl = statistics.median(c for _, c in results[variant])
        print(f"| {variant} | {ka:,.0f} | {ka / base_ka:.2f}x | {cl:,.0f} | {cl / base_cl:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
