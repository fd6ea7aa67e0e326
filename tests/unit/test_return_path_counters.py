"""Rewrite mode's return path counts the node -> client bytes per backend, and the counts read back."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from distributor.reroute import RuleBackend, RuleService
from distributor.rules import parse_return_path_bytes, render_return_path, return_path_tag

LAYOUT = (RuleService("http", "203.0.113.1", 80, (RuleBackend("198.51.100.11", 80, 0x1000),
                                                  RuleBackend("198.51.100.12", 8080, 0x1001))),)


def test_every_backend_chain_counts_what_it_rewrites_and_names_its_backend():
    text = render_return_path(0, LAYOUT)
    assert 'counter ip saddr set 203.0.113.1 comment "http 198.51.100.11:80"' in text
    assert 'counter ip saddr set 203.0.113.1 tcp sport set 80 comment "http 198.51.100.12:8080"' in text


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                    reason="nft -c needs root and the nftables package")
def test_nft_accepts_the_return_path():
    result = subprocess.run(["nft", "-c", "-f", "-"], input=render_return_path(0, LAYOUT), capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 0, result.stderr


def test_the_counters_are_read_back_per_service_node_address_and_port():
    def rule(comment, packets, count):
        return {"rule": {"family": "ip", "table": "dist0", "chain": "to_vip_0", "comment": comment,
                         "expr": [{"counter": {"packets": packets, "bytes": count}}, {"mangle": {}}]}}

    listing = json.dumps({"nftables": [{"metainfo": {}}, {"table": {"name": "dist0"}},
                                       rule(return_path_tag("http", "198.51.100.11", 80), 3, 4500),
                                       rule(return_path_tag("http alt", "198.51.100.12", 8080), 1, 60),
                                       {"rule": {"chain": "postrouting", "expr": [{"vmap": {}}]}}]})
    assert parse_return_path_bytes(listing) == {("http", "198.51.100.11", 80): 4500,
                                               ("http alt", "198.51.100.12", 8080): 60}
