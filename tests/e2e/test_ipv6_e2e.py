"""IPv6 through the VIP6, end to end, in both data-path modes: rerouting, node health, failover, path MTU.

The namespace testbed is dual stack (testbed.topology): with ``ipv6=True`` the distributors serve the
service "http" on the VIP 203.0.113.1 and "http6" on the VIP6 2001:db8:203::1, over the same nodes.
These tests mirror the IPv4 ones (test_reroute_e2e, test_health_e2e, test_failover_e2e,
test_pmtu_e2e) with an IPv6 client; the IPv4 half is checked beside it where dual stack matters.
Everything a test adds (the far namespace and its routes, ip6tables rules) goes with it, also when it
fails.  Waits poll with deadlines.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import signal
import socket
import subprocess
import time

import pytest

from testbed import content, http, netns, wrk
from testbed.loadgen import Recorder, forwarded
from testbed.runner import new_takeover, wait_until
from tests.e2e.conftest import MODES, counter

V6 = socket.AF_INET6
DISTS = ("dist1", "dist2")
DEAD_WINDOW = 0.35  # the failover default: (dead + 1) x interval


@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    # No flap damping: the same nodes die and return within a minute here (as in test_health_e2e).
    bed = make_testbed(f"tsix{request.param[0]}", nodes=3, policy="round-robin", mode=request.param, ipv6=True,
                       flap_suppress=0)
    yield bed
    bed.down()  # before the next mode's testbed comes up: the machine is small


def curl6(bed, path: str, *extra: str) -> subprocess.CompletedProcess:
    return bed.run("client", ["curl", "-g", "-sS", "-m", "10", *extra, bed.url(path, V6)], check=False)


# -- rerouting ----------------------------------------------------------------------------------------------

def test_curl_through_the_vip6_is_served_by_a_named_node(bed):
    out = curl6(bed, "/index.html", "-D", "-", "-o", "/dev/null")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("HTTP/1.1 200"), out.stdout
    assert any(line.lower().startswith("x-node: web") for line in out.stdout.splitlines()), out.stdout


def test_ipv6_and_ipv4_are_served_at_the_same_time_by_every_node(bed, tmp_path):
    """Dual stack: wrk on the VIP6 and wrk on the VIP at once, a new connection per request, both spread over
    every node without an error."""
    with_script = tmp_path / "count_nodes.lua"
    with_script.write_text(wrk.COUNT_NODES_LUA)
    runs = {family: bed.popen("client", wrk.command(bed.url("/1k.bin", family), duration=4, connections=8,
                                                    close=True, script=str(with_script)),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for family in (socket.AF_INET, V6)}
    results = {family: wrk.parse(run.communicate(timeout=60)[0]) for family, run in runs.items()}
    for family, result in results.items():
        assert result.requests > 300, result.output
        assert result.errors == 0, result.output
        assert set(result.nodes) == {"web1", "web2", "web3"}, result.output


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_wrk_through_the_vip6_sees_no_socket_errors(bed, close):
    result = wrk.run(bed, bed.url("/1k.bin", V6), duration=3, connections=20, close=close)
    assert result.requests > 1000, result.output
    assert sum(result.socket_errors.values()) == 0, result.output
    assert result.non_2xx == 0, result.output


def test_round_robin_spreads_ipv6_requests_evenly(bed):
    result = wrk.run(bed, bed.url("/1k.bin", V6), duration=3, connections=12, close=True, count_nodes=True)
    assert set(result.nodes) == {"web1", "web2", "web3"}, result.output
    mean = sum(result.nodes.values()) / 3
    for node, served in result.nodes.items():
        assert abs(served - mean) <= 0.02 * mean + 12, f"{node} served {served}, mean {mean:.0f}: {result.nodes}"


@pytest.mark.parametrize("path", ["/1m.bin", "/4m.bin"])
def test_large_download_through_the_vip6_arrives_intact(bed, path):
    reply = http.get(bed.ns("client"), bed.vip6, 80, path, timeout=20)
    assert reply.status == 200
    assert hashlib.sha256(reply.body).hexdigest() == content.sha256(path)


def test_concurrent_ipv6_clients_all_get_correct_bodies(bed):
    def client(n: int) -> list[str]:
        nodes = []
        for _ in range(15):
            reply = http.get(bed.ns("client"), bed.vip6, 80, "/64k.bin", timeout=10)
            assert reply.status == 200 and reply.body == content.body("/64k.bin")
            nodes.append(reply.node)
        return nodes

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        served = [node for nodes in pool.map(client, range(12)) for node in nodes]
    assert len(served) == 180
    assert set(served) == {"web1", "web2", "web3"}


# -- node health ----------------------------------------------------------------------------------------------

def node_state(bed, node: str) -> str:
    for (name, labels), value in bed.metrics("dist1").items():
        labels = dict(labels)
        if name == "distributor_node_state" and labels["node"] == node and value == 1:
            return labels["state"]
    raise AssertionError(f"no state for {node}")


def acquired6(bed, node: str) -> float:
    """Connections the IPv6 service placed on ``node``."""
    return sum(v for (name, labels), v in bed.metrics("dist1").items()
               if name == "distributor_backend_connections_total" and dict(labels)["node"] == node
               and dict(labels)["service"] == "http6")


def serves_again6(bed, node: str) -> bool:
    return any(http.get(bed.ns("client"), bed.vip6, 80, "/health").node == node for _ in range(30))


def test_stopped_web_server_is_excluded_from_ipv6_service_and_rejoins(bed):
    wait_until(lambda: all(node_state(bed, n) == "up" for n in ("web1", "web2", "web3")), 30, "every node up")
    assert bed.active_distributor() == "dist1"
    load = bed.popen("client", wrk.command(bed.url("/1k.bin", V6), duration=8, connections=8, close=True),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    recorder = Recorder(bed, vip=bed.vip6)
    try:
        # Traffic flows on every node first.
        wait_until(lambda: {r.node for r in recorder.results if r.ok} >= {"web1", "web2", "web3"}, 10,
                   "IPv6 requests served by every node")
        stopped_at = time.time()
        # As `systemctl stop nginx` stops it (SIGQUIT: graceful); from then on web1 resets every SYN.
        bed.run("web1", ["kill", "-QUIT", str(bed.service_pid("web1", "nginx"))])
        warning = bed.wait_alert("web1", "warning", stopped_at, 5)
        given_to_web1 = acquired6(bed, "web1")
        dead = bed.wait_alert("web1", "dead", stopped_at, 10)
        # An observation window measured in requests, not seconds: 200 more after the node died.
        dead_count = len(recorder.after(dead["time"]))
        wait_until(lambda: len(recorder.after(dead["time"])) >= dead_count + 200, 15, "200 requests after web1 died")
        assert acquired6(bed, "web1") == given_to_web1, "a new IPv6 connection reached web1 after the warning"
    finally:
        recorder.stop()
        output = load.communicate(timeout=30)[0]
    assert warning["time"] - stopped_at < 0.5
    late = recorder.after(stopped_at)
    assert late and max(r.seconds for r in late) < 2.0, max(r.seconds for r in late)
    # As for IPv4: a connection web1's kernel accepted while nginx was closing its listener is lost
    # (the node had it); few, fast and only before the exclusion.
    lost = [r for r in late if not r.ok]
    assert len(lost) <= 3 and all(r.seconds < 0.5 and r.started < warning["time"] for r in lost), lost
    after = recorder.after(warning["time"])
    assert after and all(r.ok for r in after), [r for r in after if not r.ok][:5]
    assert {r.node for r in after} == {"web2", "web3"}
    assert wrk.parse(output).requests > 0
    assert dead["time"] - stopped_at < 5

    restarted_at = time.time()
    bed.start("web1")
    bed.wait_alert("web1", "slow_start", restarted_at, 10)
    wait_until(lambda: serves_again6(bed, "web1"), 20, "web1 to receive IPv6 traffic again")


def test_killed_node_host_is_excluded_from_ipv6_service(bed):
    wait_until(lambda: node_state(bed, "web3") == "up", 20, "web3 to be up")
    recorder = Recorder(bed, vip=bed.vip6)
    try:
        wait_until(lambda: any(r.ok and r.node == "web3" for r in recorder.results), 10, "web3 to serve IPv6")
        killed_at = time.time()
        bed.kill("web3")
        dead_at = time.time()  # its links are down: a request that reached it before is lost with it
        warning = bed.wait_alert("web3", "warning", killed_at, 5)
        dead = bed.wait_alert("web3", "dead", killed_at, 10)
        wait_until(lambda: len(recorder.after(dead["time"])) >= 100, 15, "100 requests after web3 died")
    finally:
        recorder.stop()
    # Its SYNs went unanswered until it was excluded; each client's retransmission went elsewhere.
    late = recorder.after(dead_at)
    assert late and all(r.ok for r in late), [r for r in late if not r.ok][:5]
    assert "web3" not in {r.node for r in recorder.after(warning["time"])}
    assert max(r.seconds for r in late) < 2.5, max(r.seconds for r in late)
    bed.start("web3")
    bed.wait_alert("web3", "slow_start", killed_at, 20)
    wait_until(lambda: serves_again6(bed, "web3"), 20, "the restarted web3 to serve IPv6 again")


# -- failover ---------------------------------------------------------------------------------------------------

def owners6(bed) -> list[str]:
    """The distributors holding the VIP6 on their outside link."""
    return [h for h in DISTS if f"{bed.vip6}/" in bed.run(h, ["ip", "-6", "-o", "addr", "show", "dev", "ext0"]).stdout]


def signal_distributor(bed, host: str, signum: int) -> None:
    os.kill(bed.service_pid(host, "distributor"), signum)


def restart(bed, host: str) -> None:
    wait_until(lambda: bed.service_pid(host, "distributor") is None, 10, f"the distributor on {host} to end")
    bed.start(host)


def active(bed) -> str:
    found = wait_until(lambda: [h for h in DISTS if bed.role(h) == "active"], 10, "an active distributor")
    assert len(found) == 1, found
    return found[0]


def neighbour_mac(bed, address: str) -> str:
    """The client's neighbour entry for ``address`` (its link-layer address, or what ip printed)."""
    words = bed.run("client", ["ip", "-6", "neigh", "show", address]).stdout.split()
    return words[words.index("lladdr") + 1] if "lladdr" in words else " ".join(words)


