"""The feedback policy against least-outstanding and round-robin, with one node slowed down.

For each policy a testbed is stood up (``Options(policy=...)``, three web nodes, the distributors as
deployed: dist1 active, dist2 its backup), and one node (``--slow``, web3) is made slow: its nginx
answers every request, the agent's ``/health`` probe included, ``--delay`` ms late (the echo
module's ``echo_sleep``, which holds the request without blocking the worker: a node with a slow
disk or a slow dependency).  The probe slowing down is what the feedback policy reads: the agent
reports its probe's response time in every heartbeat, and the distributor scales the node's weight
by it (``distributor.heartbeat.feedback_factor``).  A CPU hog would not do here: every namespace
shares the machine's two CPUs, so it would slow every node (and the distributor) alike, and the CPU
figure the agents report is machine-wide.

Then wrk requests ``/`` through the VIP for ``--seconds``, a new connection per request (each
request is a balancing decision; keep-alive connections would be placed once), with ``--latency``
and a Lua hook counting the ``X-Node`` of every response.  Reported per policy (medians over the
rounds, the policies' order rotating each round): requests/s, p50/p90/p99 latency, the share of the
requests the slow node served, errors, and the slow node's feedback factor read from the active
distributor during the load (every policy computes it; only ``feedback`` uses it).

    python -m bench.feedback_bench [--seconds S] [--rounds N] [--delay MS] [--connections C] [--mode rewrite|kernel]   (root)

Each run has its own testbed project name (``fb<pid>``), so two benches at once do not tear each
other down; each testbed is removed after its policy's run, also on failure.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from testbed import netns, wrk
from testbed.runner import API_PORT, Options, Testbed, TestbedError, wait_until

POLICIES = ("round-robin", "least-outstanding", "feedback")
SETUP_SECONDS = 6.0  # a first guess of a run's cost besides the load (up, slowing, settling, down); then measured


def slow_down(bed: Testbed, node: str, delay: float) -> None:
    """Make ``node``'s nginx answer ``/`` and ``/health`` ``delay`` seconds late (nginx reloads on SIGHUP)."""
    conf = bed.host_dir(node) / "nginx.conf"
    text = conf.read_text()
    marker = "location / { }"
    if marker not in text:
        raise TestbedError(f"{conf} has no '{marker}': the testbed's nginx template changed")
    slow = (f'location = / {{ echo_sleep {delay:g}; echo "<h1>{node}</h1>"; }}\n'
            f"        location = /health {{ echo_sleep {delay:g}; echo ok; }}\n"
            f"        {marker}")
    conf.write_text(text.replace(marker, slow, 1))
    pid = bed.service_pid(node, "nginx")
    if pid is None:
        raise TestbedError(f"nginx is not running on {node}")
    os.kill(pid, signal.SIGHUP)
    address = str(bed.topology.host(node).address_on("int"))

    def answers_late() -> bool:
        started = time.monotonic()
        reply = bed_get(bed, "dist1", address, 80, "/health")
        return reply[0] == 200 and time.monotonic() - started >= delay * 0.9

    wait_until(answers_late, 15, f"{node} to answer {delay * 1000:g} ms late", interval=0.2)


