"""Playbooks of the content core inside the distributor core: syncs, the content gate, task requests.

The distributor core runs with [health] (real heartbeat datagrams move its nodes between up and dead)
and [administration]; what a broker would answer is fed back as SyncReported / TaskReported, as the
adapter (distributor.adminclient.NodeAdministrator) does.
"""

from __future__ import annotations

import ipaddress

from backup.failover import FailoverOptions
from backup.roles import FailoverSettings
from common.sansio import Tick
from common.wire import Keys, Kind, NodeHeartbeat, seal
from distributor.admin import AdminReply
from distributor.content import Entry, NodeReport
from distributor.contentcore import (ActiveChanged, AdministrationOptions, BundleAdd, BundleRemove, BundleSpec,
                                     CollectBlobs, ContentCore, ContentDelete, ContentPut, ContentRefused, ContentState,
                                     DesiredReplicated, FetchTask, FileSpec, NodesChanged, RunTask, SaveAdministration,
                                     SetContentGate, SyncNode, SyncReported, TaskReported, TaskRequested)
from distributor.core import DistributorCore, HealthOptions
from distributor.heartbeat import HealthSettings
from distributor.reroute import Mode
from tests.packets import WEB
from tests.playbook import Playbook, only
from tests.unit.test_reroute import service_spec

KEYS = Keys({1: b"k" * 32})
WALL = 1_800_000_000.0
NODES = ("web1", "web2", "web3")
SETTINGS = HealthSettings(tick=0.25, warning=3, dead=8, rise=2, slow_start=0.0)
OPTIONS = AdministrationOptions(check_interval=60.0, retry=2.0, max_retry=8.0, task_poll=1.0, task_wanted_for=600.0)
SHA_A = "a" * 64
SHA_B = "b" * 64
REPORT = NodeHeartbeat(0.1, 0.1, 2.0, 250).pack()


class Cluster:
    """A distributor core with three nodes, its clock, and the nodes' heartbeats."""

    def __init__(self, saved: str | None = None):
        self.core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=NODES)], 100,
                                    health=HealthOptions(SETTINGS, {n: WEB[n] for n in NODES}), health_keys=KEYS,
                                    administration=OPTIONS, saved_administration=saved)
        self.play = Playbook(self.core)
        self.now = 0.0
        self.sequence = {n: 0 for n in NODES}
        self.beating = set(NODES)
        self.requests = 0
        self.started = self.core.start(0.0, WALL)

    # -- time and heartbeats --------------------------------------------------------------------------
    def beat(self, node: str) -> list:
        self.sequence[node] += 1
        data = seal(KEYS, Kind.NODE_HEARTBEAT, node, self.sequence[node], WALL + self.now, REPORT)
        from distributor.heartbeat import NodeDatagram
        return self.core.handle(NodeDatagram(data, WEB[node], self.now, WALL + self.now))

    def run(self, seconds: float) -> list:
        """Ticks for ``seconds``; the beating nodes heartbeat before each tick.  Every command that came out."""
        out = []
        for _ in range(round(seconds / SETTINGS.tick)):
            self.now = round(self.now + SETTINGS.tick, 6)
            for node in sorted(self.beating):
                out += self.beat(node)
            out += self.core.handle(Tick(self.now, WALL + self.now))
        return out

    def kill(self, node: str) -> list:
        self.beating.discard(node)
        return self.run(SETTINGS.tick * (SETTINGS.dead + 2))  # past the dead threshold

    def revive(self, node: str) -> list:
        self.beating.add(node)
        return self.run(SETTINGS.tick)

    # -- the operator and the brokers -----------------------------------------------------------------
    def request_id(self) -> int:
        self.requests += 1
        return self.requests

    def put(self, path: str, sha256: str = SHA_A, size: int = 10) -> list:
        return self.core.handle(ContentPut(self.request_id(), (FileSpec(path, size, sha256),), "alice", self.now,
                                           WALL + self.now))

    def synced(self, node: str, target: int, matches: bool = True, error: str | None = None, operations: int = 1,
               conflict: str | None = None) -> list:
        desired = self.core.content.desired
        entries = {p: Entry(p, e.version, e.size, e.sha256) for p, e in desired.entries.items()} if matches else {}
        report = NodeReport(target if matches else 0, entries) if error is None else None
        return self.core.handle(SyncReported(node, target, error is None, matches, report, conflict, error, operations,
                                             self.now, WALL + self.now))

    def task(self, name: str = "disk-usage", nodes=None, priority: str | None = "high", task_id: str = "t1") -> list:
        return self.core.handle(TaskRequested(self.request_id(), task_id, name, nodes, priority, {}, "alice", self.now,
                                              WALL + self.now))

    def task_answer(self, node: str, state: str, task_id: str = "t1", exit_status: int | None = None) -> list:
        record = {"id": task_id, "state": state, "exit_status": exit_status, "output": "ok\n", "duration": 0.1}
        return self.core.handle(TaskReported(task_id, node, record, None, False, self.now, WALL + self.now))

    def serving(self, node: str) -> bool:
        return self.core.node_view(node, self.now)["serving"]


