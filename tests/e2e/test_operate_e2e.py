"""Operating the cluster at run time, end to end (issue 11's "Done when"), in both data-path modes.

One testbed per mode (projects ``woprr``, ``woprk``) with four web nodes of which the distributors'
configs name three: web4 runs nginx and its agent from the start and enters service only when a
reloaded config names it.  The tests run in file order on the same bed and leave it as they found
it (every node ready), except that the takeover test leaves dist2 active and the reload test adds
web4.  Drains, explains and refusals go through ``distributorctl`` (``Testbed.ctl``) and the API;
traffic is wrk and single connections from the client namespace.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from testbed import http as testbed_http, netns, wrk
from testbed.runner import API_PORT, wait_until
from tests.e2e.conftest import MODES

CONFIGURED = ("web1", "web2", "web3")
CLIENT = "203.0.113.10"


@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    return make_testbed(f"wopr{request.param[0]}", nodes=4, configured_nodes=3, mode=request.param)


# -- helpers ---------------------------------------------------------------------------------------
def ctl_json(bed, *args, host: str | None = None, role: str = "admin"):
    result = bed.ctl(["--json", *args], host=host, role=role, check=True)
    return json.loads(result.stdout)


def read(bed, path: str, host: str | None = None):
    """A read of the API in this process (polling through distributorctl would start Python each time)."""
    status, body = api_request(bed, host or bed.active_distributor(), "GET", path, token=bed.api_token("viewer"))
    assert status == 200, (path, status, body)
    return body


def node(bed, name: str, host: str | None = None) -> dict:
    return read(bed, f"/api/v1/nodes/{name}", host)


def nodes(bed, host: str | None = None) -> dict[str, dict]:
    return {n["name"]: n for n in read(bed, "/api/v1/nodes", host)}


def total(view: dict) -> int:
    return sum(s["connections_total"] for s in view["services"])


def ctl_argv(bed, host: str, *args: str, token: str | None) -> list[str]:
    argv = [sys.executable, "-m", "distributor.ctl", "--url", bed.api_url(host)]
    return argv + ([f"--token={token}"] if token is not None else []) + list(args)  # a token may begin with "-"


def request_from(bed, port: int = 0, keep: bool = False, path: str = "/health"):
    """One GET through the VIP from the client, from local port ``port``; its X-Node (and the open connection)."""

    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((CLIENT, port))
        sock.connect((bed.vip, bed.topology.vip_port))
        return sock

    conn = http.client.HTTPConnection(bed.vip, bed.topology.vip_port, timeout=5)
    conn.sock = netns.call_in(bed.ns("client"), connect)
    conn.request("GET", path, headers={} if keep else {"Connection": "close"})
    reply = conn.getresponse()
    reply.read()
    assert reply.status == 200, reply.status
    if keep:
        return conn, reply.getheader("X-Node")
    conn.close()
    return reply.getheader("X-Node")


def api_request(bed, host: str, method: str, path: str, token: str | None = None, body=None,
                headers: dict | None = None) -> tuple[int, dict]:
    """A raw request to the API of the distributor on ``host`` (from its own namespace)."""
    address = str(bed.topology.host(host).address_on("int"))
    conn = http.client.HTTPConnection(address, API_PORT, timeout=10)
    conn.sock = netns.connect_in(bed.ns(host), (address, API_PORT))
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    data = None
    if body is not None:
        data = json.dumps(body)
        sent["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=sent)
        reply = conn.getresponse()
        text = reply.read()
        try:
            return reply.status, json.loads(text)
        except ValueError:
            return reply.status, {"text": text.decode(errors="replace")}
    finally:
        conn.close()


def start_wrk(bed, duration: float, connections: int, close: bool) -> subprocess.Popen:
    return bed.popen("client", wrk.command(f"http://{bed.vip}/1k.bin", duration=duration, connections=connections,
                                           close=close, timeout=5),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish_wrk(load: subprocess.Popen, duration: float) -> wrk.WrkResult:
    return wrk.parse(load.communicate(timeout=duration + 30)[0])


def assert_clean(result: wrk.WrkResult, least: int = 100) -> None:
    assert result.requests >= least and result.errors == 0, result.output


def log_offset(bed, host: str) -> int:
    return bed.log_path(host, "distributor").stat().st_size


def log_since(bed, host: str, offset: int) -> str:
    with open(bed.log_path(host, "distributor"), "rb") as f:
        f.seek(offset)
        return f.read().decode(errors="replace")


def hangup(bed, host: str) -> None:
    os.kill(bed.service_pid(host, "distributor"), signal.SIGHUP)


def make_ready(bed, name: str) -> None:
    """Leave the bed as the next test expects it: the node ready and serving on every distributor."""
    bed.ctl(["ready", name], check=True)
    for host in ("dist1", "dist2"):
        if bed.service_pid(host, "distributor") is not None:
            wait_until(lambda: node(bed, name, host)["admin"] == "ready", 10, f"{name} ready on {host}")


# -- the tests ---------------------------------------------------------------------------------------
KEEP_SECONDS = 12.0
FRESH_SECONDS = 8.0


def test_a_drain_from_distributorctl_takes_no_new_connection_and_ends_with_its_last_one(bed):
    """About 14 s: keep-alive wrk for 12 s holds connections on web2; a second wrk opens new ones."""
    active, _ = bed.wait_settled()
    keep = start_wrk(bed, KEEP_SECONDS, connections=4, close=False)  # round-robin: web2 gets one or two
    fresh = None
    drainer = None
    try:
        wait_until(lambda: node(bed, "web2")["connections"] >= 1, 5, "a keep-alive connection on web2")
        fresh = start_wrk(bed, FRESH_SECONDS, connections=8, close=True)
        before = total(node(bed, "web2"))
        wait_until(lambda: total(node(bed, "web2")) > before + 100, 5, "web2 to take new connections")
        drainer = bed.popen(active, ctl_argv(bed, active, "drain", "web2", "--wait", "--timeout", "60",
                                             token=bed.api_token()),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        drain_began = time.monotonic()
        wait_until(lambda: node(bed, "web2")["admin"] == "drain", 5, "web2 in drain")
        at_drain = total(node(bed, "web2"))
        others = {n: total(node(bed, n)) for n in ("web1", "web3")}
        # New connections go on to the others, none to web2: by its count and by who answers.
        wait_until(lambda: all(total(node(bed, n)) > others[n] + 200 for n in others), 10,
                   "web1 and web3 to take new connections during the drain")
        answered = [request_from(bed) for _ in range(20)]
        assert "web2" not in answered and set(answered) == {"web1", "web3"}, answered
        view = node(bed, "web2")
        assert total(view) == at_drain and view["connections"] >= 1 and not view["drain"]["drained"], view
        assert fresh.poll() is None, "the connection-per-request wrk ended before the checks"
        assert_clean(finish_wrk(fresh, FRESH_SECONDS), least=1000)
        fresh = None
        # web2's keep-alive connection is still served; the drain waits for it.
        assert drainer.poll() is None, drainer.communicate()[0]
        assert keep.poll() is None
        result = finish_wrk(keep, KEEP_SECONDS)
        keep = None
        assert_clean(result, least=1000)
        output = drainer.communicate(timeout=15)[0]
        waited = time.monotonic() - drain_began
        assert drainer.returncode == 0 and "web2 drained: its last connection ended" in output, output
        drained_after = node(bed, "web2")["drain"]["drained_after"]
        assert KEEP_SECONDS - 4 < drained_after <= waited, (drained_after, waited)  # at wrk's end, not before
        assert total(node(bed, "web2")) == at_drain
    finally:
        for load in (keep, fresh, drainer):
            if load is not None and load.poll() is None:
                load.kill()
                load.communicate()
        make_ready(bed, "web2")


def test_unauthenticated_and_viewer_changes_are_refused_and_change_nothing(bed):
    active, backup = bed.wait_settled()
    before_nodes = nodes(bed)
    before = ctl_json(bed, "status")["state_version"]
    services_before = ctl_json(bed, "services")
    changes = [["drain", "web2"], ["ready", "web1"], ["maint", "web1"], ["weight", "web2", "5"], ["remove", "web3"],
               ["add", "web9", "198.51.100.99", "http:80"], ["policy", "http", "least-outstanding"]]
    environment = {k: v for k, v in os.environ.items() if not k.startswith("DISTRIBUTOR_")}
    for change in changes:
        nobody = bed.run(active, ctl_argv(bed, active, *change, token=None), check=False, env=environment)
        assert nobody.returncode == 1 and "refused (401)" in nobody.stderr, (change, nobody.stderr)
        wrong = bed.run(active, ctl_argv(bed, active, *change, token="not-a-token-of-this-run"), check=False)
        assert wrong.returncode == 1 and "refused (401)" in wrong.stderr, (change, wrong.stderr)
        viewer = bed.ctl(change, role="viewer")
        assert viewer.returncode == 1 and "refused (403)" in viewer.stderr, (change, viewer.stderr)
    # The same by hand: the status codes themselves, with and without a body.
    assert api_request(bed, active, "POST", "/api/v1/nodes/web2/drain")[0] == 401
    assert api_request(bed, active, "PUT", "/api/v1/nodes/web2/weight", token=bed.api_token("viewer"),
                       body={"weight": 0})[0] == 403
    assert api_request(bed, active, "DELETE", "/api/v1/nodes/web3", token=bed.api_token("viewer"))[0] == 403
    assert api_request(bed, active, "POST", "/api/v1/login-links", token=bed.api_token("viewer"))[0] == 403
    # A session cookie that the API did not make is no session.
    assert api_request(bed, active, "POST", "/api/v1/nodes/web2/drain",
                       headers={"Cookie": "distributor_session=forged", "X-Requested-With": "distributor-console"}
                       )[0] == 401
    # Nothing changed, on either distributor; a viewer still reads.
    assert ctl_json(bed, "status", role="viewer")["state_version"] == before
    assert ctl_json(bed, "services") == services_before
    assert bed.ctl(["nodes"], role="viewer").returncode == 0
    after_nodes = nodes(bed)
    for name, view in before_nodes.items():
        assert (after_nodes[name]["admin"], after_nodes[name]["weight"]) == (view["admin"], view["weight"]), name
    assert set(after_nodes) == set(before_nodes)
    assert ctl_json(bed, "status", host=backup)["state_version"] == before


def test_explain_names_the_node_the_next_connection_from_that_client_reaches(bed):
    bed.wait_settled()
    wait_until(lambda: all(v["connections"] == 0 for v in nodes(bed).values()), 15, "no connection open")
    # Ports above the client's ephemeral range (the testbed sets 1024-65000), so no earlier wrk connection
    # has this client's tuple, and a new base each run, so no closing entry of an earlier run does either.
    port = 65010 + int(time.monotonic()) % 25 * 20
    seen = []
    for i in range(8):
        answer = ctl_json(bed, "explain", f"{CLIENT}:{port + i}")
        (service,) = answer["services"]
        assert service["candidates"] == list(CONFIGURED) and service["excluded"] == [] and service["existing"] is None
        reached = request_from(bed, port + i)  # right after, and nothing else goes through the VIP
        assert reached == service["next"], (service, reached)
        seen.append(reached)
    assert set(seen) == set(CONFIGURED), seen  # round-robin: the prediction was not one node each time
    # A drained node is excluded, and named so; an open connection's table entry is shown.
    bed.ctl(["drain", "web3"], check=True)
    try:
        for i in range(8, 12):
            service = ctl_json(bed, "explain", f"{CLIENT}:{port + i}")["services"][0]
            assert service["excluded"] == [{"node": "web3", "reason": "admin state drain"}], service
            assert request_from(bed, port + i) == service["next"] != "web3"
        conn, reached = request_from(bed, port + 20, keep=True)
        try:
            existing = ctl_json(bed, "explain", f"{CLIENT}:{port + 20}")["services"][0]["existing"]
            assert existing["node"] == reached and existing["open"], existing
        finally:
            conn.close()
    finally:
        make_ready(bed, "web3")


def test_a_drain_survives_a_takeover_and_a_restart(bed):
    """About 15 s: drain on dist1, SIGKILL dist1, dist2 has it; restart dist2 alone, its state file has it."""
    primary, backup = bed.wait_settled()
    version = ctl_json(bed, "drain", "web2", host=primary)["version"]
    wait_until(lambda: node(bed, "web2", backup)["admin"] == "drain", 5, "the drain replicated to the backup")
    try:
        bed.kill(primary)
        wait_until(lambda: bed.role(backup) == "active", 5, f"{backup} to take over")
        assert node(bed, "web2", backup)["admin"] == "drain"
        answered = [request_from(bed) for _ in range(12)]
        assert "web2" not in answered, answered
        # A restart with no peer to learn from: only its state file can say web2 is drained.
        bed.stop(backup)
        bed.start(backup)
        bed.wait_vip(15)
        view = node(bed, "web2", backup)
        assert view["admin"] == "drain" and ctl_json(bed, "status", host=backup)["state_version"] == version, view
        assert "runtime state version" in bed.log_tail(backup, "distributor", 200)
        answered = [request_from(bed) for _ in range(12)]
        assert "web2" not in answered, answered
    finally:
        if bed.service_pid(primary, "distributor") is None:
            bed.start(primary)
        bed.wait_settled()
        make_ready(bed, "web2")
    assert node(bed, "web2", primary)["state"] == "up"


RELOAD_SECONDS = 10.0


def test_sighup_with_a_new_node_brings_it_into_service_with_no_errors(bed):
    """About 11 s: web4 is added to both configs and SIGHUP reloads them while wrk runs."""
    active, backup = bed.wait_settled()
    assert "web4" not in nodes(bed)
    pids = {h: bed.service_pid(h, "distributor") for h in (active, backup)}
    counters_before = {n: total(v) for n, v in nodes(bed).items()}
    keep = start_wrk(bed, RELOAD_SECONDS, connections=4, close=False)
    fresh = start_wrk(bed, RELOAD_SECONDS, connections=8, close=True)
    try:
        offsets = {h: log_offset(bed, h) for h in pids}
        bed.set_configured_nodes(4)
        for host in (backup, active):
            hangup(bed, host)
        for host in pids:
            wait_until(lambda: "configuration" in log_since(bed, host, offsets[host]) and "reloaded" in
                       log_since(bed, host, offsets[host]), 10, f"{host} to reload")
        # Into service: healthy, and taking new connections while wrk runs.
        wait_until(lambda: node(bed, "web4")["state"] == "up" and total(node(bed, "web4")) > 100, 15,
                   "web4 up and serving")
        assert node(bed, "web4", backup)["state"] in ("up", "rising", "slow_start")
        assert fresh.poll() is None and keep.poll() is None, "wrk ended before web4 served"
        # Health state and counts were kept: nobody restarted, no node was reset or re-learned.
        after = nodes(bed)
        for name in CONFIGURED:
            assert after[name]["state"] == "up" and total(after[name]) >= counters_before[name], after[name]
        assert {h: bed.service_pid(h, "distributor") for h in pids} == pids
    finally:
        results = [finish_wrk(keep, RELOAD_SECONDS), finish_wrk(fresh, RELOAD_SECONDS)]
    for result in results:
        assert_clean(result, least=1000)
    assert "web4" in request_from_many(bed, 40)


def request_from_many(bed, count: int) -> set[str]:
    return {request_from(bed) for _ in range(count)}


BROKEN = {
    "a bad value": lambda text: text.replace('policy = "round-robin"', 'policy = "leastconn"'),
    "a TOML syntax error": lambda text: text.replace("[health]", "[health", 1),
}


@pytest.mark.parametrize("broken", list(BROKEN), ids=["bad-value", "toml-syntax"])
def test_sighup_with_a_broken_config_keeps_everything_running(bed, broken):
    """About 7 s each: both distributors refuse the config, say why, and serve on unchanged."""
    active, backup = bed.wait_settled()
    pids = {h: bed.service_pid(h, "distributor") for h in (active, backup)}
    before = {n: (v["state"], v["admin"], v["weight"]) for n, v in nodes(bed).items()}
    configs = {h: bed.host_dir(h) / "distributor.toml" for h in pids}
    good = {h: path.read_text() for h, path in configs.items()}
    load = start_wrk(bed, 5.0, connections=8, close=True)
    try:
        offsets = {h: log_offset(bed, h) for h in pids}
        for host, path in configs.items():
            bad = BROKEN[broken](good[host])
            assert bad != good[host]
            path.write_text(bad)
            hangup(bed, host)
        for host in pids:
            text = wait_until(lambda: "reload refused" in log_since(bed, host, offsets[host]) and
                              log_since(bed, host, offsets[host]), 10, f"{host} to refuse the config")
            refusal = next(line for line in text.splitlines() if "reload refused" in line)
            assert ("services[0].policy" in refusal) if broken == "a bad value" else ("not valid TOML" in refusal), refusal
        events = read(bed, "/api/v1/events", active)
        assert any(e["kind"] == "log" and "reload refused" in e["message"] for e in events)
        assert {h: bed.service_pid(h, "distributor") for h in pids} == pids
        assert {h: bed.role(h) for h in pids} == {active: "active", backup: "backup"}
        assert {n: (v["state"], v["admin"], v["weight"]) for n, v in nodes(bed).items()} == before
        assert load.poll() is None, "wrk ended before the checks"
    finally:
        for host, path in configs.items():
            path.write_text(good[host])
        result = finish_wrk(load, 5.0)
    assert_clean(result, least=500)
    # The good config is taken again.
    offsets = {h: log_offset(bed, h) for h in pids}
    for host in pids:
        hangup(bed, host)
    for host in pids:
        wait_until(lambda: "reloaded" in log_since(bed, host, offsets[host]), 10, f"{host} to reload the good config")
    assert testbed_http.get(bed.ns("client"), bed.vip, bed.topology.vip_port, "/health").status == 200
