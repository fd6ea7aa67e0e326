"""Direct server return and active-active (no root): the interposer's dsr verdicts, its rules and
routes as rendered, the config's rules for the mode, and when a distributor announces its VIPs.

The end-to-end proof, with BIRD, a router and three distributors of which one is killed under
load, is tests/e2e/test_active_active_e2e.py.
"""

from __future__ import annotations

import json
import random
import subprocess

import pytest

from common.sansio import CommandDone, StopRequested
from backup.failover import InstallRules, RemoveRules
from distributor.admin import AdminOp
from distributor.announce import (AnnounceCore, AnnounceRoute, AnnounceState, ServingChanged, TRANSITIONS,
                                  WithdrawRoute)
from distributor.balancer import Policy
from distributor.config import ConfigError, parse
from distributor.conntable import ConnectionTable
from distributor.core import DistributorCore
from distributor.reroute import (ConnectionEnded, ConnectionOpened, Interposer, MARK_BASE, Mode, PassiveFailure,
                                 Reason)
from distributor.rules import DsrRoutes, dsr_rule_pref, dsr_table, render_dsr_routes, render_rules
from tests.packets import CLIENT, VIP, tcp
from tests.unit.test_admin_core import request
from tests.unit.test_reroute import service_spec

NODES = ("web1", "web2", "web3")
MARKS = {MARK_BASE + i: name for i, name in enumerate(NODES)}


def dsr(secret: bytes = b"shared", nodes=NODES) -> Interposer:
    return Interposer([service_spec(Policy.MAGLEV, nodes=nodes)], ConnectionTable(10_000), Mode.DSR,
                      flow_secret=secret)


def flows(count: int, seed: int = 3) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    return [(f"192.0.2.{rng.randrange(1, 255)}", rng.randrange(1024, 65536)) for _ in range(count)]


# -- the interposer ------------------------------------------------------------------------------------
def test_a_connection_is_marked_for_its_node_and_never_rewritten():
    ip = dsr()
    reason, out, effects = ip.decide(tcp(CLIENT, VIP, 40000, 80, "S", seq=1), 0.0)
    assert reason is Reason.NEW_CONNECTION and out in MARKS
    assert [type(e) for e in effects] == [ConnectionOpened]
    for flags in ("A", "PA", "A"):
        assert ip.decide(tcp(CLIENT, VIP, 40000, 80, flags, payload=b"GET /"), 0.01) == (Reason.TO_BACKEND, out, None)
    assert ip.decide(tcp(CLIENT, VIP, 40000, 80, "FA"), 0.02)[1] == out  # the FIN goes to the node too


def test_a_flow_the_router_moves_keeps_its_node_on_the_other_distributor():
    first, second = dsr(), dsr()
    for client, port in flows(500):
        _, node, _ = first.decide(tcp(client, VIP, port, 80, "S", seq=1), 0.0)
        reason, out, effects = second.decide(tcp(client, VIP, port, 80, "PA", payload=b"x"), 1.0)
        assert reason is Reason.ADOPTED_FLOW and out == node
        assert [type(e) for e in effects] == [ConnectionOpened]
    # Adopted flows are cached: their next segments are plain traffic of a known connection.
    client, port = flows(1)[0]
    assert second.decide(tcp(client, VIP, port, 80, "A"), 1.1)[0] is Reason.TO_BACKEND
    assert len(second) == 500


def test_distributors_with_another_secret_disagree_so_the_secret_must_be_shared():
    first, other = dsr(b"one"), dsr(b"two")
    same = sum(first.decide(tcp(c, VIP, p, 80, "S", seq=1), 0.0)[1] == other.decide(tcp(c, VIP, p, 80, "S", seq=1),
                                                                                     0.0)[1]
               for c, p in flows(300))
    assert same < 200  # about a third agree by chance


def test_a_closing_segment_of_an_unknown_flow_is_sent_on_but_not_remembered():
    ip = dsr()
    reason, out, effects = ip.decide(tcp(CLIENT, VIP, 40001, 80, "FA"), 0.0)
    assert reason is Reason.ADOPTED_FLOW and out in MARKS and effects is None
    assert len(ip) == 0


