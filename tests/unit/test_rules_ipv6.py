"""IPv6 services' rules: the IPv4 shape in the ip6 tables, installed only when an IPv6 service exists."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from distributor.reroute import Mode, RuleBackend, RuleService
from distributor.rules import (GuardSpec, ICMPV6_ERROR_TYPES, Rules, RulesError, ToolMissing, render_guard,
                               render_return_path, render_rules)

V4 = RuleService("http", "203.0.113.1", 80, (RuleBackend("198.51.100.11", 80, 0x1000),))
V6 = RuleService("http6", "2001:db8:203::1", 80, (RuleBackend("2001:db8:198::11", 80, 0x1001),
                                                   RuleBackend("2001:db8:198::12", 8080, 0x1002)))
QUOTES_11 = ("4>>8&0xFF=58&&52>>8&0xFF=6&&72=0x20010db8&&76=0x1980000&&80=0x0&&84=0x11&&88&0xFFFF=80")
QUOTES_12 = ("4>>8&0xFF=58&&52>>8&0xFF=6&&72=0x20010db8&&76=0x1980000&&80=0x0&&84=0x12&&88&0xFFFF=8080")
QUEUE = "-m limit --limit 1000/second --limit-burst 1000 -j NFQUEUE --queue-num 0"
FLOOD = '-m comment --comment "dist:icmp_flood" -j DROP'


@pytest.mark.parametrize("mode", [Mode.REWRITE, Mode.KERNEL])
@pytest.mark.parametrize("answer_echo", [True, False])
def test_the_ipv4_rules_of_a_mixed_layout_are_those_of_its_ipv4_services_alone(mode, answer_echo):
    assert render_rules(0, (V4, V6), mode, answer_echo) == render_rules(0, (V4,), mode, answer_echo)
    assert render_rules(0, (V4, V6), mode, answer_echo, family=6) == render_rules(0, (V6,), mode, answer_echo, family=6)
    assert render_rules(0, (V4,), mode, answer_echo, family=6) == {}  # no IPv6 service: nothing in the ip6 tables
    assert render_return_path(0, (V4, V6)) == render_return_path(0, (V4,))


def test_rewrite_mode_ipv6_rules_line_by_line():
    rules = render_rules(0, (V4, V6), Mode.REWRITE, answer_echo=False, family=6)
    vip = "-d 2001:db8:203::1/128"
    assert rules == {
        ("raw", "DIST0-IN"): [
            f'-A DIST0-IN {vip} -p ipv6-icmp -m icmp6 --icmpv6-type 128 -m comment --comment "dist:echo_refused" -j DROP',
            f"-A DIST0-IN {vip} -p tcp -m tcp --dport 80 -j CT --notrack",
            f"-A DIST0-IN {vip} -p tcp -m tcp --dport 80 -j NFQUEUE --queue-num 0",
            "-A DIST0-IN -s 2001:db8:198::11/128 -p tcp -m tcp --sport 80 -j CT --notrack",
            "-A DIST0-IN -s 2001:db8:198::12/128 -p tcp -m tcp --sport 8080 -j CT --notrack",
            "-A DIST0-IN -p ipv6-icmp -j DIST0-IERR"],
        ("mangle", "DIST0-OUT"): [
            "-A DIST0-OUT -p tcp -m tcp --tcp-flags SYN,FIN,RST NONE -j RETURN",
            "-A DIST0-OUT -s 2001:db8:198::11/128 -p tcp -m tcp --sport 80 -j NFQUEUE --queue-num 0",
            "-A DIST0-OUT -s 2001:db8:198::12/128 -p tcp -m tcp --sport 8080 -j NFQUEUE --queue-num 0",
            *[f"-A DIST0-OUT -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -j DIST0-OERR" for kind in (1, 2, 3, 4)]],
        ("raw", "DIST0-LOCAL"): [
            "-A DIST0-LOCAL -s 2001:db8:203::1/128 -p tcp -m tcp --sport 80 -j CT --notrack",
            "-A DIST0-LOCAL -d 2001:db8:198::11/128 -p tcp -m tcp --dport 80 -j CT --notrack",
            "-A DIST0-LOCAL -d 2001:db8:198::12/128 -p tcp -m tcp --dport 8080 -j CT --notrack"],
        ("raw", "DIST0-IERR"): [f"-A DIST0-IERR -p ipv6-icmp -m icmp6 --icmpv6-type {kind} -g DIST0-IQ"
                                for kind in (1, 2, 3, 4)],
        ("raw", "DIST0-IQ"): [
            f"-A DIST0-IQ {vip} -j CT --notrack",
            f"-A DIST0-IQ {vip} {QUEUE} --queue-bypass",
            f"-A DIST0-IQ {vip} {FLOOD}",
            f'-A DIST0-IQ -m u32 --u32 "{QUOTES_11}" -j CT --notrack',
            f'-A DIST0-IQ -m u32 --u32 "{QUOTES_12}" -j CT --notrack'],
        ("mangle", "DIST0-OERR"): [
            "-A DIST0-OERR -m addrtype --dst-type LOCAL -j RETURN",
            f'-A DIST0-OERR -m u32 --u32 "{QUOTES_11}" -j DIST0-OQ',
            f'-A DIST0-OERR -m u32 --u32 "{QUOTES_12}" -j DIST0-OQ'],
        ("mangle", "DIST0-OQ"): [f"-A DIST0-OQ {QUEUE}", f"-A DIST0-OQ {FLOOD}"],
    }
    assert ICMPV6_ERROR_TYPES == (1, 2, 3, 4)


def test_no_ipv6_rule_matches_neighbour_discovery_or_mld_by_type():
    for mode in (Mode.REWRITE, Mode.KERNEL):
        for echo in (True, False):
            lines = [line for chain in render_rules(0, (V6,), mode, echo, family=6).values() for line in chain]
            typed = [int(line.split("--icmpv6-type ")[1].split()[0]) for line in lines if "--icmpv6-type" in line]
            assert set(typed) <= {1, 2, 3, 4, 128}
            # The only untyped ICMPv6 rule jumps to the chain that tells the types apart (and returns the rest).
            assert [line for line in lines if "ipv6-icmp" in line and "--icmpv6-type" not in line] == (
                ["-A DIST0-IN -p ipv6-icmp -j DIST0-IERR"] if mode is Mode.REWRITE else [])


def test_kernel_mode_ipv6_rules_line_by_line():
    rules = render_rules(0, (V4, V6), Mode.KERNEL, family=6)
    vip = "-d 2001:db8:203::1/128 -p tcp -m tcp --dport 80"
    end = "0x40000000/0x40000000"
    queue = "-j NFQUEUE --queue-num 0"
    assert rules == {
        ("mangle", "DIST0-NEW"): [
            f"-A DIST0-NEW {vip} -m conntrack --ctstate NEW -m mark ! --mark {end} {queue}",
            f"-A DIST0-NEW {vip} -m tcp --tcp-flags RST RST -m conntrack --ctstate INVALID -m mark ! --mark {end} {queue}",
            '-A DIST0-NEW -s 2001:db8:198::11/128 -p tcp -m tcp --sport 80 -m comment --comment "dist:unknown_reply" -j DROP',
            '-A DIST0-NEW -s 2001:db8:198::12/128 -p tcp -m tcp --sport 8080 -m comment --comment "dist:unknown_reply" '
            "-j DROP"],
        ("mangle", "DIST0-IN"): [
            "-A DIST0-IN -m conntrack --ctstate NEW,INVALID -j DIST0-NEW",
            "-A DIST0-IN -p tcp -m tcp --tcp-flags FIN,RST NONE -j RETURN",
            f"-A DIST0-IN -m connmark --mark {end} -j RETURN",
            f"-A DIST0-IN -m mark --mark {end} -j CONNMARK --save-mark --nfmask 0x40000000 --ctmask 0x40000000",
            f"-A DIST0-IN -m mark --mark {end} -j RETURN",
            f"-A DIST0-IN {vip} {queue}",
            f"-A DIST0-IN -s 2001:db8:198::11/128 -p tcp -m tcp --sport 80 {queue}",
            f"-A DIST0-IN -s 2001:db8:198::12/128 -p tcp -m tcp --sport 8080 {queue}"],
        ("nat", "DIST0-NAT"): [
            f"-A DIST0-NAT {vip} -m mark --mark 0x1001/0xffff -j DNAT --to-destination [2001:db8:198::11]:80",
            f"-A DIST0-NAT {vip} -m mark --mark 0x1002/0xffff -j DNAT --to-destination [2001:db8:198::12]:8080"],
        ("raw", "DIST0-LOCAL"): ["-A DIST0-LOCAL -s 2001:db8:203::1/128 -p tcp -m tcp --sport 80 -j CT --notrack"],
    }
    refused = render_rules(0, (V6,), Mode.KERNEL, answer_echo=False, family=6)[("mangle", "DIST0-IN")][0]
    assert refused == ('-A DIST0-IN -d 2001:db8:203::1/128 -p ipv6-icmp -m icmp6 --icmpv6-type 128 '
                       '-m comment --comment "dist:echo_refused" -j DROP')


def test_dsr_mode_refuses_an_ipv6_service_and_ignores_none():
    assert render_rules(0, (V4,), Mode.DSR, answer_echo=False, family=6) == {}
    with pytest.raises(RulesError, match="dsr mode serves IPv4 VIPs only"):
        render_rules(0, (V4, V6), Mode.DSR, answer_echo=False, family=6)


def test_the_ipv6_return_path_rewrites_the_source_in_table_ip6():
    text = render_return_path(0, (V4, V6), family=6)
    assert text == (
        "table ip6 dist0 {\n"
        "  chain to_vip_0 {\n"
        '    counter ip6 saddr set 2001:db8:203::1 comment "http6 2001:db8:198::11:80"\n'
        "  }\n"
        "  chain to_vip_1 {\n"
        '    counter ip6 saddr set 2001:db8:203::1 tcp sport set 80 comment "http6 2001:db8:198::12:8080"\n'
        "  }\n"
        "  chain postrouting {\n"
        "    type filter hook postrouting priority -140; policy accept;\n"
        "    meta l4proto tcp ip6 saddr . tcp sport vmap { 2001:db8:198::11 . 80 : goto to_vip_0, "
        "2001:db8:198::12 . 8080 : goto to_vip_1 }\n"
        "  }\n"
        "}\n")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("nft") is None,
                    reason="nft -c needs root and the nftables package")
def test_nft_accepts_the_ipv6_return_path():
    result = subprocess.run(["nft", "-c", "-f", "-"], input=render_return_path(0, (V4, V6), family=6),
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr


SPEC = GuardSpec(("198.51.100.11", "2001:db8:198::11", "198.51.100.2"), ("198.51.100.11", "2001:db8:198::11"),
                 (8405, 8406), "int0", ((9110, ("198.51.100.9",)),))


def test_the_guard_splits_its_addresses_by_family():
    v4_only = GuardSpec(("198.51.100.11", "198.51.100.2"), ("198.51.100.11",), (8405, 8406), "int0",
                        ((9110, ("198.51.100.9",)),))
    assert render_guard(0, SPEC) == render_guard(0, v4_only)
    assert render_guard(0, v4_only, family=6) == {}
    assert render_guard(0, SPEC, family=6) == {("raw", "DGRD0-IN"): [
        "-A DGRD0-IN -i lo -j RETURN",
        "-A DGRD0-IN -s 2001:db8:198::11/128 -i int0 -j RETURN",
        '-A DGRD0-IN -s 2001:db8:198::11/128 -m comment --comment "dist-guard:spoofed_source" -j DROP',
        '-A DGRD0-IN -p udp -m udp --dport 8405 -m comment --comment "dist-guard:control_port" -j DROP',
        '-A DGRD0-IN -p udp -m udp --dport 8406 -m comment --comment "dist-guard:control_port" -j DROP',
        '-A DGRD0-IN -d 2001:db8:198::11/128 -m comment --comment "dist-guard:cluster_address" -j DROP']}


class Recorded(Rules):
    """Rules with the programs replaced: records each call, answers from ``tables`` (family -> save output)."""

    def __init__(self, *args, tables=None, missing=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[list[str], str | None]] = []
        self.tables = tables or {}
        self.missing = set(missing)

    def _run(self, argv, stdin=None):
        self.calls.append((argv, stdin))
        if argv[0] in self.missing:
            raise ToolMissing(f"{argv[0]} is not installed (Debian package: iptables)")
        out = self.tables.get(argv[0], "") if argv[0].endswith("-save") else ""
        return subprocess.CompletedProcess(argv, 0, out, "")

    def programs(self):
        return [argv[0] for argv, _ in self.calls]

    def script(self, program):
        return next(stdin for argv, stdin in self.calls if argv[0] == program)


def test_an_ipv4_only_layout_installs_nothing_in_the_ip6_tables_and_removes_what_was_left():
    rules = Recorded(0, Mode.REWRITE)
    rules.install_layout((V4,))
    assert "ip6tables-restore" not in rules.programs() and "iptables-restore" in rules.programs()
    nft = rules.script("nft")
    assert "table ip6 dist0 {}\ndelete table ip6 dist0\n" in nft and "ip6 saddr set" not in nft
    # A previous run's IPv6 chains are removed by the next install, even of an IPv4-only layout.
    left = Recorded(0, Mode.REWRITE, tables={"ip6tables-save": ":DIST0-IN - [0:0]\n-A PREROUTING -j DIST0-IN\n"})
    left.install_layout((V4,))
    assert "-D PREROUTING -j DIST0-IN\n-F DIST0-IN\n-X DIST0-IN" in left.script("ip6tables-restore")
    # No ip6tables on an IPv4-only host: fine.
    bare = Recorded(0, Mode.REWRITE, missing={"ip6tables-save", "ip6tables-restore"})
    bare.install_layout((V4,))
    assert bare.remove() is False


def test_a_mixed_layout_installs_both_families_and_remove_takes_both_away():
    rules = Recorded(0, Mode.REWRITE)
    rules.install_layout((V4, V6))
    v6 = rules.script("ip6tables-restore")
    assert "-A DIST0-IN -d 2001:db8:203::1/128 -p tcp -m tcp --dport 80 -j NFQUEUE --queue-num 0" in v6
    assert "-I PREROUTING 1 -j DIST0-IN" in v6 and "203.0.113.1" not in v6
    assert "2001:" not in rules.script("iptables-restore")
    nft = rules.script("nft")
    assert nft.index("delete table ip6 dist0") < nft.index("table ip6 dist0 {\n  chain to_vip_0")
    # The queue rules of both families go after the return path (no SYN-ACK leaves with a node's address).
    assert rules.programs().index("nft") < rules.programs().index("iptables-restore") < rules.programs().index(
        "ip6tables-restore")
    rules.calls.clear()
    rules.tables = {"iptables-save": ":DIST0-IN - [0:0]\n", "ip6tables-save": ":DIST0-IN - [0:0]\n"}
    assert rules.remove()
    assert "-X DIST0-IN" in rules.script("iptables-restore") and "-X DIST0-IN" in rules.script("ip6tables-restore")
    assert "delete table ip6 dist0" in rules.calls[-1][1]
    # Missing ip6tables with an IPv6 service is an error that names the package.
    bare = Recorded(0, Mode.KERNEL, missing={"ip6tables-save", "ip6tables-restore"})
    with pytest.raises(RulesError, match=r"ip6tables-\w+ is not installed \(Debian package: iptables\)"):
        bare.install_layout((V4, V6))


def test_the_return_path_counters_of_both_tables_are_read():
    import json

    def listing(family, comment, count):
        return json.dumps({"nftables": [{"rule": {"family": family, "comment": comment,
                                                   "expr": [{"counter": {"packets": 1, "bytes": count}}]}}]})

    class Listed(Recorded):
        def _run(self, argv, stdin=None):
            if argv[:2] == ["nft", "-j"]:
                family = argv[4]
                comment = "http6 2001:db8:198::11:80" if family == "ip6" else "http 198.51.100.11:80"
                return subprocess.CompletedProcess(argv, 0, listing(family, comment, 100 if family == "ip6" else 40), "")
            return super()._run(argv, stdin)

    rules = Listed(0, Mode.REWRITE)
    rules.install_layout((V4, V6))
    assert rules.return_path_bytes() == {("http", "198.51.100.11", 80): 40, ("http6", "2001:db8:198::11", 80): 100}
