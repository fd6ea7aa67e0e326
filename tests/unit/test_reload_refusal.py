"""What a SIGHUP may apply, and what it refuses as needing a restart (distributor.daemon.reload_refusal)."""

from __future__ import annotations

from pathlib import Path

from distributor.config import parse
from distributor.daemon import reload_refusal

EXAMPLE = (Path(__file__).resolve().parents[2] / "docs" / "distributor.example.toml").read_text()


def test_node_weight_and_policy_changes_apply():
    running = parse(EXAMPLE)
    new = parse(EXAMPLE.replace('policy = "least-outstanding"', 'policy = "round-robin"')
                .replace('{ node = "web3", weight = 2 }', '{ node = "web3", weight = 5 }'))
    assert reload_refusal(running, new) is None


def test_a_new_service_needs_a_restart_and_is_refused_by_name():
    running = parse(EXAMPLE)
    extra = '\n[[services]]\nname = "https"\nvip = "203.0.113.1"\nport = 443\nbackends = ["web1"]\n'
    new = parse(EXAMPLE.replace("\n# Node health.", extra + "\n# Node health.", 1))
    assert reload_refusal(running, new) == "new services (https)"


def test_mode_and_failover_changes_need_a_restart():
    running = parse(EXAMPLE)
    assert "distributor.mode changed" in reload_refusal(running, parse(EXAMPLE.replace('mode = "rewrite"', 'mode = "kernel"')))
    assert reload_refusal(running, parse(EXAMPLE.replace("priority = 200", "priority = 150"))) == \
        "the [failover] section changed"
