"""The distributor's /metrics: rendered from snapshots, linted by promtool, named as operators expect."""

from __future__ import annotations

import dataclasses
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from backup.failover import FailoverStats, PeerStats, Takeover
from backup.roles import Role
from common.wire import NodeHeartbeat, Reject
from distributor.admin import AdminState
from distributor.core import DistributorStats, NodeAdminStats
from distributor.heartbeat import HealthStats, NodeHealthStats, NodeState
from distributor.metrics import (TAKEOVER_BUCKETS, DistributorCollector, KernelCounters, TakeoverHistogram, render,
                                 takeover_phases)
from distributor.reroute import BackendStats, InterposerStats, Mode, Reason
from tests.unit.test_core import make

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool is missing: run scripts/install.sh (Debian "
                                                              "package prometheus)")


def promtool_check_metrics(text: bytes) -> None:
    assert PROMTOOL is not None
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=text, capture_output=True, timeout=30)
    assert result.returncode == 0, (result.stdout + result.stderr).decode()


def takeover(last_heartbeat, started, claimed=None, first_forward=None, first_arrival=None, term=2) -> Takeover:
    return Takeover(last_heartbeat, started, term, claimed, first_forward, first_arrival)


def snapshot(role=Role.ACTIVE, peer_role=Role.BACKUP, mode=Mode.REWRITE, takeovers=(), total=None) -> DistributorStats:
    packets = {reason: 0 for reason in Reason}
    packets[Reason.NEW_CONNECTION] = 40
    packets[Reason.TABLE_FULL] = 3
    backends = (BackendStats("http", "web1", "198.51.100.11", 80, 1, True, True, 1.0, 5, 30, 4_000),
                BackendStats("http", "web2", "198.51.100.12", 80, 2, False, False, 0.25, 0, 10, 1_000))
    interposer = InterposerStats(mode, packets, 12, 100, 4, 1, backends)
    dead = {(NodeState.UP, NodeState.WARNING): 2, (NodeState.WARNING, NodeState.DEAD): 1,
            (NodeState.WARNING, NodeState.UP): 1}
    nodes = (NodeHealthStats("web1", NodeState.UP, False, 0, 120, 0, 0.1, NodeHeartbeat(0.5, 0.2, 3.0, 250), {}),
             NodeHealthStats("web2", NodeState.DEAD, True, 40, 80, 4, 10.0, NodeHeartbeat(1.5, 0.9, 900.0, 2000), dead))
    rejected = {reason: 0 for reason in Reject}
    rejected[Reject.BAD_MAC] = 7
    health = HealthStats(nodes, {(NodeState.UP, NodeState.WARNING): 2}, rejected, 3)
    peers = (PeerStats("dist2", peer_role, True, 0, 2, 100, 17, 5 if role is Role.ACTIVE else None),)
    recent = tuple(takeovers)
    failover = FailoverStats(role, 2, role is Role.BACKUP, peers, 0 if role is Role.ACTIVE else 3, 12, 1, 2, 3, 4, 5, 6,
                             0, 9, 0.06, {}, dict(rejected), {(Role.STARTING, Role.ACTIVE): 1},
                             recent[-1] if recent else None, len(recent) if total is None else total,
                             None if role is Role.ACTIVE else 95.0, recent)
    nodes = (NodeAdminStats("web1", "198.51.100.11", AdminState.READY, True, 5, None, None),
             NodeAdminStats("web2", "198.51.100.12", AdminState.DRAIN, False, 0, 50.0, 60.0))
    return DistributorStats("dist1", interposer, health, failover, nodes)


class FakeCore:
    def __init__(self, stats: DistributorStats):
        self.snapshot = stats

    def stats(self, now: float) -> DistributorStats:
        return self.snapshot


