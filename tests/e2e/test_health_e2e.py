"""Node health end to end: real agents, nginx, heartbeats, alerts by mail, in the namespace testbed.

A stopped web server, a killed node host and a slow node are excluded from the VIP's service ("http", the
testbed ``bed``, with mail) and from the VIP6's ("http6", ``bed6``, a dual-stack testbed in both modes): the
same scenario functions, through either VIP.  A dead node's connections are reset through either VIP
(``reset_bed``, dual stack too; test ids ``ipv4``, ``ipv6``).  The heartbeats are IPv4 control traffic: the
forged-heartbeat test has no IPv6 case.
"""

from __future__ import annotations

import mailbox
import socket
import subprocess
import sys
import time

import pytest

from common.keyfile import load_keys
from common.wire import Keys, Kind, NodeHeartbeat, seal
from testbed import http, netns, wrk
from testbed.loadgen import Recorder
from testbed.runner import wait_until
from tests.e2e.conftest import FAMILIES, MODES, service_of

SMTP = ("198.51.100.3", 2525)  # on the cluster LAN, in dist2's namespace


@pytest.fixture(scope="module")
def bed(make_testbed):
    # The same nodes die and return several times within a minute here: no flap damping, which would
    # rightly hold them out (the hostile suite tests damping).
    return make_testbed("thealth", nodes=3, policy="round-robin", smtp=f"{SMTP[0]}:{SMTP[1]}", flap_suppress=0)


@pytest.fixture(scope="module", params=MODES)
def bed6(make_testbed, request):
    """Dual stack, for the IPv6 service in both modes (no flap damping either)."""
    bed = make_testbed(f"thealth6{request.param[0]}", nodes=3, policy="round-robin", mode=request.param,
                       ipv6=True, flap_suppress=0)
    yield bed
    bed.down()  # before the next mode's testbed comes up: the machine is small