def test_the_clients_fin_ends_the_connection_and_its_last_acks_still_reach_the_node():
    ip = dsr()
    _, node, _ = ip.decide(tcp(CLIENT, VIP, 40002, 80, "S", seq=1), 0.0)
    ip.decide(tcp(CLIENT, VIP, 40002, 80, "A"), 0.01)
    reason, out, effects = ip.decide(tcp(CLIENT, VIP, 40002, 80, "FA"), 0.02)
    assert (reason, out) == (Reason.TO_BACKEND, node) and [type(e) for e in effects] == [ConnectionEnded]
    assert ip.services[0].balancer.outstanding(NODES.index(MARKS[node])) == 0
    assert ip.decide(tcp(CLIENT, VIP, 40002, 80, "A"), 0.03)[:2] == (Reason.TO_BACKEND, node)


def test_a_retransmitted_syn_stays_with_its_node_until_the_heartbeats_exclude_it():
    ip = dsr()
    syn = tcp(CLIENT, VIP, 40003, 80, "S", seq=77)
    _, first, _ = ip.decide(syn, 0.0)
    # The node's SYN-ACK never passes here: a retransmission may be a lost SYN-ACK, or a forged SYN.
    assert ip.decide(syn, 1.0) == (Reason.TO_BACKEND, first, None)
    ip.set_node_available(MARKS[first], False)  # the heartbeat counters excluded it
    reason, out, effects = ip.decide(syn, 3.0)
    assert reason is Reason.NEW_CONNECTION and out in MARKS and out != first
    assert not [e for e in effects if isinstance(e, PassiveFailure)]
    # Every distributor given the same node set computes the same node for the flow.
    other = dsr()
    other.set_node_available(MARKS[first], False)
    assert other.decide(syn, 0.0)[1] == out


def test_forged_mid_stream_segments_cannot_take_the_room_new_connections_need():
    ip = Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(1000), Mode.DSR, flow_secret=b"s")
    for client, port in flows(2000, seed=9):
        assert ip.decide(tcp(client, VIP, port, 80, "A"), 0.0)[0] is Reason.ADOPTED_FLOW
    assert len(ip) == 750  # past three quarters full, adopted segments are forwarded without an entry
    for port in range(41000, 41200):
        assert ip.decide(tcp(CLIENT, VIP, port, 80, "S", seq=1), 1.0)[0] is Reason.NEW_CONNECTION
    opened = sum(ip.services[0].balancer.outstanding(i) for i in range(3))
    assert opened == len(ip) == 950


def test_a_client_answering_a_syn_cookie_is_verified_not_adopted():
    from distributor.synauth import SynAuth
    auth = SynAuth(b"k" * 32, 64)
    auth.always = True
    ip = Interposer([service_spec(Policy.MAGLEV, nodes=NODES)], ConnectionTable(100), Mode.DSR, auth, b"s")
    syn = tcp(CLIENT, VIP, 40020, 80, "S", seq=500)
    reason, _, effects = ip.decide(syn, 0.0)
    assert reason is Reason.SYN_CHALLENGED
    challenge = effects[-1].packet  # a SYN-ACK from the VIP carrying the cookie; a real client answers with an RST
    cookie = int.from_bytes(challenge[28:32], "big")
    assert ip.decide(tcp(CLIENT, VIP, 40020, 80, "R", seq=cookie), 0.1)[0] is Reason.SYN_VERIFIED
    assert ip.decide(syn, 1.0)[0] is Reason.NEW_CONNECTION


def test_a_packet_that_is_not_for_a_service_or_malformed_gets_no_mark():
    ip = dsr()
    assert ip.decide(tcp(CLIENT, VIP, 40005, 443, "S"), 0.0)[:2] == (Reason.NOT_SERVICE, None)
    assert ip.decide(b"\x45\x00", 0.0)[1] is None
    assert ip.decide(tcp(CLIENT, VIP, 40006, 80, "SF"), 0.0)[1] is None


def test_an_unknown_flow_with_every_node_out_is_dropped():
    ip = dsr()
    for name in NODES:
        ip.set_node_available(name, False)
    assert ip.decide(tcp(CLIENT, VIP, 40007, 80, "A"), 0.0)[:2] == (Reason.NO_BACKEND, None)


# -- rules and routes --------------------------------------------------------------------------------------
def test_dsr_rules_queue_the_vips_segments_untracked_and_nothing_else():
    ip = dsr()
    rules = render_rules(0, ip.rule_layout(), Mode.DSR, answer_echo=False)
    chain = rules[("raw", "DIST0-IN")]
    tcp_lines = [line for line in chain if "-p tcp" in line]
    assert tcp_lines == [f"-A DIST0-IN -d {VIP}/32 -p tcp -m tcp --dport 80 -j CT --notrack",
                         f"-A DIST0-IN -d {VIP}/32 -p tcp -m tcp --dport 80 -j NFQUEUE --queue-num 0"]
    assert chain[0].endswith("-j DROP") and "--icmp-type 8" in chain[0]  # echo: counted, never answered
    assert f"-A DIST0-IN -d {VIP}/32 -p icmp -j DIST0-IERR" in chain  # errors to the VIP: to their node
    assert any("limit" in line and "NFQUEUE" in line for line in rules[("raw", "DIST0-IQ")])
    assert set(rules) == {("raw", "DIST0-IN"), ("raw", "DIST0-LOCAL"), ("raw", "DIST0-IERR"), ("raw", "DIST0-IQ")}


