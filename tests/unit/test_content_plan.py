"""The desired content and the anti-entropy planner (pure)."""

import pytest

from common.paths import PathRefused
from distributor.content import (Change, Delete, DesiredContent, Entry, NodeReport, Transfer, content_status, differences,
                                 matches, plan)

A, B, C = "a" * 64, "b" * 64, "c" * 64


def report(version, **paths):
    return NodeReport(version, {p.replace("_", "."): Entry(p.replace("_", "."), *v) for p, v in paths.items()})


def desired_with(*changes):
    desired = DesiredContent()
    for change in changes:
        if change[0] == "put":
            desired.put(change[1], change[2], change[3])
        else:
            desired.delete(change[1])
    return desired


def test_changes_are_numbered_versions():
    desired = DesiredContent()
    assert desired.put("a.html", 1, A).version == 1
    assert desired.put("b.html", 2, B).version == 2
    assert desired.delete("a.html").version == 3
    assert desired.version == 3 and set(desired.entries) == {"b.html"} and desired.deleted == {"a.html": 3}
    with pytest.raises(KeyError):
        desired.delete("never.html")
    with pytest.raises(PathRefused):
        desired.put("../x", 1, A)
    with pytest.raises(ValueError):
        desired.put("x", 1, "not a digest")


def test_a_fresh_node_gets_every_path_in_version_order_then_a_commit():
    desired = desired_with(("put", "b.html", 2, B), ("put", "a.html", 1, A))
    p = plan(desired, NodeReport(0))
    assert p.operations == (Transfer("b.html", 1, 2, B), Transfer("a.html", 2, 1, A))
    assert p.commit and p.target == 2 and p.bytes_to_send == 3 and not p.in_sync


def test_missed_versions_are_compacted_to_each_paths_final_state():
    desired = desired_with(("put", "a.html", 1, A), ("put", "a.html", 2, B), ("put", "a.html", 3, C),
                           ("put", "gone.html", 1, A), ("delete", "gone.html"))
    p = plan(desired, NodeReport(0))
    assert p.operations == (Transfer("a.html", 3, 3, C),)  # once, the last bytes; the put-then-deleted path costs nothing
    assert p.target == 5


def test_a_node_behind_gets_only_what_changed_and_deletes_with_the_delete_version():
    desired = desired_with(("put", "a.html", 1, A), ("put", "b.html", 2, B), ("delete", "a.html"),
                           ("put", "c.html", 3, C))
    node = report(2, a_html=(1, 1, A), b_html=(2, 2, B))
    assert plan(desired, node).operations == (Delete("a.html", 3), Transfer("c.html", 4, 3, C))


def test_a_matching_node_needs_nothing_and_passes_the_gate():
    desired = desired_with(("put", "a.html", 1, A))
    node = report(1, a_html=(1, 1, A))
    assert plan(desired, node).in_sync and matches(desired, node)


def test_the_gate_needs_the_committed_version_as_well_as_the_bytes():
    desired = desired_with(("put", "a.html", 1, A))
    uncommitted = report(0, a_html=(1, 1, A))  # transferred, commit not yet done
    assert not matches(desired, uncommitted)
    p = plan(desired, uncommitted)
    assert p.operations == () and p.commit  # only the commit is left
    assert not matches(desired, None)  # unreachable
    assert not matches(desired, report(1, a_html=(1, 1, B)))  # other bytes


def test_the_same_bytes_pushed_again_need_no_transfer():
    desired = desired_with(("put", "a.html", 1, A), ("put", "a.html", 1, A))
    node = report(1, a_html=(1, 1, A))
    p = plan(desired, node)
    assert p.operations == () and p.commit and p.target == 2


def test_extra_managed_paths_are_deleted():
    desired = desired_with(("put", "a.html", 1, A))
    node = report(1, a_html=(1, 1, A), stray_html=(1, 5, B))
    assert differences(desired, node) == [("stray.html", "extra")]
    assert plan(desired, node).operations == (Delete("stray.html", 1),)


@pytest.mark.parametrize("node", [report(5), report(1, a_html=(4, 1, A))])
def test_a_node_ahead_is_never_rolled_back(node):
    desired = desired_with(("put", "a.html", 1, A))
    p = plan(desired, node)
    assert p.conflict and "ahead" in p.conflict and p.operations == () and not p.commit and not p.in_sync


def test_status_per_node_and_which_differ():
    desired = desired_with(("put", "a.html", 1, A), ("put", "b.html", 1, B))
    rows = content_status(desired, {"web2": report(1, a_html=(1, 1, A)), "web1": report(2, a_html=(1, 1, A), b_html=(2, 1, B)),
                                    "web3": None})
    assert [(r.node, r.matches, r.lag) for r in rows] == [("web1", True, 0), ("web2", False, 1), ("web3", False, None)]
    assert rows[1].differing == (("b.html", "missing"),)


def test_desired_state_round_trips_and_replays_in_order_only():
    desired = desired_with(("put", "a.html", 1, A), ("put", "b.html", 2, B), ("delete", "a.html"))
    copy = DesiredContent.from_dict(desired.to_dict())
    assert copy.to_dict() == desired.to_dict()
    replica = DesiredContent()
    replica.apply(Change(1, "put", "a.html", 1, A))
    with pytest.raises(ValueError, match="out of order"):
        replica.apply(Change(3, "put", "b.html", 1, B))


def test_a_manifest_with_a_bad_field_is_refused_by_name():
    with pytest.raises(ValueError, match=r"manifest.paths\['x'\].sha256"):
        NodeReport.from_manifest({"version": 1, "paths": {"x": {"version": 1, "size": 1, "sha256": "nope"}}})
    with pytest.raises(ValueError, match="manifest.version"):
        NodeReport.from_manifest({"version": -1, "paths": {}})
