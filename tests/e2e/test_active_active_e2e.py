"""Active-active end to end: three distributors behind a router's ECMP route, announced by BIRD (root).

The testbed (``cluster-testbed up --active-active 3``): a router running BIRD learns the VIP from
each distributor over BGP (BFD 100 ms x 3) and spreads flows over them by layer-4 hash; every
distributor runs the dsr data path with the maglev policy, and the nodes answer the clients
themselves (the VIP on their loopback), through the router.  What an operator would check:

* every distributor carries flows, and every node serves;
* killing one distributor under wrk load, keep-alive and one connection per request, fails no
  request: the survivors' flows go on, and the dead one's flows continue through the others to the
  same node (the flow hash), delayed by the router's withdrawal and a TCP retransmission;
* the router's route loses the dead distributor's path, and gets it back when it returns;
* a distributor that can serve no node withdraws the VIP itself, and the monitor host's Prometheus
  sees it (the DistributorVipWithdrawn ticket alert) and raises no primary-backup alert;
* a "fragmentation needed" the router sends the VIP about a response reaches the node that sent it
  (through whichever distributor the router picks), so a large download through a smaller MTU
  completes, and the node's route shows the lowered path MTU; without that ICMP it hangs.
"""

from __future__ import annotations

import hashlib

import pytest

from testbed import content, http, monitoring, wrk
from testbed.loadgen import forwarded, kill_under_load
from testbed.runner import wait_until

DISTRIBUTORS = ("dist1", "dist2", "dist3")
VICTIM = "dist2"


@pytest.fixture(scope="module")
def bed(make_testbed):
    return make_testbed("aae", nodes=3, active_active=3, mode="dsr", policy="maglev", monitor=True)


def metric(bed, host: str, name: str, **labels) -> float:
    return sum(value for (metric_name, found), value in bed.metrics(host).items()
               if metric_name == name and all(dict(found).get(k) == v for k, v in labels.items()))


def router_has_every_path(bed) -> None:
    bed.wait_paths(len(DISTRIBUTORS), 30)


def test_every_distributor_carries_flows_and_every_node_serves(bed):
    router_has_every_path(bed)
    before = {host: forwarded(bed, host) for host in DISTRIBUTORS}
    result = wrk.run(bed, f"http://{bed.vip}/1k.bin", count_nodes=True, duration=3, connections=24, close=True)
    assert result.errors == 0 and result.requests > 300, result.output
    assert set(result.nodes) == {"web1", "web2", "web3"}, result.nodes
    for host in DISTRIBUTORS:
        assert forwarded(bed, host) - before[host] > 100, f"{host} carried no flows: the router's ECMP skips it"
        assert metric(bed, host, "distributor_vip_announced", vip=bed.vip) == 1


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "new-connections"])
def test_killing_a_distributor_under_load_fails_no_request(bed, close):
    survivors = [h for h in DISTRIBUTORS if h != VICTIM]
    adopted = {host: metric(bed, host, "distributor_packets_total", reason="adopted_flow") for host in survivors}
    try:
        result, withdrawn, recorded = kill_under_load(bed, VICTIM, close)
        assert result.requests > 2000, result.output
        assert result.errors == 0, f"{result.output}\n" + "\n".join(
            f"--- {h} ---\n{bed.log_tail(h, 'distributor', 20)}" for h in survivors)
        # The router noticed within BFD's detection time (or at once: the killed BIRD's session closed).
        assert withdrawn < 1.5, withdrawn
        # A request caught on the dead path waited for the withdrawal and a retransmission, not for a timeout:
        # a data segment's (RTO 200 ms and up), or a new connection's SYN (1 s, RFC 6298).
        assert result.latency_ms["max"] < 2500, result.output
        assert recorded and all(r.ok for r in recorded), [r for r in recorded if not r.ok]
        assert max(r.seconds for r in recorded) < 2.5, max(r.seconds for r in recorded)
        if not close:
            # The dead one's keep-alive connections went on through the survivors: adopted, not reset.
            assert sum(metric(bed, h, "distributor_packets_total", reason="adopted_flow") - adopted[h]
                       for h in survivors) > 0
    finally:
        bed.start(VICTIM)
    router_has_every_path(bed)  # it comes back, announced again


