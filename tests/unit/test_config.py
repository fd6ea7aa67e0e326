"""Config errors name the key and the value; defaults are sensible."""

from pathlib import Path

import pytest

from distributor.balancer import Policy
from distributor.heartbeat import OnDead
from distributor.config import ConfigError, load, parse
from distributor.daemon import main

EXAMPLE = Path(__file__).parents[2] / "docs" / "distributor.example.toml"

MINIMAL = """
[nodes.web1]
address = "198.51.100.11"
[[services]]
vip = "203.0.113.1"
backends = ["web1"]
"""


def test_minimal_config_gets_defaults():
    config = parse(MINIMAL)
    assert config.queue == 0 and config.capacity == 262_144
    assert config.timeouts.established == 900
    (service,) = config.services
    assert service.port == 80 and service.policy is Policy.ROUND_ROBIN
    assert service.backends[0].port == 80 and service.backends[0].weight == 1
    assert config.metrics_listen is None


def test_the_documented_example_is_valid():
    config = load(EXAMPLE)
    assert [s.name for s in config.services] == ["http", "http-alt"]
    assert config.services[0].backends[2].weight == 2
    assert config.services[1].backends[0].port == 8081
    assert config.health.settings.dead == 8 and config.health.on_dead is OnDead.KEEP
    assert config.smtp.recipients == ("ops@example.org",) and config.alert_log.endswith("alerts.log")
    assert config.failover.settings.priority == 200 and list(config.failover.peers) == ["dist2"]
    assert [str(a.address) for a in config.failover.addresses] == ["203.0.113.1/32", "198.51.100.1/24"]
    assert config.failover.keys_file == config.health.keys_file


FAILOVER = """
[failover]
address = "198.51.100.2"
destination = "198.51.100.255:8406"
keys_file = "keys"
peers = { dist2 = "198.51.100.3" }
addresses = [{ address = "203.0.113.1/32", interface = "ext0" }]
"""


@pytest.mark.parametrize(
    "change,message",
    [
        (("peers = { dist2 = \"198.51.100.3\" }", "peers = {}"), r"failover\.peers: expected"),
        (("dist2 = \"198.51.100.3\"", "distributor = \"198.51.100.3\""), r"failover\.peers\.distributor: that is this"),
        (("dist2 = \"198.51.100.3\"", "dist2 = \"somewhere\""), r"failover\.peers\.dist2: 'somewhere'"),
        (("203.0.113.1/32", "203.0.113.1/40"), r"failover\.addresses\[0\]\.address: '203\.0\.113\.1/40'"),
        (("address = \"198.51.100.2\"", "address = \"dist1\""), r"failover\.address: 'dist1'"),
        (("destination = \"198.51.100.255:8406\"\n", ""), r"failover\.destination: required"),
        (("keys_file = \"keys\"\n", ""), r"failover\.keys_file: required"),
        (("peers", "warning = 9\npeers"), r"failover\.warning = 9 must be >= 0 and below failover\.dead"),
    ],
)
def test_bad_failover_settings_name_the_key(change, message):
    assert parse(MINIMAL + FAILOVER).failover.settings.dead == 6
    with pytest.raises(ConfigError, match=message):
        parse(MINIMAL + FAILOVER.replace(*change))


@pytest.mark.parametrize(
    "extra,message",
    [
        ("[health]\nwarning = 8\ndead = 8\nkeys_file = \"k\"\n", r"health\.warning = 8 must be >= 0 and below health\.dead"),
        ("[health]\non_dead = \"drop\"\nkeys_file = \"k\"\n", r"health\.on_dead: 'drop'"),
        ("[health]\ntick = 0.25\n", r"health\.keys_file: required key is missing"),
        ("[alerts.smtp]\nhost = \"mx\"\nrecipients = \"ops\"\n", r"alerts\.smtp\.recipients: 'ops'"),
        ("[alerts.smtp]\nhost = \"mx\"\nrecipients = [\"a@b\"]\nstarttls = \"yes\"\n", r"alerts\.smtp\.starttls: 'yes'"),
    ],
)
def test_bad_health_and_alert_settings_name_the_key(extra, message):
    with pytest.raises(ConfigError, match=message):
        parse(MINIMAL + extra)


def test_health_is_off_without_its_section_or_when_disabled():
    assert parse(MINIMAL).health is None
    assert parse(MINIMAL + "[health]\nenabled = false\n").health is None


