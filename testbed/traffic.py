"""Demo traffic: requests through the VIP, counted per node, with a download check.

Contract: ``python -m testbed.traffic`` (run inside the client host, e.g. via
``cluster-testbed exec client -- ...``) sends ``--requests`` HTTP GETs over
``--concurrency`` parallel clients, each on a new connection, downloads
``--download`` and compares its SHA-256 with the known one, then prints a
table of requests per node and the failures.  Exits 1 if any request failed
or the digest differs.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import hashlib
import http.client
import sys
import time

from . import content


def fetch(host: str, port: int, path: str, timeout: float) -> tuple[int, str | None, bytes]:
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, response.getheader("X-Node"), response.read()
    finally:
        conn.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.traffic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--host", default="203.0.113.1", help="the VIP, IPv4 or IPv6 (default: %(default)s)")
    parser.add_argument("--port", type=int, default=80)
    parser.add_argument("--path", default="/1k.bin")
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=6)
    parser.add_argument("--download", default=content.BIG_FILE, help="file whose digest is checked (default: %(default)s)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)

    per_node: collections.Counter[str] = collections.Counter()
    failures: collections.Counter[str] = collections.Counter()
    started = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
        futures = [pool.submit(fetch, args.host, args.port, args.path, args.timeout) for _ in range(args.requests)]
        for future in concurrent.futures.as_completed(futures):
            try:
                status, node, body = future.result()
            except OSError as exc:
                failures[type(exc).__name__] += 1
                continue
            if status != 200 or body != content.body(args.path):
                failures[f"HTTP {status}" if status != 200 else "wrong body"] += 1
            else:
                per_node[node or "(no X-Node)"] += 1
    elapsed = time.monotonic() - started

    host = f"[{args.host}]" if ":" in args.host else args.host  # an IPv6 VIP, as a URL writes it
    print(f"{args.requests} requests to http://{host}:{args.port}{args.path} over {args.concurrency} "
          f"concurrent clients, one connection each, in {elapsed:.2f} s")
    print(f"  {'node':10} {'served':>7} {'share':>7}")
    for node in sorted(per_node):
        print(f"  {node:10} {per_node[node]:7d} {per_node[node] / args.requests:7.1%}")
    print(f"  {'failed':10} {sum(failures.values()):7d}  {dict(failures) if failures else ''}")

    status, node, body = fetch(args.host, args.port, args.download, args.timeout * 4)
    digest = hashlib.sha256(body).hexdigest()
    intact = status == 200 and digest == content.sha256(args.download)
    print(f"download {args.download} ({len(body)} bytes) from {node}: sha256 {digest[:16]}... "
          f"{'intact' if intact else 'CORRUPT (expected ' + content.sha256(args.download)[:16] + '...)'}")
    return 0 if intact and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
