"""Cluster administration in the testbed: push times, the agents' memory, task latency (root).

Usage: ``python -m bench.admin_bench [--rounds 5] [--sizes 4,100] [--project bbench]``

Stands a testbed up, then in interleaved rounds, for each size: pushes a new
file of random bytes to the three nodes at once with the distributor's client
(from dist1's namespace), measures the time until every node committed it,
and, side by side, the time to move the same bytes over the same links with
plain HTTP (three parallel ``curl`` downloads of it from the nodes' nginx to
/dev/null: the transfer without hashing, signing, fsync and rename).  Then a
high-priority task (disk-usage) on every node: request to start, and request
to result.  Each round deletes what it pushed.  Prints medians (and ranges),
the agents' peak RSS (VmHWM), and whether any node left service meanwhile.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from distributor.adminclient import AdminClient, new_request_id, run_on_nodes, sync_nodes
from distributor.blobstore import BlobStore
from distributor.content import DesiredContent
from common.keyfile import load_keys
from common.wire import SequenceCounter
from testbed import netns
from testbed.runner import BROKER_PORT, Options, Testbed


def _random_file(path: Path, mib: int) -> None:
    with open(path, "wb") as f:
        for _ in range(mib):
            f.write(os.urandom(1 << 20))


def _peak_rss_kib(bed: Testbed, node: str) -> int:
    for line in open(f"/proc/{bed.service_pid(node, 'agent')}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def _summary(values: list[float], unit: str, digits: int = 2) -> str:
    return f"median {statistics.median(values):.{digits}f} {unit} (range {min(values):.{digits}f}-{max(values):.{digits}f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.admin_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--sizes", default="4,100", help="MiB, comma separated")
    parser.add_argument("--project", default="bbench")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("admin_bench needs root (network namespaces)", file=sys.stderr)
        return 2
    sizes = [int(s) for s in args.sizes.split(",")]
    bed = Testbed(args.project, Options(nodes=3))
    nodes = [h.name for h in bed.topology.web_nodes]
    addresses = {n: str(bed.topology.host(n).address_on("int")) for n in nodes}
    sequence = SequenceCounter()
    push: dict[int, list[float]] = {s: [] for s in sizes}
    raw: dict[int, list[float]] = {s: [] for s in sizes}
    task_start: list[float] = []
    task_result: list[float] = []
    bed.up()
    started_wall = time.time()
    try:
        keys = load_keys(bed.keys_file)
        with tempfile.TemporaryDirectory(prefix="admin-bench-") as tmp:
            blobs = BlobStore(Path(tmp) / "blobs")
            desired = DesiredContent()

            def in_dist1(make):
                async def run():
                    clients = {n: AdminClient(n, (addresses[n], BROKER_PORT), keys, "dist1", sequence) for n in nodes}
                    try:
                        return await make(clients)
                    finally:
                        for c in clients.values():
                            await c.close()

                return netns.call_in(bed.ns("dist1"), asyncio.run, run())

            for round_number in range(1, args.rounds + 1):
                for size in sizes:
                    source = Path(tmp) / f"r{round_number}-{size}.bin"
                    _random_file(source, size)
                    digest, length = blobs.ingest(source)
                    source.unlink()
                    path = f"bench/r{round_number}-{size}m.bin"
                    desired.put(path, length, digest)
                    t0 = time.monotonic()
                    results = in_dist1(lambda clients: sync_nodes(clients, desired, blobs))
                    push[size].append(time.monotonic() - t0)
                    if not all(r.matches for r in results.values()):
                        raise RuntimeError(f"push failed: {results}")
                    t0 = time.monotonic()
                    curls = [bed.popen("dist1", ["curl", "-sf", "-o", "/dev/null", f"http://{addresses[n]}/{path}"])
                             for n in nodes]
                    if any(c.wait(timeout=300) != 0 for c in curls):
                        raise RuntimeError("curl failed")
                    raw[size].append(time.monotonic() - t0)
                    desired.delete(path)
                    in_dist1(lambda clients: sync_nodes(clients, desired, blobs))
                    blobs.remove_unused(e.sha256 for e in desired.entries.values())
                request_id = new_request_id()
                t0 = time.time()
                records = in_dist1(lambda clients: run_on_nodes(clients, request_id, "disk-usage", "high", wait=30))
                done = time.time()
                for record in records.values():
                    if not isinstance(record, dict) or record["state"] != "done":
                        raise RuntimeError(f"task failed: {record}")
                    task_start.append((record["started"] - record["received"]) * 1000)
                task_result.append((done - t0) * 1000)
                print(f"round {round_number}: " + ", ".join(
                    f"{s} MiB push {push[s][-1]:.2f} s / raw {raw[s][-1]:.2f} s" for s in sizes), flush=True)
            peaks = {n: _peak_rss_kib(bed, n) for n in nodes}
            left = [a for a in bed.alerts() if a["time"] >= started_wall]
    finally:
        bed.down()
    print(f"\n{args.rounds} interleaved rounds, 3 nodes pushed at once from dist1 (medians, ranges):")
    for size in sizes:
        ratios = [p / r for p, r in zip(push[size], raw[size])]
        print(f"  {size:>4} MiB: push {_summary(push[size], 's')}, {3 * size / statistics.median(push[size]):.0f} MiB/s in all;"
              f" plain HTTP of the same bytes {_summary(raw[size], 's')}; push/raw {statistics.median(ratios):.2f}x")
    print(f"  high task (disk-usage): request->start {_summary(task_start, 'ms', 1)}; "
          f"request->result on 3 nodes {_summary(task_result, 'ms', 0)}")
    print("  agents' peak RSS (VmHWM): " + ", ".join(f"{n} {kib / 1024:.1f} MiB" for n, kib in peaks.items()))
    print(f"  node state changes during the run: {len(left)} {left[:3] if left else ''}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
