"""The node agent's /metrics: every probe outcome counted by name, linted by promtool."""

from __future__ import annotations

import pytest

from common.tomlconfig import ConfigError
from node.agent import assess, parse_config
from node.metrics import PROBE_RESULTS, AgentMetrics, probe_result, read_tasks
from tests.unit.test_agent import CONFIG
from tests.unit.test_metrics import needs_promtool, promtool_check_metrics, samples, value

OUTCOMES = [
    ((200, True, 0.01, 0.5, 0.2), "ok"),
    ((None, False, 2.0, 0.5, 0.2, "ClientConnectorError"), "error"),
    ((503, True, 0.01, 0.5, 0.2), "bad_status"),
    ((200, False, 0.01, 0.5, 0.2), "bad_body"),
    ((200, True, 1.5, 0.5, 0.2), "slow"),
    ((200, True, 0.01, 4.5, 0.2), "load"),
    ((200, True, 0.01, 0.5, 0.95), "cpu"),
]


@pytest.mark.parametrize("args,result", OUTCOMES, ids=[r for _, r in OUTCOMES])
def test_every_assessment_of_the_agent_maps_to_its_own_result_label(args, result):
    verdict = assess(*args[:5], CONFIG, *args[5:])
    assert probe_result(verdict.healthy, verdict.reason) == result
    assert {r for _, r in OUTCOMES} == set(PROBE_RESULTS)


def test_probes_and_heartbeats_are_counted_and_the_last_figures_kept():
    metrics = AgentMetrics("web1", "0.1.0", process=False, tasks=lambda: (3, 300))
    metrics.probed(True, "healthy", 0.004, 0.2, 0.5, 0.25)
    metrics.probed(False, "response time 1500 ms > 1000 ms", 1.5, 2.0, 0.7, 0.5)
    metrics.heartbeat_sent()
    metrics.heartbeat_failed()
    found = samples(metrics.render())
    assert value(found, "distributor_agent_probes_total", result="ok") == 1
    assert value(found, "distributor_agent_probes_total", result="slow") == 1
    assert value(found, "distributor_agent_probes_total", result="cpu") == 0  # present before its first
    assert value(found, "distributor_agent_probe_duration_seconds_count") == 2
    assert value(found, "distributor_agent_probe_duration_seconds_bucket", le="0.005") == 1
    assert value(found, "distributor_agent_probe_interval_seconds") == 2.0
    assert value(found, "distributor_agent_healthy") == 0
    assert value(found, "distributor_agent_load1") == 0.7
    assert value(found, "distributor_agent_heartbeats_sent_total") == 1
    assert value(found, "distributor_agent_heartbeat_send_errors_total") == 1
    assert value(found, "distributor_agent_processes") == 300
    assert value(found, "distributor_agent_processes_runnable") == 3
    assert not [k for k in found if k[0] == "distributor_agent_tasks"]  # no broker, no tasks
    metrics.watch_tasks(lambda: {"queued": 1, "running": 1, "done": 4})
    found = samples(metrics.render())
    assert value(found, "distributor_agent_tasks", state="running") == 1
    assert value(found, "distributor_agent_tasks", state="done") == 4
    assert value(found, "distributor_agent_build_info", version="0.1.0") == 1


@needs_promtool
def test_promtool_check_metrics_passes_on_the_agents_endpoint():
    metrics = AgentMetrics("web1", "0.1.0")
    metrics.probed(True, "healthy", 0.004, 0.2, 0.5, 0.25)
    metrics.watch_tasks(lambda: {"queued": 0, "running": 1})
    text = metrics.render()
    assert b"process_resident_memory_bytes" in text
    promtool_check_metrics(text)


def test_processes_come_from_the_fourth_field_of_proc_loadavg(tmp_path):
    path = tmp_path / "loadavg"
    path.write_text("0.52 0.58 0.59 2/345 12345\n")
    assert read_tasks(str(path)) == (2, 345)
    assert read_tasks(str(tmp_path / "missing")) is None
    assert read_tasks("/proc/loadavg") is not None


BASE = """
[agent]
id = "web1"
probe_url = "http://198.51.100.11/health"
[heartbeat]
keys_file = "/etc/distributor/keys"
"""


def test_metrics_are_off_by_default_and_listen_where_configured():
    assert parse_config(BASE).metrics_listen is None
    assert parse_config(BASE + '[metrics]\nlisten = "198.51.100.11:9111"\n').metrics_listen == ("198.51.100.11", 9111)
    with pytest.raises(ConfigError, match=r"metrics.listen: 'nowhere' is not valid"):
        parse_config(BASE + '[metrics]\nlisten = "nowhere"\n')
