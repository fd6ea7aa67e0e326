"""The testbed's ``monitor`` host: Debian's Prometheus and Alertmanager with deploy/prometheus's files.

Contract
--------
* :func:`write_monitor_files` copies ``deploy/prometheus`` (prometheus.yml, rules/,
  alertmanager.yml) unchanged into the monitor's directory and writes its ``targets/*.json``
  from the topology: both distributors (their cluster-LAN address, :data:`METRICS_PORT`) and every
  node agent (:data:`AGENT_METRICS_PORT`), labelled with their names.
* :func:`service_argv` and :func:`ready` tell the runner how to start each monitor service and
  when it answers: ``prometheus`` (9090), ``alertmanager`` (9093, no HA cluster port) and
  ``mailsink`` (aiosmtpd on 127.0.0.1:25, the smarthost of deploy's alertmanager.yml, writing a
  Maildir), all inside the monitor's namespace.
* :class:`PrometheusApi` queries that Prometheus from any process (through the monitor's
  namespace); ``python -m testbed.monitoring query EXPR`` does it from inside the monitor host
  (``cluster-testbed exec monitor -- ...``), for the demo.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

from . import http, netns
from .topology import Topology

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "prometheus"
PROMETHEUS_PORT = 9090
ALERTMANAGER_PORT = 9093
AGENT_METRICS_PORT = 9111
MAILSINK = ("127.0.0.1", 25)
METRICS_PORT = 9110  # the distributors' (testbed.runner.METRICS_PORT)

__all__ = ["write_monitor_files", "service_argv", "ready", "PrometheusApi", "DEPLOY", "PROMETHEUS_PORT",
           "ALERTMANAGER_PORT", "AGENT_METRICS_PORT", "MAILSINK"]


def write_monitor_files(topology: Topology, directory: Path) -> None:
    if not (DEPLOY / "prometheus.yml").exists():
        raise FileNotFoundError(f"the monitor host needs deploy/prometheus of the repository; {DEPLOY} is missing")
    for name in ("prometheus.yml", "alertmanager.yml"):
        shutil.copyfile(DEPLOY / name, directory / name)
    shutil.copytree(DEPLOY / "rules", directory / "rules", dirs_exist_ok=True)
    targets = directory / "targets"
    targets.mkdir(exist_ok=True)
    distributors = [{"targets": [f"{host.address_on('int')}:{METRICS_PORT}"], "labels": {"distributor": host.name}}
                    for host in topology.by_role("distributor")]
    agents = [{"targets": [f"{host.address_on('int')}:{AGENT_METRICS_PORT}"], "labels": {"node": host.name}}
              for host in topology.web_nodes]
    for name, content in (("distributors.json", distributors), ("node-agents.json", agents),
                          ("alertmanager.json", [{"targets": [f"localhost:{ALERTMANAGER_PORT}"]}])):
        (targets / name).write_text(json.dumps(content, indent=2) + "\n")
    for data in ("prometheus-data", "alertmanager-data"):  # the mail sink makes its Maildir itself
        (directory / data).mkdir(exist_ok=True)
    for path in [directory, *directory.rglob("*")]:
        path.chmod(0o777 if path.is_dir() else 0o644)  # Debian's binaries need no special user here


def service_argv(service: str, directory: Path) -> list[str]:
    if service == "prometheus":
        return ["prometheus", f"--config.file={directory / 'prometheus.yml'}",
                f"--storage.tsdb.path={directory / 'prometheus-data'}", "--storage.tsdb.retention.time=1d",
                f"--web.listen-address=0.0.0.0:{PROMETHEUS_PORT}"]
    if service == "alertmanager":
        return ["prometheus-alertmanager", f"--config.file={directory / 'alertmanager.yml'}",
                f"--storage.path={directory / 'alertmanager-data'}",
                f"--web.listen-address=0.0.0.0:{ALERTMANAGER_PORT}",
                "--cluster.listen-address="]  # one Alertmanager: no gossip port
    if service == "mailsink":
        return [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{MAILSINK[0]}:{MAILSINK[1]}",
                "-c", "aiosmtpd.handlers.Mailbox", str(directory / "Maildir")]
    raise ValueError(f"unknown monitor service {service!r}; known: prometheus, alertmanager, mailsink")


def ready(ns: str, service: str) -> bool:
    if service == "prometheus":
        return http.get(ns, "127.0.0.1", PROMETHEUS_PORT, "/-/ready", timeout=1).status == 200
    if service == "alertmanager":
        return http.get(ns, "127.0.0.1", ALERTMANAGER_PORT, "/-/ready", timeout=1).status == 200
    if service == "mailsink":
        netns.connect_in(ns, MAILSINK, timeout=1).close()
        return True
    raise ValueError(f"unknown monitor service {service!r}")


class PrometheusApi:
    """Prometheus' HTTP API (api/v1) of the monitor host, from the monitor's namespace."""

    def __init__(self, ns: str, port: int = PROMETHEUS_PORT):
        self.ns = ns
        self.port = port

    def get(self, path: str, **params: str) -> dict:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        reply = http.get(self.ns, "127.0.0.1", self.port, f"/api/v1/{path}{query}", timeout=10)
        answer = json.loads(reply.body)
        if reply.status != 200 or answer.get("status") != "success":
            raise RuntimeError(f"Prometheus answered {reply.status} to {path} {params}: {answer.get('error', answer)}")
        return answer["data"]

    def query(self, expr: str) -> list[dict]:
        """An instant query's result vector (``[{"metric": {...}, "value": [t, "v"]}, ...]``)."""
        return self.get("query", query=expr)["result"]

    def alerts(self) -> list[dict]:
        return self.get("alerts")["alerts"]

    def targets(self) -> list[dict]:
        return self.get("targets")["activeTargets"]


