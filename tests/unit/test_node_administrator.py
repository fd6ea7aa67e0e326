"""The daemon's administration loop in miniature on loopback (no root): core -> NodeAdministrator -> a real broker.

The distributor core (with [administration]) runs on the real Runtime; its SyncNode / RunTask / FetchTask
commands are carried out by :class:`~distributor.adminclient.NodeAdministrator` against a broker for
web1 on 127.0.0.1, and what the broker answered comes back as events, as in the daemon.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import os
import time

from backup.failover import InstallRules
from common.sansio import Alert, Log
from distributor.admin import AdminReply
from distributor.adminclient import NodeAdministrator
from distributor.api import inspect_bundle
from distributor.balancer import Policy
from distributor.blobstore import BlobStore
from distributor.contentcore import (AdministrationOptions, BundleAdd, BundleRemove, BundleSpec, CollectBlobs,
                                     ContentPut, ContentState, FetchTask, FileSpec, RunTask, SaveAdministration,
                                     SyncNode, TaskRequested)
from distributor.core import DistributorCore
from distributor.reroute import BackendSpec, Mode, ServiceSpec
from distributor.runtime import Runtime
from node.agent import CpuSampler
from node.broker import Broker
from tests.unit.test_broker import KEYS, broker_config, signed_bundle


async def until(condition, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def wired(tmp_path):
    """A broker for web1 on loopback, and a distributor core wired to it as the daemon wires it:
    ``(core, runtime, blobs, replies, saved)``, the AdminReplies and saved state texts collected."""
    broker = Broker(broker_config(tmp_path), "web1", KEYS, max_load=1000.0, max_cpu=1.0, cpu=CpuSampler())
    await broker.start()
    spec = ServiceSpec("web", ipaddress.IPv4Address("203.0.113.1"), 80, Policy.ROUND_ROBIN,
                       (BackendSpec("web1", ipaddress.IPv4Address("127.0.0.1"), 80),))
    core = DistributorCore("dist1", Mode.REWRITE, [spec], 100,
                           administration=AdministrationOptions(broker_port=broker.port, task_poll=0.1))
    runtime = Runtime(core, {})
    runtime.attach(asyncio.get_running_loop())
    blobs = BlobStore(tmp_path / "blobs")
    administrator = NodeAdministrator(KEYS, "dist1", blobs, runtime.feed)
    replies: list[AdminReply] = []
    saved: list[str] = []
    runtime.register({Log: lambda c: None, Alert: lambda c: None, InstallRules: lambda c: None,
                      AdminReply: replies.append, SaveAdministration: lambda c: saved.append(c.text),
                      SyncNode: administrator.sync, RunTask: administrator.run_task,
                      FetchTask: administrator.fetch_task, CollectBlobs: administrator.collect_blobs})
    try:
        yield core, runtime, blobs, replies, saved
    finally:
        await administrator.close()
        runtime.close()
        await broker.stop()


def test_a_push_and_a_task_go_from_the_core_through_the_adapter_to_a_broker_and_back(tmp_path):
    data = os.urandom(2 << 20)

    async def main():
        async with wired(tmp_path) as (core, runtime, blobs, replies, saved):
            content = core.content
            runtime.execute(core.start(time.monotonic(), time.time()))
            await until(lambda: content.nodes["web1"].confirmed == 0)  # the check at start
            writer = blobs.writer()
            writer.write(data)
            sha256, size = writer.commit()
            runtime.feed(ContentPut(1, (FileSpec("docs/big.bin", size, sha256),), "alice", time.monotonic(), time.time()))
            await until(lambda: content.nodes["web1"].confirmed == 1)
            assert content.nodes["web1"].state is ContentState.MATCHES
            assert (tmp_path / "www/docs/big.bin").read_bytes() == data
            runtime.feed(TaskRequested(2, "t-1", "disk-usage", None, "high", {}, "alice", time.monotonic(), time.time()))
            await until(lambda: content.task_view("t-1")["finished"])
            part = content.task_view("t-1")["nodes"]["web1"]
            assert part["state"] == "done" and part["exit_status"] == 0 and part["sends"] == 1 and part["output"]
            assert [r.status for r in replies] == [200, 200] and saved
            status = content.status(time.time())
            assert status["differing"] == [] and status["nodes"][0]["paths"]["docs/big.bin"]["sha256"] == sha256

    asyncio.run(main())


def test_a_bundle_goes_to_the_brokers_bundle_area_before_the_task_that_runs_it_and_is_removed_again(tmp_path):
    data = signed_bundle("hello", priority="high")

    async def main():
        async with wired(tmp_path) as (core, runtime, blobs, replies, _):
            content = core.content
            signed_file = tmp_path / "state" / "bundles" / "signed" / "hello"
            runtime.execute(core.start(time.monotonic(), time.time()))
            await until(lambda: content.nodes["web1"].confirmed == 0)
            writer = blobs.writer()
            writer.write(data)
            sha256, size = writer.commit()
            manifest, key = inspect_bundle(data)
            bundle = BundleSpec("hello", manifest.version, manifest.priority, manifest.time_limit,
                                manifest.memory_limit, key, size, sha256)
            # The task is asked for at once: it must reach the broker after the bundle, or the broker refuses it.
            runtime.feed(BundleAdd(1, bundle, "alice", time.monotonic(), time.time()))
            runtime.feed(TaskRequested(2, "t-1", "hello", None, "high", {}, "alice", time.monotonic(), time.time()))
            await until(lambda: content.nodes["web1"].bundles.confirmed == 1)
            assert signed_file.read_bytes() == data and not (tmp_path / "www" / "hello").exists()
            await until(lambda: content.task_view("t-1")["finished"])
            part = content.task_view("t-1")["nodes"]["web1"]
            # Run or not (running it as the task user needs root and a reachable directory), the node took it.
            assert part["state"] in ("done", "failed") and part["sends"] == 1, part
            runtime.feed(BundleRemove(3, "hello", "alice", time.monotonic(), time.time()))
            await until(lambda: content.nodes["web1"].bundles.confirmed == 2)
            assert not signed_file.exists()
            assert [r.status for r in replies] == [200, 200, 200]
            assert content.bundle_status(time.time())["differing"] == []

    asyncio.run(main())
