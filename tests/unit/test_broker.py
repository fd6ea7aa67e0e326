"""The broker and the distributor's client together, in one process on loopback (no root unless stated)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import tempfile
import time
import tomllib
from pathlib import Path

import aiohttp
import pytest

from common import bundle as bundles
from common.adminauth import sign_request
from common.tomlconfig import ConfigError, TableReader
from common.wire import Keys
from distributor.adminclient import AdminClient, AdminRefused, AdminUnverified, sync_node
from distributor.blobstore import BlobStore
from distributor.content import DesiredContent
from node.agent import CpuSampler
from node.broker import Broker, parse_broker_config

KEYS = Keys({1: b"cluster admin key, 32 bytes long"})
OPERATOR = bundles.generate_private_key()
ROOT_ONLY = pytest.mark.skipif(os.geteuid() != 0, reason="running a bundle as another user needs root")


def broker_config(tmp_path, bundle_dir=None, **tasks):
    extra = "".join(f"{k} = {json.dumps(v)}\n" for k, v in tasks.items())
    text = f"""
bundle_dir = "{bundle_dir or tmp_path / 'state' / 'bundles'}"
listen = "127.0.0.1:0"
senders = {{ dist1 = "127.0.0.1", dist2 = "" }}
document_root = "{tmp_path}/www"
state_dir = "{tmp_path}/state"
min_free = 0
[tasks]
sample_interval = 0.05
idle_for = 0
{extra}
[bundles]
trusted_keys = ["{bundles.public_key_text(OPERATOR)}"]
"""
    return parse_broker_config(TableReader(tomllib.loads(text), "broker"))


def run(tmp_path, scenario, bundle_dir=None, **tasks):
    """Start a broker for web1, run ``scenario(broker, client)``, stop everything."""
    async def main():
        broker = Broker(broker_config(tmp_path, bundle_dir, **tasks), "web1", KEYS, max_load=1000.0, max_cpu=1.0,
                        cpu=CpuSampler())
        await broker.start()
        try:
            async with AdminClient("web1", ("127.0.0.1", broker.port), KEYS, "dist1") as client:
                return await scenario(broker, client)
        finally:
            await broker.stop()

    return asyncio.run(main())


def write(path, data):
    path.write_bytes(data)
    return path, len(data), hashlib.sha256(data).hexdigest()


def test_push_a_file_and_sync_a_node_to_the_desired_content(tmp_path):
    blobs = BlobStore(tmp_path / "blobs")
    desired = DesiredContent()
    for name, data in [("index.html", b"<h1>v1</h1>"), ("docs/big.bin", os.urandom(3 << 20))]:
        source, _, _ = write(tmp_path / name.replace("/", "_"), data)
        sha, size = blobs.ingest(source)
        desired.put(name, size, sha)

    async def scenario(broker, client):
        first = await sync_node(client, desired, blobs)
        assert first.error is None and first.matches and len(first.plan.operations) == 2
        again = await sync_node(client, desired, blobs)
        assert again.plan.in_sync and again.matches
        desired.delete("index.html")
        third = await sync_node(client, desired, blobs)
        assert third.matches and [type(op).__name__ for op in third.plan.operations] == ["Delete"]
        return await client.manifest(), await client.stats()

    report, stats = run(tmp_path, scenario)
    assert report.version == 3 and list(report.entries) == ["docs/big.bin"]
    assert (tmp_path / "www/docs/big.bin").read_bytes() == blobs.path(desired.entries["docs/big.bin"].sha256).read_bytes()
    assert not (tmp_path / "www/index.html").exists()
    assert stats["changes"] == {"content_put": 2, "content_commit": 2, "content_delete": 1}


def test_path_escapes_are_refused_counted_and_change_nothing(tmp_path):
    (tmp_path / "outside").mkdir()
    source, size, sha = write(tmp_path / "evil", b"evil")

    async def scenario(broker, client):
        (tmp_path / "www" / "escape").symlink_to(tmp_path / "outside")
        reasons = []
        for path in ["../outside/evil", "/etc/evil", "escape/evil", "a\0b"]:
            with pytest.raises(AdminRefused) as caught:
                await client.put_file(path, 1, source, size, sha)
            assert caught.value.signed
            reasons.append(caught.value.reason)
        with pytest.raises(AdminRefused) as caught:
            await client.delete("../outside/x", 1)
        reasons.append(caught.value.reason)
        return reasons, await client.stats()

    reasons, stats = run(tmp_path, scenario)
    assert reasons == ["traversal", "absolute", "symlink", "nul", "traversal"]
    assert stats["refusals"] == {"traversal": 2, "absolute": 1, "symlink": 1, "nul": 1}
    assert os.listdir(tmp_path / "outside") == [] and stats["content_version"] == 0


def test_bad_signatures_and_replays_are_refused_unsigned_and_counted(tmp_path):
    async def scenario(broker, client):
        forger = AdminClient("web1", ("127.0.0.1", broker.port), Keys({1: b"a key the node does not know!!"}), "dist1")
        with pytest.raises(AdminRefused) as caught:
            await forger.commit(7)
        await forger.close()
        assert caught.value.reason == "bad_mac" and not caught.value.signed
        stranger = AdminClient("web1", ("127.0.0.1", broker.port), KEYS, "mallory")
        with pytest.raises(AdminRefused) as unknown:
            await stranger.stats()
        await stranger.close()
        # Capture one good request and send it twice.
        body = json.dumps({"version": 7}).encode()
        headers = sign_request(KEYS, "dist1", 10**15, time.time(), "POST", "/v1/content/commit",
                               hashlib.sha256(body).hexdigest())
        statuses = []
        async with aiohttp.ClientSession() as session:
            for _ in range(2):
                async with session.post(f"http://127.0.0.1:{broker.port}/v1/content/commit", data=body,
                                        headers=headers) as response:
                    statuses.append((response.status, (await response.json())["error" if response.status != 200 else "version"]))
        return unknown.value.reason, statuses, await client.stats()

    unknown, statuses, stats = run(tmp_path, scenario)
    assert unknown == "unknown_sender"
    assert statuses == [(200, 7), (401, "replay")]
    assert stats["refusals"] == {"bad_mac": 1, "unknown_sender": 1, "replay": 1}
    assert stats["content_version"] == 7  # only the genuine request changed anything


def test_a_body_other_than_the_signed_one_is_refused(tmp_path):
    async def scenario(broker, client):
        body = json.dumps({"version": 7}).encode()
        headers = sign_request(KEYS, "dist1", 10**15, time.time(), "POST", "/v1/content/commit",
                               hashlib.sha256(body).hexdigest())
        async with aiohttp.ClientSession() as session:
            async with session.post(f"http://127.0.0.1:{broker.port}/v1/content/commit",
                                    data=json.dumps({"version": 9}).encode(), headers=headers) as response:
                return response.status, await response.json(), await client.stats()

    status, data, stats = run(tmp_path, scenario)
    assert (status, data["error"], stats["content_version"]) == (422, "bad_digest", 0)


def test_an_answer_from_another_node_fails_verification(tmp_path):
    async def scenario(broker, client):
        impostor = AdminClient("web2", ("127.0.0.1", broker.port), KEYS, "dist1")
        try:
            with pytest.raises(AdminUnverified) as caught:
                await impostor.manifest()
        finally:
            await impostor.close()
        return caught.value.reason

    assert run(tmp_path, scenario) == "unknown_sender"


def test_a_replay_mark_survives_a_restart(tmp_path):
    async def first(broker, client):
        await client.stats()
        return broker.verifier.marks()["dist1"]

    mark = run(tmp_path, first)
    restarted = Broker(broker_config(tmp_path), "web1", KEYS, 1000.0, 1.0, CpuSampler())
    assert restarted.verifier.replay["dist1"].floor == mark


def test_tasks_run_once_with_results_and_unknown_ones_are_refused(tmp_path):
    async def scenario(broker, client):
        created = await client.run_task("req-1", "disk-usage", "high")
        assert created["state"] in ("queued", "running")
        done = await client.wait_task("req-1", timeout=20)
        again = await client.run_task("req-1", "disk-usage", "high")  # a resend: not run again
        with pytest.raises(AdminRefused) as caught:
            await client.run_task("req-2", "rm-rf", "high")
        listed = await client.tasks()
        return done, again, caught.value, listed

    done, again, refusal, listed = run(tmp_path, scenario)
    assert done["state"] == "done" and done["exit_status"] == 0 and done["duration"] > 0
    assert json.loads(done["output"])["document_root"] == str(tmp_path / "www")
    assert again["started"] == done["started"] and again["state"] == "done"
    assert (refusal.status, refusal.reason) == (404, "unknown_task")
    assert [r["id"] for r in listed] == ["req-1"]


def test_a_task_request_survives_a_restart_and_never_runs_twice(tmp_path):
    async def first(broker, client):
        await client.run_task("once", "disk-usage", "high")
        return await client.wait_task("once", timeout=20)

    async def second(broker, client):
        return await client.run_task("once", "disk-usage", "high")

    done = run(tmp_path, first)
    again = run(tmp_path, second)
    assert again["started"] == done["started"] and again["state"] == "done"


def test_output_is_truncated_to_the_limit(tmp_path):
    log = tmp_path / "access.log"
    log.write_text("".join(f'192.0.2.{n % 200} - - [x] "GET /../../etc/passwd HTTP/1.1" 404 1 "-" "nikto"\n' for n in range(500)))

    async def scenario(broker, client):
        await client.run_task("scan", "scan-access-log", "high")
        return await client.wait_task("scan", timeout=20)

    done = run(tmp_path, scenario, access_log=str(log), output_limit=100)
    assert done["state"] == "done" and len(done["output"]) == 100 and done["output_truncated"] > 0


def signed_bundle(name="hello", script=b"#!/bin/sh\nid -u\npwd\n", version=1, **kw):
    fields = dict(priority="low", time_limit=10, memory_limit=64)
    fields.update(kw)
    return bundles.make_bundle(OPERATOR, name, version, entry="run.sh", files={"run.sh": script}, **fields)


def test_bundles_are_installed_only_when_their_signature_verifies(tmp_path):
    good = write(tmp_path / "good", signed_bundle())
    forged = write(tmp_path / "forged", bundles.make_bundle(bundles.generate_private_key(), "hello", 2, "low", 10, 64,
                                                            "run.sh", {"run.sh": b"#!/bin/sh\nexit 0\n"}))
    older = write(tmp_path / "older", signed_bundle(version=1))
    newer = write(tmp_path / "newer", signed_bundle(version=2))

    async def scenario(broker, client):
        reasons = []
        await client.put_file("hello", 1, *good, area="bundles")
        for source, name in [(forged, "hello"), (good, "other")]:
            with pytest.raises(AdminRefused) as caught:
                await client.put_file(name, 2, *source, area="bundles")
            reasons.append(caught.value.reason)
        await client.put_file("hello", 3, *newer, area="bundles")
        with pytest.raises(AdminRefused) as caught:
            await client.put_file("hello", 4, *older, area="bundles")
        reasons.append(caught.value.reason)
        with pytest.raises(AdminRefused) as caught:
            await client.run_task("b1", "hello", "high")  # signed for low at most
        reasons.append(caught.value.reason)
        return reasons, await client.manifest("bundles")

    reasons, manifest = run(tmp_path, scenario)
    assert reasons == ["untrusted_key", "bad_bundle", "rollback", "priority"]
    assert list(manifest.entries) == ["hello"] and manifest.entries["hello"].version == 3
    assert not (tmp_path / "www" / "hello").exists()  # bundles never land in the document root


@pytest.fixture
def searchable_dir():
    """A directory every user can search (pytest's tmp_path is under a 0700 directory)."""
    path = tempfile.mkdtemp(prefix="broker-test-")
    os.chmod(path, 0o755)
    yield Path(path)
    shutil.rmtree(path)


@ROOT_ONLY
def test_a_bundle_runs_as_the_unprivileged_user_in_its_own_directory_within_its_limits(tmp_path, searchable_dir):
    hello = write(tmp_path / "hello", signed_bundle(priority="high"))
    sleeper = write(tmp_path / "sleeper", signed_bundle("sleeper", b"#!/bin/sh\nsleep 30 &\nsleep 30\n", priority="high",
                                                        time_limit=0.5))
    hog = write(tmp_path / "hog", signed_bundle("hog", b"#!/usr/bin/python3\nx = bytearray(200 << 20)\n",
                                                priority="high", memory_limit=64))

    async def scenario(broker, client):
        for n, (name, source) in enumerate([("hello", hello), ("sleeper", sleeper), ("hog", hog)], 1):
            await client.put_file(name, n, *source, area="bundles")
            await client.run_task(f"run-{name}", name, "high")
        return [await client.wait_task(f"run-{name}", timeout=20) for name in ("hello", "sleeper", "hog")]

    hello_run, sleeper_run, hog_run = run(tmp_path, scenario, bundle_dir=searchable_dir)
    assert hello_run["state"] == "done", hello_run
    uid, cwd = hello_run["output"].split()
    assert hello_run["state"] == "done" and uid == "65534"
    assert cwd == str(searchable_dir / "run" / "hello" / "work")
    assert sleeper_run["state"] == "timed_out" and sleeper_run["duration"] < 5
    assert hog_run["state"] == "failed" and "MemoryError" in hog_run["output"]


def test_a_bundle_dir_the_task_user_cannot_reach_is_reported(tmp_path):
    hello = write(tmp_path / "hello", signed_bundle(priority="high"))
    os.chmod(tmp_path, 0o700)

    async def scenario(broker, client):
        await client.put_file("hello", 1, *hello, area="bundles")
        await client.run_task("r", "hello", "high")
        return await client.wait_task("r", timeout=20)

    record = run(tmp_path, scenario)
    assert record["state"] == "failed" and "cannot search" in record["error"]


@pytest.mark.parametrize("line,message", [
    ('listen = "0.0.0.0:8407"', "listens on every address"),
    ('listen = "web1:8407"', "expected \"ADDRESS:PORT\""),
    ('senders = {}', "broker.senders"),
    ('senders = { dist1 = "nowhere" }', "not an IP address"),
    ('tasks = { allow = ["rm-rf"] }', "'rm-rf' is not a built-in task"),
    ('tasks = { user = "root" }', "unprivileged"),
    ('tasks = { user = "no-such-user-here" }', "no user"),
    ('tasks = { idle_cpu = 2 }', "fraction"),
    ('bundles = { trusted_keys = ["ed25519:short"] }', "public key"),
    ('listn = "x"', "broker.listn: unknown key"),
])
def test_broker_config_errors_name_the_key_and_what_is_valid(line, message):
    base = {"listen": '"198.51.100.11:8407"', "senders": '{ dist1 = "198.51.100.2" }', "document_root": '"/srv/www"',
            "state_dir": '"/var/lib/agent"'}
    key = line.split(" ", 1)[0]
    base[key] = line.split(" = ", 1)[1]
    text = "\n".join(f"{k} = {v}" for k, v in base.items())
    with pytest.raises(ConfigError, match=message):
        parse_broker_config(TableReader(tomllib.loads(text), "broker"))


def test_the_agent_config_carries_the_broker_section():
    from node.agent import parse_config

    config = parse_config("""
[agent]
id = "web1"
probe_url = "http://198.51.100.11/health"
[heartbeat]
keys_file = "/etc/distributor/keys"
[broker]
listen = "198.51.100.11:8407"
senders = { dist1 = "198.51.100.2", dist2 = "198.51.100.3" }
document_root = "/srv/www"
state_dir = "/var/lib/distributor-agent"
""")
    broker = config.broker
    assert broker.listen == ("198.51.100.11", 8407) and broker.keys_file is None
    assert broker.bundle_dir == Path("/var/lib/distributor-agent/bundles") and not broker.bundles_enabled
    assert broker.allow == ("reload-nginx", "rotate-logs", "disk-usage", "scan-access-log") and broker.user == "nobody"


def test_one_request_runs_on_several_nodes_and_errors_are_per_node(tmp_path):
    from distributor.adminclient import run_on_nodes

    async def scenario(broker, client):
        dead = AdminClient("web9", ("127.0.0.1", 1), KEYS, "dist1")
        try:
            return await run_on_nodes({"web1": client, "web9": dead}, "multi-1", "disk-usage", "high", wait=20)
        finally:
            await dead.close()

    results = run(tmp_path, scenario)
    assert results["web1"]["state"] == "done"
    assert type(results["web9"]).__name__ == "AdminUnreachable"


def test_the_stats_report_the_event_loops_lag(tmp_path):
    async def scenario(broker, client):
        await asyncio.sleep(0.25)
        time.sleep(0.3)  # block the loop on purpose: the watcher must see it
        await asyncio.sleep(0.15)
        return (await client.stats())["loop_lag"]

    lag = run(tmp_path, scenario)
    assert lag["over_200ms"] >= 1 and lag["max_ms"] >= 200


def test_a_bundle_may_not_take_a_built_in_tasks_name_even_one_this_node_does_not_allow(tmp_path):
    # Allowed here or not, "rotate-logs" means the built-in on every node: a bundle of that name
    # would run in its stead wherever an operator later allows it.
    reserved = write(tmp_path / "reserved", signed_bundle(name="rotate-logs"))

    async def scenario(broker, client):
        with pytest.raises(AdminRefused) as caught:
            await client.put_file("rotate-logs", 1, *reserved, area="bundles")
        return caught.value.reason, await client.manifest("bundles")

    reason, manifest = run(tmp_path, scenario, allow=["disk-usage"])
    assert reason == "reserved" and not manifest.entries