def _local_query(expr: str, port: int) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
    with urllib.request.urlopen(url, timeout=10) as reply:
        return json.loads(reply.read())["data"]["result"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.monitoring",
                                     description="Ask the monitor host's Prometheus (run it inside the monitor).")
    verbs = parser.add_subparsers(dest="verb", required=True)
    ask = verbs.add_parser("query", help="an instant query, printed as a table of labels and values")
    ask.add_argument("expr")
    ask.add_argument("--at-least", type=float, default=None,
                     help="wait until the values add up to at least this much (Prometheus scrapes every 5 s)")
    ask.add_argument("--timeout", type=float, default=30.0)
    ask.add_argument("--port", type=int, default=PROMETHEUS_PORT)
    listing = verbs.add_parser("alerts", help="the alerts pending or firing, one a line")
    listing.add_argument("--port", type=int, default=PROMETHEUS_PORT)
    args = parser.parse_args(argv)
    if args.verb == "alerts":
        with urllib.request.urlopen(f"http://127.0.0.1:{args.port}/api/v1/alerts", timeout=10) as reply:
            alerts = json.loads(reply.read())["data"]["alerts"]
        for alert in alerts:
            print(f"  {alert['state']:8} {alert['labels']['alertname']}: {alert['annotations'].get('summary', '')}")
        if not alerts:
            print("  (none pending or firing)")
        return 0
    deadline = time.monotonic() + args.timeout
    while True:
        result = _local_query(args.expr, args.port)
        total = sum(float(r["value"][1]) for r in result)
        if args.at_least is None or total >= args.at_least or time.monotonic() >= deadline:
            break
        time.sleep(0.5)
    print(f"  {args.expr}")
    for row in sorted(result, key=lambda r: sorted(r["metric"].items())):
        labels = ", ".join(f"{k}={v}" for k, v in sorted(row["metric"].items())) or "(no labels)"
        print(f"    {labels:40} {float(row['value'][1]):10.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
