"""Cluster administration end to end, as an operator does it: distributorctl -> the daemon -> the node brokers.

Every content change, task and signed task bundle goes through `distributorctl` (run inside the active distributor's
namespace by ``Testbed.ctl``), the control API and the distributor daemon, whose content core decides
and whose adapter talks to the real agents on web1..web3; clients check the result through the VIP.
The node side's own defences (paths out of the root, forged and replayed requests) are attacked
directly from dist1's namespace, with a client of the brokers, as an attacker on the LAN would.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from distributor.adminclient import AdminClient, AdminRefused
from common.adminauth import sign_request
from common.keyfile import load_keys
from common.wire import Keys, SequenceCounter
from testbed import http, netns, wrk
from testbed.runner import BROKER_PORT, wait_until

NODES = ("web1", "web2", "web3")
SEQUENCE = SequenceCounter()  # the attacker's own client of the brokers
RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)  # sched_getscheduler(2) reports it with the policy


@pytest.fixture(scope="module")
def bed(make_testbed):
    return make_testbed("badmin", nodes=3, access_log=True)


def address(bed, node: str) -> str:
    return str(bed.topology.host(node).address_on("int"))


def ctl(bed, *args: str, timeout: float = 120) -> tuple[int, str, str]:
    result = bed.ctl(list(args), timeout=timeout)
    return result.returncode, result.stdout, result.stderr


def ctl_json(bed, *args: str) -> dict | list:
    code, out, err = ctl(bed, "--json", *args)
    assert code == 0, (args, code, out, err)
    return json.loads(out)


def content_status(bed) -> dict:
    return ctl_json(bed, "content", "status")


def in_dist1(bed, make_coroutine):
    """Run ``make_coroutine(clients)`` in a fresh event loop inside dist1's namespace (a direct broker client)."""
    keys = load_keys(bed.keys_file)

    async def main():
        clients = {n: AdminClient(n, (address(bed, n), BROKER_PORT), keys, "dist1", SEQUENCE) for n in NODES}
        try:
            return await make_coroutine(clients)
        finally:
            for client in clients.values():
                await client.close()

    return netns.call_in(bed.ns("dist1"), asyncio.run, main())


def random_file(path, size: int):
    digest = hashlib.sha256()
    with open(path, "wb") as f:
        for _ in range(size // (1 << 20)):
            chunk = os.urandom(1 << 20)
            digest.update(chunk)
            f.write(chunk)
    return path, digest.hexdigest()


def direct(bed, node: str, path: str) -> http.Reply:
    return http.get(bed.ns("dist1"), address(bed, node), 80, path, timeout=10)


def through_vip_until_every_node(bed, path: str, status: int = 200) -> dict[str, str]:
    """GET ``path`` through the VIP until every node answered once: {node: sha256 of its body}."""
    seen: dict[str, str] = {}
    deadline = time.monotonic() + 20
    while set(seen) != set(NODES) and time.monotonic() < deadline:
        reply = http.get(bed.ns("client"), bed.vip, 80, path, timeout=10)
        assert reply.status == status, (reply.status, reply.node)
        seen[reply.node] = hashlib.sha256(reply.body).hexdigest()
    return seen


def agent_memory(bed, node: str) -> dict[str, int]:
    """The process's current and peak resident memory, in KiB (/proc/PID/status VmRSS, VmHWM)."""
    return memory(bed.service_pid(node, "agent"))


def memory(pid: int) -> dict[str, int]:
    status = open(f"/proc/{pid}/status").read()
    return {key: int(line.split()[1]) for line in status.splitlines() for key in ("VmRSS", "VmHWM")
            if line.startswith(key + ":")}


def node_state(bed, node: str) -> str:
    return ctl_json(bed, "node", node)["state"]


def push(bed, source, dest: str, *extra: str) -> dict:
    code, out, err = ctl(bed, "--json", "content", "push", str(source), "--as", dest, *extra)
    assert code == 0, (code, out, err)
    return json.loads(out.splitlines()[0])


def test_a_pushed_file_is_served_identically_by_every_node_while_wrk_runs(bed, tmp_path):
    source, sha = random_file(tmp_path / "new4m.bin", 4 << 20)
    load = bed.popen("client", wrk.command(f"http://{bed.vip}/1k.bin", duration=8, connections=8),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.0)  # traffic flows before the push
        started = time.monotonic()
        code, out, err = ctl(bed, "content", "push", str(source), "--as", "pushed/new4m.bin", "--wait", "--timeout", "60")
        push_seconds = time.monotonic() - started
    finally:
        output = load.communicate(timeout=60)[0]
    assert code == 0 and "every live node holds version" in out, (code, out, err)
    load_result = wrk.parse(output)
    assert load_result.requests > 0 and load_result.errors == 0, output
    for node in NODES:
        reply = direct(bed, node, "/pushed/new4m.bin")
        assert (reply.status, reply.node, hashlib.sha256(reply.body).hexdigest()) == (200, node, sha)
    assert through_vip_until_every_node(bed, "/pushed/new4m.bin") == {node: sha for node in NODES}
    status = content_status(bed)
    assert status["differing"] == [] and status["paths"]["pushed/new4m.bin"]["sha256"] == sha
    assert all(n["paths"]["pushed/new4m.bin"]["sha256"] == sha for n in status["nodes"])
    print(f"\npush 4 MiB to 3 nodes through distributorctl and the daemon: {push_seconds:.2f} s until every node "
          f"holds it; wrk meanwhile {load_result.requests} requests, {load_result.errors} errors")


class VipProber:
    """GETs a path through the VIP (a new connection each) from the client until stopped: what each node answered."""

    def __init__(self, bed, path: str):
        self.bed, self.path = bed, path
        self.answers: list[tuple[float, str | None, int, str]] = []  # (time, node, status, sha256)
        self.errors = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="vip-prober", daemon=True)

    def __enter__(self) -> "VipProber":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _run(self) -> None:
        deadline = time.monotonic() + 180  # bounded, whatever happens
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                reply = http.get(self.bed.ns("client"), self.bed.vip, 80, self.path, timeout=5)
                self.answers.append((time.monotonic(), reply.node, reply.status, hashlib.sha256(reply.body).hexdigest()))
            except OSError:
                self.errors += 1
            time.sleep(0.01)

    def served_by(self, node: str, sha: str) -> int:
        return sum(1 for _, who, status, digest in self.answers if who == node and status == 200 and digest == sha)


