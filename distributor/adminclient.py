"""The distributor's client of the node brokers (adapter: HTTP via aiohttp).

Contract
--------
* :class:`AdminClient` talks to one node's broker (``node/broker.py``; the
  protocol is in docs/administration.md).  Every request is signed
  (:func:`common.adminauth.sign_request`) with a sequence from the
  client's :class:`~common.wire.SequenceCounter` (share one per
  distributor process: the node keeps one replay window per sender).  Every
  answer is verified (:func:`common.adminauth.verify_response`: the
  expected node, fresh, bound to this request, MAC, body digest) before it is
  parsed; one that fails raises :class:`AdminUnverified`, so a spoofed node
  cannot report content it does not have.
* Every change sent and every refusal or failed verification is logged
  (logger ``distributor.admin``) with the node and the sender.
* A node's refusal raises :class:`AdminRefused` with its reason label
  (``signed`` False for the broker's unsigned 401 to a request that failed
  authentication).  Network errors raise :class:`AdminUnreachable`.
* Files are streamed from disk 1 MiB at a time (read in a worker thread);
  ``X-Admin-Body-SHA256`` is the file's digest, which the node verifies before
  the file becomes visible.  Nothing is held in memory beyond one chunk.
* :func:`run_on_nodes` sends one task request (one id) to a set of nodes and,
  if asked, waits for every result; resending it later to a node that was
  away is safe (the node runs an id once).
* :func:`sync_node` / :func:`sync_nodes` are anti-entropy: read the node's
  manifest, :func:`distributor.content.plan`, send the operations in order,
  commit, and read the manifest again to report whether the node now matches.
* :class:`NodeAdministrator` is the daemon's executor of the content core's
  commands (:mod:`distributor.contentcore`): each :class:`SyncNode` (of the node's content, or of its
  signed task bundles: ``area="bundles"``, the same protocol under ``/v1/bundles``),
  :class:`RunTask`, :class:`FetchTask` runs as its own asyncio task on the
  daemon's loop, off the packet path (the blob reads in worker threads), and
  its outcome goes back to the core as an event (:class:`SyncReported`,
  :class:`TaskReported`).  It decides nothing: which node, when, and what a
  failure means are the core's.  All requests leave from ``local_address``
  (the distributor's cluster-LAN address, which the brokers pin for its name).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Mapping
from urllib.parse import quote

import aiohttp
import yarl

from common.adminauth import EMPTY_SHA256, Refusal, sign_request, verify_response
from common.paths import check_bundle_name, check_path
from common.wire import Keys, SequenceCounter

from .blobstore import BlobStore
from .content import Delete, DesiredContent, NodeReport, Plan, Transfer, matches, plan
from .contentcore import CollectBlobs, FetchTask, RunTask, SyncNode, SyncReported, TaskReported

__all__ = [
    "AdminError",
    "AdminRefused",
    "AdminUnverified",
    "AdminUnreachable",
    "AdminClient",
    "SyncResult",
    "apply_plan",
    "sync_node",
    "sync_nodes",
    "run_on_nodes",
    "new_request_id",
    "NodeAdministrator",
]

log = logging.getLogger("distributor.admin")

CHUNK = 1 << 20
FINISHED_STATES = {"done", "failed", "timed_out", "expired", "interrupted"}


class AdminError(Exception):
    pass


class AdminRefused(AdminError):
    def __init__(self, node: str, status: int, reason: str, detail: str, signed: bool):
        super().__init__(f"{node} refused ({status} {reason}): {detail}")
        self.node, self.status, self.reason, self.detail, self.signed = node, status, reason, detail, signed


class AdminUnverified(AdminError):
    def __init__(self, node: str, reason: str, status: int):
        super().__init__(f"answer from {node} (HTTP {status}) failed verification: {reason}")
        self.node, self.reason, self.status = node, reason, status


class AdminUnreachable(AdminError):
    pass


def new_request_id() -> str:
    """A task request id that is unique without coordination."""
    return uuid.uuid4().hex


def _query(params: Mapping[str, Any]) -> str:
    # Encoded here, once, and sent as is (yarl encoded=True): the node checks the MAC on the raw bytes.
    return "&".join(f"{quote(str(k), safe='')}={quote(str(v), safe='')}" for k, v in params.items())


class AdminClient:
    def __init__(self, node: str, address: tuple[str, int] | str, keys: Keys, sender: str,
                 sequence: SequenceCounter | None = None, session: aiohttp.ClientSession | None = None,
                 timeout: float = 30.0, window: float = 10.0, clock=time.time):
        """``address``: the node's broker, ``(host, port)`` or ``"host:port"``."""
        if isinstance(address, str):
            host, _, port = address.rpartition(":")
            address = (host, int(port))
        self.node = node
        self.base = f"http://{address[0]}:{address[1]}"
        self.keys = keys
        self.sender = sender
        self.sequence = sequence or SequenceCounter()
        self.window = window
        self.clock = clock
        self._timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout, sock_read=timeout)
        self._session = session
        self._own_session = session is None

    async def __aenter__(self) -> "AdminClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self._timeout)
        return self._session

    async def close(self) -> None:
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    # -- one request ------------------------------------------------------------------
    async def request(self, method: str, raw_path: str, body: bytes | None = None, *,
                      stream: tuple[Path, int, str] | None = None, headers: Mapping[str, str] | None = None) -> tuple[int, Any]:
        """Send one signed request; returns (status, parsed JSON) of a verified 2xx answer."""
        if stream is not None:
            source, size, digest = stream
            data: Any = _file_chunks(source)
            extra = {"Content-Length": str(size), "Content-Type": "application/octet-stream"}
        else:
            data = body or b""
            digest = hashlib.sha256(data).hexdigest() if body else EMPTY_SHA256
            extra = {"Content-Type": "application/json"} if body else {}
        now = self.clock()
        sequence = self.sequence.next(now)
        signed = sign_request(self.keys, self.sender, sequence, now, method, raw_path, digest)
        url = yarl.URL(self.base + raw_path, encoded=True)
        try:
            async with self.session.request(method, url, data=data, headers={**extra, **signed, **(headers or {})}) as response:
                payload = await response.read()
                status, reply_headers = response.status, response.headers
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError) as exc:
            raise AdminUnreachable(f"{self.node} ({self.base}) {method} {raw_path[:80]}: {type(exc).__name__}: {exc}") from None
        problem = verify_response(self.keys, self.node, status, reply_headers, payload, self.sender, sequence,
                                  self.clock(), self.window)
        if problem is not None:
            if status == 401 and problem == Refusal.MISSING_HEADER:
                reason, detail = _error_of(payload)
                log.warning("%s refused %s %s from %s: %s (unsigned 401)", self.node, method, raw_path[:120],
                            self.sender, reason)
                raise AdminRefused(self.node, status, reason, detail, signed=False)
            log.error("answer from %s to %s %s failed verification: %s (HTTP %d): not trusted", self.node, method,
                      raw_path[:120], problem, status)
            raise AdminUnverified(self.node, problem, status)
        result = json.loads(payload) if payload else None
        if status >= 300:
            reason, detail = _error_of(payload)
            log.warning("%s refused %s %s from %s: %s: %s", self.node, method, raw_path[:120], self.sender, reason, detail)
            raise AdminRefused(self.node, status, reason, detail, signed=True)
        if method != "GET":
            log.info("%s: %s %s by %s -> %d", self.node, method, raw_path[:120], self.sender, status)
        return status, result

    # -- content ----------------------------------------------------------------------------
    async def manifest(self, area: str = "content") -> NodeReport:
        _, data = await self.request("GET", f"/v1/{area}/manifest")
        try:
            return NodeReport.from_manifest(data)
        except ValueError as exc:
            raise AdminUnverified(self.node, f"bad manifest: {exc}", 200) from None

    async def put_file(self, path: str, version: int, source: str | Path, size: int, sha256: str,
                       area: str = "content") -> dict:
        raw = f"/v1/{area}?" + _query({"path": path, "version": version, "size": size})
        _, data = await self.request("PUT", raw, stream=(Path(source), size, sha256))
        return data

    async def delete(self, path: str, version: int, area: str = "content") -> dict:
        _, data = await self.request("DELETE", f"/v1/{area}?" + _query({"path": path, "version": version}))
        return data

    async def commit(self, version: int, area: str = "content") -> dict:
        _, data = await self.request("POST", f"/v1/{area}/commit", _json({"version": version}))
        return data

    # -- tasks ------------------------------------------------------------------------------
    async def run_task(self, request_id: str, name: str, priority: str | None = None,
                       args: Mapping[str, Any] | None = None, not_after: float | None = None) -> dict:
        """Ask the node to run a task; idempotent by ``request_id`` (resend it freely)."""
        body: dict[str, Any] = {"id": request_id, "name": name, "args": dict(args or {})}
        if priority is not None:
            body["priority"] = priority
        if not_after is not None:
            body["not_after"] = not_after
        _, data = await self.request("POST", "/v1/tasks", _json(body))
        return data

    async def task(self, request_id: str) -> dict:
        _, data = await self.request("GET", f"/v1/tasks/{quote(request_id, safe='')}")
        return data

    async def tasks(self, limit: int = 100) -> list[dict]:
        _, data = await self.request("GET", f"/v1/tasks?limit={int(limit)}")
        return data["tasks"]

    async def wait_task(self, request_id: str, timeout: float, poll: float = 0.2) -> dict:
        """The task's record once it finished; TimeoutError with its last record otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            record = await self.task(request_id)
            if record["state"] in FINISHED_STATES:
                return record
            if time.monotonic() >= deadline:
                raise TimeoutError(f"task {request_id} on {self.node} still {record['state']} after {timeout:g} s"
                                   f" ({record.get('waiting') or 'no reason given'})")
            await asyncio.sleep(poll)

    async def stats(self) -> dict:
        _, data = await self.request("GET", "/v1/stats")
        return data


def _json(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True).encode()


def _error_of(payload: bytes) -> tuple[str, str]:
    try:
        data = json.loads(payload)
        return str(data.get("error", "unknown")), str(data.get("detail", ""))
    except (ValueError, AttributeError):
        return "unknown", payload[:200].decode("utf-8", "replace")


async def _file_chunks(path: Path) -> AsyncIterator[bytes]:
    loop = asyncio.get_running_loop()
    with open(path, "rb") as f:
        while True:
            chunk = await loop.run_in_executor(None, f.read, CHUNK)
            if not chunk:
                return
            yield chunk


@dataclass(frozen=True)
class SyncResult:
    node: str
    plan: Plan | None  # None: the manifest could not be read
    matches: bool
    # Why the sync could not go on: the node unreachable, a refusal, a failed transfer.  None when the
    # node answered throughout (whether it matches then, or holds a conflict, is ``matches`` and
    # ``plan.conflict``: the content core decides what each means).
    error: str | None
    seconds: float
    report: NodeReport | None = None  # the node's manifest after the sync (or as first read, if it stopped there)


async def apply_plan(client: AdminClient, planned: Plan, blobs: BlobStore, area: str = "content") -> None:
    """Send ``planned``'s operations in version order, then the commit; stops at the first error."""
    loop = asyncio.get_running_loop()
    for op in planned.operations:
        if isinstance(op, Transfer):
            source = await loop.run_in_executor(None, blobs.path, op.sha256)
            await client.put_file(op.path, op.version, source, op.size, op.sha256, area)
        elif isinstance(op, Delete):
            await client.delete(op.path, op.version, area)
    if planned.commit:
        await client.commit(planned.target, area)