def collector_of(stats: DistributorStats) -> DistributorCollector:
    collector = DistributorCollector(FakeCore(stats), clock=lambda: 100.0,  # type: ignore[arg-type]
                                     queue_stats=lambda: {0: {"waiting": 2, "queue_dropped": 5, "user_dropped": 1}})
    collector.bytes_out.update(1, {("http", "198.51.100.11", 80): 90_000})  # as the return path's rules count
    return collector


def samples(text: bytes) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found, name: str, **labels) -> float:
    return found[(name, tuple(sorted(labels.items())))]


@needs_promtool
@pytest.mark.parametrize("role", [Role.ACTIVE, Role.BACKUP], ids=["active", "backup"])
def test_promtool_check_metrics_passes_on_the_whole_endpoint_with_process_metrics(role):
    stats = snapshot(role, takeovers=(takeover(1.0, 1.35, 1.36, 1.5, 1.42),))
    text = render(collector_of(stats), process=True)
    assert b"process_cpu_seconds_total" in text and b"python_info" in text
    promtool_check_metrics(text)


@needs_promtool
def test_promtool_check_metrics_passes_on_a_real_core_in_both_modes():
    for mode in Mode:
        core, _ = make(mode)
        core.start(0.0, 1_800_000_000.0)
        promtool_check_metrics(render(DistributorCollector(core, clock=lambda: 1.0), process=True))


def test_per_backend_and_per_node_families_carry_service_node_and_one_series_per_state():
    found = samples(render(collector_of(snapshot())))
    assert value(found, "distributor_backend_connections_total", service="http", node="web1") == 30
    assert value(found, "distributor_backend_connections_open", service="http", node="web1") == 5
    assert value(found, "distributor_backend_weight", service="http", node="web2") == 2
    assert value(found, "distributor_backend_eligible", service="http", node="web2") == 0
    assert value(found, "distributor_backend_bytes_in_total", service="http", node="web1") == 4_000
    assert value(found, "distributor_backend_bytes_out_total", service="http", node="web1") == 90_000
    states = {dict(labels)["state"]: v for (name, labels), v in found.items()
              if name == "distributor_node_state" and dict(labels)["node"] == "web2"}
    assert states == {"up": 0, "warning": 0, "dead": 1, "rising": 0, "slow_start": 0}
    assert value(found, "distributor_node_silent_ticks", node="web2") == 40
    assert value(found, "distributor_node_heartbeat_age_seconds", node="web2") == 10.0
    assert value(found, "distributor_node_heartbeats_total", node="web1") == 120
    assert value(found, "distributor_node_heartbeat_failures_total", node="web2") == 2  # two late, one of them fatal
    assert value(found, "distributor_node_transitions_total", node="web2", **{"from": "warning", "to": "dead"}) == 1
    assert value(found, "distributor_node_transitions_total", node="web1", **{"from": "warning", "to": "dead"}) == 0
    assert value(found, "distributor_node_probe_duration_seconds", node="web2") == 0.9
    assert value(found, "distributor_node_heartbeat_interval_seconds", node="web2") == 2.0
    assert value(found, "distributor_node_held_out", node="web2") == 1
    assert value(found, "distributor_heartbeats_rejected_total", reason="bad_mac") == 7
    assert value(found, "distributor_node_admin_state", node="web2", state="drain") == 1
    assert value(found, "distributor_node_admin_state", node="web2", state="ready") == 0
    assert value(found, "distributor_node_serving", node="web1") == 1


