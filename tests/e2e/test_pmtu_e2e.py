"""Path MTU discovery through the VIP: a router with a smaller MTU between a client and the distributors.

The testbed's client becomes that router: a far client (namespace ``<project>-far``, 192.0.2.10)
sits behind it on a link of MTU 1,400 and advertises an MSS of 1,460 (``advmss``), so a node's
full-size response segments reach the router too big for its next hop, and the router sends
"fragmentation needed" (RFC 1191) to their source: the VIP.  The download completes only if that
error reaches the node that sent the segments (rewrite mode translates it itself; kernel mode
leaves it to conntrack).  A control run, in which the router drops those errors (an iptables rule
of this test's own), shows the hang it prevents.  The other direction: with the distributor's own
link to the nodes at the smaller MTU, a client's upload completes only if the distributor's
"fragmentation needed" reaches the client about the VIP.  Everything the test adds (the namespace, the
routes on the distributors) goes with the module, also when a test fails.

The testbed is dual stack, and the same runs through the VIP6 (test ids ``ipv6``): the far client
(2001:db8:192::10) sits behind the router on a second link of MTU 1,280 (IPv6's minimum) and advertises
an MSS of 1,440; the router sends "packet too big" (RFC 8201) to the VIP6.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import fcntl
import hashlib
import os
import socket
import struct
import subprocess
import termios
import time

import pytest

from scapy.layers.inet import ICMP, IP, TCP

from testbed import content, hostile, http, netns
from testbed.runner import wait_until
from tests.e2e.conftest import FAMILIES, MODES, counter


@dataclasses.dataclass(frozen=True)
class FarSide:
    """The far client's side of the router, in one address family."""
    ip: str  # ip's family option
    net: str
    router: str
    client: str
    prefix: int
    mtu: int
    advmss: int  # more than the far link can carry: the bottleneck is the router's
    link: str  # the router's end of the veth to the far namespace (the far end: link + "p")
    forwarding: str  # the router's sysctl
    drop_too_big: list[str]  # the router's rule dropping its own "too big" errors ("{}": A to add, D to delete)


FAR = {
    socket.AF_INET: FarSide(  # TEST-NET-1 (RFC 5737)
        ip="-4", net="192.0.2.0/24", router="192.0.2.1", client="192.0.2.10", prefix=24, mtu=1400, advmss=1460,
        link="far", forwarding="net.ipv4.ip_forward=1",
        drop_too_big=["iptables", "-w", "-{}", "OUTPUT", "-p", "icmp", "-m", "icmp", "--icmp-type",
                      "fragmentation-needed", "-j", "DROP"]),
    socket.AF_INET6: FarSide(  # IPv6's minimum MTU; an MSS of 1,500 - 60
        ip="-6", net="2001:db8:192::/64", router="2001:db8:192::1", client="2001:db8:192::10", prefix=64, mtu=1280,
        advmss=1440, link="far6", forwarding="net.ipv6.conf.all.forwarding=1",
        drop_too_big=["ip6tables", "-w", "-{}", "OUTPUT", "-p", "ipv6-icmp", "-m", "icmp6", "--icmpv6-type",
                      "packet-too-big", "-j", "DROP"]),
}
FAR_CLIENT = FAR[socket.AF_INET].client


def _ip(*argv: str) -> None:
    subprocess.run(["ip", *argv], check=True, capture_output=True, text=True, timeout=10)


@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    bed = make_testbed(f"tpmtu{request.param[0]}", nodes=2, policy="round-robin", mode=request.param, ipv6=True)
    far, router = f"{bed.project}-far", bed.ns("client")
    client = bed.topology.host("client")
    try:
        _ip("netns", "add", far)
        _ip("-n", far, "link", "set", "lo", "up")
        for family, side in FAR.items():
            nodad = ["nodad"] if family == socket.AF_INET6 else []
            _ip("-n", router, "link", "add", side.link, "type", "veth", "peer", "name", f"{side.link}p", "netns", far)
            _ip("-n", router, "address", "add", f"{side.router}/{side.prefix}", "dev", side.link, *nodad)
            _ip("-n", router, "link", "set", side.link, "mtu", str(side.mtu), "up")
            bed.run("client", ["sysctl", "-q", "-w", side.forwarding])
            _ip("-n", far, "address", "add", f"{side.client}/{side.prefix}", "dev", f"{side.link}p", *nodad)
            _ip("-n", far, "link", "set", f"{side.link}p", "mtu", str(side.mtu), "up")
            _ip("-n", far, side.ip, "route", "add", "default", "via", side.router, "advmss", str(side.advmss))
            via = client.address6_on("ext") if family == socket.AF_INET6 else client.address_on("ext")
            for dist in ("dist1", "dist2"):
                _ip("-n", bed.ns(dist), side.ip, "route", "add", side.net, "via", str(via))
        yield bed
    finally:
        subprocess.run(["ip", "netns", "del", far], capture_output=True, timeout=10)
        for side in FAR.values():
            for dist in ("dist1", "dist2"):
                subprocess.run(["ip", "-n", bed.ns(dist), side.ip, "route", "del", side.net], capture_output=True,
                               timeout=10)


