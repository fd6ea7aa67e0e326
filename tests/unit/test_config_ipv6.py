"""IPv6 in the config: nodes' address6, IPv6 VIPs and floating addresses; control traffic stays IPv4."""

from __future__ import annotations

import ipaddress
import re
from pathlib import Path

import pytest

from distributor.config import ConfigError, parse
from distributor.daemon import describe, guard_spec, ipv6_problem
from distributor.reroute import Mode

EXAMPLE = Path(__file__).parents[2] / "docs" / "distributor.example.toml"

DUAL = """
[nodes.web1]
address = "198.51.100.11"
address6 = "2001:db8:198::11"
[nodes.web2]
address = "198.51.100.12"
address6 = "2001:db8:198:0:0::12"
[[services]]
name = "http"
vip = "203.0.113.1"
backends = ["web1", "web2"]
[[services]]
name = "http6"
vip = "2001:db8:203::1"
backends = ["web1", { node = "web2", port = 8080 }]
"""

FAILOVER = """
[failover]
address = "198.51.100.2"
destination = "198.51.100.255:8406"
keys_file = "keys"
peers = { dist2 = "198.51.100.3" }
addresses = [{ address = "203.0.113.1/32", interface = "ext0" }, { address = "2001:db8:203::1/64", interface = "ext0" }]
"""


def test_a_dual_stack_service_is_two_services_over_the_same_nodes():
    config = parse(DUAL)
    http, http6 = config.services
    assert http6.vip == ipaddress.IPv6Address("2001:db8:203::1") and http6.port == 80
    assert [(b.name, str(b.address), b.port) for b in http6.backends] == [
        ("web1", "2001:db8:198::11", 80), ("web2", "2001:db8:198::12", 8080)]
    assert [str(b.address) for b in http.backends] == ["198.51.100.11", "198.51.100.12"]
    assert config.nodes6 == {"web1": ipaddress.IPv6Address("2001:db8:198::11"),
                             "web2": ipaddress.IPv6Address("2001:db8:198::12")}
    assert config.ipv6 and not parse(DUAL.split("[[services]]\nname = \"http6\"")[0]).ipv6
    assert "service http6: [2001:db8:203::1]:80 round-robin -> web1=[2001:db8:198::11]:80(w1)" in describe(config)
    assert parse(DUAL.replace("[[services]]", "[distributor]\nmode = \"kernel\"\n[[services]]", 1)).mode is Mode.KERNEL


def test_ipv6_floating_addresses_and_the_vip6_among_them():
    config = parse(DUAL + FAILOVER)
    assert [str(a.address) for a in config.failover.addresses] == ["203.0.113.1/32", "2001:db8:203::1/64"]
    missing = DUAL + FAILOVER.replace(', { address = "2001:db8:203::1/64", interface = "ext0" }', "")
    with pytest.raises(ConfigError, match=re.escape(
            "failover.addresses: service http6's VIP 2001:db8:203::1 is not among them, so a backup taking over "
            "would not hold it; add { address = \"2001:db8:203::1/128\", interface = ... }")):
        parse(missing)


@pytest.mark.parametrize("change,message", [
    # A node an IPv6 service names must have an address6.
    (('address6 = "2001:db8:198:0:0::12"\n', ""),
     "services[1].backends[1].node: node web2 has no IPv6 address, and service 'http6' has the IPv6 VIP "
     "2001:db8:203::1; add address6 = \"...\" (its IPv6 address) to [nodes.web2], or serve it over IPv4 only"),
    (('address6 = "2001:db8:198:0:0::12"', 'address6 = "2001:db8:198::11"'),
     "nodes.web2.address6: 2001:db8:198::11 is web1's address6 too; each node has its own"),
    (('address6 = "2001:db8:198:0:0::12"', 'address6 = "198.51.100.12"'),
     "nodes.web2.address6: '198.51.100.12' is not valid; expected the node's IPv6 address, such as "
     "\"2001:db8:198::11\""),
    (('address6 = "2001:db8:198:0:0::12"', 'address6 = "ff02::1"'),
     "nodes.web2.address6: ff02::1 is a multicast address; expected the node's IPv6 address"),
    (('address6 = "2001:db8:198:0:0::12"', 'address6 = "fe80::12"'),
     "nodes.web2.address6: fe80::12 is a link-local address (valid on one link only, and needing a zone)"),
    (('vip = "2001:db8:203::1"', 'vip = "::1"'), "services[1].vip: ::1 is a loopback address"),
    (('vip = "2001:db8:203::1"', 'vip = "2001:db8:203::1::"'),
     "services[1].vip: '2001:db8:203::1::' is not valid; expected the IPv6 address clients connect to, such as "
     "\"2001:db8:203::1\""),
    (('vip = "2001:db8:203::1"', 'vip = "::ffff:203.0.113.9"'),
     "services[1].vip: ::ffff:cb00:7109 is an IPv4-mapped address (write the IPv4 address as such)"),
    (('vip = "2001:db8:203::1"', 'vip = "2001:db8:198::11"'),
     "services[1].vip: 2001:db8:198::11 is node web1's address6; a VIP is the distributor's own"),
    (('backends = ["web1", { node = "web2", port = 8080 }]',
      'backends = ["web1", { node = "web2", port = 8080 }]\n[[services]]\nname = "again"\nvip = "2001:db8:203:0::1"\n'
      'backends = ["web2"]'),
     "services[2].vip: [2001:db8:203::1]:80 is already served by service 'http6'"),
])
def test_bad_ipv6_configs_say_what_and_what_is_valid(change, message):
    old, new = change
    assert old in DUAL
    with pytest.raises(ConfigError, match=re.escape(message)):
        parse(DUAL.replace(old, new, 1))