def syncs(commands) -> list[tuple[str, int]]:
    return [(c.node, c.target) for c in only((SyncNode,), commands)]


def settle_first_check(cluster: Cluster) -> None:
    assert syncs(cluster.started) == [("web1", 0), ("web2", 0), ("web3", 0)]
    for node in NODES:
        cluster.synced(node, 0, operations=0)


# -- content -----------------------------------------------------------------------------------------
def test_at_start_the_active_distributor_checks_every_node_and_a_change_syncs_every_live_node():
    cluster = Cluster()
    settle_first_check(cluster)
    out = cluster.put("site/a.bin")
    reply = only((AdminReply,), out)[0]
    assert reply.status == 200 and reply.body["version"] == 1
    assert syncs(out) == [("web1", 1), ("web2", 1), ("web3", 1)]
    assert only((SaveAdministration,), out) and all(cluster.serving(n) for n in NODES)  # updating nodes keep serving
    assert {n.node: n.state for n in cluster.core.stats(0).content.nodes} == dict.fromkeys(NODES, ContentState.UPDATING)
    for node in NODES:
        cluster.synced(node, 1)
    assert all(n.state is ContentState.MATCHES and not n.mismatch for n in cluster.core.stats(0).content.nodes)


def test_a_node_dead_during_a_push_is_held_out_when_it_returns_until_its_sync_reports_a_match():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.kill("web3")
    out = cluster.put("site/new.bin")
    assert syncs(out) == [("web1", 1), ("web2", 1)]  # a dead node is not contacted
    assert cluster.core.content.held_out("web3")  # behind while web1 and web2 have content to serve
    cluster.synced("web1", 1)
    cluster.synced("web2", 1)
    out = cluster.revive("web3")
    assert syncs(out) == [("web3", 1)]  # its heartbeats came back: a sync at once
    out = cluster.run(2.0)  # healthy again (rise), but its content still is not confirmed
    assert not syncs(out) and cluster.core.health.board.eligible("web3") and not cluster.serving("web3")
    assert any(x["node"] == "web3" and x["reason"].startswith("content behind")
               for x in cluster.core.explain("192.0.2.10", 40000, now=cluster.now)["services"][0]["excluded"])
    assert not cluster.serving("web3")
    cluster.synced("web3", 1)
    assert cluster.serving("web3") and not cluster.core.content.held_out("web3")


def test_a_returning_node_is_checked_first_even_without_a_change_while_it_was_away():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.put("a.bin")
    for node in NODES:
        cluster.synced(node, 1)
    cluster.kill("web2")
    out = cluster.revive("web2")
    assert syncs(out) == [("web2", 1)] and cluster.core.content.held_out("web2")
    cluster.synced("web2", 1, operations=0)
    assert not cluster.core.content.held_out("web2")


def test_a_failed_sync_is_retried_with_a_growing_delay_and_a_newer_change_waits_for_the_sync_in_flight():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.put("a.bin")
    out = cluster.put("b.bin", SHA_B)
    assert syncs(out) == []  # each node has a sync in flight: a new one follows it
    assert syncs(cluster.synced("web1", 1)) == [("web1", 2)]  # matched version 1, but 2 is desired: synced again
    out = cluster.synced("web2", 1, matches=False, error="web2 (198.51.100.12:8407): connection refused")
    assert syncs(out) == []
    assert cluster.core.content.nodes["web2"].state is ContentState.BEHIND and not cluster.serving("web2")
    assert syncs(cluster.run(1.75)) == [] and syncs(cluster.run(0.25)) == [("web2", 2)]  # after retry = 2 s
    cluster.synced("web2", 2, matches=False, error="refused again")
    assert syncs(cluster.run(3.75)) == [] and syncs(cluster.run(0.25)) == [("web2", 2)]  # then 4 s