@pytest.fixture(scope="module")
def maildir(bed, tmp_path_factory):
    path = tmp_path_factory.mktemp("mail") / "Maildir"
    server = bed.popen("dist2", [sys.executable, "-m", "aiosmtpd", "-n", "-l", f"{SMTP[0]}:{SMTP[1]}",
                                 "-c", "aiosmtpd.handlers.Mailbox", str(path)],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    def listening() -> bool:
        netns.connect_in(bed.ns("dist1"), SMTP, timeout=1).close()
        return True

    wait_until(listening, 10, "the SMTP server")
    yield mailbox.Maildir(path, create=False)
    server.terminate()
    server.wait(timeout=10)


def alerts(bed, node: str, since: float = 0.0) -> list[dict]:
    return [r for r in bed.alerts() if r["node"] == node and r["time"] >= since]


def node_state(bed, node: str) -> str:
    for (name, labels), value in bed.metrics("dist1").items():
        labels = dict(labels)
        if name == "distributor_node_state" and labels["node"] == node and value == 1:
            return labels["state"]
    raise AssertionError(f"no state for {node}")


def acquired(bed, node: str, service: str = "http") -> float:
    """Connections ``service`` placed on ``node`` ("http": the VIP's; a dual-stack testbed has "http6" too)."""
    return next(v for (name, labels), v in bed.metrics("dist1").items()
                if name == "distributor_backend_connections_total" and dict(labels)["node"] == node
                and dict(labels)["service"] == service)


def serves_again(bed, node: str, family: int = socket.AF_INET) -> bool:
    return any(http.get(bed.ns("client"), bed.vip_of(family), 80, "/health").node == node for _ in range(30))


def stop_web1_and_check_exclusion(bed, family: int) -> None:
    """Stop web1's nginx under load through the VIP of ``family``: excluded at its first RST, declared dead,
    and no request lost after the exclusion."""
    wait_until(lambda: all(node_state(bed, n) == "up" for n in ("web1", "web2", "web3")), 30, "every node up")
    assert bed.active_distributor() == "dist1"
    load = bed.popen("client", wrk.command(bed.url("/1k.bin", family), duration=8, connections=8, close=True),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    recorder = Recorder(bed, vip=bed.vip_of(family))
    try:
        # Traffic flows on every node first.
        wait_until(lambda: {r.node for r in recorder.results if r.ok} >= {"web1", "web2", "web3"}, 10,
                   "requests served by every node")
        stopped_at = time.time()
        # As `systemctl stop nginx` stops it (SIGQUIT: graceful); from then on web1 resets every SYN.
        bed.run("web1", ["kill", "-QUIT", str(bed.service_pid("web1", "nginx"))])
        warning = bed.wait_alert("web1", "warning", stopped_at, 5)
        given_to_web1 = acquired(bed, "web1", service_of(family))
        dead = bed.wait_alert("web1", "dead", stopped_at, 10)
        # An observation window measured in requests, not seconds: 200 more after the node died.
        dead_count = len(recorder.after(dead["time"]))
        wait_until(lambda: len(recorder.after(dead["time"])) >= dead_count + 200, 15, "200 requests after web1 died")
        assert acquired(bed, "web1", service_of(family)) == given_to_web1, \
            "a new connection reached web1 after the warning"
    finally:
        recorder.stop()
        output = load.communicate(timeout=30)[0]
    # Passive health: web1's first RST to a SYN excluded it, and that connection went to another
    # node (rewrite mode at once; kernel mode drops the RST and the client retransmits once).
    assert warning["time"] - stopped_at < 0.5
    late = recorder.after(stopped_at)
    assert late and max(r.seconds for r in late) < 2.0, max(r.seconds for r in late)
    # The one loss no layer-4 balancer can prevent: a connection web1's kernel accepted while nginx
    # was closing its listener is reset with the request on it (the node had it, not us).  Such
    # losses are few, fast (an RST, not a timeout) and only before the exclusion.
    lost = [r for r in late if not r.ok]
    assert len(lost) <= 3 and all(r.seconds < 0.5 and r.started < warning["time"] for r in lost), lost
    after = recorder.after(warning["time"])
    assert after and all(r.ok for r in after), [r for r in after if not r.ok][:5]
    assert {r.node for r in after} == {"web2", "web3"}
    assert wrk.parse(output).requests > 0
    assert dead["time"] - stopped_at < 5


def restart_web1_and_check_it_rejoins(bed, family: int) -> None:
    restarted_at = time.time()
    bed.start("web1")
    bed.wait_alert("web1", "slow_start", restarted_at, 10)  # back in service (rising is logged, not alerted)
    wait_until(lambda: serves_again(bed, "web1", family), 20, "web1 to receive traffic again")


def kill_web3_and_check_exclusion_and_return(bed, family: int) -> None:
    """Kill web3's host (its links go down) with requests through the VIP of ``family``: none lost after it
    was declared dead, and it serves again once restarted."""
    wait_until(lambda: node_state(bed, "web3") == "up", 20, "web3 to be up")
    recorder = Recorder(bed, vip=bed.vip_of(family))
    try:
        wait_until(lambda: any(r.ok and r.node == "web3" for r in recorder.results), 10, "web3 to serve")
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
    wait_until(lambda: serves_again(bed, "web3", family), 20, "the restarted web3 to serve requests again")


def test_stopped_web_server_is_excluded_declared_dead_mailed_and_rejoins(bed, maildir):
    stop_web1_and_check_exclusion(bed, socket.AF_INET)

    def mailed() -> bool:
        return any("web1" in m["Subject"] and "dead" in m["Subject"] or "web1: warning -> dead" in m.get_payload()
                   for m in maildir)

    wait_until(mailed, 15, "the alert mail about web1")
    restart_web1_and_check_it_rejoins(bed, socket.AF_INET)


def test_stopped_web_server_is_excluded_from_the_ipv6_service_and_rejoins(bed6):
    stop_web1_and_check_exclusion(bed6, socket.AF_INET6)
    restart_web1_and_check_it_rejoins(bed6, socket.AF_INET6)


def slow_web2_and_check_exclusion_and_return(bed, family: int) -> None:
    """Slow web2's answers past the agent's limits: declared dead, no request through the VIP of ``family``
    reaches it, and it is back in service once it answers in time again."""
    wait_until(lambda: node_state(bed, "web2") == "up", 20, "web2 to be up")
    slowed_at = time.time()
    bed.set_web_delay("web2", 3.5)  # over the testbed agent's max_response_time (2.5 s) and probe_timeout (3 s)
    try:
        bed.wait_alert("web2", "warning", slowed_at, 10)
        bed.wait_alert("web2", "dead", slowed_at, 10)
        served = {http.get(bed.ns("client"), bed.vip_of(family), 80, "/1k.bin").node for _ in range(20)}
        assert "web2" not in served
    finally:
        recovered_at = time.time()
        bed.set_web_delay("web2", 0)
    bed.wait_alert("web2", "slow_start", recovered_at, 15)
    assert node_state(bed, "web2") in ("slow_start", "up")


def test_slow_node_is_excluded_and_included_again_when_it_recovers(bed):
    slow_web2_and_check_exclusion_and_return(bed, socket.AF_INET)


def test_slow_node_is_excluded_from_the_ipv6_service_and_included_again(bed6):
    slow_web2_and_check_exclusion_and_return(bed6, socket.AF_INET6)


def test_killed_node_host_is_excluded_like_a_dead_web_server(bed):
    kill_web3_and_check_exclusion_and_return(bed, socket.AF_INET)


def test_killed_node_host_is_excluded_from_the_ipv6_service(bed6):
    kill_web3_and_check_exclusion_and_return(bed6, socket.AF_INET6)


def test_forged_replayed_and_stale_heartbeats_are_rejected_and_keep_no_node_alive(bed):
    wait_until(lambda: node_state(bed, "web1") in ("up", "slow_start"), 30, "web1 to be a candidate")
    bed.run("web1", ["kill", "-TERM", str(bed.service_pid("web1", "agent"))])
    silenced_at = time.time()
    bed.wait_alert("web1", "dead", silenced_at, 10)

    real = load_keys(bed.keys_file)
    forged_keys = Keys({1: b"an attacker's guess at the key!!"})
    report = NodeHeartbeat(0.1, 0.1, 1.0, 200).pack()
    sock = netns.socket_in(bed.ns("web1"), socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    destination = ("198.51.100.255", 8405)
    before = {r: counter_rejected(bed, r) for r in ("bad_mac", "stale", "replay")}
    captured = seal(real, Kind.NODE_HEARTBEAT, "web1", time.time_ns() // 1000, time.time(), report)
    sock.sendto(captured, destination)  # one genuine datagram: a single heartbeat must not revive the node
    try:
        deadline = time.monotonic() + 4
        sequence = time.time_ns() // 1000 + 10
        while time.monotonic() < deadline:
            sequence += 1
            sock.sendto(seal(forged_keys, Kind.NODE_HEARTBEAT, "web1", sequence, time.time(), report), destination)
            sock.sendto(seal(real, Kind.NODE_HEARTBEAT, "web1", sequence, time.time() - 120, report), destination)
            sock.sendto(captured, destination)  # replayed
            assert node_state(bed, "web1") in ("dead", "rising")
            time.sleep(0.1)
    finally:
        sock.close()
    for reason in ("bad_mac", "stale", "replay"):
        assert counter_rejected(bed, reason) >= before[reason] + 20, reason
    states = [r["to"] for r in alerts(bed, "web1", silenced_at)]
    assert "slow_start" not in states and "up" not in states, states
    wait_until(lambda: node_state(bed, "web1") == "dead", 5, "web1 to stay dead")
    bed.start("web1")
    bed.wait_alert("web1", "slow_start", silenced_at, 15)


def counter_rejected(bed, reason: str) -> float:
    return next(v for (name, labels), v in bed.metrics("dist1").items()
                if name == "distributor_heartbeats_rejected_total" and dict(labels)["reason"] == reason)


@pytest.fixture(scope="module", params=MODES)
def reset_bed(make_testbed, request):
    return make_testbed(f"treset{request.param[0]}", nodes=2, policy="round-robin", on_dead="reset", mode=request.param)


@pytest.mark.parametrize("family", FAMILIES)
def test_dead_nodes_connections_are_reset_so_clients_fail_fast(reset_bed, family):
    """Through the VIP and the VIP6 (``reset_bed`` is dual stack: the default Options.ipv6)."""
    bed = reset_bed

    def connect_small_window() -> socket.socket:
        sock = socket.socket(family)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)  # the node cannot push the file ahead of us
        sock.settimeout(20)
        sock.connect((bed.vip_of(family), 80))
        return sock

    sock = netns.call_in(bed.ns("client"), connect_small_window)
    try:
        sock.sendall(b"GET /4m.bin HTTP/1.1\r\nHost: vip\r\n\r\n")
        head = sock.recv(4096).decode(errors="replace")
        node = next(line.split(":", 1)[1].strip() for line in head.split("\r\n") if line.lower().startswith("x-node:"))
        killed_at = time.time()
        bed.kill(node)  # links down: without a reset the client would wait for its own timeouts (minutes)
        bed.wait_alert(node, "dead", killed_at, 10)
        with pytest.raises(ConnectionResetError):
            while True:
                if not sock.recv(4096):
                    raise AssertionError("the download ended normally: the node was not cut off")
        assert time.time() - killed_at < 8
    finally:
        sock.close()
    bed.start(node)
