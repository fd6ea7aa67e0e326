"""HTTP through the VIP, end to end, with real clients in the namespace testbed.

The testbed is dual stack: the rerouting tests run through the VIP (service "http") and through the VIP6
2001:db8:203::1 (service "http6", the same nodes), test ids ``ipv4`` and ``ipv6``, and one test serves both
at the same time.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import socket
import subprocess
import sys

import pytest

from testbed import content, http, netns, wrk
from testbed.runner import wait_until
from tests.e2e.conftest import FAMILIES, MODES, counter, open_samples, service_of


@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    return make_testbed(f"treroute{request.param[0]}", nodes=3, policy="round-robin", mode=request.param, ipv6=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_curl_through_the_vip_is_served_by_a_named_node(bed, family):
    out = bed.run("client", ["curl", "-g", "-sS", "-D", "-", "-o", "/dev/null", "-m", "10",
                             bed.url("/index.html", family)], check=False)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200"), out.stdout
    assert any(line.lower().startswith("x-node: web") for line in out.stdout.splitlines()), out.stdout


def test_ipv4_and_ipv6_are_served_at_the_same_time_by_every_node(bed, tmp_path):
    """Dual stack: wrk on the VIP6 and wrk on the VIP at once, a new connection per request, both spread over
    every node without an error."""
    with_script = tmp_path / "count_nodes.lua"
    with_script.write_text(wrk.COUNT_NODES_LUA)
    runs = {family: bed.popen("client", wrk.command(bed.url("/1k.bin", family), duration=4, connections=8,
                                                    close=True, script=str(with_script)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for family in (socket.AF_INET, socket.AF_INET6)}
    results = {family: wrk.parse(run.communicate(timeout=60)[0]) for family, run in runs.items()}
    for family, result in results.items():
        assert result.requests > 300, result.output
        assert result.errors == 0, result.output
        assert set(result.nodes) == {"web1", "web2", "web3"}, result.output


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_wrk_sees_no_socket_errors(bed, close, family):
    result = wrk.run(bed, bed.url("/1k.bin", family), duration=3, connections=20, close=close)
    assert result.requests > 1000, result.output
    assert sum(result.socket_errors.values()) == 0, result.output
    assert result.non_2xx == 0, result.output


@pytest.mark.parametrize("family", FAMILIES)
def test_round_robin_spreads_requests_evenly(bed, family):
    result = wrk.run(bed, bed.url("/1k.bin", family), duration=3, connections=12, close=True, count_nodes=True)
    assert set(result.nodes) == {"web1", "web2", "web3"}, result.output
    mean = sum(result.nodes.values()) / 3
    for node, served in result.nodes.items():
        assert abs(served - mean) <= 0.02 * mean + 12, f"{node} served {served}, mean {mean:.0f}: {result.nodes}"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["/1m.bin", "/4m.bin"])
def test_large_download_arrives_intact(bed, path, family):
    reply = http.get(bed.ns("client"), bed.vip_of(family), 80, path, timeout=20)
    assert reply.status == 200
    assert hashlib.sha256(reply.body).hexdigest() == content.sha256(path)


@pytest.mark.parametrize("family", FAMILIES)
def test_concurrent_clients_all_get_correct_bodies(bed, family):
    def client(n: int) -> list[str]:
        nodes = []
        for _ in range(15):
            reply = http.get(bed.ns("client"), bed.vip_of(family), 80, "/64k.bin", timeout=10)
            assert reply.status == 200 and reply.body == content.body("/64k.bin")
            nodes.append(reply.node)
        return nodes

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        served = [node for nodes in pool.map(client, range(12)) for node in nodes]
    assert len(served) == 180
    assert set(served) == {"web1", "web2", "web3"}


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_mid_stream_segment_is_dropped_not_reset(bed, family):
    """A segment of a connection the distributor never saw must not reach any node or draw an RST.

    Its source port lies outside the client's ephemeral range (1024-65000), so no real connection has it.
    """
    before = counter(bed, "unknown_flow")
    layer = "IPv6" if family == socket.AF_INET6 else "IP"
    script = (
        f"from scapy.all import {layer}, TCP, sr1; "
        f"answer = sr1({layer}(dst={bed.vip_of(family)!r})/TCP(sport=65123, dport=80, flags='PA', seq=1, ack=1)"
        "/b'GET /\\r\\n', timeout=1.5, verbose=0); "
        "print('none' if answer is None else answer.summary())"
    )
    assert bed.run("client", [sys.executable, "-c", script]).stdout.strip() == "none"
    wait_until(lambda: counter(bed, "unknown_flow") > before, 5, "the unknown segment to be counted")


def test_crashed_distributor_rules_are_cleaned_on_restart_and_a_stopped_one_leaves_none(bed):
    # One jump per hooked built-in chain, in the iptables and in the ip6tables (the dual-stack testbed's
    # "http6"): rewrite mode hooks raw PREROUTING, mangle POSTROUTING and raw OUTPUT; kernel mode mangle
    # PREROUTING, nat PREROUTING and raw OUTPUT.  Rewrite mode's return path is the nft tables ip dist0 and
    # ip6 dist0.
    hooks = 3
    rewrite = bed.options.mode == "rewrite"
    saves = {socket.AF_INET: "iptables-save", socket.AF_INET6: "ip6tables-save"}

    def our_rules(host: str, family: int = socket.AF_INET) -> list[str]:
        dump = bed.run(host, [saves[family]]).stdout
        return [line for line in dump.splitlines() if "DIST0" in line or "NFQUEUE" in line]

    def jumps(host: str, family: int = socket.AF_INET) -> int:
        return sum(1 for line in our_rules(host, family) if line.startswith("-A ") and " -j DIST0-" in line
                   and not line.startswith("-A DIST0-"))

    def our_nft6(host: str) -> list[str]:
        """What nft shows of ours in the ip6 family: the DIST0-* chains (ip6tables-nft) and table ip6 dist0."""
        dump = bed.run(host, ["nft", "list", "ruleset", "ip6"]).stdout
        return [line.strip() for line in dump.splitlines() if "dist0" in line.lower()]

    def return_path6(host: str) -> bool:
        return "table ip6 dist0 {" in bed.run(host, ["nft", "list", "ruleset", "ip6"]).stdout

    def in_place(host: str) -> bool:
        """Exactly one set of rules in both families (and rewrite mode's IPv6 return path)."""
        return (jumps(host) == hooks and jumps(host, socket.AF_INET6) == hooks
                and (return_path6(host) or not rewrite))

    def none_left(host: str) -> bool:
        return our_rules(host) == [] and our_rules(host, socket.AF_INET6) == [] and our_nft6(host) == []

    assert in_place("dist1") and none_left("dist2"), (our_rules("dist1", socket.AF_INET6), our_nft6("dist2"))
    bed.run("dist1", ["kill", "-KILL", str(bed.service_pid("dist1", "distributor"))])  # a crash leaves its rules
    wait_until(lambda: bed.service_pid("dist1", "distributor") is None, 10, "the distributor to die")
    assert in_place("dist1"), (our_rules("dist1", socket.AF_INET6), our_nft6("dist1"))
    wait_until(lambda: in_place("dist2"), 5, "dist2 to take over with exactly one set of rules in both families")
    bed.start("dist1")  # back as a backup: it removes what the crash left, in both families
    assert our_rules("dist1") == []
    assert our_rules("dist1", socket.AF_INET6) == [] and our_nft6("dist1") == [], \
        (our_rules("dist1", socket.AF_INET6), our_nft6("dist1"))
    assert http.get(bed.ns("client"), bed.vip, 80, "/health").status == 200
    assert http.get(bed.ns("client"), bed.vip6, 80, "/health").status == 200

    bed.stop("dist2")  # SIGTERM: dist2 resigns, removes its rules and exits; dist1 takes over
    assert our_rules("dist2") == []
    assert our_rules("dist2", socket.AF_INET6) == [] and our_nft6("dist2") == [], \
        (our_rules("dist2", socket.AF_INET6), our_nft6("dist2"))
    assert bed.run("dist2", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.strip() == ""
    wait_until(lambda: in_place("dist1"), 5, "dist1 to take over, its IPv4 and IPv6 rules back")
    bed.start("dist2")
    bed.wait_vip(10)


@pytest.fixture(scope="module", params=MODES)
def lo_bed(make_testbed, request):
    return make_testbed(f"tleast{request.param[0]}", nodes=3, policy="least-outstanding", mode=request.param)


@pytest.mark.parametrize("family", FAMILIES)
def test_least_outstanding_steers_new_connections_away_from_a_busy_node(lo_bed, family):
    vip, service = lo_bed.vip_of(family), service_of(family)
    wait_until(lambda: all(v == 0 for v in open_samples(lo_bed, service=service).values()), 10,
               "no connection open (the readiness probes', another case's)")
    held = [http.hold(lo_bed.ns("client"), vip) for _ in range(30)]
    try:
        on_web1 = [conn for conn, node in held if node == "web1"]
        assert len(on_web1) == 10, [node for _, node in held]  # least-outstanding spread them 10/10/10
        for conn, node in held:
            if node != "web1":
                conn.close()
        wait_until(lambda: open_samples(lo_bed, service=service) == {"web1": 10, "web2": 0, "web3": 0}, 10,
                   "web2 and web3 to have no open connection")
        served = [http.get(lo_bed.ns("client"), vip, 80, "/health").node for _ in range(20)]
        assert "web1" not in served, served
        assert served.count("web2") == served.count("web3") == 10
    finally:
        for conn, _ in held:
            conn.close()


@pytest.fixture(scope="module", params=MODES)
def small_bed(make_testbed, request):
    return make_testbed(f"tfull{request.param[0]}", nodes=2, policy="round-robin", capacity=4, mode=request.param)


@pytest.mark.parametrize("family", FAMILIES)
def test_full_table_refuses_new_connections_and_keeps_serving_existing_ones(small_bed, family):
    vip = small_bed.vip_of(family)
    wait_until(lambda: all(v == 0 for service in ("http", "http6")
                           for v in open_samples(small_bed, service=service).values()),
               10, "the readiness probes (and another case's connections) to finish")
    held = [http.hold(small_bed.ns("client"), vip)[0] for _ in range(4)]
    try:
        refused_before = counter(small_bed, "table_full")
        with pytest.raises(OSError):
            netns.connect_in(small_bed.ns("client"), (vip, 80), timeout=2)
        assert counter(small_bed, "table_full") > refused_before
        for conn in held:  # existing connections are still served
            conn.request("GET", "/1k.bin")
            response = conn.getresponse()
            assert response.status == 200 and response.read() == content.body("/1k.bin")
        held.pop().close()  # one ends: its finished entry makes room
        reply = wait_until(lambda: http.get(small_bed.ns("client"), vip, 80, "/health", timeout=2), 10,
                           "a new connection to be accepted")
        assert reply.status == 200
        assert "connection table full" in small_bed.log_tail("dist1", "distributor", 200)
    finally:
        for conn in held:
            conn.close()
