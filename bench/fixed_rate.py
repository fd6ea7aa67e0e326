"""Latency at a fixed request rate: an open-loop HTTP/1.1 load generator.

Requests are scheduled at exact times (``--rate`` per second) and spread over
``--connections`` keep-alive connections; each latency runs from the request's
*scheduled* time to its last response byte, so a stall shows up in the tail
instead of silently slowing the sender down (no coordinated omission).
Prints one JSON object: requests, errors, p50/p90/p99/max in milliseconds.

    python -m bench.fixed_rate --rate 1000 --duration 5 http://203.0.113.1/1k.bin [http://...]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from urllib.parse import urlsplit


async def connection(host: str, port: int, path: str, queue: asyncio.Queue, latencies: list[float],
                     errors: list[str], timeout: float) -> None:
    request = f"GET {path} HTTP/1.1\r\nHost: {f'[{host}]' if ':' in host else host}\r\n\r\n".encode()
    reader = writer = None
    while True:
        scheduled = await queue.get()
        if scheduled is None:
            break
        try:
            if writer is None:
                reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
            writer.write(request)
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await asyncio.wait_for(reader.readexactly(length), timeout)
            if not head.startswith(b"HTTP/1.1 200"):
                errors.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            latencies.append(time.perf_counter() - scheduled)
        except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError, asyncio.LimitOverrunError) as exc:
            errors.append(type(exc).__name__)
            if writer is not None:
                writer.close()
            reader = writer = None
    if writer is not None:
        writer.close()


async def run(urls: list[str], rate: float, duration: float, connections: int, timeout: float) -> dict:
    targets = [urlsplit(url) for url in urls]
    queues = [asyncio.Queue() for _ in range(connections)]
    latencies: list[float] = []
    errors: list[str] = []
    workers = [
        asyncio.create_task(connection(t.hostname, t.port or 80, t.path or "/", queues[i], latencies, errors, timeout))
        for i, t in enumerate(targets[i % len(targets)] for i in range(connections))
    ]
    total = int(rate * duration)
    start = time.perf_counter()
    for n in range(total):
        scheduled = start + n / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        queues[n % connections].put_nowait(scheduled)
    for q in queues:
        q.put_nowait(None)
    await asyncio.gather(*workers)
    latencies.sort()

    def pct(p: float) -> float | None:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3) if latencies else None

    return {"requests": len(latencies), "errors": len(errors), "rate": rate, "p50_ms": pct(0.50), "p90_ms": pct(0.90),
            "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 3) if latencies else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fixed_rate", description=__doc__.split("\n\n")[0])
    parser.add_argument("urls", nargs="+", help="connections are spread over these URLs")
    parser.add_argument("--rate", type=float, default=1000.0, help="requests per second (default: 1000)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds (default: 5)")
    parser.add_argument("--connections", type=int, default=16, help="keep-alive connections (default: 16)")
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args(argv)
    if args.rate <= 0 or args.duration <= 0 or args.connections < 1:
        parser.error("--rate, --duration and --connections must be positive")
    print(json.dumps(asyncio.run(run(args.urls, args.rate, args.duration, args.connections, args.timeout))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