def test_per_distributor_families_table_refusals_drops_and_build_info():
    found = samples(render(collector_of(snapshot())))
    assert value(found, "distributor_connection_table_entries") == 12
    assert value(found, "distributor_connection_table_capacity") == 100
    assert value(found, "distributor_connections_refused_total", reason="table_full") == 3
    assert value(found, "distributor_packets_total", reason="table_full", verdict="drop") == 3
    assert value(found, "distributor_nfqueue_dropped_packets_total", cause="queue_full") == 5
    assert value(found, "distributor_nfqueue_waiting_packets") == 2
    assert value(found, "distributor_datapath_mode", mode="rewrite") == 1
    assert any(name == "distributor_build_info" for name, _ in found)
    assert value(found, "distributor_failover_role", role="active") == 1
    assert value(found, "distributor_failover_term") == 2
    assert value(found, "distributor_failover_transitions_total", **{"from": "starting", "to": "active"}) == 1
    assert value(found, "distributor_failover_transitions_total", **{"from": "backup", "to": "active"}) == 0
    assert value(found, "distributor_sync_peer_lag_records", peer="dist2") == 5
    assert ("distributor_sync_lag_seconds", ()) not in found  # the active is the stream


def test_a_standby_reports_its_lag_in_seconds_and_batches():
    found = samples(render(collector_of(snapshot(Role.BACKUP, peer_role=Role.ACTIVE))))
    assert value(found, "distributor_sync_lag_seconds") == 5.0  # behind since 95 s, scraped at 100 s
    assert value(found, "distributor_sync_lag_batches") == 3
    assert value(found, "distributor_sync_caught_up") == 1
    assert not [k for k in found if k[0] == "distributor_sync_peer_lag_records"]


def test_a_peer_changing_role_changes_values_never_the_set_of_series():
    before = samples(render(collector_of(snapshot(peer_role=Role.BACKUP))))
    after = samples(render(collector_of(snapshot(Role.BACKUP, peer_role=Role.ACTIVE))))
    peer_series = lambda found: {k for k in found if k[0] in ("distributor_failover_peer_role",
                                                              "distributor_failover_peer_up",
                                                              "distributor_failover_role")}
    assert peer_series(before) == peer_series(after)
    assert value(after, "distributor_failover_peer_role", peer="dist2", role="active") == 1
    assert value(after, "distributor_failover_peer_role", peer="dist2", role="backup") == 0


def test_kernel_mode_exports_no_byte_counters_rather_than_zeros_that_look_measured():
    found = samples(render(collector_of(snapshot(mode=Mode.KERNEL))))
    assert not [k for k in found if k[0].startswith("distributor_backend_bytes")]


def test_takeover_phases_start_at_the_decision_and_first_forward_leaves_out_idle_time():
    # Decided 0.35 s after the last heartbeat, addresses claimed 5 ms later, then no traffic for 1.4 s.
    idle = takeover(10.0, 10.35, claimed=10.355, first_forward=11.8, first_arrival=11.799)
    assert takeover_phases(idle) == pytest.approx({"decided": 0.35, "claimed": 0.005, "first_forward": 0.006})
    # A packet that waited for the claim (queued while the addresses were being added) counts whole.
    waiting = takeover(10.0, 10.35, claimed=10.355, first_forward=10.36, first_arrival=10.352)
    assert takeover_phases(waiting)["first_forward"] == pytest.approx(0.01)
    # The first election at start has no old active: no decided phase.
    assert "decided" not in takeover_phases(takeover(None, 1.0, claimed=1.01))


def test_the_takeover_histogram_observes_each_phase_once_across_scrapes_and_misses_none_in_the_history():
    histogram = TakeoverHistogram()
    first = takeover(10.0, 10.35, claimed=10.36)
    histogram.update(1, (first,))
    histogram.update(1, (first,))  # scraped again: nothing new
    assert histogram.counts["decided"][-1] == 1 and histogram.counts["first_forward"][-1] == 0
    first = dataclasses.replace(first, first_forward=10.5, first_arrival=10.4)  # the phase becomes known later
    second = takeover(20.0, 20.25, claimed=20.26, first_forward=20.27, first_arrival=20.27, term=3)
    histogram.update(2, (first, second))
    assert histogram.counts["first_forward"][-1] == 2 and histogram.counts["decided"][-1] == 2
    assert histogram.sums["decided"] == pytest.approx(0.35 + 0.25)
    le_400ms = TAKEOVER_BUCKETS.index(0.4)
    assert histogram.counts["decided"][le_400ms] == 2 and histogram.counts["decided"][le_400ms - 1] == 1