def test_a_node_killed_before_a_push_takes_no_connection_until_its_content_matches_and_gets_a_wanted_task(bed, tmp_path):
    bed.kill("web3")
    wait_until(lambda: node_state(bed, "web3") == "dead", 30, "the distributor to declare web3 dead")
    source, sha = random_file(tmp_path / "later.bin", 1 << 20)
    reply = push(bed, source, "pushed/later.bin", "--wait", "--timeout", "60")
    version = reply["version"]
    status = content_status(bed)
    web3 = next(n for n in status["nodes"] if n["node"] == "web3")
    assert web3["state"] == "behind" and web3["held_out"] and status["differing"] == ["web3"], status
    task = ctl_json(bed, "task", "run", "disk-usage", "--priority", "high")
    assert task["nodes"]["web3"]["state"] == "pending" and task["nodes"]["web3"]["sends"] == 0, task

    # web3's broker refuses the distributor until web3 is healthy again and 2 s more: its heartbeats flow,
    # its sync cannot, so the content gate alone must keep it out (the kernel's REJECT, not the broker's).
    block = ["iptables", "-I", "INPUT", "-p", "tcp", "--dport", str(BROKER_PORT), "-j", "REJECT", "--reject-with",
             "tcp-reset"]
    bed.run("web3", block)
    try:
        with VipProber(bed, "/pushed/later.bin") as prober:
            started, started_wall = time.monotonic(), time.time()
            bed.start("web3")
            healthy_alert = wait_until(lambda: next((a for a in bed.alerts() if a["node"] == "web3" and a["time"] >=
                                                     started_wall and a["to"] in ("up", "slow_start")), None),
                                       30, "web3 to be healthy again")
            time.sleep(2.0)
            held = next(n for n in content_status(bed)["nodes"] if n["node"] == "web3")
            served_while_held = prober.served_by("web3", sha)
            bed.run("web3", ["iptables", "-D", *block[2:]])
            unblocked = time.monotonic() - started
            wait_until(lambda: prober.served_by("web3", sha) >= 3, 90, "web3 to serve the file it missed through the VIP")
    finally:
        bed.run("web3", ["iptables", "-D", *block[2:]], check=False)
    assert held["state"] == "behind" and held["held_out"] and held["error"], held
    assert served_while_held == 0 and not any(node == "web3" for t, node, _, _ in prober.answers
                                               if t - started < unblocked)
    # Every answer through the VIP had the file: web3 took no connection before its content matched.
    wrong = [(round(t - started, 3), node, code) for t, node, code, digest in prober.answers
             if code != 200 or digest != sha]
    assert not wrong, (wrong[:10], len(prober.answers))
    first_web3 = min(t for t, node, _, _ in prober.answers if node == "web3") - started
    healthy = healthy_alert["time"] - started_wall
    gate = gate_opened(bed, "web3", started_wall) - started_wall
    assert healthy < unblocked < gate <= first_web3 + 0.05, (healthy, unblocked, gate, first_web3)
    status = content_status(bed)
    assert status["differing"] == [] and all(n["confirmed"] == version for n in status["nodes"]), status

    def task_done():
        view = ctl_json(bed, "task", "show", task["id"])
        return view if view["finished"] else None

    view = wait_until(task_done, 60, "the task to finish on every node, web3 included")
    assert {n: p["state"] for n, p in view["nodes"].items()} == dict.fromkeys(NODES, "done"), view
    received = view["nodes"]["web3"]["received"]
    assert received >= started_wall + unblocked - 1.0  # web3 got it after it came back (the node runs an id once)
    print(f"\nweb3 started: healthy again after {healthy:.2f} s; its broker was unreachable until {unblocked:.2f} s "
          f"(held out meanwhile: {held['error']}); its content gate opened at {gate:.2f} s, when its sync reported "
          f"a match; its first answer through the VIP at {first_web3:.2f} s, with the file it missed "
          f"({len(prober.answers)} probes, none wrong, {prober.errors} without an answer); the task asked for while it "
          f"was dead was sent {view['nodes']['web3']['sends']} time(s) and ran on it once")