def test_content_never_empties_the_cluster_and_a_node_ahead_is_never_held_out():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.put("a.bin")
    for node in NODES:
        out = cluster.synced(node, 1, matches=False, error="disk full")
    # Every node failed the change: nobody matches, so nobody is held out for content.
    assert all(cluster.serving(n) for n in NODES)
    assert all(n.mismatch for n in cluster.core.stats(0).content.nodes)
    cluster.run(2.0)
    cluster.synced("web1", 1)
    assert not cluster.serving("web2") and not cluster.serving("web3") and cluster.serving("web1")
    cluster.synced("web2", 1, matches=False, conflict="node holds content version 9, ahead of the desired version 1")
    assert cluster.core.content.nodes["web2"].state is ContentState.AHEAD and cluster.serving("web2")


def test_a_periodic_check_finds_drift_and_repairs_it_without_holding_the_node_out():
    cluster = Cluster()
    settle_first_check(cluster)
    out = cluster.run(60.0)
    assert sorted(syncs(out)) == [("web1", 0), ("web2", 0), ("web3", 0)]
    out = cluster.synced("web2", 0, operations=2)
    assert cluster.serving("web2") and cluster.core.content.syncs["repaired"] == 1


def test_deleting_a_directory_deletes_every_path_under_it_and_bad_or_unknown_paths_are_refused_and_counted():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.core.handle(ContentPut(cluster.request_id(), (FileSpec("docs/a.html", 1, SHA_A),
                                                          FileSpec("docs/img/b.png", 2, SHA_B),
                                                          FileSpec("docsx", 3, SHA_A)), "alice", 0.0, WALL, tree=""))
    assert cluster.core.content.desired.version == 3
    out = cluster.core.handle(ContentDelete(cluster.request_id(), "docs", "bob", 0.0, WALL))
    reply = only((AdminReply,), out)[0]
    assert reply.status == 200 and reply.body["paths"] == ["docs/a.html", "docs/img/b.png"]
    assert list(cluster.core.content.desired.entries) == ["docsx"] and reply.body["version"] == 5
    assert only((CollectBlobs,), out) == []  # syncs are in flight: the blobs they read stay
    out = cluster.core.handle(ContentDelete(cluster.request_id(), "nothing/here", "bob", 0.0, WALL))
    assert only((AdminReply,), out)[0].status == 404
    out = cluster.core.handle(ContentPut(cluster.request_id(), (FileSpec("../escape", 1, SHA_A),), "eve", 0.0, WALL))
    assert only((AdminReply,), out)[0].status == 400 and cluster.play.core.content.desired.version == 5
    cluster.core.handle(ContentRefused("absolute", "path '/etc/x' is absolute", "eve", 0.0))
    refusals = cluster.core.stats(0).content.refusals
    assert (refusals["not_managed"], refusals["traversal"], refusals["absolute"]) == (1, 1, 1)
    for node in NODES:
        out = cluster.synced(node, 3)
    out = cluster.run(0.25)
    for node in NODES:
        out = cluster.synced(node, 5)
    assert only((CollectBlobs,), out) == [CollectBlobs(frozenset({SHA_A}))]


def test_the_state_file_keeps_the_desired_content_and_confirmed_versions_across_a_restart():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.put("a.bin")
    cluster.synced("web1", 1)
    cluster.synced("web2", 1)
    cluster.synced("web3", 1, matches=False, error="timeout")
    saved = cluster.core.content.saved()
    again = Cluster(saved)
    content = again.core.content
    assert content.desired.version == 1 and list(content.desired.entries) == ["a.bin"]
    assert {n: content.nodes[n].state for n in NODES} == {"web1": ContentState.MATCHES, "web2": ContentState.MATCHES,
                                                          "web3": ContentState.BEHIND}
    assert not again.serving("web3") and again.serving("web1")
    assert syncs(again.started) == [("web1", 1), ("web2", 1), ("web3", 1)]  # everyone is checked at start


