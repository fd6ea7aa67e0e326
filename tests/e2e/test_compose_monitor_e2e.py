"""The compose testbed's ``monitor`` profile on a real engine: Prometheus and Alertmanager in containers.

Builds the runtime image and the monitor's own image (on podman: a second local base made by
debootstrap with testbed/image/monitor-packages.txt, once), starts the cluster with
``--profile monitor``, and checks what the profile is for: Prometheus scrapes both distributors
(through their guards, which let the monitor's address reach the metrics port and nothing else)
and every node agent, sees dist1 active and dist2 its backup, has deploy/prometheus's rules loaded
and evaluating, and has its Alertmanager; the runtime image stays without Prometheus.  The
project (``cmon``, this suite's ``c`` prefix) is removed at the end, also when a test fails, and
nothing of it may be left: containers, networks, volumes.  The build times are printed (``-s``).
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from testbed.compose import LAN_PORTS, MONITOR_ADDRESS
from testbed.compose_cluster import ComposeCluster
from testbed.runner import wait_until

from .test_compose_e2e import _prepare_engine

ROOT = Path(__file__).resolve().parents[2]
PROJECT = "cmon"
RULES = ROOT / "deploy" / "prometheus" / "rules"
def leftovers(bed: ComposeCluster) -> dict[str, list[str]]:
    """What of the project is still there, by kind."""
    found = {"containers": sorted(bed.containers().values())}
    for kind in ("network", "volume"):
        listing = bed.cli(kind, "ls", "-q", "--filter", f"label=com.docker.compose.project={bed.project}", check=False)
        found[f"{kind}s"] = listing.stdout.split()
    return found


@pytest.fixture(scope="module")
def monitored():
    engine = _prepare_engine()
    bed = ComposeCluster(PROJECT, engine, profiles=("monitor",))
    try:
        started = time.monotonic()
        bed.build(log=lambda message: print(f"compose monitor test: {message}"))
        print(f"compose monitor test: built {', '.join(f.image for f in bed.flavours)} in "
              f"{time.monotonic() - started:.1f} s")
        started = time.monotonic()
        bed.up()
        print(f"compose monitor test: up and healthy, the monitor included, in {time.monotonic() - started:.1f} s")
        yield bed
    finally:
        bed.down()
    left = leftovers(bed)
    assert not any(left.values()), f"left of project {PROJECT} after down: {left}"


def scraped(bed: ComposeCluster) -> dict[tuple[str, str], str]:
    """{(job, name): health} of Prometheus' active targets, named by their distributor or node label."""
    targets = bed.prometheus("targets")["activeTargets"]
    return {(t["labels"]["job"], t["labels"].get("distributor") or t["labels"].get("node") or t["labels"]["instance"]):
            t["health"] for t in targets}


def test_prometheus_scrapes_every_distributor_and_node_agent(monitored):
    expected = {("distributor", h.name) for h in monitored.topology.by_role("distributor")}
    expected |= {("node-agent", h.name) for h in monitored.topology.web_nodes}
    expected |= {("prometheus", "localhost:9090"), ("alertmanager", "localhost:9093")}  # as deploy's config has them
    seen: dict = {}

    def all_up() -> bool:
        seen.clear()
        seen.update(scraped(monitored))
        return expected <= set(seen) and all(seen[target] == "up" for target in expected)

    started = time.monotonic()
    try:
        wait_until(all_up, 60, "every target up in Prometheus", interval=1)
    except Exception:
        pytest.fail(f"targets as Prometheus sees them: {seen}")
    print(f"compose monitor test: every target up {time.monotonic() - started:.1f} s after the cluster was healthy")
    assert set(seen) == expected


def test_prometheus_sees_dist1_active_and_dist2_its_backup(monitored):
    def roles() -> dict[str, str]:
        result = monitored.prometheus("query", query="distributor_failover_role == 1")["result"]
        return {r["metric"]["distributor"]: r["metric"]["role"] for r in result}

    wait_until(lambda: roles() == {"dist1": "active", "dist2": "backup"}, 30,
               "dist1 active and dist2 backup in Prometheus", interval=1)
    up = monitored.prometheus("query", query='up{job="node-agent"}')["result"]
    assert sorted(r["metric"]["node"] for r in up if r["value"][1] == "1") == ["web1", "web2", "web3"]