def gate_opened(bed, node: str, since: float) -> float:
    """When the active distributor logged that ``node``'s content gate opened (wall time), at or after ``since``."""
    for line in bed.log_path(bed.active_distributor(), "distributor").read_text().splitlines():
        if f"content: {node} may take new connections again" in line:
            stamp, millis = line[:23].split(",")
            at = time.mktime(time.strptime(stamp, "%Y-%m-%d %H:%M:%S")) + int(millis) / 1000
            if at >= since - 0.001:
                return at
    raise AssertionError(f"the distributor never logged that {node}'s content gate opened")


def test_deleting_a_path_removes_it_everywhere(bed):
    code, out, err = ctl(bed, "content", "delete", "pushed/later.bin", "--wait", "--timeout", "60")
    assert code == 0, (code, out, err)
    for node in NODES:
        assert direct(bed, node, "/pushed/later.bin").status == 404
        assert direct(bed, node, "/pushed/new4m.bin").status == 200
    through_vip_until_every_node(bed, "/pushed/later.bin", status=404)
    assert "pushed/later.bin" not in content_status(bed)["paths"]


def refusals(bed, reason: str) -> float:
    return next((v for (name, labels), v in bed.metrics(bed.active_distributor()).items()
                 if name == "distributor_content_refusals_total" and dict(labels)["reason"] == reason), 0.0)


def test_a_path_escaping_the_root_is_refused_by_the_distributor_counted_and_changes_nothing(bed, tmp_path):
    source = tmp_path / "evil.bin"
    source.write_bytes(b"evil")
    version = content_status(bed)["version"]
    before = {reason: refusals(bed, reason) for reason in ("traversal", "absolute")}
    for dest, reason in (("../../evil.bin", "traversal"), ("/etc/evil.bin", "absolute")):
        code, out, err = ctl(bed, "content", "push", str(source), "--as", dest)
        assert code == 1 and "refused (400)" in err, (code, out, err)
    as_viewer = bed.ctl(["content", "push", str(source), "--as", "pushed/x.bin"], role="viewer")
    assert as_viewer.returncode == 1 and "refused (403)" in as_viewer.stderr  # a viewer may not change content
    assert {reason: refusals(bed, reason) - before[reason] for reason in before} == {"traversal": 1, "absolute": 1}
    assert content_status(bed)["version"] == version
    for node in NODES:
        assert not (bed.host_dir(node) / "evil.bin").exists()