def test_each_nodes_mark_selects_a_table_routing_via_the_node_and_unmarked_vip_packets_are_blackholed():
    ip = dsr()
    rules, routes = render_dsr_routes(3, ip.rule_layout())
    pref = dsr_rule_pref(3)
    assert pref < 32766  # before the main table's rule
    for i, backend in enumerate(ip.services[0].backends):
        table = dsr_table(3, MARK_BASE + i)
        assert table > 0xFFFF
        assert f"rule add pref {pref} fwmark {MARK_BASE + i:#x}/0xffff lookup {table}" in rules
        assert f"route replace default via {backend.address} table {table}" in routes
    assert rules[-1] == f"rule add pref {pref + 1} to {VIP}/32 blackhole"
    assert all(DsrRoutes._rule_key(line)[0] in (pref, pref + 1) for line in rules)


# -- configuration ---------------------------------------------------------------------------------------
DSR_CONFIG = """
[distributor]
mode = "dsr"
[nodes.web1]
address = "198.51.100.11"
[[services]]
vip = "203.0.113.1"
policy = "maglev"
backends = ["web1"]
[announce]
bird_config = "/etc/bird/dist1.conf"
"""


def test_a_dsr_config_with_announce_is_valid_and_drops_echo_by_default():
    config = parse(DSR_CONFIG)
    assert config.mode is Mode.DSR and config.vip_echo == "drop"
    assert config.announce.table == 100 and config.announce.bird_config == "/etc/bird/dist1.conf"
    assert config.announce.bird_socket.endswith(".ctl") and config.announce.bird_binary == "bird"


@pytest.mark.parametrize("change, words", [
    (('policy = "maglev"', 'policy = "least-outstanding"'), "expected \"maglev\""),
    (('mode = "dsr"', 'mode = "rewrite"'), "needs distributor.mode = \"dsr\""),
    (('mode = "dsr"', 'mode = "dsr"\nvip_echo = "answer"'), "not valid in dsr mode"),
    (('backends = ["web1"]', 'backends = ["web1"]\npersistence = 60'), "persistence"),
    (("[announce]", "[announce]\ntable = 254"), "253 default, 254 main"),
    (("[announce]", "[announce]\ntable = 0"), "from 1 to"),
    (('bird_config = "/etc/bird/dist1.conf"', "bird_config = 5"), "announce.bird_config"),
    (('mode = "dsr"', 'mode = "dsr"\nqueue = 10000'), "expected 0 to 9999"),
    (("[announce]", "[announce]\ntable = 69632"), "dsr mode's node routes"),
    (('backends = ["web1"]', 'backends = [{ node = "web1", port = 8080 }]'), "expected the VIP's port, 80"),
])
def test_what_dsr_and_announce_refuse_is_said(change, words):
    with pytest.raises(ConfigError, match=None) as caught:
        parse(DSR_CONFIG.replace(*change))
    assert words in str(caught.value)


def test_dsr_refuses_failover():
    text = DSR_CONFIG + """
[health]
keys_file = "/etc/distributor/keys"
[failover]
address = "198.51.100.2"
destination = "198.51.100.255:8406"
peers = { dist2 = "198.51.100.3" }
addresses = [{ address = "203.0.113.1/32", interface = "eth0" }]
"""
    with pytest.raises(ConfigError, match="not valid in dsr mode"):
        parse(text.replace("[announce]\nbird_config = \"/etc/bird/dist1.conf\"\n", ""))