def rule_names() -> tuple[set[str], set[str]]:
    """The alerting and the recording rules of deploy/prometheus/rules."""
    alerts, records = set(), set()
    for path in RULES.glob("*.yml"):
        for group in yaml.safe_load(path.read_text())["groups"]:
            alerts.update(rule["alert"] for rule in group["rules"] if "alert" in rule)
            records.update(rule["record"] for rule in group["rules"] if "record" in rule)
    return alerts, records


def loaded_rules(bed: ComposeCluster) -> list[dict]:
    return [rule for group in bed.prometheus("rules")["groups"] for rule in group["rules"]]


def test_the_alert_rules_are_loaded_with_an_alertmanager_to_send_to(monitored):
    alerts, records = rule_names()
    assert alerts and records
    loaded = loaded_rules(monitored)
    assert {r["name"] for r in loaded if r["type"] == "alerting"} == alerts
    assert {r["name"] for r in loaded if r["type"] == "recording"} == records
    alertmanagers = wait_until(lambda: monitored.prometheus("alertmanagers")["activeAlertmanagers"], 15,
                               "Prometheus to discover its Alertmanager", interval=1)
    assert [a["url"] for a in alertmanagers] == ["http://localhost:9093/api/v2/alerts"]
    firing = [a["labels"]["alertname"] for a in monitored.prometheus("alerts")["alerts"] if a["state"] == "firing"]
    assert "DistributorTwoActive" not in firing and "DistributorNoActive" not in firing, firing


def test_every_rule_evaluates_without_error(monitored):
    # increase() and rate() need two samples of a series: evaluations before that return nothing, and
    # nothing fails.  So: every target scraped three times, then every group evaluated once more.
    # (This found DistributorHeartbeatAuthFailures failing at every evaluation on a real scrape:
    # "vector cannot contain metrics with the same labelset"; promtool's cases had no such series.)
    wait_until(lambda: min(float(r["value"][1]) for r in monitored.prometheus(
        "query", query='count_over_time(up{job=~"distributor|node-agent"}[1m])')["result"]) >= 3, 30,
               "three scrapes of every target", interval=1)
    before = {g["name"]: g["lastEvaluation"] for g in monitored.prometheus("rules")["groups"]}
    groups: list[dict] = []

    def evaluated_again() -> bool:
        groups[:] = monitored.prometheus("rules")["groups"]
        return all(g["lastEvaluation"] != before.get(g["name"]) for g in groups)

    wait_until(evaluated_again, 30, "every rule group evaluated again", interval=1)
    loaded = [rule for group in groups for rule in group["rules"]]
    failing = {r["name"]: r.get("lastError", "") for r in loaded if r["health"] != "ok"}
    assert not failing, f"rules failing to evaluate: {failing}"


def test_the_monitor_reaches_the_metrics_port_and_not_the_api(monitored):
    dist1 = monitored.topology.host("dist1").address_on("int")
    metrics = monitored.exec("monitor", ["curl", "-sS", "-m", "3", "-o", "/dev/null", "-w", "%{http_code}",
                                         f"http://{dist1}:{LAN_PORTS['metrics']}/metrics"], check=False)
    assert metrics.stdout == "200", metrics.stderr
    api = monitored.exec("monitor", ["curl", "-sS", "-m", "3", "-o", "/dev/null",
                                     f"http://{dist1}:{LAN_PORTS['api']}/"], check=False)
    # The guard drops the rest of the monitor's packets to the distributor (curl: 28, timed out).
    assert api.returncode != 0, f"the API port answered the monitor ({MONITOR_ADDRESS})"


def test_the_runtime_image_stays_without_prometheus(monitored):
    for service in ("dist1", "web1"):
        probe = monitored.exec(service, ["sh", "-c", "command -v prometheus prometheus-alertmanager"], check=False)
        assert probe.returncode != 0 and not probe.stdout.strip(), probe.stdout
    assert monitored.exec("monitor", ["sh", "-c", "command -v prometheus"]).stdout.strip() == "/usr/bin/prometheus"