def test_escapes_bad_signatures_and_replays_at_the_broker_are_refused_counted_and_change_nothing(bed, tmp_path):
    source, sha = random_file(tmp_path / "evil.bin", 1 << 20)
    web1 = bed.host_dir("web1")
    (web1 / "www" / "uplink").symlink_to(web1)  # a link out of the document root

    async def attack(clients):
        client = clients["web1"]
        before = await client.stats()
        reasons = []
        for path in ["../evil.bin", "/tmp/evil.bin", "uplink/evil.bin"]:
            with pytest.raises(AdminRefused) as caught:
                await client.put_file(path, 99, source, 1 << 20, sha)
            reasons.append(caught.value.reason)
        forger = AdminClient("web1", (address(bed, "web1"), BROKER_PORT), Keys({1: os.urandom(32)}), "dist1")
        with pytest.raises(AdminRefused) as forged:
            await forger.commit(10**6)
        await forger.close()
        # A genuine request captured on the wire and sent again: a commit of the version the node already holds.
        current = (await client.manifest()).version
        body = json.dumps({"version": current}).encode()
        now = time.time()
        headers = sign_request(load_keys(bed.keys_file), "dist1", SEQUENCE.next(now), now, "POST",
                               "/v1/content/commit", hashlib.sha256(body).hexdigest())
        url = f"http://{address(bed, 'web1')}:{BROKER_PORT}/v1/content/commit"
        statuses = []
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(url, data=body, headers=headers) as r:
                    statuses.append((r.status, await r.json()))
        after = await client.stats()
        return reasons, forged.value.reason, statuses, before, after, await client.manifest()

    try:
        reasons, forged, statuses, before, after, manifest = in_dist1(bed, attack)
    finally:
        (web1 / "www" / "uplink").unlink()
    assert reasons == ["traversal", "absolute", "symlink"] and forged == "bad_mac"
    assert statuses[0][0] == 200 and statuses[1] == (401, {"error": "replay", "detail": "authentication failed"})
    delta = {k: after["refusals"].get(k, 0) - before["refusals"].get(k, 0) for k in after["refusals"]}
    assert {k: v for k, v in delta.items() if v} == {"traversal": 1, "absolute": 1, "symlink": 1, "bad_mac": 1, "replay": 1}
    assert not (web1 / "evil.bin").exists() and not (bed.host_dir("web1") / "www" / "evil.bin").exists()
    assert "evil.bin" not in " ".join(manifest.entries) and manifest.version == before["content_version"]
    # The distributor still sees web1's content as it should be: nothing the attacks sent changed it.
    assert content_status(bed)["differing"] == []


def send_raw(bed, node: str, request: bytes) -> None:
    """One raw HTTP request to a node's nginx (from dist1), as an attacker's tool would send it."""
    sock = netns.connect_in(bed.ns("dist1"), (address(bed, node), 80), timeout=5)
    try:
        sock.sendall(request)
        while sock.recv(65536):
            pass
    finally:
        sock.close()


BUSY_LOOP = "import time\nend = time.time() + 40\nwhile time.time() < end: pass\n"  # bounded, whatever happens


def test_a_low_task_waits_while_the_node_is_loaded_and_runs_when_idle_a_high_one_at_once(bed):
    for request in [b"GET /../../etc/passwd HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET /item?id=1%20UNION%20SELECT%20password%20FROM%20users HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
                    b"GET / HTTP/1.1\r\nHost: x\r\nUser-Agent: sqlmap/1.7.2\r\nConnection: close\r\n\r\n",
                    b"GET /.env HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"]:
        send_raw(bed, "web1", request)
    loops = [bed.popen("web1", [sys.executable, "-c", BUSY_LOOP]) for _ in range(os.cpu_count() or 1)]
    try:
        async def loaded(clients):
            load = (await clients["web1"].stats())["tasks"]["load"]
            return load and load["cpu"] > 0.85

        wait_until(lambda: in_dist1(bed, loaded), 20, "the busy loops to raise web1's own CPU measure")
        low = ctl_json(bed, "task", "run", "scan-access-log", "--nodes", "web1", "--priority", "low")
        submitted = time.monotonic()
        code, out, err = ctl(bed, "--json", "task", "run", "disk-usage", "--nodes", "web1", "--priority", "high",
                             "--wait", "--timeout", "15")
        high = json.loads(out)["nodes"]["web1"]
        assert code == 0 and high["state"] == "done", (code, out, err)
        time.sleep(3.0)  # the node stays loaded: the low task must still wait
        low_loaded = ctl_json(bed, "task", "show", low["id"])["nodes"]["web1"]
        waited = time.monotonic() - submitted
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert high["started"] - high["received"] < 1.0
    assert low_loaded["state"] == "queued" and low_loaded["waiting"].startswith("node not idle"), low_loaded

    async def idle_for(clients):
        return (await clients["web1"].stats())["tasks"]["idle_for"]

    longest_idle = 0.0
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        part = ctl_json(bed, "task", "show", low["id"])["nodes"]["web1"]
        if part["state"] not in ("queued", "running", "sending", "pending"):
            break
        longest_idle = max(longest_idle, in_dist1(bed, idle_for))
        time.sleep(0.5)
    if part["state"] == "queued" and longest_idle < 2.0:
        # The measure is machine-wide (one kernel for every namespace, CPUs shared with other runs): if the
        # machine never idled, the node rightly never was idle. A node that was idle and did not run it fails.
        pytest.skip(f"the machine stayed busy for 180 s after the busy loops ended (longest idle spell the "
                    f"agent saw: {longest_idle:.1f} s): {part.get('waiting')}")
    assert part["state"] == "done", (part, longest_idle)
    report = json.loads(part["output"])
    assert report["kinds"]["path_traversal"] >= 1 and report["kinds"]["sql_injection"] >= 1
    assert report["kinds"]["scanner_agent"] >= 1 and report["kinds"]["sensitive_file"] >= 1
    listed = ctl_json(bed, "task", "list")
    assert {low["id"]} <= {t["id"] for t in listed}
    print(f"\nhigh task (distributorctl task run --wait): started {high['started'] - high['received']:.3f} s after "
          f"web1 received it, took {high['duration']:.3f} s, while the node was loaded; low task waited "
          f"{part['started'] - part['received']:.1f} s (loaded for {waited:.1f} s of it), took {part['duration']:.3f} s")


