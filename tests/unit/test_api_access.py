"""Who may reach a distributor's control API: the cluster's own hosts and the sources of [api] allow."""

from __future__ import annotations

import ipaddress

import pytest

from distributor.config import ConfigError, parse
from distributor.daemon import guard_spec
from distributor.rules import GuardSpec, render_guard
from tests.unit.test_config import MINIMAL

API = '[api]\nlisten = "{listen}"\ntokens_file = "/etc/distributor/api-tokens"\n'
METRICS = '[metrics]\nlisten = "198.51.100.2:9110"\nallow = ["198.51.100.9"]\n'


def guard(text: str) -> list[str]:
    return render_guard(0, guard_spec(parse(text)))[("raw", "DGRD0-IN")]


def test_allowed_sources_reach_the_api_port_and_nothing_else_through_the_guard():
    config = parse(MINIMAL + API.format(listen="198.51.100.2:8410") + 'allow = ["198.51.100.254", "192.0.2.0/24"]\n')
    assert config.api.allow == (ipaddress.IPv4Network("198.51.100.254/32"), ipaddress.IPv4Network("192.0.2.0/24"))
    lines = render_guard(0, guard_spec(config))[("raw", "DGRD0-IN")]
    opened = ["-A DGRD0-IN -s 198.51.100.254/32 -p tcp -m tcp --dport 8410 -j RETURN",
              "-A DGRD0-IN -s 192.0.2.0/24 -p tcp -m tcp --dport 8410 -j RETURN"]
    assert [line for line in lines if "--dport 8410" in line] == opened
    # Before any drop, and neither source is an allowed source for anything else.
    assert max(map(lines.index, opened)) < min(i for i, line in enumerate(lines) if line.endswith("-j DROP"))
    assert not [line for line in lines if ("198.51.100.254" in line or "192.0.2.0" in line) and line not in opened]


def test_with_listen_auto_the_opened_port_is_api_port():
    text = MINIMAL + '[api]\nport = 8499\ntokens_file = "/x"\nallow = ["198.51.100.254"]\n'
    assert parse(text).api.listen is None
    assert "-A DGRD0-IN -s 198.51.100.254/32 -p tcp -m tcp --dport 8499 -j RETURN" in guard(text)


def test_metrics_then_api_rules_are_pinned():
    lines = guard(MINIMAL + METRICS + API.format(listen="198.51.100.2:8410") + 'allow = ["198.51.100.254"]\n')
    assert lines == [
        "-A DGRD0-IN -i lo -j RETURN",
        "-A DGRD0-IN -s 198.51.100.11/32 -j RETURN",
        "-A DGRD0-IN -s 198.51.100.9/32 -p tcp -m tcp --dport 9110 -j RETURN",
        "-A DGRD0-IN -s 198.51.100.254/32 -p tcp -m tcp --dport 8410 -j RETURN",
        '-A DGRD0-IN -d 198.51.100.11/32 -m comment --comment "dist-guard:cluster_address" -j DROP',
    ]


def test_an_address_renders_as_its_slash_32_a_network_as_is():
    spec = GuardSpec((), (), (), None, ((9110, ("198.51.100.9",)), (8410, ("198.51.100.254/32", "192.0.2.0/24"))))
    assert render_guard(3, spec)[("raw", "DGRD3-IN")] == [
        "-A DGRD3-IN -i lo -j RETURN",
        "-A DGRD3-IN -s 198.51.100.9/32 -p tcp -m tcp --dport 9110 -j RETURN",
        "-A DGRD3-IN -s 198.51.100.254/32 -p tcp -m tcp --dport 8410 -j RETURN",
        "-A DGRD3-IN -s 192.0.2.0/24 -p tcp -m tcp --dport 8410 -j RETURN",
    ]


@pytest.mark.parametrize("extra", ["", API.format(listen="198.51.100.2:8410"), API.format(listen="127.0.0.1:8410"),
                                   API.format(listen="198.51.100.2:8410") + "allow = []\n"])
def test_without_api_allow_the_guard_is_unchanged(extra):
    config = parse(MINIMAL + METRICS + extra)
    assert config.api is None or config.api.allow == ()
    assert guard_spec(config) == guard_spec(parse(MINIMAL + METRICS))
    assert guard(MINIMAL + METRICS + extra) == [
        "-A DGRD0-IN -i lo -j RETURN",
        "-A DGRD0-IN -s 198.51.100.11/32 -j RETURN",
        "-A DGRD0-IN -s 198.51.100.9/32 -p tcp -m tcp --dport 9110 -j RETURN",
        '-A DGRD0-IN -d 198.51.100.11/32 -m comment --comment "dist-guard:cluster_address" -j DROP',
    ]
    assert not any("8410" in line for line in guard(MINIMAL + METRICS + extra))


EXPECTED = r'expected a list of IPv4 addresses or networks, such as \["198\.51\.100\.9", "198\.51\.100\.0/24"\]'


@pytest.mark.parametrize("allow,message", [
    ('"198.51.100.9"', r"api\.allow: '198\.51\.100\.9' is not valid; "),
    ('["operator"]', r"api\.allow: 'operator' is not valid; "),
    ("[5]", r"api\.allow: 5 is not valid; "),
    ('["::1"]', r"api\.allow: '::1' is not valid; "),
    ('["198.51.100.0/33"]', r"api\.allow: '198\.51\.100\.0/33' is not valid; "),
    ('["198.51.100.9/24"]', r"api\.allow: '198\.51\.100\.9/24' is not valid \(host bits set: the network is "
                            r"198\.51\.100\.0/24\); "),
])
def test_a_bad_allow_list_names_the_key_the_value_and_what_is_valid(allow, message):
    with pytest.raises(ConfigError, match=message + EXPECTED):
        parse(MINIMAL + API.format(listen="198.51.100.2:8410") + f"allow = {allow}\n")


def test_allow_with_the_api_on_loopback_is_refused():
    with pytest.raises(ConfigError, match=r"api\.allow: set, but api\.listen is 127\.0\.0\.1:8410, on loopback"):
        parse(MINIMAL + API.format(listen="127.0.0.1:8410") + 'allow = ["198.51.100.254"]\n')


def test_a_non_string_metrics_allow_entry_is_refused_too():
    # ipaddress alone would read 5 as 0.0.0.5
    with pytest.raises(ConfigError, match=r"metrics\.allow: 5 is not valid; expected a list of IPv4 addresses"):
        parse(MINIMAL + '[metrics]\nlisten = "198.51.100.2:9110"\nallow = [5]\n')
