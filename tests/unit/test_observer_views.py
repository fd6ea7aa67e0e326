"""Observers read snapshots: the core's views for the API, the metrics and the daemon, and nothing else of it.

The control API, the metrics and the daemon's role callback see the core through
:meth:`~distributor.core.DistributorCore.stats` and its view methods (plain frozen dataclasses), never
through its parts (the interposer, the health and failover cores, the runtime state): a view can be
kept stable while the parts change, and reading a part is how a decision leaks into an observer.
"""

from __future__ import annotations

import ast
import dataclasses
import pathlib

import pytest

from backup.roles import Role
from distributor.core import ConnectionView, DistributorCore, ServiceView
from distributor.reroute import Mode
from tests.packets import CLIENT, VIP, tcp
from tests.unit.test_admin_core import Pair
from tests.unit.test_reroute import service_spec

ROOT = pathlib.Path(__file__).resolve().parents[2]
OBSERVERS = ("distributor/api.py", "distributor/metrics.py", "distributor/daemon.py")
CORE_PARTS = {"interposer", "health", "failover", "runtime", "machine", "board"}
# The packet path is no observer: the data-path adapter calls the interposer for each packet (core.py's contract).
PACKET_PATH = {("core", "interposer", "decide")}


def test_the_core_shows_its_services_and_connections_as_plain_snapshots():
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2"))], 100)
    core.start(0.0, 0.0)
    for port in (40000, 40001, 40002):  # round-robin: web1, web2, web1
        core.interposer.decide(tcp(CLIENT, VIP, port, 80, "S"), 1.0)
    assert core.service_views() == (ServiceView("web", VIP, 80, "round-robin", ("web1", "web2")),)
    views = core.connections(3.5)
    assert views[0] == ConnectionView(f"{CLIENT}:40000", f"{VIP}:80", "web", "web1", "syn_seen", 2.5)
    assert [v.node for v in views] == ["web1", "web2", "web1"]
    assert [v.client for v in core.connections(3.5, node="web1")] == [f"{CLIENT}:40000", f"{CLIENT}:40002"]
    assert len(core.connections(3.5, limit=2)) == 2 and core.connections(3.5, limit=0) == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        views[0].node = "web2"  # type: ignore[misc]


def test_the_stats_name_the_role_and_whether_this_distributor_is_a_standby():
    alone = DistributorCore("dist1", Mode.REWRITE, [service_spec()], 100)
    assert alone.stats(0.0).role == "alone" and alone.stats(0.0).failover is None
    pair = Pair()
    assert pair.cores["dist1"].stats(0.0).role == "starting" and pair.cores["dist1"].stats(0.0).failover.standby
    pair.step(1.0)
    active, backup = (pair.cores[name].stats(pair.now) for name in ("dist1", "dist2"))
    assert (active.role, active.failover.standby) == ("active", False)
    assert (backup.role, backup.failover.standby) == ("backup", True)
    assert backup.failover.role is Role.BACKUP


def core_part_reads(source: str, name: str) -> list[str]:
    """``x.core.<part>`` and ``core.<part>`` reads in one module's source (``core.interposer.decide`` excepted)."""
    tree = ast.parse(source, name)
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in CORE_PARTS):
            continue
        owner = node.value
        named_core = (isinstance(owner, ast.Name) and owner.id == "core") or (
            isinstance(owner, ast.Attribute) and owner.attr == "core")
        if not named_core:
            continue
        parent = parents.get(node)
        used = parent.attr if isinstance(parent, ast.Attribute) else None
        if ("core", node.attr, used) in PACKET_PATH:
            continue
        found.append(f"{name}:{node.lineno}: core.{node.attr}{'.' + used if used else ''}")
    return found


@pytest.mark.parametrize("module", OBSERVERS)
def test_observers_read_the_cores_views_never_its_parts(module):
    assert core_part_reads((ROOT / module).read_text(), module) == []


def test_the_checker_finds_a_part_read_through_self_and_spares_the_packet_path_and_the_stats():
    source = ("def f(self, core, stats):\n"
              "    a = self.core.interposer.table\n"
              "    b = core.failover.role\n"
              "    c = core.interposer.decide\n"
              "    d = stats.failover.role\n")
    assert core_part_reads(source, "sample.py") == ["sample.py:2: core.interposer.table",
                                                    "sample.py:3: core.failover.role"]