def sign_bundle(bed, tmp_path: Path, name: str, script: bytes, version: int = 1) -> Path:
    """A bundle signed offline with the run's operator key, as an operator does it (distributor-sign)."""
    entry = tmp_path / "run.sh"
    entry.write_bytes(script)
    entry.chmod(0o755)
    out = tmp_path / f"{name}-{version}.bundle"
    subprocess.run([sys.executable, "-m", "distributor.signtool", "sign", "--key", str(bed.operator_key_file),
                    "--name", name, "--version", str(version), "--priority", "high", "--time-limit", "10",
                    "--memory-limit", "64", "--entry", "run.sh", str(entry), "--out", str(out)],
                   check=True, capture_output=True, text=True)
    return out


def signed_on(bed, node: str, name: str):
    return bed.host_dir(node) / "bundles" / "signed" / name


def test_a_signed_bundle_added_with_distributorctl_reaches_every_node_one_that_was_away_too_and_runs_as_nobody(
        bed, tmp_path):
    # Field 41 of /proc/PID/stat is the scheduling policy (proc(5)); `cut` runs at its shell's policy.
    source = sign_bundle(bed, tmp_path, "whoami", b"#!/bin/sh\nid -un\npwd\ncut -d' ' -f41 /proc/self/stat\n")
    killed = time.time()
    bed.kill("web3")
    # Its second death in a minute: the node view may say "flapping" (damped), the alert says dead.
    bed.wait_alert("web3", "dead", killed, 30, host=bed.active_distributor())
    # The operator's path: distributorctl -> the daemon (which stores it and checks its form, not its
    # signature) -> every live broker (which verifies it against the operator key it trusts).
    code, out, err = ctl(bed, "--json", "task", "add", str(source), "--wait", "--timeout", "60")
    assert code == 0, (code, out, err)
    added = json.loads(out.splitlines()[0])
    assert added["bundle"]["name"] == "whoami" and added["bundle"]["version"] == 1
    status = ctl_json(bed, "task", "bundles")
    web3 = next(n for n in status["nodes"] if n["node"] == "web3")
    assert web3["state"] == "behind" and status["differing"] == ["web3"], status
    for node in ("web1", "web2"):
        assert signed_on(bed, node, "whoami").read_bytes() == source.read_bytes()
    # Asked for while web3 is away: web3's part waits, and goes to it after the bundle when it returns.
    task = ctl_json(bed, "task", "run", "whoami", "--priority", "high")
    assert task["nodes"]["web3"]["state"] == "pending" and task["nodes"]["web3"]["sends"] == 0, task
    started_wall = time.time()
    bed.start("web3")

    def task_done():
        view = ctl_json(bed, "task", "show", task["id"])
        return view if view["finished"] else None

    view = wait_until(task_done, 90, "the bundle's task to finish on every node, web3 included")
    policies = {}
    for node, record in view["nodes"].items():
        assert record["state"] == "done" and record["exit_status"] == 0, (node, record)
        user, cwd, policy = record["output"].split()
        assert user == "nobody" and cwd == str(bed.host_dir(node) / "bundles" / "run" / "whoami" / "work")
        # The agent runs at SCHED_FIFO (agent.realtime_priority); its tasks must not: SCHED_RESET_ON_FORK.
        agent_policy = os.sched_getscheduler(bed.service_pid(node, "agent")) & ~RESET_ON_FORK
        assert policy == str(os.SCHED_OTHER), (node, record["output"], f"agent policy {agent_policy}")
        policies[node] = agent_policy
        assert not (bed.host_dir(node) / "www" / "whoami").exists()  # bundles never land in the document root
    assert view["nodes"]["web3"]["received"] >= started_wall and view["nodes"]["web3"]["sends"] == 1
    assert signed_on(bed, "web3", "whoami").read_bytes() == source.read_bytes()
    status = ctl_json(bed, "task", "bundles")
    assert status["differing"] == [] and all(n["confirmed"] == added["version"] for n in status["nodes"]), status

    # Removed everywhere; a node then refuses to run it (signed, final: not retried).
    code, out, err = ctl(bed, "task", "remove", "whoami", "--wait", "--timeout", "60")
    assert code == 0 and "every live node holds bundles version" in out, (code, out, err)
    assert not any(signed_on(bed, node, "whoami").exists() for node in NODES)
    code, out, err = ctl(bed, "--json", "task", "run", "whoami", "--priority", "high", "--wait", "--timeout", "30")
    refused = json.loads(out)["nodes"]
    assert code == 1 and {n: p["state"] for n, p in refused.items()} == dict.fromkeys(NODES, "refused"), refused
    assert all("unknown_task" in p["error"] for p in refused.values())
    print(f"\nbundle added through distributorctl to web1, web2 while web3 was dead; web3 got it when it returned and "
          f"ran the task asked for meanwhile {view['nodes']['web3']['started'] - started_wall:.2f} s after start "
          f"began; agent scheduling policy (0 other, 1 fifo): {policies}; every bundle ran at policy 0")


