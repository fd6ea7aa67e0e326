"""deploy/grafana: the dashboard is what its generator builds, and every query parses and names real series.

That every query also returns data from a real Prometheus is tests/e2e/test_monitoring_e2e.py's.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from backup.roles import Role
from node.metrics import AgentMetrics
from tests.unit.test_metrics import collector_of, snapshot, takeover
from distributor.metrics import render

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "deploy" / "grafana"
PROMTOOL = shutil.which("promtool")


def load_generator():
    pytest.importorskip("grafana_foundation_sdk", reason="grafana-foundation-sdk is missing: run scripts/install.sh")
    spec = importlib.util.spec_from_file_location("distributor_dashboard", GRAFANA / "dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_committed_dashboard_is_what_the_generator_builds():
    generator = load_generator()
    result = subprocess.run([sys.executable, str(GRAFANA / "dashboard.py"), "--check"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (GRAFANA / "dashboards" / "distributor.json").read_text() == generator.render()


def test_a_row_per_concern_and_every_query_on_the_provisioned_datasource():
    generator = load_generator()
    board = generator.build()
    rows = [p["title"] for p in board["panels"] if p["type"] == "row"]
    assert rows == ["Overview", "Traffic and connections per node", "Node health", "Failover and replication",
                    "Data path and drops", "Processes"]
    provisioned = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "distributor.yml").read_text())
    uid = provisioned["datasources"][0]["uid"]
    for panel in board["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert {t["datasource"]["uid"] for t in panel["targets"]} == {uid}, panel["title"]
    dashboards = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "distributor.yml").read_text())
    assert dashboards["providers"][0]["type"] == "file"


@pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing: run scripts/install.sh (Debian package prometheus)")
def test_every_panel_query_parses_as_promql(tmp_path):
    generator = load_generator()
    # promtool parses every expression of a rules file: each query becomes a recording rule.
    rules = {"groups": [{"name": "dashboard", "rules": [{"record": f"dashboard:query{i}", "expr": expr}
                                                        for i, (_, expr) in enumerate(generator.queries())]}]}
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def exported_names() -> set[str]:
    """Every series name the distributor, the agent, the recording rules and Prometheus itself provide."""
    names = set()
    active = collector_of(snapshot(Role.ACTIVE, takeovers=(takeover(1.0, 1.3, 1.31, 1.4, 1.4),)))
    # The daemon's adapters, as the collector reads them.
    active.queue = SimpleNamespace(errors=0, drains=1, packets=2)
    active.runtime = SimpleNamespace(late_ticks_max=0.001)
    active.alerts = SimpleNamespace(sent=0, retried=0, failed=0, file_errors=0)
    agent = AgentMetrics("web1", "0.1.0")
    agent.watch_tasks(lambda: {"queued": 0, "running": 0})
    texts = [render(active, True),
             render(collector_of(snapshot(Role.BACKUP, peer_role=Role.ACTIVE))),
             agent.render()]
    for text in texts:
        names.update(line.split("{")[0].split(" ")[0] for line in text.decode().splitlines()
                     if line and not line.startswith("#"))
    for path in (ROOT / "deploy" / "prometheus" / "rules").glob("*.yml"):
        names.update(rule["record"] for group in yaml.safe_load(path.read_text())["groups"] for rule in group["rules"]
                     if "record" in rule)
    return names | {"ALERTS", "up"}


def test_every_series_a_query_names_exists():
    generator = load_generator()
    known = exported_names()
    functions = {"sum", "max", "min", "count", "rate", "increase", "histogram_quantile", "vector", "by", "or", "and",
                 "unless", "on", "without", "group_left"}
    for title, expr in generator.queries():
        without_strings = re.sub(r'"[^"]*"', '""', expr)
        without_labels = re.sub(r"\{[^}]*\}|\[[^]]*\]|(by|on) \([^)]*\)", "", without_strings)
        for name in re.findall(r"(?<![\w.])[a-zA-Z_:][a-zA-Z0-9_:]*", without_labels):
            if name in functions:
                continue
            assert name in known, f"panel {title!r}: {name} is exported by nothing ({expr})"