@pytest.mark.parametrize(
    "text,message",
    [
        (MINIMAL.replace('vip = "203.0.113.1"', 'vip = "203.0.113.300"'), r"services\[0\]\.vip: '203\.0\.113\.300'"),
        (MINIMAL + 'policy = "leastconn"\n', r"services\[0\]\.policy: 'leastconn' .*least-outstanding"),
        (MINIMAL.replace('["web1"]', '["web9"]'), r"services\[0\]\.backends\[0\]\.node: 'web9' is not a node"),
        (MINIMAL.replace('["web1"]', '[{ node = "web1", weight = -2 }]'), r"backends\[0\]\.weight: -2"),
        (MINIMAL.replace('["web1"]', '[]'), r"services\[0\]\.backends: \[\]"),
        ("[distributor]\nqueue = 70000\n" + MINIMAL, r"distributor\.queue: 70000 .*0 to 65535"),
        ("[distributor]\nqueu = 1\n" + MINIMAL, r"distributor\.queu: unknown key"),
        ("[table]\ncapacity = 0\n" + MINIMAL, r"table\.capacity: 0"),
        ("[table.timeouts]\nsyn = -1\n" + MINIMAL, r"table\.timeouts\.syn: -1"),
        ("[metrics]\nlisten = \"localhost\"\n" + MINIMAL, r"metrics\.listen: 'localhost'"),
        (MINIMAL.replace('address = "198.51.100.11"', 'address = 5'), r"nodes\.web1\.address: 5"),
        ("[[services]]\nvip = \"203.0.113.1\"\nbackends = [\"a\"]\n", r"nodes: required key is missing"),
        ("[nodes.web1]\naddress = \"198.51.100.11\"\n", r"services: required key is missing"),
        (MINIMAL + MINIMAL.split("[[services]]")[1].join(["[[services]]", ""]), r"203\.0\.113\.1:80 is already served"),
        ("this is = not toml [", r"not valid TOML"),
    ],
)
def test_bad_config_names_the_key_and_the_value(text, message):
    with pytest.raises(ConfigError, match=message):
        parse(text)


def test_a_backend_address_port_serves_one_service_only():
    text = MINIMAL + '[[services]]\nvip = "203.0.113.1"\nport = 81\nbackends = [{ node = "web1", port = 80 }]\n'
    with pytest.raises(ConfigError, match=r"services\[1\]\.backends\[0\]: web1 .* already serves"):
        parse(text)


def test_missing_file_is_reported(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load(tmp_path / "nope.toml")


def test_cli_check_and_exit_codes(tmp_path, capsys):
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    assert main(["--config", str(good), "--check"]) == 0
    assert "203.0.113.1:80" in capsys.readouterr().out
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL.replace("web1\"]", "web2\"]"))
    assert main(["--config", str(bad), "--check"]) == 2
    assert "services[0].backends[0].node: 'web2'" in capsys.readouterr().err


API = """
[api]
listen = "{listen}"
tokens = [{{ name = "ops", role = "admin", token = "0123456789abcdef" }}]
"""


@pytest.mark.parametrize(
    "listen,message",
    [
        ("0.0.0.0:8410", r"api\.listen: '0\.0\.0\.0:8410' is not valid: a wildcard listens on every address"),
        ("[::]:8410", r"api\.listen: '\[::\]:8410' is not valid: a wildcard listens on every address"),
        ("203.0.113.1:8410", r"api\.listen: '203\.0\.113\.1:8410' is not valid: it is the VIP of service 'service0'"),
        ("198.51.100.1:8410", r"api\.listen: '198\.51\.100\.1:8410' is not valid: it is a floating address "
                              r"\(failover\.addresses\[1\]\)"),
    ],
)
def test_the_api_never_listens_on_the_vip_side(listen, message):
    failover = FAILOVER.replace('addresses = [{ address = "203.0.113.1/32", interface = "ext0" }]',
                                'addresses = [{ address = "203.0.113.1/32", interface = "ext0" }, '
                                '{ address = "198.51.100.1/24", interface = "int0" }]')
    with pytest.raises(ConfigError, match=message) as refused:
        parse(MINIMAL + failover + API.format(listen=listen))
    assert "expected \"auto\" or \"ADDRESS:PORT\" with a management-side address" in str(refused.value)


def test_the_api_listens_on_the_cluster_lan_address_or_loopback():
    for listen in ("198.51.100.2:8410", "127.0.0.1:8410"):
        config = parse(MINIMAL + FAILOVER + API.format(listen=listen))
        assert config.api.listen == (listen.split(":")[0], 8410)


def test_the_daemon_runs_at_sched_fifo_by_default_and_at_a_nice_value_when_asked():
    config = parse(MINIMAL)
    assert (config.realtime_priority, config.nice) == (10, -20)  # nice applies only without FIFO
    normal = parse(MINIMAL + '[distributor]\nrealtime_priority = 0\nnice = -5\n')
    assert (normal.realtime_priority, normal.nice) == (0, -5)
    with pytest.raises(ConfigError, match=r"distributor\.nice: -21"):
        parse(MINIMAL + '[distributor]\nnice = -21\n')


def test_scheduling_problems_are_reasons_not_exceptions():
    from common.realtime import set_nice, set_realtime

    assert set_nice(0) is None and set_realtime(0) is None  # nothing asked, nothing done
    assert "expected -20 to 19" in set_nice(25)
    assert "expected 1 to 99" in set_realtime(120)