# -- the announce core -------------------------------------------------------------------------------------
def test_the_announce_table_announces_only_what_can_be_served_and_never_after_stop():
    core = AnnounceCore(["203.0.113.1"])
    assert core.start() == [WithdrawRoute("203.0.113.1")]  # a crashed run's route goes first
    assert core.handle(ServingChanged("203.0.113.1", False)) == []
    commands = core.handle(ServingChanged("203.0.113.1", True))
    assert commands[0] == AnnounceRoute("203.0.113.1")
    assert core.handle(ServingChanged("203.0.113.1", True)) == []  # no change, no command
    commands = core.handle(ServingChanged("203.0.113.1", False, "no node"))
    assert commands[0] == WithdrawRoute("203.0.113.1") and "no node" in commands[1].message
    core.handle(ServingChanged("203.0.113.1", True))
    assert core.handle(StopRequested(4.0, 4.0))[0] == WithdrawRoute("203.0.113.1")
    assert core.handle(ServingChanged("203.0.113.1", True)) == []
    assert core.states["203.0.113.1"] is AnnounceState.STOPPED
    assert core.counts[(AnnounceState.WITHDRAWN, AnnounceState.ANNOUNCED)] == 2
    assert all(isinstance(state, AnnounceState) for pair in TRANSITIONS for state in (pair[0], TRANSITIONS[pair]))
    with pytest.raises(ValueError, match="not announced here"):
        core.handle(ServingChanged("203.0.113.9", True))


def active_active_core() -> DistributorCore:
    return DistributorCore("dist1", Mode.DSR, [service_spec(Policy.MAGLEV, nodes=NODES)], 100, announce=True)


def of(commands, kind):
    return [c for c in commands if isinstance(c, kind)]


def test_a_distributor_announces_once_its_rules_are_in_and_withdraws_when_no_node_can_serve():
    core = active_active_core()
    started = core.start(0.0, 0.0)
    install = of(started, InstallRules)[0]
    assert of(started, WithdrawRoute) and not of(started, AnnounceRoute)
    assert started.index(of(started, WithdrawRoute)[0]) < started.index(install)
    assert of(core.handle(CommandDone(install, 0.1, "iptables-restore failed")), AnnounceRoute) == []
    assert of(core.handle(CommandDone(install, 0.2)), AnnounceRoute) == [AnnounceRoute(VIP)]
    assert core.stats(0.2).announced == ((VIP, True),)
    commands = []
    for i, node in enumerate(NODES):
        commands += core.handle(request(AdminOp.MAINT, now=1.0 + i, node=node))
    assert of(commands, WithdrawRoute) == [WithdrawRoute(VIP)]  # after the last node, not before
    assert of(core.handle(request(AdminOp.READY, now=5.0, node="web2")), AnnounceRoute) == [AnnounceRoute(VIP)]


def test_a_later_failed_install_keeps_the_vip_and_a_stop_withdraws_before_the_rules_go():
    core = active_active_core()
    install = of(core.start(0.0, 0.0), InstallRules)[0]
    core.handle(CommandDone(install, 0.1))
    # A node added at run time whose route the kernel refuses: the rules in place still serve.
    assert of(core.handle(CommandDone(install, 0.5, "ip: Nexthop has invalid gateway")), WithdrawRoute) == []
    stop = core.handle(StopRequested(1.0, 1.0))
    assert stop.index(WithdrawRoute(VIP)) < stop.index(of(stop, RemoveRules)[0])


def test_a_dsr_service_keeps_the_maglev_policy_at_run_time():
    core = active_active_core()
    core.start(0.0, 0.0)
    replies = [c for c in core.handle(request(AdminOp.SET_POLICY, service="web", policy="round-robin"))
               if type(c).__name__ == "AdminReply"]
    assert replies[0].status == 400 and "maglev" in replies[0].body["error"]


def test_an_active_active_core_has_no_failover():
    from tests.unit.test_admin_core import KEYS, Pair
    with pytest.raises(ValueError, match="no failover"):
        DistributorCore("dist1", Mode.DSR, [service_spec(Policy.MAGLEV)], 100, announce=True,
                        failover=Pair.failover_options("dist1"), failover_keys=KEYS)


