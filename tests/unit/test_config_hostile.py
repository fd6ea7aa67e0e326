"""Configs that parse but could not work are refused by name (found by a hostile review of --check).

Each case once passed ``distributor --check`` (exit 0) and failed later: at start, at the first
takeover, or silently (a split brain, a node that never dies).
"""

from __future__ import annotations

import math
import struct

import pytest

from common.wire import MAX_TERM, DistHeartbeat, NodeHeartbeat
from distributor.config import ConfigError, parse
from distributor.daemon import main
from tests.unit.test_config import EXAMPLE

TEXT = EXAMPLE.read_text()


@pytest.mark.parametrize("old, new, named", [
    ("tick = 0.25", "tick = inf", "health.tick: inf"),
    ("tick = 0.25", "tick = nan", "health.tick: nan"),
    ("tick = 0.25", "tick = 1e-300", "health.tick: 1e-300"),
    ("address_lifetime = 1.0", "address_lifetime = inf", "failover.address_lifetime: inf"),
    ('address = "198.51.100.12"', 'address = "198.51.100.11"', "198.51.100.11 is web1's address too"),
    ('address = "198.51.100.13"', 'address = "224.0.0.1"', "multicast"),
    ('address = "198.51.100.13"', 'address = "255.255.255.255"', "broadcast"),
    ('name = "http-alt"', 'name = "http"', "names another service too"),
    ('peers = { dist2 = "198.51.100.3" }', 'peers = { dist2 = "198.51.100.2" }', "this distributor's own address"),
    ('destination = "198.51.100.255:8406"', 'destination = "198.51.100.255:9999"', "port 9999 is not valid"),
    ('address = "198.51.100.2"  #', 'address = "198.51.100.11"  #', "node web1's address"),
    ('listen = "0.0.0.0:8406"   # UDP\n', 'listen = "0.0.0.0:8405"   # UDP\n', "health.listen's too"),
])
def test_a_config_that_could_not_work_is_refused_naming_the_key_and_value(old, new, named):
    assert old in TEXT, old
    text = TEXT.replace(old, new, 1)
    if "health.listen" in named:  # the heartbeats' port moves with it: only the clash is left
        text = text.replace('destination = "198.51.100.255:8406"', 'destination = "198.51.100.255:8405"')
    with pytest.raises(ConfigError, match=named.replace(".", r"\.").replace("(", r"\(")):
        parse(text)


def test_a_vip_that_is_a_node_loopback_or_not_among_the_floating_addresses_is_refused():
    vip = 'vip = "203.0.113.1"'
    assert vip in TEXT
    for address, named in [("198.51.100.11", "node web1's address"), ("127.0.0.1", "loopback"),
                            ("0.0.0.0", "unspecified"), ("203.0.113.9", "not among them")]:
        with pytest.raises(ConfigError, match=named):
            parse(TEXT.replace(vip, f'vip = "{address}"'))


def test_a_service_whose_every_backend_has_weight_zero_is_refused():
    text = TEXT.replace('{ node = "web3", weight = 2 }', '{ node = "web3", weight = 0 }')
    text = text.replace('backends = ["web1", "web2", { node = "web3", weight = 0 }]',
                        'backends = [{ node = "web1", weight = 0 }, { node = "web3", weight = 0 }]')
    assert 'weight = 0 }, { node = "web3", weight = 0 }' in text  # the example's backends kept their shape
    with pytest.raises(ConfigError, match="every backend has weight 0"):
        parse(text)


def test_check_exits_2_for_a_keys_file_that_is_there_but_not_valid_and_warns_once_for_a_missing_one(tmp_path, capsys):
    for content, named in [(b"1 abcd\n", "too short"), (b"\xff\xfe", "not ASCII"), (b"1_0 " + b"ab" * 16 + b"\n",
                                                                                    "expected 'KEY_ID HEX_SECRET'")]:
        keys = tmp_path / "keys"
        keys.write_bytes(content)
        config = tmp_path / "distributor.toml"
        config.write_text(TEXT.replace("/etc/distributor/keys", str(keys)))
        assert main(["--config", str(config), "--check"]) == 2, content
        error = capsys.readouterr().err
        assert named in error and str(keys) in error, error  # what is wrong, and in which file
    config.write_text(TEXT.replace("/etc/distributor/keys", str(tmp_path / "absent")))
    assert main(["--config", str(config), "--check"]) == 0
    assert capsys.readouterr().out.count("cannot read keys file") == 1  # health and failover share it
    config.write_bytes(b"\xff[distributor]")
    assert main(["--config", str(config), "--check"]) == 2
    assert "not UTF-8" in capsys.readouterr().err


def test_heartbeats_that_no_agent_or_distributor_could_send_are_rejected():
    good = NodeHeartbeat(0.5, 0.25, 3.0, 200)
    assert NodeHeartbeat.unpack(good.pack()) == good
    for load1, cpu, response_ms in [(math.nan, 0.1, 1.0), (0.1, 0.1, math.inf), (0.1, 0.1, -5.0), (-1.0, 0.1, 1.0)]:
        assert NodeHeartbeat.unpack(struct.pack("!fffI", load1, cpu, response_ms, 200)) is None
    beat = DistHeartbeat(1, 100, 7, bytes(4), True, False, 0, 0)
    assert DistHeartbeat.unpack(beat.pack()) == beat
    assert DistHeartbeat.unpack(DistHeartbeat(1, 100, MAX_TERM, bytes(4), True, False, 0, 0).pack()) is None


def test_metrics_and_the_api_never_listen_on_the_clients_side_however_the_address_is_written():
    metrics = 'listen = "127.0.0.1:9110" #'
    assert metrics in TEXT
    for address in ("203.0.113.1", "0.0.0.0"):
        with pytest.raises(ConfigError, match="metrics.listen"):
            parse(TEXT.replace(metrics, f'listen = "{address}:9110" #'))
    api = 'listen = "auto"           #'
    assert api in TEXT
    with pytest.raises(ConfigError, match="api.listen"):
        parse(TEXT.replace(api, 'listen = "[::ffff:203.0.113.1]:8410" #'))


def test_a_missing_keys_file_does_not_hide_an_invalid_tokens_file(tmp_path, capsys):
    tokens = tmp_path / "tokens"
    tokens.write_text("admin alice short\n")
    config = tmp_path / "distributor.toml"
    config.write_text(TEXT.replace("/etc/distributor/keys", str(tmp_path / "absent"))
                      .replace("/etc/distributor/api-tokens", str(tokens)))
    assert main(["--config", str(config), "--check"]) == 2
    assert str(tokens) in capsys.readouterr().err