def test_a_100_mib_push_keeps_the_agent_under_64_mib_and_its_loop_running(bed, tmp_path):
    source, sha = random_file(tmp_path / "big.bin", 100 << 20)

    async def lags(clients):
        return {n: (await c.stats())["loop_lag"] for n, c in clients.items()}

    before = {node: agent_memory(bed, node) for node in NODES}
    distributor_pid = bed.service_pid(bed.active_distributor(), "distributor")
    distributor_before = memory(distributor_pid)
    lag_before = in_dist1(bed, lags)
    started_wall = time.time()
    started = time.monotonic()
    code, out, err = ctl(bed, "content", "push", str(source), "--as", "pushed/big.bin", "--wait", "--timeout", "120",
                         timeout=180)
    seconds = time.monotonic() - started
    assert code == 0, (code, out, err)
    after = {node: agent_memory(bed, node) for node in NODES}
    distributor_after = memory(distributor_pid)
    lag_after = in_dist1(bed, lags)
    for node in NODES:
        assert after[node]["VmHWM"] < 64 * 1024, (node, after[node])
        served = bed.run("dist1", ["sh", "-c", f"curl -s http://{address(bed, node)}/pushed/big.bin | sha256sum"])
        assert served.stdout.split()[0] == sha
        # The agent's event loop (which also sends the heartbeats) never stalled: file work is in threads.
        assert lag_after[node]["over_200ms"] == lag_before[node]["over_200ms"], (node, lag_before[node], lag_after[node])
    changes = [a for a in bed.alerts() if a["time"] >= started_wall and a["node"] in NODES]
    print(f"\npush 100 MiB through distributorctl to 3 nodes: {seconds:.2f} s until every node holds it; "
          "agent RSS before -> peak (KiB): " +
          ", ".join(f"{n} {before[n]['VmRSS']} -> {after[n]['VmHWM']}" for n in NODES) +
          f"; the distributor's RSS {distributor_before['VmRSS']} -> {distributor_after['VmRSS']} KiB (peak "
          f"{distributor_after['VmHWM']}); worst event-loop lag (ms): " +
          ", ".join(f"{n} {lag_after[n]['max_ms']}" for n in NODES) + f"; node state changes meanwhile: {len(changes)}")
