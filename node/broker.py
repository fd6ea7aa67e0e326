"""The broker: the node agent's administration endpoint (HTTP on the cluster LAN only).

It runs inside the node agent's process (``[broker]`` in its config; see
docs/administration.md for the whole protocol) and lets the distributor
manage the node's content and run tasks on it.

Endpoints (JSON; every request and every answer signed, :mod:`common.adminauth`)::

    GET  /v1/content/manifest                     -> {"area", "version", "paths": {path: {version, size, sha256}}}
    PUT  /v1/content?path=P&version=V&size=N      body: the file, streamed; X-Admin-Body-SHA256 is its digest
    DELETE /v1/content?path=P&version=V
    POST /v1/content/commit   {"version"}           the node's content version becomes V
    (the same four under /v1/bundles: signed task bundles, stored in the bundle directory)
    POST /v1/tasks            {"id", "name", "priority"?, "args"?, "not_after"?}  -> 202 new, 200 seen before
    GET  /v1/tasks/ID         -> the request's record (state, exit_status, output, duration, ...)
    GET  /v1/tasks?limit=N    -> the latest records
    GET  /v1/stats            -> refusals by reason, changes, versions, task states, the load measure

Contract
--------
* It listens on the configured cluster-LAN address only; a wildcard address
  (``0.0.0.0``, ``::``) is a config error.
* Authentication happens before any handler runs: cheap checks, then the MAC
  (:class:`~common.adminauth.RequestVerifier`).  A request that fails gets
  401 with the reason, unsigned (signing answers to forgeries would hand out
  MACs), and changes nothing.  The replay marks are saved to the state
  directory before the request is acted on, so a restarted agent refuses
  what it already accepted.
* Every refusal is counted by reason (``GET /v1/stats``) and logged with who
  asked (sender and source address); every change is logged the same way.
  Authenticated refusals (bad path, stale version, bad digest, unknown task, ...)
  are answered signed, with ``{"error": REASON, "detail": ...}``.
* File work runs in the broker's own worker threads: the event loop that
  also sends the heartbeats never waits for a disk.  Those threads run at a
  lower CPU priority (``io_nice``, default 10; on Linux the nice value is a
  per-thread attribute, setpriority(2)), so hashing a large upload yields the
  CPU to nginx and to the agent's own loop.  ``/v1/stats`` reports the event
  loop's lag (how late a 100 ms timer fires) so a stall would show.  Uploads stream in
  chunks of at most 64 KiB; aiohttp's request buffer pauses the socket when
  the node is behind, so memory stays bounded whatever the file's size.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import hashlib
import ipaddress
import json
import logging
import math
import os
import pwd
import re
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from common.adminauth import Authenticated, RequestVerifier, sign_response
from common.bundle import MAX_BUNDLE_BYTES, BundleRefused, open_bundle, parse_public_key
from common.paths import PathRefused, check_bundle_name, check_path
from common.tomlconfig import ConfigError, TableReader
from common.wire import Keys, SequenceCounter

from .store import ContentStore, StoreRefused, Upload, atomic_write
from .taskrunner import CpuMeasure, TaskRefused, TaskService, TaskSettings
from .tasks import Gate, Priority

__all__ = ["BrokerConfig", "parse_broker_config", "Broker", "DEFAULT_PORT", "BUILTIN_TASKS"]

log = logging.getLogger("node-agent.broker")

DEFAULT_PORT = 8407
BUILTIN_TASKS = ("reload-nginx", "rotate-logs", "disk-usage", "scan-access-log")
# Upload chunk handed to a worker thread. Measured on loopback (3 x 100 MiB, 4 interleaved rounds, medians):
# 64 KiB 1.35 s and +1.5 MiB peak RSS; 256 KiB 2.06 s, +2.8 MiB; 1 MiB 2.52 s, +7.7 MiB.
CHUNK = 64 << 10
MAX_JSON_BODY = 64 << 10
# Where the middleware leaves who signed the request (aiohttp >= 3.11 wants a typed key).
AUTH = web.RequestKey("auth", Authenticated) if hasattr(web, "RequestKey") else "auth"
_REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # matched whole: "$" would let "t7\n" in

# The HTTP status of each refusal reason (authenticated requests).
_STATUS = {
    "bad_request": 400, "bad_path": 400, "traversal": 400, "absolute": 400, "nul": 400, "reserved": 400,
    "not_directory": 409, "not_file": 409, "symlink": 403, "not_found": 404, "stale_version": 409, "busy": 409,
    "too_large": 413, "no_space": 507, "bad_size": 422, "bad_digest": 422, "bad_bundle": 422,
    "bad_signature": 403, "untrusted_key": 403, "rollback": 409, "bundles_disabled": 403, "unknown_task": 404,
    "priority": 403,
}


@dataclass(frozen=True)
class BrokerConfig:
    listen: tuple[str, int]
    senders: dict[str, str | None]  # distributor name -> the source address it must use (None: any)
    keys_file: str | None  # None: the heartbeat's keys file
    key_id: int | None
    freshness: float
    document_root: Path
    state_dir: Path
    bundle_dir: Path
    max_file_size: int
    min_free: int
    allow: tuple[str, ...]
    user: str
    uid: int
    gid: int
    idle_cpu: float
    idle_load: float
    idle_for: float
    max_running: int
    output_limit: int
    time_limit: float
    memory_limit: int  # bytes
    nginx_pid_file: str | None
    access_log: str | None
    logs: tuple[str, ...]
    rotate_keep: int
    keep_results: int
    sample_interval: float
    io_nice: int = 10
    trusted_keys: tuple[bytes, ...] = field(default=())
    bundles_enabled: bool = True


def _strings(table: TableReader, name: str, default: list[str]) -> list[str]:
    value = table.get(name, default)
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise ConfigError(f"{table.key(name)}: {value!r} is not valid; expected a list of non-empty strings")
    return value


def _address(text: str, key: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        address = None
    if address is None or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise ConfigError(f"{key}: {text!r} is not valid; expected \"ADDRESS:PORT\" with the node's cluster-LAN address")
    if address.is_unspecified:
        raise ConfigError(f"{key}: {text!r} listens on every address; give the node's cluster-LAN address "
                          f"(the broker must not be reachable from outside)")
    return str(address), int(port)


def parse_broker_config(broker: TableReader, cpus: int | None = None) -> BrokerConfig:
    """``[broker]`` (with ``[broker.tasks]`` and ``[broker.bundles]``) of the agent's config."""
    cpus = cpus or os.cpu_count() or 1
    listen = _address(broker.string("listen"), broker.key("listen"))
    senders_value = broker.get("senders")
    if not isinstance(senders_value, dict) or not senders_value:
        raise ConfigError(f"{broker.key('senders')}: expected a table of distributor name = \"source address\" "
                          f"(\"\" for any), e.g. {{ dist1 = \"198.51.100.2\" }}")
    senders: dict[str, str | None] = {}
    for name, address in senders_value.items():
        if not isinstance(address, str):
            raise ConfigError(f"{broker.key('senders')}.{name}: {address!r} is not valid; expected an address or \"\"")
        if address:
            try:
                ipaddress.ip_address(address)
            except ValueError:
                raise ConfigError(f"{broker.key('senders')}.{name}: {address!r} is not an IP address") from None
        senders[name] = address or None
    keys_file = broker.get("keys_file", None)
    if keys_file is not None and (not isinstance(keys_file, str) or not keys_file):
        raise ConfigError(f"{broker.key('keys_file')}: {keys_file!r} is not valid; expected a path")
    key_id = broker.get("key_id", None)
    if key_id is not None and (isinstance(key_id, bool) or not isinstance(key_id, int)):
        raise ConfigError(f"{broker.key('key_id')}: {key_id!r} is not valid; expected an integer key id")
    state_dir = Path(broker.string("state_dir"))
    values: dict[str, Any] = dict(
        listen=listen, senders=senders, keys_file=keys_file, key_id=key_id,
        freshness=broker.number("freshness", 10.0, 0),
        document_root=Path(broker.string("document_root")),
        state_dir=state_dir,
        bundle_dir=Path(broker.string("bundle_dir", str(state_dir / "bundles"))),
        max_file_size=broker.integer("max_file_size", 1 << 30, 0, 1 << 50),
        min_free=broker.integer("min_free", 64 << 20, 0, 1 << 50),
        io_nice=broker.integer("io_nice", 10, 0, 19),
    )
    tasks = broker.table("tasks")
    allow = _strings(tasks, "allow", list(BUILTIN_TASKS))
    unknown = [name for name in allow if name not in BUILTIN_TASKS]
    if unknown:
        raise ConfigError(f"{tasks.key('allow')}: {unknown[0]!r} is not a built-in task; expected some of "
                          f"{', '.join(BUILTIN_TASKS)} (add other tasks as signed bundles)")
    user = tasks.string("user", "nobody")
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        raise ConfigError(f"{tasks.key('user')}: no user {user!r} on this system (bundles run as it)") from None
    if entry.pw_uid == 0:
        raise ConfigError(f"{tasks.key('user')}: {user!r} is root; bundles must run as an unprivileged user")
    access_log = tasks.get("access_log", None)
    nginx_pid_file = tasks.get("nginx_pid_file", None)
    for name, value in (("access_log", access_log), ("nginx_pid_file", nginx_pid_file)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ConfigError(f"{tasks.key(name)}: {value!r} is not valid; expected a path")
    values.update(
        allow=tuple(allow), user=user, uid=entry.pw_uid, gid=entry.pw_gid,
        idle_cpu=tasks.number("idle_cpu", 0.25, 0, inclusive=True),
        idle_load=tasks.number("idle_load", float(cpus), 0, inclusive=True),
        idle_for=tasks.number("idle_for", 10.0, 0, inclusive=True),
        max_running=tasks.integer("max_running", 1, 1, 64),
        output_limit=tasks.integer("output_limit", 64 << 10, 0, 16 << 20),
        time_limit=tasks.number("time_limit", 300.0, 0),
        memory_limit=tasks.integer("memory_limit", 256, 16, 65536) << 20,
        nginx_pid_file=nginx_pid_file, access_log=access_log,
        logs=tuple(_strings(tasks, "logs", [access_log] if access_log else [])),
        rotate_keep=tasks.integer("rotate_keep", 5, 1, 1000),
        keep_results=tasks.integer("keep_results", 1000, 1, 1_000_000),
        sample_interval=tasks.number("sample_interval", 1.0, 0),
    )
    if values["idle_cpu"] > 1:
        raise ConfigError(f"{tasks.key('idle_cpu')}: {values['idle_cpu']} is not valid; expected a fraction in [0, 1]")
    tasks.done()
    bundles = broker.table("bundles")
    trusted = []
    for text in _strings(bundles, "trusted_keys", []):
        try:
            trusted.append(parse_public_key(text))
        except ValueError as exc:
            raise ConfigError(f"{bundles.key('trusted_keys')}: {exc}") from None
    enabled = bundles.get("enabled", True)
    if not isinstance(enabled, bool):
        raise ConfigError(f"{bundles.key('enabled')}: {enabled!r} is not valid; expected true or false")
    bundles.done()
    broker.done()
    return BrokerConfig(trusted_keys=tuple(trusted), bundles_enabled=enabled and bool(trusted), **values)


def _lower_priority(nice: int) -> None:
    """Thread initializer: this worker thread only runs at ``nice`` (Linux: nice is per thread)."""
    if nice:
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
        except OSError as exc:
            log.warning("cannot lower the priority of a file worker thread: %s", exc)


class LoopLag:
    """How late the event loop runs a periodic timer: its worst lag and how often it passed two bounds."""

    def __init__(self, period: float = 0.1):
        self.period = period
        self.max_ms = 0.0
        self.over_50ms = 0
        self.over_200ms = 0

    async def watch(self) -> None:
        while True:
            due = time.monotonic() + self.period
            await asyncio.sleep(self.period)
            lag_ms = max(0.0, time.monotonic() - due) * 1000
            self.max_ms = max(self.max_ms, lag_ms)
            self.over_50ms += lag_ms > 50
            self.over_200ms += lag_ms > 200

    def stats(self) -> dict[str, float]:
        return {"max_ms": round(self.max_ms, 1), "over_50ms": self.over_50ms, "over_200ms": self.over_200ms}


class Refused(Exception):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _int_param(value: str | None, name: str) -> int:
    if value is None or not (value.isascii() and value.isdigit()) or len(value) > 19:
        raise Refused("bad_request", f"query parameter {name}={value!r} is not valid; expected a non-negative integer")
    return int(value)


class Broker:
    def __init__(self, config: BrokerConfig, node_id: str, keys: Keys, max_load: float, max_cpu: float,
                 cpu: CpuMeasure):
        """``max_load``/``max_cpu`` are the heartbeat's thresholds; ``cpu`` measures the CPU busy fraction
        (the agent passes its own ``CpuSampler``) for the tasks' priority gate."""
        self.config = config
        self.node_id = node_id
        self.keys = keys
        self.refusals: Counter[str] = Counter()
        self.changes: Counter[str] = Counter()
        self.sequence = SequenceCounter()
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.marks_file = config.state_dir / "replay-marks.json"
        try:
            marks = {str(k): int(v) for k, v in json.loads(self.marks_file.read_text()).items()}
        except FileNotFoundError:
            marks = {}
        self.verifier = RequestVerifier(keys, config.senders, config.freshness, marks)
        self._marks_lock = asyncio.Lock()
        self.stores = {
            "content": ContentStore("content", config.document_root, config.state_dir / "content-manifest.json",
                                    check_path, config.max_file_size, config.min_free),
            # Bundles are read by the agent (root) only; the task user gets its copy unpacked per run.
            "bundles": ContentStore("bundles", config.bundle_dir / "signed", config.state_dir / "bundles-manifest.json",
                                    check_bundle_name, MAX_BUNDLE_BYTES, config.min_free, file_mode=0o600),
        }
        gate = Gate(max_load, max_cpu, config.idle_load, config.idle_cpu, config.idle_for, config.max_running)
        settings = TaskSettings(
            allow=config.allow, user=config.uid, group=config.gid, output_limit=config.output_limit,
            time_limit=config.time_limit, memory_limit=config.memory_limit,
            builtin_settings={"nginx_pid_file": config.nginx_pid_file, "access_log": config.access_log,
                              "logs": list(config.logs), "rotate_keep": config.rotate_keep,
                              "document_root": str(config.document_root)},
            bundles_enabled=config.bundles_enabled, trusted_keys=config.trusted_keys,
            sample_interval=config.sample_interval)
        self.tasks = TaskService(settings, gate, config.state_dir, config.bundle_dir / "signed",
                                 config.bundle_dir / "run", cpu, config.keep_results)
        self._runner = None
        self.port: int | None = None
        self._io = concurrent.futures.ThreadPoolExecutor(4, "broker-io", _lower_priority, (config.io_nice,))
        self.loop_lag = LoopLag()
        self._lag_task: asyncio.Task | None = None

    # -- lifecycle -------------------------------------------------------------------
    def app(self):
        app = web.Application(middlewares=[self._authenticate], client_max_size=MAX_JSON_BODY)
        for area in self.stores:
            app.router.add_get(f"/v1/{area}/manifest", self._manifest)
            app.router.add_put(f"/v1/{area}", self._put)
            app.router.add_delete(f"/v1/{area}", self._delete)
            app.router.add_post(f"/v1/{area}/commit", self._commit)
        app.router.add_post("/v1/tasks", self._run_task)
        app.router.add_get("/v1/tasks", self._list_tasks)
        app.router.add_get("/v1/tasks/{id}", self._task)
        app.router.add_get("/v1/stats", self._stats)
        return app

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for store in self.stores.values():
            removed = await loop.run_in_executor(None, store.remove_leftovers)
            if removed:
                log.info("removed %d temporary file(s) an earlier run left in %s", removed, store.root)
        self.tasks.load()
        if self.config.bundles_enabled:
            problem = await loop.run_in_executor(None, self.tasks.unreachable)
            if problem:
                log.warning("%s", problem)
        await self.tasks.start()
        self._lag_task = asyncio.ensure_future(self.loop_lag.watch())
        self._runner = web.AppRunner(self.app(), access_log=None, handle_signals=False)
        await self._runner.setup()
        host, port = self.config.listen
        try:
            await web.TCPSite(self._runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await self._runner.cleanup()
            raise OSError(exc.errno, f"broker: cannot listen on {host}:{port} ([broker] listen): {exc.strerror}") from None
        self.port = self._runner.addresses[0][1]  # the bound port (the config may say 0: any)
        log.info("broker %s listening on %s:%d for %s (document root %s, content version %d)", self.node_id, host,
                 self.port, ", ".join(self.config.senders), self.config.document_root, self.stores["content"].version)

    async def stop(self) -> None:
        await self.tasks.stop()
        if self._lag_task is not None:
            self._lag_task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
        self._io.shutdown(wait=True)

    # -- authentication ----------------------------------------------------------------
    def _who(self, request) -> str:
        auth = request.get(AUTH)
        sender = auth.sender if auth else request.headers.get("X-Admin-Sender", "?")[:64]
        return f"{sender!r} from {request.remote}"

    def _count_refusal(self, request, reason: str, message: str) -> None:
        self.refusals[reason] += 1
        log.warning("refused %s %s for %s: %s (%s)", request.method, request.path[:200], self._who(request), reason, message)

    @web.middleware
    async def _authenticate(self, request, handler):
        auth, refusal = self.verifier.check(request.method, request.raw_path, request.headers, request.remote,
                                            time.time())
        if refusal is not None:
            self._count_refusal(request, refusal, "authentication failed")
            response = web.json_response({"error": refusal, "detail": "authentication failed"}, status=401)
            # Close the connection instead of reading and discarding whatever body an
            # unauthenticated sender declared (aiohttp would otherwise drain it for up to 10 s).
            response.force_close()
            return response
        request[AUTH] = auth
        async with self._marks_lock:  # one writer at a time, each writing the latest marks
            await asyncio.get_running_loop().run_in_executor(
                None, atomic_write, self.marks_file, json.dumps(self.verifier.marks()).encode())
        try:
            return await handler(request)
        except (Refused, StoreRefused, TaskRefused, PathRefused) as exc:
            self._count_refusal(request, exc.reason, str(exc))
            return self._reply(request, _STATUS.get(exc.reason, 400), {"error": exc.reason, "detail": str(exc)})
        except web.HTTPException as exc:  # e.g. 404 for an unknown route, 413 for a large JSON body
            reason = {413: "too_large", 404: "not_found", 405: "not_found"}.get(exc.status, "bad_request")
            self._count_refusal(request, reason, exc.reason)
            return self._reply(request, exc.status, {"error": reason, "detail": exc.reason})

    def _reply(self, request, status: int, payload: Any):
        body = json.dumps(payload, sort_keys=True).encode()
        auth = request[AUTH]
        now = time.time()
        headers = sign_response(self.keys, self.node_id, self.sequence.next(now), now, status, auth.sender,
                                auth.sequence, hashlib.sha256(body).hexdigest())
        return web.Response(status=status, body=body, headers=headers, content_type="application/json")

    async def _json(self, request) -> dict[str, Any]:
        body = await request.read()
        if hashlib.sha256(body).hexdigest() != request[AUTH].body_sha256:
            raise Refused("bad_digest", "the body is not the one the request's MAC covers")
        try:
            data = json.loads(body)
        except ValueError as exc:
            raise Refused("bad_request", f"body is not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise Refused("bad_request", "body must be a JSON object")
        return data

    # -- content and bundles --------------------------------------------------------------
    def _area(self, request) -> tuple[str, ContentStore]:
        area = request.path.split("/")[2]
        return area, self.stores[area]

    async def _manifest(self, request):
        _, store = self._area(request)
        return self._reply(request, 200, store.manifest())

    def _validate_bundle(self, upload: Upload) -> None:
        """Before a bundle is published: its signature verifies, its name is its path, no rollback."""
        try:
            bundle = open_bundle(upload.temp_bytes(MAX_BUNDLE_BYTES), self.config.trusted_keys)
        except BundleRefused as exc:
            raise StoreRefused(exc.reason, f"bundle {upload.path!r}: {exc}") from None
        if bundle.manifest.name != upload.path:
            raise StoreRefused("bad_bundle", f"bundle is named {bundle.manifest.name!r} but was sent as {upload.path!r}")
        if bundle.manifest.name in BUILTIN_TASKS:  # every built-in, allowed on this node or not
            raise StoreRefused("reserved", f"bundle {upload.path!r} has the name of a built-in task")
        try:
            installed = open_bundle((self.stores["bundles"].root / upload.path).read_bytes(), self.config.trusted_keys)
        except (FileNotFoundError, BundleRefused):
            return
        if bundle.manifest.version < installed.manifest.version:
            raise StoreRefused("rollback", f"bundle {upload.path!r} version {bundle.manifest.version} is older than "
                                           f"the installed version {installed.manifest.version}")

    async def _put(self, request):
        area, store = self._area(request)
        if area == "bundles" and not self.config.bundles_enabled:
            raise Refused("bundles_disabled", "this node trusts no operator key ([broker.bundles] trusted_keys)")
        path = request.query.get("path")
        version = _int_param(request.query.get("version"), "version")
        size = _int_param(request.query.get("size"), "size")
        if request.content_length is not None and request.content_length != size:
            raise Refused("bad_size", f"Content-Length {request.content_length} is not the declared size {size}")
        digest = request[AUTH].body_sha256
        loop = asyncio.get_running_loop()
        upload = await loop.run_in_executor(self._io, store.begin_put, path, version, size, digest)
        started = time.monotonic()
        try:
            async for chunk in request.content.iter_chunked(CHUNK):
                await loop.run_in_executor(self._io, upload.write, chunk)
            validate = self._validate_bundle if area == "bundles" else None
            await loop.run_in_executor(self._io, upload.finish, validate)
        except BaseException:
            await loop.run_in_executor(self._io, upload.abort)
            raise
        elapsed = time.monotonic() - started
        self.changes[f"{area}_put"] += 1
        log.info("%s put %r version %d (%d bytes, sha256 %s) in %.2f s for %s", area, upload.path, version, size,
                 digest[:16], elapsed, self._who(request))
        return self._reply(request, 200, {"path": upload.path, "version": version, "size": size, "sha256": digest})

    async def _delete(self, request):
        area, store = self._area(request)
        path = request.query.get("path")
        version = _int_param(request.query.get("version"), "version")
        existed = await asyncio.get_running_loop().run_in_executor(self._io, store.delete, path, version)
        self.changes[f"{area}_delete"] += 1
        log.info("%s delete %r version %d (%s) for %s", area, path, version,
                 "removed" if existed else "was not there", self._who(request))
        return self._reply(request, 200, {"path": path, "version": version, "removed": existed})

    async def _commit(self, request):
        area, store = self._area(request)
        data = await self._json(request)
        before = store.version
        await asyncio.get_running_loop().run_in_executor(self._io, store.commit, data.get("version"))
        if store.version != before:
            self.changes[f"{area}_commit"] += 1
            log.info("%s version %d -> %d for %s", area, before, store.version, self._who(request))
        return self._reply(request, 200, {"area": area, "version": store.version})

    # -- tasks ------------------------------------------------------------------------------
    async def _run_task(self, request):
        data = await self._json(request)
        request_id, name = data.get("id"), data.get("name")
        priority, args, not_after = data.get("priority"), data.get("args", {}), data.get("not_after")
        if not isinstance(request_id, str) or not _REQUEST_ID.fullmatch(request_id):
            raise Refused("bad_request", f"id {request_id!r} is not valid; expected 1-64 of A-Z a-z 0-9 . _ : -")
        if not isinstance(name, str) or not 0 < len(name) <= 64:
            raise Refused("bad_request", f"name {name!r} is not valid; expected a task name")
        if priority is not None and priority not in {p.value for p in Priority}:
            raise Refused("bad_request", f"priority {priority!r} is not valid; expected high, normal or low")
        if not isinstance(args, dict):
            raise Refused("bad_request", f"args {args!r} is not valid; expected a JSON object")
        if not_after is not None and (isinstance(not_after, bool) or not isinstance(not_after, (int, float))
                                      or not math.isfinite(not_after)):
            raise Refused("bad_request", f"not_after {not_after!r} is not valid; expected a wall time in seconds")
        record, new = await self.tasks.submit(request_id, name, priority, args, request[AUTH].sender, not_after)
        if new:
            self.changes["task_run"] += 1
        return self._reply(request, 202 if new else 200, record.to_dict())

    async def _task(self, request):
        record = self.tasks.get(request.match_info["id"])
        if record is None:
            raise Refused("not_found", f"no task request {request.match_info['id']!r} on {self.node_id}")
        return self._reply(request, 200, record.to_dict())

    async def _list_tasks(self, request):
        limit = _int_param(request.query.get("limit", "100"), "limit")
        return self._reply(request, 200, {"tasks": [r.to_dict() for r in self.tasks.recent(limit)]})

    async def _stats(self, request):
        return self._reply(request, 200, {
            "node": self.node_id,
            "refusals": dict(self.refusals),
            "changes": dict(self.changes),
            "content_version": self.stores["content"].version,
            "bundles_version": self.stores["bundles"].version,
            "tasks": self.tasks.stats(),
            "loop_lag": self.loop_lag.stats(),
        })
