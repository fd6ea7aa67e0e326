"""The node agent's decisions: adaptive interval, health assessment, CPU sampling, config."""

import os
from pathlib import Path

import pytest

from common.tomlconfig import ConfigError
from distributor import daemon
from node import agent
from node.agent import CpuSampler, assess, next_interval, parse_config

DOCS = Path(__file__).parents[2] / "docs"

CONFIG = parse_config("""
[agent]
id = "web1"
probe_url = "http://198.51.100.11/health"
max_load = 4.0
max_cpu = 0.9
[heartbeat]
keys_file = "/etc/distributor/keys"
""")


@pytest.mark.parametrize("this,previous,expected", [
    (0.001, 0.001, 0.2),  # a fast node is held at the minimum
    (0.05, 0.01, 0.5),  # the slower of the two response times counts
    (0.01, 0.08, 0.8),
    (0.5, 0.5, 2.0),  # and a slow one at the maximum
])
def test_interval_is_the_larger_response_time_times_the_multiplier_within_bounds(this, previous, expected):
    assert next_interval(this, previous, 10.0, 0.2, 2.0) == pytest.approx(expected)


@pytest.mark.parametrize("args,healthy,reason", [
    ((200, True, 0.01, 0.5, 0.2), True, "healthy"),
    ((None, False, 2.0, 0.5, 0.2, "ClientConnectorError"), False, "probe failed"),
    ((503, True, 0.01, 0.5, 0.2), False, "HTTP 503"),
    ((200, False, 0.01, 0.5, 0.2), False, "lacks 'ok'"),
    ((200, True, 1.5, 0.5, 0.2), False, "response time 1500 ms > 1000 ms"),
    ((200, True, 0.01, 4.5, 0.2), False, "load average 4.50 > 4.00"),
    ((200, True, 0.01, 0.5, 0.95), False, "CPU busy 95% > 90%"),
])
def test_heartbeat_only_when_the_answer_is_right_and_the_load_is_under_the_thresholds(args, healthy, reason):
    verdict = assess(*args[:5], CONFIG, *args[5:])
    assert verdict.healthy is healthy and reason in verdict.reason


def test_cpu_sampler_measures_busy_fraction_between_readings():
    sampler = CpuSampler()
    assert sampler.sample("cpu  100 0 100 800 0 0 0 0 0 0\n") == 0.0
    assert sampler.sample("cpu  175 0 125 900 0 0 0 0 0 0\n") == pytest.approx(0.5)


def test_defaults_and_config_errors():
    assert CONFIG.destination == ("198.51.100.255", 8405)
    assert (CONFIG.min_interval, CONFIG.max_interval, CONFIG.multiplier) == (0.2, 2.0, 10.0)
    bad = [
        ('[agent]\nid = "web1"\nprobe_url = "ftp://x"\n[heartbeat]\nkeys_file = "k"\n', "agent.probe_url: 'ftp://x'"),
        ('[agent]\nid = "a-very-long-node-name"\nprobe_url = "http://x/"\n[heartbeat]\nkeys_file = "k"\n', "agent.id"),
        ('[agent]\nid = "w"\nprobe_url = "http://x/"\nmin_interval = 3\n[heartbeat]\nkeys_file = "k"\n', "max_interval"),
        ('[agent]\nid = "w"\nprobe_url = "http://x/"\n[heartbeat]\nkeys_file = "k"\ndestination = "nope"\n', "heartbeat.destination"),
        ('[agent]\nid = "w"\nprobe_url = "http://x/"\nmultipler = 3\n[heartbeat]\nkeys_file = "k"\n', "agent.multipler: unknown key"),
        ('[heartbeat]\nkeys_file = "k"\n', "agent: required key is missing"),
    ]
    for text, message in bad:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
            parse_config(text)


def test_the_documented_example_is_valid():
    from pathlib import Path

    example = Path(__file__).parents[2] / "docs" / "node-agent.example.toml"
    config = parse_config(example.read_text())
    assert config.node_id == "web1" and config.max_load == 8.0


@pytest.mark.parametrize("program,example,keys_file", [
    (agent.main, "node-agent.example.toml", lambda path: parse_config(path.read_text()).keys_file),
    (daemon.main, "distributor.example.toml", lambda path: daemon.load(path).health.keys_file),
])
def test_check_passes_on_the_documented_example_and_warns_of_a_keys_file_this_host_lacks(program, example, keys_file,
                                                                                         capsys):
    path = DOCS / example
    assert program(["--config", str(path), "--check"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("config OK")
    named = keys_file(path)
    if not os.path.exists(named):  # the example's keys are not installed here: a warning, not a failure
        assert f"warning: cannot read keys file {named!r}" in out


def test_the_agent_check_still_refuses_a_bad_config(tmp_path, capsys):
    bad = tmp_path / "agent.toml"
    bad.write_text('[agent]\nid = "web1"\nprobe_url = "https://198.51.100.11/"\n[heartbeat]\nkeys_file = "k"\n')
    assert agent.main(["--config", str(bad), "--check"]) == 2
    assert "agent.probe_url: 'https://198.51.100.11/' is not valid" in capsys.readouterr().err
