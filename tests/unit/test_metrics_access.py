"""Who may scrape a distributor: the cluster's own hosts and the monitoring hosts of [metrics] allow."""

from __future__ import annotations

import ipaddress

import pytest

from distributor.config import ConfigError, parse
from distributor.daemon import guard_spec
from distributor.rules import render_guard
from tests.unit.test_config import MINIMAL


def test_allowed_monitoring_hosts_reach_the_metrics_port_and_nothing_else_through_the_guard():
    config = parse(MINIMAL + '[metrics]\nlisten = "198.51.100.2:9110"\nallow = ["198.51.100.9"]\n')
    assert config.metrics_allow == (ipaddress.IPv4Address("198.51.100.9"),)
    lines = render_guard(0, guard_spec(config))[("raw", "DGRD0-IN")]
    scrape = "-A DGRD0-IN -s 198.51.100.9/32 -p tcp -m tcp --dport 9110 -j RETURN"
    assert scrape in lines
    # Before any drop, and the monitor is no allowed source for anything else.
    assert lines.index(scrape) < min(i for i, line in enumerate(lines) if line.endswith("-j DROP"))
    assert "-A DGRD0-IN -s 198.51.100.9/32 -j RETURN" not in lines


def test_without_allow_the_guard_is_unchanged():
    config = parse(MINIMAL + '[metrics]\nlisten = "198.51.100.2:9110"\n')
    assert config.metrics_allow == ()
    assert not [line for line in render_guard(0, guard_spec(config))[("raw", "DGRD0-IN")] if "--dport 9110" in line]


@pytest.mark.parametrize("allow,message", [
    ('"198.51.100.9"', "metrics.allow: '198.51.100.9' is not valid; expected a list of IPv4 addresses"),
    ('["monitor"]', "metrics.allow: 'monitor' is not valid; expected a list of IPv4 addresses"),
])
def test_a_bad_allow_list_names_the_key_and_the_value(allow, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.").replace("[", r"\[")):
        parse(MINIMAL + f'[metrics]\nlisten = "198.51.100.2:9110"\nallow = {allow}\n')


def test_allow_without_a_metrics_port_is_refused():
    with pytest.raises(ConfigError, match="metrics.allow: set, but metrics.listen is empty"):
        parse(MINIMAL + '[metrics]\nallow = ["198.51.100.9"]\n')