def test_only_the_active_distributor_syncs_and_gates_and_a_standby_refuses_changes_with_a_409():
    address, peer = ipaddress.IPv4Address("198.51.100.2"), ipaddress.IPv4Address("198.51.100.3")
    options = FailoverOptions("dist1", address, FailoverSettings(priority=100, interval=0.05, warning=3, dead=6),
                              ("198.51.100.255", 8406), {"dist2": peer}, 8406, address_lifetime=0.0)
    core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=NODES)], 100, failover=options,
                           failover_keys=KEYS, administration=OPTIONS)
    started = core.start(0.0, WALL)
    assert not syncs(started) and not core.content.active
    out = core.handle(ContentPut(1, (FileSpec("a.bin", 1, SHA_A),), "alice", 0.1, WALL + 0.1))
    assert only((AdminReply,), out)[0].status == 409 and core.content.desired.version == 0
    content = ContentCore(OPTIONS)
    content.handle(NodesChanged({n: WEB[n] for n in NODES}, 0.0))
    assert not only((SyncNode,), content.handle(ActiveChanged(False, 0.0)))
    assert syncs(content.handle(ActiveChanged(True, 1.0))) == [("web1", 0), ("web2", 0), ("web3", 0)]


# -- tasks -------------------------------------------------------------------------------------------------
def tasks_sent(commands) -> list[str]:
    return [c.node for c in only((RunTask,), commands)]


def test_a_task_wanted_for_a_down_node_is_sent_once_when_it_returns_and_never_after_it_ran():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.kill("web3")
    out = cluster.task(priority="low")
    reply = only((AdminReply,), out)[0]
    assert reply.status == 200 and reply.body["task"]["nodes"]["web3"]["state"] == "pending"
    assert tasks_sent(out) == ["web1", "web2"]
    assert [(c.task_id, c.name, c.priority) for c in only((RunTask,), out)] == [("t1", "disk-usage", "low")] * 2
    cluster.task_answer("web1", "done", exit_status=0)
    cluster.task_answer("web2", "done", exit_status=0)
    assert tasks_sent(cluster.run(5.0)) == []  # web3 is still down: nothing goes out
    out = cluster.revive("web3")
    assert tasks_sent(out) == ["web3"]
    cluster.task_answer("web3", "queued")
    out = cluster.run(1.0)
    assert tasks_sent(out) == [] and [c.node for c in only((FetchTask,), out)] == ["web3"]  # polled, not resent
    cluster.task_answer("web3", "done", exit_status=0)
    assert cluster.core.content.task_view("t1")["finished"]
    cluster.kill("web3")
    out = cluster.revive("web3") + cluster.run(5.0)
    assert tasks_sent(out) == [] and not only((FetchTask,), out)  # it ran: nothing is sent again


def test_a_send_that_got_no_answer_is_resent_with_the_same_id_and_a_refusal_is_final():
    cluster = Cluster()
    settle_first_check(cluster)
    out = cluster.task(nodes=("web1", "web2"))
    assert tasks_sent(out) == ["web1", "web2"]
    cluster.core.handle(TaskReported("t1", "web1", None, "web1: connection reset", False, cluster.now, WALL))
    cluster.core.handle(TaskReported("t1", "web2", None, "unknown_task: no task 'disk-usage' here", True, cluster.now,
                                     WALL))
    out = cluster.run(2.0)
    assert [(c.node, c.task_id) for c in only((RunTask,), out)] == [("web1", "t1")]
    view = cluster.core.content.task_view("t1")
    assert view["nodes"]["web2"]["state"] == "refused" and view["nodes"]["web1"]["sends"] == 2


def test_a_task_request_is_checked_before_anything_is_sent():
    cluster = Cluster()
    settle_first_check(cluster)
    for kwargs, status in [({"name": "../bin/sh"}, 400), ({"priority": "urgent"}, 400), ({"nodes": ("web9",)}, 404)]:
        out = cluster.task(**kwargs)
        assert only((AdminReply,), out)[0].status == status and not tasks_sent(out)
    assert cluster.core.stats(0).content.refusals["bad_task"] == 3 and not cluster.core.content.tasks


def test_a_task_not_delivered_within_its_time_is_abandoned_and_tasks_survive_a_restart():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.kill("web3")
    cluster.task(nodes=("web2", "web3"))
    saved = cluster.core.content.saved()
    again = Cluster(saved)
    # The part that was being sent when the distributor stopped is sent again: the node runs an id once.
    assert tasks_sent(again.started) == ["web2", "web3"]
    out = cluster.run(601.0)
    view = cluster.core.content.task_view("t1")
    assert view["nodes"]["web3"]["state"] == "abandoned" and not tasks_sent(out)