@needs_promtool
def test_the_histogram_is_there_before_any_takeover_and_counts_them_after():
    empty = samples(render(collector_of(snapshot(takeovers=()))))
    assert value(empty, "distributor_failover_takeover_duration_seconds_count", phase="first_forward") == 0
    assert value(empty, "distributor_failover_takeovers_total") == 0
    stats = snapshot(takeovers=(takeover(1.0, 1.35, 1.36, 1.5, 1.42),))
    text = render(collector_of(stats))
    promtool_check_metrics(text)
    found = samples(text)
    assert value(found, "distributor_failover_takeover_duration_seconds_count", phase="first_forward") == 1
    assert value(found, "distributor_failover_takeover_duration_seconds_bucket", phase="decided", le="0.4") == 1
    assert value(found, "distributor_failover_takeovers_total") == 1


def test_kernel_counters_stay_monotonic_across_reinstalls_of_their_rules():
    counts = KernelCounters()
    key = ("http", "198.51.100.11", 80)
    counts.update(1, {key: 100})
    counts.update(1, {key: 150})
    counts.update(2, {key: 30})  # the rules were installed again (a takeover): the kernel starts at 0
    assert counts.value(key) == 180
    counts.update(2, {})  # removed (given up): nothing to read, the figure stays
    assert counts.value(key) == 180
    counts.update(2, {key: 10})  # reinstalled between two readings without a generation change
    assert counts.value(key) == 190
    assert counts.value(("http", "198.51.100.12", 80)) == 0


def test_rule_counters_added_to_packet_and_guard_counts_never_go_backwards():
    # The kernel's counters of the ICMP-flood and guard rules restart at 0 when the chains are
    # installed again (a takeover) and vanish when they are removed (stand-down).
    class Chains:
        installs = 1
        now: dict[str, int] = {}

        def counters(self) -> dict[str, int]:
            return dict(self.now)

    chains = Chains()
    collector = DistributorCollector(FakeCore(snapshot()), chains=[chains], clock=lambda: 100.0,  # type: ignore[arg-type]
                                     queue_stats=lambda: {})

    def icmp_unknown_and_guard() -> tuple[float, float]:
        collector.refresh_kernel_counts()
        found = samples(render(collector))
        return (value(found, "distributor_packets_total", reason="icmp_unknown", verdict="drop"),
                value(found, "distributor_guard_dropped_packets_total", what="control_port"))

    chains.now = {"dist:icmp_flood": 5000, "dist-guard:control_port": 7}
    assert icmp_unknown_and_guard() == (5000, 7)
    chains.now = {}  # removed
    assert icmp_unknown_and_guard() == (5000, 7)
    chains.installs, chains.now = 2, {"dist:icmp_flood": 20, "dist-guard:control_port": 1}  # installed again
    assert icmp_unknown_and_guard() == (5020, 8)


def test_dsr_mode_exports_client_bytes_only_and_whether_each_vip_is_announced():
    stats = dataclasses.replace(snapshot(mode=Mode.DSR), failover=None, announced=(("203.0.113.1", True),
                                                                                    ("203.0.113.2", False)),
                                announce_moves=(("withdrawn", "announced", 3),))
    found = samples(render(collector_of(stats)))
    assert [k for k in found if k[0].startswith("distributor_backend_bytes_in")]
    assert not [k for k in found if k[0].startswith("distributor_backend_bytes_out")]  # responses never pass here
    assert value(found, "distributor_vip_announced", vip="203.0.113.1") == 1
    assert value(found, "distributor_vip_announced", vip="203.0.113.2") == 0
    assert value(found, "distributor_vip_announce_transitions_total", **{"from": "withdrawn", "to": "announced"}) == 3