async def sync_node(client: AdminClient, desired: DesiredContent, blobs: BlobStore, area: str = "content") -> SyncResult:
    """Bring one node to the desired state; never raises for the node's errors (they are in the result)."""
    started = time.monotonic()
    planned = report = None
    try:
        report = await client.manifest(area)
        planned = plan(desired, report)
        if planned.conflict:
            return SyncResult(client.node, planned, False, None, time.monotonic() - started, report)
        if not planned.in_sync:
            await apply_plan(client, planned, blobs, area)
            report = await client.manifest(area)
        return SyncResult(client.node, planned, matches(desired, report), None, time.monotonic() - started, report)
    except (AdminError, KeyError) as exc:
        return SyncResult(client.node, planned, False, str(exc), time.monotonic() - started, report)


async def sync_nodes(clients: Mapping[str, AdminClient], desired: DesiredContent, blobs: BlobStore,
                     area: str = "content") -> dict[str, SyncResult]:
    """:func:`sync_node` on every node at once."""
    results = await asyncio.gather(*(sync_node(c, desired, blobs, area) for c in clients.values()))
    return {r.node: r for r in results}


async def run_on_nodes(clients: Mapping[str, AdminClient], request_id: str, name: str, priority: str | None = None,
                       args: Mapping[str, Any] | None = None, wait: float | None = None) -> dict[str, dict | AdminError]:
    """One task request on every node of ``clients``: {node: its record (finished, if ``wait`` seconds were
    given and sufficed) or the error}.  A TimeoutError while waiting leaves the last record."""
    async def one(client: AdminClient) -> dict | AdminError:
        try:
            record = await client.run_task(request_id, name, priority, args)
            if wait is not None:
                try:
                    record = await client.wait_task(request_id, wait)
                except TimeoutError:
                    record = await client.task(request_id)
            return record
        except AdminError as exc:
            return exc

    results = await asyncio.gather(*(one(c) for c in clients.values()))
    return dict(zip(clients, results))