def bed_get(bed: Testbed, host: str, address: str, port: int, path: str, token: str | None = None,
            timeout: float = 5.0) -> tuple[int, bytes]:
    """One GET from inside ``host`` (with a bearer token when given): (status, body)."""
    conn = http.client.HTTPConnection(address, port, timeout=timeout)
    conn.sock = netns.connect_in(bed.ns(host), (address, port), timeout=timeout)
    try:
        headers = {"Connection": "close"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def feedback_factors(bed: Testbed, host: str) -> dict[str, float]:
    """Each node's feedback factor as the distributor on ``host`` holds it (control API, viewer token)."""
    address = str(bed.topology.host(host).address_on("int"))
    status, body = bed_get(bed, host, address, API_PORT, "/api/v1/nodes", token=bed.api_token("viewer"))
    if status != 200:
        raise TestbedError(f"GET /api/v1/nodes on {host}: HTTP {status}: {body[:200]!r}")
    return {node["name"]: node["services"][0]["feedback"] for node in json.loads(body) if node["services"]}


def probe_times(bed: Testbed, host: str) -> dict[str, float]:
    """Each node's last reported probe response time (ms), from the distributor's metrics."""
    return {dict(labels)["node"]: value * 1000 for (name, labels), value in bed.metrics(host).items()
            if name == "distributor_node_probe_duration_seconds"}


def one_run(policy: str, args: argparse.Namespace, project: str) -> dict:
    bed = Testbed(project, Options(nodes=3, policy=policy, mode=args.mode))
    bed.up()
    try:
        active, _ = bed.wait_settled(30)
        slow_down(bed, args.slow, args.delay / 1000)
        # The agents report the slow probe within a few heartbeats; the distributor averages the
        # reports.  Every policy waits the same way, so each run starts from the same state.
        wait_until(lambda: feedback_factors(bed, active)[args.slow] < 0.9, 20,
                   f"{args.slow}'s feedback factor to fall", interval=0.25)
        url = f"http://{bed.vip}/"
        with tempfile.TemporaryDirectory(prefix="fb-wrk-") as tmp:
            script = Path(tmp) / "count_nodes.lua"
            script.write_text(wrk.COUNT_NODES_LUA)
            argv = wrk.command(url, duration=args.seconds, connections=args.connections, close=True,
                               script=str(script), timeout=5)
            load = bed.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                time.sleep(args.seconds * 0.6)  # mid-run: what the distributor holds under the load
                factors = feedback_factors(bed, active)
                probes = probe_times(bed, active)
            finally:
                output = load.communicate(timeout=args.seconds + 60)[0]
        result = wrk.parse(output)
    finally:
        bed.down()
    served = sum(result.nodes.values())
    return {"policy": policy, "rps": result.rps, "requests": result.requests, "errors": result.errors,
            "p50": result.latency_ms.get("p50"), "p90": result.latency_ms.get("p90"),
            "p99": result.latency_ms.get("p99"),
            "share": result.nodes.get(args.slow, 0) / served if served else 0.0, "nodes": result.nodes,
            "factor": factors.get(args.slow), "factors": factors, "probe_ms": probes}


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def spread(values: list[float], fmt: str) -> str:
    """The median, and the range when there are several rounds."""
    middle = format(median(values), fmt)
    if len(values) < 2:
        return middle
    return f"{middle} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.feedback_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of load per policy and round (default 10)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; each runs every policy (default 1)")
    parser.add_argument("--delay", type=float, default=20.0, help="ms the slow node adds to every answer (default 20)")
    parser.add_argument("--connections", type=int, default=16, help="wrk's concurrent connections (default 16)")
    parser.add_argument("--mode", choices=("rewrite", "kernel"), default="rewrite", help="data path (default rewrite)")
    parser.add_argument("--slow", default="web3", choices=("web1", "web2", "web3"), help="the slowed node (default web3)")
    parser.add_argument("--policies", default=",".join(POLICIES), help=f"comma-separated (default {','.join(POLICIES)})")
    args = parser.parse_args(argv)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    if not 1 <= args.rounds <= 10 or not 1 <= args.seconds <= 120 or not 0 < args.delay <= 1000 \
            or not 1 <= args.connections <= 1024 or not policies:
        parser.error("--rounds 1-10, --seconds 1-120, --delay (0, 1000] ms, --connections 1-1024, some --policies")
    project = f"fb{os.getpid() % 10_000_000}"
    runs: list[dict] = []
    total = args.rounds * len(policies)
    started = time.monotonic()
    for round_ in range(args.rounds):
        order = policies[round_ % len(policies):] + policies[:round_ % len(policies)]
        for policy in order:
            done = len(runs)
            per_run = (time.monotonic() - started) / done if done else args.seconds + SETUP_SECONDS
            left = (total - done) * per_run
            print(f"[feedback_bench] round {round_ + 1}/{args.rounds}, {policy}, {args.mode} mode: run {done + 1} "
                  f"of {total}, about {left:.0f} s left", file=sys.stderr, flush=True)
            run = one_run(policy, args, project)
            run["round"] = round_ + 1
            runs.append(run)
            print(f"[feedback_bench]   {run['rps']:.0f} req/s, p99 {run['p99']} ms, {args.slow} served "
                  f"{run['share']:.1%}, factors {run['factors']}, probes (ms) "
                  f"{ {n: round(v, 1) for n, v in run['probe_ms'].items()} }, errors {run['errors']}",
                  file=sys.stderr, flush=True)
    elapsed = time.monotonic() - started

    print(f"\n{args.slow} answers {args.delay:g} ms late; wrk, {args.connections} connections, a new connection per "
          f"request, {args.seconds:g} s per run; {args.mode} mode; {args.rounds} round(s), medians "
          f"(range); {elapsed:.0f} s in all.\n")
    print(f"| policy | requests/s | p50 (ms) | p90 (ms) | p99 (ms) | {args.slow}'s share | errors "
          f"| {args.slow}'s feedback factor |")
    print("|---|---|---|---|---|---|---|---|")
    for policy in policies:
        mine = [r for r in runs if r["policy"] == policy]
        factors = [r["factor"] for r in mine if r["factor"] is not None]
        print(f"| {policy} | {spread([r['rps'] for r in mine], '.0f')} "
              f"| {spread([r['p50'] for r in mine if r['p50'] is not None], '.2f')} "
              f"| {spread([r['p90'] for r in mine if r['p90'] is not None], '.2f')} "
              f"| {spread([r['p99'] for r in mine if r['p99'] is not None], '.2f')} "
              f"| {spread([100 * r['share'] for r in mine], '.1f')} % "
              f"| {sum(r['errors'] for r in mine)} "
              f"| {spread(factors, '.2f') if factors else '-'}{'' if policy == 'feedback' else ' (unused)'} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