def test_dsr_mode_serves_ipv4_vips_only():
    text = DUAL.replace("[[services]]", "[distributor]\nmode = \"dsr\"\n[[services]]", 1)
    text = text.replace('backends = ["web1", "web2"]', 'policy = "maglev"\nbackends = ["web1", "web2"]')
    with pytest.raises(ConfigError, match=re.escape(
            "services[1].vip: 2001:db8:203::1 is not valid in dsr mode: dsr mode serves IPv4 VIPs only; expected an "
            "IPv4 address (serve IPv6 with mode \"rewrite\" or \"kernel\")")):
        parse(text)


@pytest.mark.parametrize("change,key", [
    (('address = "198.51.100.2"', 'address = "2001:db8:198::2"'), "failover.address"),
    (('destination = "198.51.100.255:8406"', 'destination = "[ff02::1]:8406"'), "failover.destination"),
    (('peers = { dist2 = "198.51.100.3" }', 'peers = { dist2 = "2001:db8:198::3" }'), "failover.peers.dist2"),
    (('keys_file = "keys"', 'keys_file = "keys"\nlisten = "[::]:8406"'), "failover.listen"),
])
def test_control_traffic_stays_on_ipv4(change, key):
    old, new = change
    assert old in FAILOVER
    with pytest.raises(ConfigError, match=re.escape(key) + r": .* is not valid: control traffic \(heartbeats, the "
                       r"sync stream, the API, metrics\) stays on the cluster LAN's IPv4, IPv6 addresses are for the "
                       r"services only; expected an IPv4"):
        parse(DUAL + FAILOVER.replace(old, new))
    for section in ('[health]\nkeys_file = "keys"\nlisten = "[2001:db8:198::2]:8405"\n',
                    '[metrics]\nlisten = "[2001:db8:198::2]:9110"\n',
                    '[api]\nlisten = "[2001:db8:198::2]:8410"\ntokens_file = "t"\n'):
        with pytest.raises(ConfigError, match=r"listen: .* stays on the cluster LAN's IPv4"):
            parse(DUAL + section)


def test_bad_ipv6_floating_addresses():
    for address, message in [("2001:db8:203::1/129", "'2001:db8:203::1/129' is not valid; expected ADDRESS/PREFIX such as "
                                                     "\"203.0.113.1/32\" or \"2001:db8:203::1/64\""),
                             ("fe80::1/64", "'fe80::1/64' is not valid: a link-local address")]:
        with pytest.raises(ConfigError, match=re.escape(f"failover.addresses[1].address: {message}")):
            parse(DUAL + FAILOVER.replace("2001:db8:203::1/64", address))


def test_the_documented_dual_stack_example_is_valid_once_uncommented():
    text = EXAMPLE.read_text()
    for pattern in (r"^# (address6 = .*)$", r"^# (\[\[services\]\])$", r'^# (name = "http6")$', r'^# (vip = "2001.*)$',
                    r"^# (port = 80)$", r'^# (policy = "least-outstanding")$', r"^# (backends = .*)$",
                    r"^    # (\{ address = \"2001.*)$"):
        text, count = re.subn(pattern, r"\1", text, flags=re.MULTILINE)
        assert count, pattern
    config = parse(text)
    assert [s.name for s in config.services] == ["http", "http-alt", "http6"]
    assert str(config.services[2].backends[2].address) == "2001:db8:198::13"
    assert [str(a.address) for a in config.failover.addresses][2:] == ["2001:db8:203::1/64", "2001:db8:198::1/64"]
    # The guard protects the nodes' IPv6 addresses too.
    spec = guard_spec(config)
    assert {"2001:db8:198::11", "198.51.100.11"} <= set(spec.protected) & set(spec.allowed_sources)


def test_the_daemon_refuses_to_start_ipv6_services_without_ip6tables_or_ipv6_forwarding(tmp_path):
    config = parse(DUAL)
    on, off = tmp_path / "on", tmp_path / "off"
    on.write_text("1\n")
    off.write_text("0\n")
    which = {"ip6tables-restore": "/usr/sbin/ip6tables-restore", "ip6tables-save": "/usr/sbin/ip6tables-save"}.get
    assert ipv6_problem(config, str(on), which) is None
    assert ipv6_problem(parse(DUAL.split("[[services]]\nname = \"http6\"")[0]), str(off), which) is None  # IPv4 only
    assert ipv6_problem(config, str(off), which) == (
        f"IPv6 forwarding is off ({off} is 0), so the IPv6 service(s) http6 could not reach their nodes; turn it on "
        "(sysctl -w net.ipv6.conf.all.forwarding=1, and in /etc/sysctl.d to keep it)")
    assert "does this kernel have IPv6?" in ipv6_problem(config, str(tmp_path / "absent"), which)
    assert ipv6_problem(config, str(on), lambda program: None) == (
        "ip6tables-restore is not installed (Debian package: iptables), and the IPv6 service(s) http6 need it for "
        "their rules")