def open6(bed, host: str) -> float:
    """The IPv6 service's open connections on the distributor on ``host``."""
    return sum(v for (name, labels), v in bed.metrics(host).items()
               if name == "distributor_backend_connections_open" and dict(labels)["service"] == "http6")


def mac(bed, host: str) -> str:
    return bed.run(host, ["cat", "/sys/class/net/ext0/address"]).stdout.strip()


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_sigkill_of_the_active_loses_no_ipv6_request_and_the_backup_takes_the_vip6(bed, close):
    primary, backup = bed.wait_settled()
    assert owners6(bed) == [primary]
    before = bed.takeover_durations(backup)
    load = bed.popen("client", wrk.command(bed.url("/1k.bin", V6), duration=6, connections=16, close=close,
                                           timeout=5), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Under way through the primary: many new connections forwarded, or (kernel mode's keep-alive, whose
        # data segments the kernel forwards uncounted) all of wrk's connections open on the nodes.
        start = forwarded(bed, primary)
        wait_until(lambda: forwarded(bed, primary) - start > 500 or open6(bed, primary) >= 16, 10,
                   f"wrk's IPv6 flows through {primary}")
        assert neighbour_mac(bed, bed.vip6) == mac(bed, primary)
        signal_distributor(bed, primary, signal.SIGKILL)
    finally:
        output = load.communicate(timeout=60)[0]
    result = wrk.parse(output)
    assert active(bed) == backup
    assert result.requests > 1000, result.output
    assert sum(result.socket_errors.values()) == 0 and result.non_2xx == 0, result.output
    # The backup's unsolicited neighbour advertisement moved the client's entry for the VIP6.
    assert neighbour_mac(bed, bed.vip6) == mac(bed, backup)
    phases = wait_until(lambda: (lambda p: p if "first_forward" in p else None)(
        new_takeover(before, bed.takeover_durations(backup))), 10, f"{backup}'s takeover in its histogram")
    first = phases["decided"] + phases["first_forward"]
    assert first < DEAD_WINDOW + 1.5, first
    restart(bed, primary)
    assert bed.wait_settled() == (backup, primary)
    # The restarted one, a backup, gave up what its killed predecessor left (the VIP6 on its ext0).
    assert owners6(bed) == [backup]
    assert http.get(bed.ns("client"), bed.vip6, 80, "/health").status == 200


def test_ipv6_download_in_progress_across_a_takeover_arrives_intact(bed, tmp_path):
    primary, backup = bed.wait_settled()
    target = tmp_path / "1m.bin"
    download = bed.popen("client", ["curl", "-g", "-sS", "--limit-rate", "300K", "-o", str(target),
                                    bed.url("/1m.bin", V6)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_until(lambda: target.exists() and target.stat().st_size > 256 * 1024, 10, "a quarter of the file")
        signal_distributor(bed, primary, signal.SIGKILL)
        errors = download.communicate(timeout=60)[1]
    finally:
        if download.poll() is None:
            download.kill()
            download.wait()
    assert download.returncode == 0, errors
    assert hashlib.sha256(target.read_bytes()).hexdigest() == content.sha256("/1m.bin")
    assert active(bed) == backup
    restart(bed, primary)
    bed.wait_settled()


# -- path MTU ---------------------------------------------------------------------------------------------------
# The client becomes a router with a link of MTU 1,280 (IPv6's minimum) to a far client behind it: a node's
# full-size segments reach it too big, and it sends "packet too big" to their source, the VIP6.

FAR_NET6 = "2001:db8:192::/64"
ROUTER_FAR6 = "2001:db8:192::1"
FAR_CLIENT6 = "2001:db8:192::10"
MTU6 = 1280
DROP_TOO_BIG = ["ip6tables", "-w", "-{}", "OUTPUT", "-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type",
                "packet-too-big", "-j", "DROP"]


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module", params=MODES)
def pmtu_bed(make_testbed, request):
    bed = make_testbed(f"tsixp{request.param[0]}", nodes=2, policy="round-robin", mode=request.param, ipv6=True)
    far, router = f"{bed.project}-far", bed.ns("client")
    client6 = str(bed.topology.host("client").address6_on("ext"))
    try:
        _ip("netns", "add", far)
        _ip("-n", far, "link", "set", "lo", "up")
        _ip("-n", router, "link", "add", "far", "type", "veth", "peer", "name", "far0", "netns", far)
        _ip("-n", router, "address", "add", f"{ROUTER_FAR6}/64", "dev", "far", "nodad")
        _ip("-n", router, "link", "set", "far", "mtu", str(MTU6), "up")
        bed.run("client", ["sysctl", "-q", "-w", "net.ipv6.conf.all.forwarding=1"])
        _ip("-n", far, "address", "add", f"{FAR_CLIENT6}/64", "dev", "far0", "nodad")
        _ip("-n", far, "link", "set", "far0", "mtu", str(MTU6), "up")
        # The far client offers an MSS its own link cannot carry (1,500 - 60): the bottleneck is the router's.
        _ip("-n", far, "-6", "route", "add", "default", "via", ROUTER_FAR6, "advmss", "1440")
        for dist in DISTS:
            _ip("-n", bed.ns(dist), "-6", "route", "add", FAR_NET6, "via", client6)
        yield bed
    finally:
        subprocess.run(["ip", "netns", "del", far], capture_output=True, timeout=10)
        for dist in DISTS:
            subprocess.run(["ip", "-n", bed.ns(dist), "-6", "route", "del", FAR_NET6], capture_output=True, timeout=10)
        bed.down()


def node_path_mtu6(bed, node: str) -> str:
    """The node's route to the far client (``mtu 1280`` once path MTU discovery worked)."""
    return bed.run(node, ["ip", "-6", "route", "get", FAR_CLIENT6]).stdout


def flush_route_caches6(bed) -> None:
    for node in ("web1", "web2"):
        bed.run(node, ["ip", "-6", "route", "flush", "cache"])
        assert f"mtu {MTU6}" not in node_path_mtu6(bed, node), node_path_mtu6(bed, node)


def download6(bed, path: str, timeout: float) -> http.Reply:
    return http.get(f"{bed.project}-far", bed.vip6, 80, path, timeout=timeout)


def test_without_the_routers_packet_too_big_a_large_ipv6_response_hangs(pmtu_bed):
    bed = pmtu_bed
    flush_route_caches6(bed)
    bed.run("client", [part.format("A") for part in DROP_TOO_BIG])
    try:
        with pytest.raises(OSError):
            download6(bed, "/1m.bin", timeout=4)
        for node in ("web1", "web2"):
            assert f"mtu {MTU6}" not in node_path_mtu6(bed, node), node_path_mtu6(bed, node)
        # Small answers fit whatever the MTU: the black hole hits only large responses.
        assert download6(bed, "/index.html", timeout=4).status == 200
    finally:
        bed.run("client", [part.format("D") for part in DROP_TOO_BIG])


@pytest.mark.parametrize("path", ["/1m.bin", "/4m.bin"])
def test_a_large_ipv6_download_through_a_smaller_mtu_completes_and_the_node_learns_the_path_mtu(pmtu_bed, path):
    bed = pmtu_bed
    flush_route_caches6(bed)
    reply = download6(bed, path, timeout=20)
    assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == content.sha256(path)
    assert f"mtu {MTU6}" in node_path_mtu6(bed, reply.node), node_path_mtu6(bed, reply.node)
    if bed.options.mode == "rewrite":
        # The error went through the interposer (kernel mode: conntrack translates it).
        wait_until(lambda: counter(bed, "icmp_to_node") >= 1, 5, "the translated ICMPv6 error counted")


def echo6(destination: str, timeout: float = 2.0) -> str | None:
    """Send one ICMPv6 echo request (the kernel computes an ICMPv6 raw socket's checksum) and return the
    source of its reply, or None."""
    identifier = os.getpid() & 0xFFFF
    with socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6) as sock:
        sock.settimeout(timeout)
        sock.sendto(bytes([128, 0, 0, 0]) + identifier.to_bytes(2, "big") + b"\0\1distributor", (destination, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, address = sock.recvfrom(2048)
            except TimeoutError:
                return None
            if data[0] == 129 and data[4:6] == identifier.to_bytes(2, "big"):
                return address[0]
    return None


def test_echo_to_the_vip6_is_answered_from_the_vip6(pmtu_bed):
    assert netns.call_in(pmtu_bed.ns("client"), echo6, pmtu_bed.vip6) == pmtu_bed.vip6


def test_an_ipv6_upload_through_a_smaller_mtu_on_the_cluster_lan_completes_and_the_client_learns_it_about_the_vip6(
        pmtu_bed):
    # The distributor's own link to the nodes gets the smaller MTU: its stack sends "packet too big" about
    # the client's segment, which it forwards to a node.  The client must hear it about the VIP6, from the
    # VIP6 (it never heard of the node), or its upload stalls.
    from tests.e2e.test_pmtu_e2e import upload

    bed = pmtu_bed
    dist, link = bed.ns("dist1"), bed.topology.host("dist1").links[1].ifname
    assert bed.topology.host("dist1").links[1].bridge == "int" and bed.active_distributor() == "dist1"
    bed.run("client", ["ip", "-6", "route", "flush", "cache"])
    _ip("-n", dist, "link", "set", link, "mtu", str(MTU6))
    try:
        unacknowledged, answer = netns.call_in(bed.ns("client"), upload, bed.vip6, 900_000, 10)
        assert unacknowledged == 0 and answer.startswith(b"HTTP/1.1 405"), (unacknowledged, answer)
        route = bed.run("client", ["ip", "-6", "route", "get", bed.vip6]).stdout
        assert f"mtu {MTU6}" in route, route
        if bed.options.mode == "rewrite":
            wait_until(lambda: counter(bed, "icmp_to_client") >= 1, 5, "the translated ICMPv6 error counted")
    finally:
        _ip("-n", dist, "link", "set", link, "mtu", "1500")