# -- the standby ---------------------------------------------------------------------------------------
def test_the_desired_content_is_replicated_to_the_standby_which_checks_every_node_when_it_takes_over():
    from tests.unit.test_admin_core import BROADCAST, DISTRIBUTORS, INTERVAL, KEYS as PEER_KEYS, Pair

    class AdministeredPair(Pair):
        def start(self, name):
            address, priority = DISTRIBUTORS[name]
            (peer, (peer_address, _)), = ((n, a) for n, a in DISTRIBUTORS.items() if n != name)
            options = FailoverOptions(name, ipaddress.IPv4Address(address),
                                      FailoverSettings(priority=priority, interval=INTERVAL, warning=3, dead=6),
                                      BROADCAST, {peer: ipaddress.IPv4Address(peer_address)}, BROADCAST[1],
                                      address_lifetime=0.0)
            core = DistributorCore(name, Mode.REWRITE, [service_spec(nodes=NODES)], 100, failover=options,
                                   failover_keys=PEER_KEYS, administration=OPTIONS)
            self.cores[name] = core
            self.down.discard(name)
            self._run(name, core.start(self.now, WALL + self.now))
            return core

    pair = AdministeredPair()
    pair.step(1.0)
    active, standby = pair.cores["dist1"], pair.cores["dist2"]
    assert active.content.active and not standby.content.active
    commands = pair._run("dist1", active.handle(ContentPut(1, (FileSpec("a.bin", 5, SHA_A),), "alice", pair.now,
                                                            WALL + pair.now)))
    assert only((AdminReply,), commands)[0].status == 200
    assert standby.content.desired.to_dict() == active.content.desired.to_dict()
    assert only((SaveAdministration,), pair.answers["dist2"])  # the standby keeps it across its own restart
    assert not syncs(pair.answers["dist2"])  # a standby contacts no node
    pair.crash("dist1")
    before = len(pair.answers["dist2"])
    pair.step(1.0)
    assert standby.content.active
    assert syncs(pair.answers["dist2"][before:]) == [("web1", 1), ("web2", 1), ("web3", 1)]


# -- signed task bundles -------------------------------------------------------------------------------
def bundle_spec(name: str = "clean-tmp", version: int = 1, sha256: str = SHA_A, priority: str = "low",
                size: int = 900) -> BundleSpec:
    return BundleSpec(name, version, priority, 60.0, 64, "0123456789abcdef", size, sha256, "tidies /tmp", WALL - 60)


def add_bundle(cluster: Cluster, who: str = "alice", **kw) -> list:
    return cluster.core.handle(BundleAdd(cluster.request_id(), bundle_spec(**kw), who, cluster.now, WALL + cluster.now))


def bundles_synced(cluster: Cluster, node: str, target: int, matches: bool = True, error: str | None = None,
                   reached: bool = True) -> list:
    desired = cluster.core.content.bundles
    entries = {p: Entry(p, e.version, e.size, e.sha256) for p, e in desired.entries.items()} if matches else {}
    report = NodeReport(target if matches else 0, entries) if reached else None
    return cluster.core.handle(SyncReported(node, target, reached, matches, report, None, error, 1, cluster.now,
                                            WALL + cluster.now, "bundles"))


def bundle_syncs(commands) -> list[tuple[str, int]]:
    return [(c.node, c.target) for c in only((SyncNode,), commands) if c.area == "bundles"]


def content_syncs(commands) -> list[tuple[str, int]]:
    return [(c.node, c.target) for c in only((SyncNode,), commands) if c.area == "content"]


def test_a_bundle_is_distributed_like_content_in_its_own_area_and_never_gates_a_node():
    cluster = Cluster()
    settle_first_check(cluster)
    assert not bundle_syncs(cluster.run(5.0))  # no bundle was ever added: no node is asked about bundles
    out = add_bundle(cluster)
    reply = only((AdminReply,), out)[0]
    assert reply.status == 200 and reply.body["version"] == 1 and reply.body["bundle"]["priority"] == "low"
    assert bundle_syncs(out) == [("web1", 1), ("web2", 1), ("web3", 1)] and not content_syncs(out)
    sent = only((SyncNode,), out)[0]
    assert sent.desired["entries"] == {"clean-tmp": {"version": 1, "size": 900, "sha256": SHA_A}}
    assert cluster.core.content.desired.version == 0 and only((SaveAdministration,), out)
    # A node whose bundle sync fails keeps serving: bundles never hold a node out.
    out = bundles_synced(cluster, "web2", 1, matches=False, error="web2: bundles_disabled: no trusted key")
    assert cluster.serving("web2") and not only((SetContentGate,), out)
    assert bundle_syncs(cluster.run(2.0)) == [("web2", 1)]  # retried after `retry`
    for node in NODES:
        bundles_synced(cluster, node, 1)
    status = cluster.core.content.bundle_status(WALL)
    assert status["differing"] == [] and status["bundles"]["clean-tmp"]["who"] == "alice"
    assert cluster.core.content.syncs["matched"] == 3  # the content's counters are the content's only
    # Anti-entropy: every node's bundles are checked every check_interval, like its content.
    assert sorted(bundle_syncs(cluster.run(60.0))) == [("web1", 1), ("web2", 1), ("web3", 1)]


