"""The guard's spec follows the nodes: configured ones and those added later (reload or the API)."""

from __future__ import annotations

from pathlib import Path

from distributor.config import load
from distributor.daemon import guard_spec

EXAMPLE = Path(__file__).resolve().parents[2] / "docs" / "distributor.example.toml"


def test_nodes_added_after_start_are_let_through_and_protected():
    config = load(EXAMPLE)
    at_start = guard_spec(config)
    configured = {str(a) for a in config.nodes.values()}
    assert configured <= set(at_start.allowed_sources)
    later = guard_spec(config, more_nodes=["198.51.100.99", *config.nodes.values()])
    assert set(later.allowed_sources) == set(at_start.allowed_sources) | {"198.51.100.99"}
    assert "198.51.100.99" in later.protected
    assert len(later.allowed_sources) == len(set(later.allowed_sources))  # each once
    assert guard_spec(config, more_nodes=config.nodes.values()) == at_start  # nothing new: the same spec, no reinstall