class NodeAdministrator:
    """Executes SyncNode, RunTask, FetchTask and CollectBlobs; reports back through ``feed`` (see the module docstring)."""

    def __init__(self, keys: Keys, sender: str, blobs: BlobStore, feed, clock=time.monotonic, wall_clock=time.time,
                 local_address: str | None = None, connect_timeout: float = 5.0, timeout: float = 60.0,
                 blob_grace: float = 600.0):
        self.keys = keys
        self.sender = sender
        self.blobs = blobs
        self.feed = feed
        self.clock = clock
        self.wall_clock = wall_clock
        self.local_address = local_address
        self.connect_timeout = connect_timeout
        self.timeout = timeout
        self.blob_grace = blob_grace  # a blob this young may belong to an upload not yet handed to the core
        self.sequence = SequenceCounter()  # one per distributor process: the node keeps one replay window per sender
        self._session: aiohttp.ClientSession | None = None
        self._clients: dict[tuple[str, str], AdminClient] = {}
        self._running: set[asyncio.Task] = set()

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(local_addr=(self.local_address, 0) if self.local_address else None)
            self._session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=self.connect_timeout, sock_read=self.timeout))
        return self._session

    def client(self, node: str, address: str) -> AdminClient:
        key = (node, address)
        if key not in self._clients:
            self._clients[key] = AdminClient(node, address, self.keys, self.sender, self.sequence,
                                             session=self.session, clock=self.wall_clock)
        return self._clients[key]

    async def close(self) -> None:
        """Cancel what is in flight (its outcome is not reported) and close the connections."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=5.0)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _spawn(self, work, name: str) -> None:
        task = asyncio.get_running_loop().create_task(work, name=name)
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    # -- the executors (plain functions: the runtime never waits for them) -------------------------
    def sync(self, command: SyncNode) -> None:
        self._spawn(self._sync(command), f"sync {command.node} {command.area}")

    def run_task(self, command: RunTask) -> None:
        self._spawn(self._task(command, send=True), f"task {command.task_id} on {command.node}")

    def fetch_task(self, command: FetchTask) -> None:
        self._spawn(self._task(command, send=False), f"poll {command.task_id} on {command.node}")

    def collect_blobs(self, command: CollectBlobs) -> None:
        async def collect() -> None:
            removed = await asyncio.to_thread(self.blobs.remove_unused, command.keep, self.blob_grace)
            if removed:
                log.info("removed %d blob(s) no desired path refers to", removed)
        self._spawn(collect(), "collect blobs")

    async def _sync(self, command: SyncNode) -> None:
        client = self.client(command.node, command.address)
        try:
            check = check_bundle_name if command.area == "bundles" else check_path
            desired = DesiredContent.from_dict(command.desired, check)
            result = await sync_node(client, desired, self.blobs, command.area)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # whatever happened, the core must hear that this sync ended
            log.exception("sync of %s's %s failed", command.node, command.area)
            result = SyncResult(command.node, None, False, f"{type(exc).__name__}: {exc}", 0.0)
        planned = result.plan
        conflict = planned.conflict if planned is not None else None
        self.feed(SyncReported(command.node, command.target, result.report is not None, result.matches, result.report,
                               conflict, result.error, len(planned.operations) if planned is not None else 0,
                               self.clock(), self.wall_clock(), command.area, command.request))

    async def _task(self, command: RunTask | FetchTask, send: bool) -> None:
        client = self.client(command.node, command.address)
        record, error, refused = None, None, False
        try:
            if send:
                assert isinstance(command, RunTask)
                record = await client.run_task(command.task_id, command.name, command.priority, command.args,
                                               command.not_after)
            else:
                record = await client.task(command.task_id)
        except asyncio.CancelledError:
            raise
        except AdminRefused as exc:
            # A signed refusal is the node's answer (unknown task, bad request): final.  The broker's unsigned
            # 401 (a stale clock, a replay) says nothing trustworthy: tried again.
            error, refused = f"{exc.reason}: {exc.detail}", exc.signed
        except Exception as exc:
            error = str(exc) if isinstance(exc, AdminError) else f"{type(exc).__name__}: {exc}"
        self.feed(TaskReported(command.task_id, command.node, record, error, refused, self.clock(), self.wall_clock(),
                               command.request))