def test_a_node_dead_while_a_bundle_is_added_gets_it_when_it_returns_before_the_task_that_needs_it():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.kill("web3")
    out = add_bundle(cluster, priority="high")
    assert bundle_syncs(out) == [("web1", 1), ("web2", 1)]  # a dead node is not contacted
    out = cluster.task("clean-tmp", priority="high")
    # The task waits on each node until the bundle's sync reached it; web3 is down: pending.
    assert tasks_sent(out) == []
    assert tasks_sent(bundles_synced(cluster, "web1", 1)) == ["web1"]
    assert tasks_sent(bundles_synced(cluster, "web2", 1, matches=False, error="untrusted_key: not trusted")) == ["web2"]
    out = cluster.revive("web3")
    assert bundle_syncs(out) == [("web3", 1)] and tasks_sent(out) == []  # the bundle first
    out = bundles_synced(cluster, "web3", 1, matches=False, reached=False, error="web3: connection refused")
    assert tasks_sent(out) == [] and tasks_sent(cluster.run(1.0)) == []  # not reached yet: the task still waits
    out = cluster.run(1.0)
    assert bundle_syncs(out) == [("web2", 1), ("web3", 1)]  # both retried after `retry`
    assert tasks_sent(bundles_synced(cluster, "web3", 1)) == ["web3"]
    assert cluster.core.content.bundle_status(WALL)["differing"] == ["web2"]


def test_a_bundle_named_like_a_builtin_an_older_version_or_asked_above_its_priority_is_refused():
    cluster = Cluster()
    settle_first_check(cluster)
    out = add_bundle(cluster, name="disk-usage")
    assert only((AdminReply,), out)[0].status == 400 and not bundle_syncs(out)
    add_bundle(cluster, version=3)
    out = add_bundle(cluster, version=3)  # the same bytes again: nothing to send
    assert only((AdminReply,), out)[0].body["unchanged"] and not bundle_syncs(out + cluster.run(0.25))
    cluster.core.handle(BundleRemove(cluster.request_id(), "clean-tmp", "bob", cluster.now, WALL))
    out = add_bundle(cluster, version=2, sha256=SHA_B)  # even after a remove: the nodes never go back
    reply = only((AdminReply,), out)[0]
    assert reply.status == 409 and "older than version 3" in reply.body["error"]
    add_bundle(cluster, version=4, sha256=SHA_B)
    out = cluster.task("clean-tmp", priority="high")  # signed for low at most
    assert only((AdminReply,), out)[0].status == 400 and not cluster.core.content.tasks
    out = cluster.core.handle(BundleRemove(cluster.request_id(), "nothing", "bob", cluster.now, WALL))
    assert only((AdminReply,), out)[0].status == 404
    refusals = cluster.core.stats(0).content.refusals
    assert (refusals["bad_bundle"], refusals["bad_task"], refusals["not_managed"]) == (2, 1, 1)
    assert cluster.core.content.bundles.version == 3  # add 3, remove, add 4


def test_removing_a_bundle_deletes_it_everywhere_and_its_blob_goes_once_no_sync_runs():
    cluster = Cluster()
    settle_first_check(cluster)
    cluster.put("a.bin", SHA_B)
    for node in NODES:
        cluster.synced(node, 1)
    add_bundle(cluster)
    for node in NODES:
        bundles_synced(cluster, node, 1)
    out = cluster.core.handle(BundleRemove(cluster.request_id(), "clean-tmp", "bob", cluster.now, WALL))
    assert only((AdminReply,), out)[0].body == {"ok": True, "version": 2, "removed": "clean-tmp"}
    assert bundle_syncs(out) == [("web1", 2), ("web2", 2), ("web3", 2)]
    assert only((SyncNode,), out)[0].desired["deleted"] == {"clean-tmp": 2}
    for node in NODES:
        out = bundles_synced(cluster, node, 2)
    assert only((CollectBlobs,), out) == [CollectBlobs(frozenset({SHA_B}))]  # the content's blob stays