def node_path_mtu(bed, node: str, family: int = socket.AF_INET) -> str:
    """What the node's route to the far client says (``mtu 1400``, ``mtu 1280``, once path MTU discovery
    worked)."""
    return bed.run(node, ["ip", FAR[family].ip, "route", "get", FAR[family].client]).stdout


def flush_route_caches(bed, family: int = socket.AF_INET) -> None:
    for node in ("web1", "web2"):
        bed.run(node, ["ip", FAR[family].ip, "route", "flush", "cache"])
        assert f"mtu {FAR[family].mtu}" not in node_path_mtu(bed, node, family), node_path_mtu(bed, node, family)


def download(bed, path: str, timeout: float, family: int = socket.AF_INET) -> http.Reply:
    return http.get(f"{bed.project}-far", bed.vip_of(family), 80, path, timeout=timeout)


@pytest.mark.parametrize("family", FAMILIES)
def test_without_the_routers_icmp_a_large_response_hangs(bed, family):
    mtu, drop = FAR[family].mtu, FAR[family].drop_too_big
    flush_route_caches(bed, family)
    bed.run("client", [part.format("A") for part in drop])
    try:
        with pytest.raises(OSError):
            download(bed, "/1m.bin", timeout=4, family=family)
        for node in ("web1", "web2"):
            assert f"mtu {mtu}" not in node_path_mtu(bed, node, family), node_path_mtu(bed, node, family)
        # Small answers fit whatever the MTU: the black hole hits only large responses.
        assert download(bed, "/index.html", timeout=4, family=family).status == 200
    finally:
        bed.run("client", [part.format("D") for part in drop])


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["/1m.bin", "/4m.bin"])
def test_a_large_download_through_a_smaller_mtu_completes_and_the_node_learns_the_path_mtu(bed, path, family):
    flush_route_caches(bed, family)
    before = counter(bed, "icmp_to_node")
    reply = download(bed, path, timeout=20, family=family)
    assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == content.sha256(path)
    route = node_path_mtu(bed, reply.node, family)
    assert f"mtu {FAR[family].mtu}" in route, route
    if bed.options.mode == "rewrite":
        # The error went through the interposer (kernel mode: conntrack translates it).
        wait_until(lambda: counter(bed, "icmp_to_node") > before, 5, "the translated ICMP error counted")


def echo(destination: str, family: int = socket.AF_INET, timeout: float = 2.0) -> str | None:
    """Send one ICMP (ICMPv6) echo request (a raw socket: root) and return the source of its reply, or None."""
    identifier = os.getpid() & 0xFFFF
    v6 = family == socket.AF_INET6
    message = bytes([128 if v6 else 8, 0, 0, 0]) + identifier.to_bytes(2, "big") + (1).to_bytes(2, "big") + \
        b"distributor"
    if not v6:  # the kernel computes an ICMPv6 raw socket's checksum, not an ICMP one's
        total = sum(int.from_bytes(message[i:i + 2], "big") for i in range(0, len(message) - 1, 2)) + (
            message[-1] << 8 if len(message) % 2 else 0)
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        message = message[:2] + (~total & 0xFFFF).to_bytes(2, "big") + message[4:]
    with socket.socket(family, socket.SOCK_RAW, socket.IPPROTO_ICMPV6 if v6 else socket.IPPROTO_ICMP) as sock:
        sock.settimeout(timeout)
        sock.sendto(message, (destination, 0))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data, address = sock.recvfrom(2048)
            except TimeoutError:
                return None
            icmp = data if v6 else data[(data[0] & 0x0F) * 4:]  # an IPv4 raw socket reads the IP header too
            if icmp[0] == (129 if v6 else 0) and icmp[4:6] == identifier.to_bytes(2, "big"):
                return address[0]
    return None


