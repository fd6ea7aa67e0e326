"""deploy/prometheus: the config, the rules and Alertmanager's config pass their tools, and every alert is proven.

``promtool test rules`` runs deploy/prometheus/tests/*.yml, where each alert fires on synthetic
series and resolves; this module also checks that no alert of the rules file lacks such a pair
of cases, so a new alert without a test fails here.  Skipped, with the reason, without promtool
or amtool (Debian packages prometheus and prometheus-alertmanager; scripts/install.sh).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy" / "prometheus"
RULE_FILES = sorted((DEPLOY / "rules").glob("*.yml"))
TEST_FILES = sorted((DEPLOY / "tests").glob("*.yml"))
PROMTOOL = shutil.which("promtool")
AMTOOL = shutil.which("amtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing: run scripts/install.sh (Debian "
                                                              "package prometheus)")


def run(argv: list[str], cwd: Path = DEPLOY) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(argv)} failed ({result.returncode}):\n{result.stdout}{result.stderr}"
    return result.stdout + result.stderr


def alerts() -> dict[str, dict]:
    found = {}
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                if "alert" in rule:
                    found[rule["alert"]] = rule
    return found


@needs_promtool
def test_promtool_check_config_and_check_rules_pass():
    run([PROMTOOL, "check", "config", "prometheus.yml"])
    out = run([PROMTOOL, "check", "rules", *map(str, RULE_FILES)])
    assert "SUCCESS" in out


@needs_promtool
def test_promtool_test_rules_every_alert_fires_and_resolves_on_synthetic_series():
    assert TEST_FILES
    run([PROMTOOL, "test", "rules", *(str(p.relative_to(DEPLOY)) for p in TEST_FILES)])


def test_every_alert_has_a_case_that_fires_it_and_a_later_one_that_sees_it_resolved():
    cases: dict[str, list[tuple[str, bool]]] = {}
    for path in TEST_FILES:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                cases.setdefault(case["alertname"], []).append((case["eval_time"], bool(case.get("exp_alerts"))))
    seconds = {"s": 1, "m": 60, "h": 3600}
    for name in alerts():
        checks = [(float(t[:-1]) * seconds[t[-1]], firing) for t, firing in cases.get(name, [])]
        fired = [t for t, firing in checks if firing]
        assert fired, f"no test case sees {name} firing"
        assert any(not firing and t > min(fired) for t, firing in checks), f"no test case sees {name} resolve"


def test_every_alert_has_a_severity_a_summary_and_a_description():
    for name, rule in alerts().items():
        assert rule.get("labels", {}).get("severity") in ("page", "ticket"), name
        assert {"summary", "description"} <= set(rule.get("annotations", {})), name


@pytest.mark.skipif(AMTOOL is None, reason="amtool is missing: run scripts/install.sh (Debian package "
                                           "prometheus-alertmanager)")
def test_amtool_check_config_passes_and_every_alert_reaches_the_mail_receiver():
    run([AMTOOL, "check-config", "alertmanager.yml"])
    for name, rule in alerts().items():
        out = run([AMTOOL, "config", "routes", "test", "--config.file=alertmanager.yml", f"alertname={name}",
                   f"severity={rule['labels']['severity']}"])
        assert "ops-mail" in out, (name, out)