def test_a_distributor_whose_nodes_are_all_out_withdraws_and_the_others_serve(bed):
    router_has_every_path(bed)
    host = "dist3"
    try:
        for node in ("web1", "web2", "web3"):
            bed.ctl(["maint", node], host=host, check=True)
        wait_until(lambda: len(bed.router_paths()) == len(DISTRIBUTORS) - 1, 10, f"{host} to withdraw the VIP")
        assert metric(bed, host, "distributor_vip_announced", vip=bed.vip) == 0
        result = wrk.run(bed, f"http://{bed.vip}/1k.bin", duration=2, connections=16, close=True)
        assert result.errors == 0 and result.requests > 200, result.output
        # The monitor sees it: the withdrawn distributor's ticket alert is on its way (pending, then firing
        # after 30 s), and no primary-backup alert mistakes three active distributors for a fault.
        prometheus = monitoring.PrometheusApi(bed.ns("monitor"))

        def withdrawn_alert() -> list:
            return [a for a in prometheus.alerts() if a["labels"]["alertname"] == "DistributorVipWithdrawn"
                    and a["labels"].get("distributor") == host]

        wait_until(withdrawn_alert, 30, f"Prometheus to see {host}'s withdrawal", interval=0.5)
        names = {a["labels"]["alertname"] for a in prometheus.alerts()}
        assert not names & {"DistributorNoActive", "DistributorTwoActive", "DistributorBackupGone",
                            "DistributorVipNotAnnounced"}, names
    finally:
        for node in ("web1", "web2", "web3"):
            bed.ctl(["ready", node], host=host)
    router_has_every_path(bed)


MTU = 1400
CLIENT = "203.0.113.10"
DROP_FRAG_NEEDED = ["iptables", "-{}", "OUTPUT", "-p", "icmp", "--icmp-type", "fragmentation-needed", "-j", "DROP"]


@pytest.fixture
def small_mtu(bed):
    """The router's link to the client carries 1,400 bytes; the nodes' cached path MTUs are flushed."""
    def flush() -> None:
        for node in ("web1", "web2", "web3"):
            bed.run(node, ["ip", "route", "flush", "cache"])
            assert f"mtu {MTU}" not in node_path_mtu(bed, node)

    bed.run("router", ["ip", "link", "set", "ext0", "mtu", str(MTU)])
    try:
        flush()
        yield flush
    finally:
        bed.run("router", ["ip", "link", "set", "ext0", "mtu", "1500"])
        for node in ("web1", "web2", "web3"):
            bed.run(node, ["ip", "route", "flush", "cache"])


def node_path_mtu(bed, node: str) -> str:
    return bed.run(node, ["ip", "route", "get", CLIENT]).stdout


def test_without_the_routers_icmp_a_large_response_hangs(bed, small_mtu):
    bed.run("router", [part.format("A") for part in DROP_FRAG_NEEDED])
    try:
        with pytest.raises(OSError):
            http.get(bed.ns("client"), bed.vip, 80, "/1m.bin", timeout=4)
        assert all(f"mtu {MTU}" not in node_path_mtu(bed, n) for n in ("web1", "web2", "web3"))
    finally:
        bed.run("router", [part.format("D") for part in DROP_FRAG_NEEDED])


@pytest.mark.parametrize("path", ["/1m.bin", "/4m.bin"])
def test_a_large_download_through_a_smaller_mtu_completes_and_the_node_learns_the_path_mtu(bed, small_mtu, path):
    icmp = {host: metric(bed, host, "distributor_packets_total", reason="icmp_to_node") for host in DISTRIBUTORS}
    reply = http.get(bed.ns("client"), bed.vip, 80, path, timeout=20)
    assert reply.status == 200 and hashlib.sha256(reply.body).hexdigest() == content.sha256(path)
    assert f"mtu {MTU}" in node_path_mtu(bed, reply.node), node_path_mtu(bed, reply.node)
    assert sum(metric(bed, h, "distributor_packets_total", reason="icmp_to_node") - icmp[h] for h in DISTRIBUTORS) >= 1