@pytest.mark.parametrize("family", FAMILIES)
def test_echo_to_the_vip_is_answered_by_the_distributor_from_the_vip(bed, family):
    assert netns.call_in(bed.ns("client"), echo, bed.vip_of(family), family) == bed.vip_of(family)


def test_a_flood_of_forged_icmp_errors_is_dropped_and_downloads_go_on(bed):
    # 20,000 "fragmentation needed, MTU 576" about connections that do not exist (an attacker
    # guessing ports to shrink the nodes' path MTU), sent to the VIP during a 4 MiB download.
    router = str(bed.topology.host("client").address_on("ext"))
    pool = [bytes(IP(src=router, dst=str(bed.vip)) / ICMP(type=3, code=4, nexthopmtu=576)
                  / IP(src=str(bed.vip), dst=FAR_CLIENT) / TCP(sport=80, dport=port, flags="A"))
            for port in range(20000, 21000)]
    before = counter(bed, "icmp_unknown")

    def flood() -> hostile.PaceReport:
        sock, send = hostile.raw_ip_sender()
        with sock:
            return hostile.pace(send, pool, rate=5000, seconds=4)

    flush_route_caches(bed)
    with concurrent.futures.ThreadPoolExecutor(1) as pool_runner:
        flooding = pool_runner.submit(netns.call_in, bed.ns("client"), flood)
        reply = download(bed, "/4m.bin", timeout=20)
        report = flooding.result(timeout=30)
    assert report.sent >= 19000, report
    assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == content.sha256("/4m.bin")
    for node in ("web1", "web2"):
        assert "mtu 576" not in node_path_mtu(bed, node), node_path_mtu(bed, node)
    if bed.options.mode == "rewrite":
        # Each one dropped and counted: by user space, or past the rules' rate limit by the kernel.
        wait_until(lambda: counter(bed, "icmp_unknown") - before >= report.sent, 10,
                   f"{report.sent} forged errors counted as icmp_unknown")


def upload(destination: str, size: int, timeout: float) -> tuple[int, bytes]:
    """POST ``size`` bytes to the VIP on one connection (nginx reads and discards the body of a
    POST to a static file, then answers 405): (bytes the node has not acknowledged when the
    deadline passed or all were, the start of the answer).  A black-holed path MTU leaves the
    full-size segments unacknowledged."""
    with socket.create_connection((destination, 80), timeout=timeout) as sock:
        sock.sendall(f"POST /index.html HTTP/1.1\r\nHost: vip\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
                     .encode() + b"u" * size)
        deadline = time.monotonic() + timeout
        while True:  # SIOCOUTQ: bytes in the send queue, sent or not, that the peer has not acknowledged
            unacknowledged = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
            if unacknowledged == 0 or time.monotonic() >= deadline:
                break
            time.sleep(0.05)
        return unacknowledged, sock.recv(64) if unacknowledged == 0 else b""


@pytest.mark.parametrize("family", FAMILIES)
def test_an_upload_through_a_smaller_mtu_on_the_cluster_lan_completes_and_the_client_learns_it_about_the_vip(
        bed, family):
    # The distributor's own link to the nodes gets the smaller MTU: its stack sends "fragmentation
    # needed" ("packet too big") about the client's segment, which it forwards to a node.  The client must
    # hear it about the VIP, from the VIP (it never heard of the node), or its upload stalls.
    mtu, ip, vip = FAR[family].mtu, FAR[family].ip, bed.vip_of(family)
    dist, link = bed.ns("dist1"), bed.topology.host("dist1").links[1].ifname
    assert bed.topology.host("dist1").links[1].bridge == "int" and bed.active_distributor() == "dist1"
    bed.run("client", ["ip", ip, "route", "flush", "cache"])
    before = counter(bed, "icmp_to_client")
    _ip("-n", dist, "link", "set", link, "mtu", str(mtu))
    try:
        unacknowledged, answer = netns.call_in(bed.ns("client"), upload, vip, 900_000, 10)
        assert unacknowledged == 0 and answer.startswith(b"HTTP/1.1 405"), (unacknowledged, answer)
        route = bed.run("client", ["ip", ip, "route", "get", vip]).stdout
        assert f"mtu {mtu}" in route, route
        if bed.options.mode == "rewrite":
            wait_until(lambda: counter(bed, "icmp_to_client") > before, 5, "the translated ICMP error counted")
    finally:
        _ip("-n", dist, "link", "set", link, "mtu", "1500")