def test_with_health_checking_nothing_is_announced_before_a_node_is_heard_and_dead_nodes_withdraw():
    from common.sansio import Tick
    from common.wire import Keys, Kind, NodeHeartbeat, seal
    from distributor.core import HealthOptions
    from distributor.heartbeat import HealthSettings, NodeDatagram
    from tests.packets import WEB

    keys, wall = Keys({1: b"k" * 32}), 1_800_000_000.0
    settings = HealthSettings(tick=0.25, warning=3, dead=8, rise=2, slow_start=0.0)
    core = DistributorCore("dist1", Mode.DSR, [service_spec(Policy.MAGLEV, nodes=NODES)], 100, announce=True,
                           health=HealthOptions(settings, {n: WEB[n] for n in NODES}), health_keys=keys)
    install = of(core.start(0.0, wall), InstallRules)[0]
    assert of(core.handle(CommandDone(install, 0.1)), AnnounceRoute) == []  # rules in, but no node heard yet
    report = NodeHeartbeat(0.1, 0.1, 2.0, 250).pack()
    data = seal(keys, Kind.NODE_HEARTBEAT, "web2", 1, wall + 0.2, report)
    assert of(core.handle(NodeDatagram(data, WEB["web2"], 0.2, wall + 0.2)), AnnounceRoute) == [AnnounceRoute(VIP)]
    withdrawn = []
    for step in range(1, 40):  # web2 falls silent, web1 and web3 were never heard: nothing can serve
        now = 0.2 + step * settings.tick
        withdrawn += of(core.handle(Tick(now, wall + now)), WithdrawRoute)
    assert withdrawn == [WithdrawRoute(VIP)]


def test_an_icmp_error_about_a_response_goes_unchanged_to_the_node_that_sent_it():
    from tests.unit.test_icmp import icmp_error
    ip, other = dsr(), dsr()
    _, node, _ = ip.decide(tcp(CLIENT, VIP, 40010, 80, "S", seq=1), 0.0)
    response = tcp(VIP, CLIENT, 80, 40010, "A", payload=b"x" * 100)  # the node sent it from the VIP
    error = icmp_error("192.0.2.254", VIP, response[:28])
    assert ip.decide(error, 0.1) == (Reason.ICMP_TO_NODE, node, None)
    # A distributor that never saw the connection sends it to the flow hash's node: the same one.
    assert other.decide(error, 0.1) == (Reason.ICMP_TO_NODE, node, None)
    # About no VIP connection, or quoting too little: dropped and counted.
    stranger = icmp_error("192.0.2.254", VIP, tcp("198.51.100.99", CLIENT, 80, 40010, "A")[:28])
    assert ip.decide(stranger, 0.1)[:2] == (Reason.ICMP_UNKNOWN, None)
    assert ip.decide(icmp_error("192.0.2.254", VIP, response[:24]), 0.1)[:2] == (Reason.TRUNCATED, None)
    assert ip.decide(icmp_error("192.0.2.254", VIP, b""), 0.1)[1] is None


def test_the_routes_adapter_owns_only_its_tables_and_blackholes_at_its_priorities():
    pref = dsr_rule_pref(0)
    listing = [
        {"priority": pref, "src": "all", "fwmark": "0x1000", "fwmask": "0xffff", "table": str(dsr_table(0, 0x1000))},
        {"priority": pref, "src": "all", "fwmark": "0x1", "fwmask": "0xffff", "table": "100"},  # an operator's
        {"priority": pref + 1, "src": "all", "dst": VIP, "action": "blackhole"},
        {"priority": 32766, "src": "all", "table": "main"},
    ]
    calls = []

    class Fake(DsrRoutes):
        def _run(self, argv, stdin=None):
            calls.append((argv, stdin))
            return subprocess.CompletedProcess(argv, 0, json.dumps(listing) if "show" in argv else "", "")

    assert Fake(0).remove()
    script = calls[-1][1]
    assert f"rule del pref {pref} fwmark 0x1000/0xffff lookup {dsr_table(0, 0x1000)}" in script
    assert f"rule del pref {pref + 1} to {VIP}/32 blackhole" in script
    assert "lookup 100" not in script and "table 100" not in script
    calls.clear()
    Fake(0).install(dsr().rule_layout())  # the existing mark rule stays; the others are added
    script = calls[-1][1]
    assert f"fwmark 0x1000/0xffff" not in script.replace("route", "")  # not added again
    assert f"rule add pref {pref} fwmark 0x1001/0xffff lookup {dsr_table(0, 0x1001)}" in script


def test_distributorctl_runs_a_change_on_every_distributor_named(capsys):
    from distributor import ctl
    urls = ["http://127.0.0.1:9", "http://127.0.0.1:11"]  # nothing listens: each is tried, in turn
    assert ctl.main(["--url", urls[0], "--url", urls[1], "--token", "t", "maint", "web1"]) == 3
    out, err = capsys.readouterr()
    assert out.splitlines() == [f"== {urls[0]} ==", f"== {urls[1]} =="]
    assert all(f"cannot reach the distributor at {url}" in err for url in urls)
    # A bad address among them is said before any distributor is changed.
    assert ctl.main(["--url", urls[0], "--url", "nota url", "--token", "t", "maint", "web1"]) == 2
    assert "cannot reach" not in capsys.readouterr().err