def test_the_state_file_and_the_standby_keep_the_bundles():
    cluster = Cluster()
    settle_first_check(cluster)
    add_bundle(cluster)
    bundles_synced(cluster, "web1", 1)
    again = Cluster(cluster.core.content.saved())
    content = again.core.content
    assert list(content.bundles.entries) == ["clean-tmp"] and content.bundle_meta["clean-tmp"]["who"] == "alice"
    assert content.nodes["web1"].bundles.state is ContentState.MATCHES
    assert content.nodes["web2"].bundles.state is ContentState.BEHIND
    assert sorted(bundle_syncs(again.started)) == [("web1", 1), ("web2", 1), ("web3", 1)]
    assert content.bundle_floor == {"clean-tmp": 1}
    standby = ContentCore(OPTIONS)
    standby.handle(NodesChanged({n: WEB[n] for n in NODES}, 0.0))
    out = standby.handle(DesiredReplicated(content.replicated(), 1.0))
    assert standby.bundles.to_dict() == content.bundles.to_dict() and only((SaveAdministration,), out)
    assert not only((SyncNode,), out)  # a standby contacts no node
    assert bundle_syncs(standby.handle(ActiveChanged(True, 2.0))) == [("web1", 1), ("web2", 1), ("web3", 1)]


def test_a_report_of_a_sync_that_is_no_longer_in_flight_is_dropped():
    # Active, standby, active again: the first syncs' answers may still come back after the new ones left.
    content = ContentCore(OPTIONS)
    content.handle(NodesChanged({n: WEB[n] for n in NODES}, 0.0))
    first = {c.node: c for c in only((SyncNode,), content.handle(ActiveChanged(True, 0.0)))}
    content.handle(ActiveChanged(False, 0.5))
    second = {c.node: c for c in only((SyncNode,), content.handle(ActiveChanged(True, 1.0)))}
    assert first["web2"].request != second["web2"].request

    def answer(command, now):
        return content.handle(SyncReported(command.node, command.target, True, True, NodeReport(0, {}), None, None, 0,
                                           now, WALL + now, command.area, command.request))

    answer(first["web2"], 1.1)  # stale: its sync ended when this distributor stopped being active
    assert content.nodes["web2"].syncing is not None
    answer(second["web2"], 1.2)
    assert content.nodes["web2"].syncing is None and content.nodes["web2"].state is ContentState.MATCHES
    answer(second["web2"], 1.3)  # a duplicate changes nothing either
    assert content.nodes["web2"].syncing is None


def test_a_task_report_that_answers_no_request_in_flight_is_dropped():
    # Sent, then standby (the answer may still come), then active again and sent anew: only the
    # answer to the request in flight counts, once.
    cluster = Cluster()
    settle_first_check(cluster)
    first = {c.node: c for c in only((RunTask,), cluster.task(nodes=("web1",)))}["web1"]
    content = cluster.core.content
    content.handle(ActiveChanged(False, cluster.now))
    second = {c.node: c for c in only((RunTask,), content.handle(ActiveChanged(True, cluster.now + 0.1)))}["web1"]
    assert (first.task_id, first.request) != (second.task_id, second.request) and first.task_id == second.task_id

    def answer(command, state):
        return content.handle(TaskReported("t1", "web1", {"state": state}, None, False, cluster.now, WALL,
                                           command.request))

    answer(first, "done")  # stale: that request ended with the active spell
    assert content.task_view("t1")["nodes"]["web1"]["state"] == "sending"
    answer(second, "running")
    assert content.task_view("t1")["nodes"]["web1"]["state"] == "running"
    answer(second, "done")  # a duplicate of an answer already taken changes nothing
    assert content.task_view("t1")["nodes"]["web1"]["state"] == "running"


def test_a_task_id_must_match_whole_a_trailing_newline_is_not_an_id():
    cluster = Cluster()
    settle_first_check(cluster)
    reply = only((AdminReply,), cluster.task(task_id="t7\n"))[0]
    assert reply.status == 400 and not only((RunTask,), cluster.run(1.0))
