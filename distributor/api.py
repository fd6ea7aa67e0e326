"""The control API and the web console, served by the daemon (adapter, aiohttp).

Contract
--------
:class:`ControlApi` serves JSON under ``/api/v1`` on a management address (never a VIP), and the
console at ``/``.  Every request is authenticated: a bearer token (``Authorization: Bearer T``) or
the console's session cookie, made by a one-time login link.  Tokens have one of two roles:
``viewer`` reads, ``admin`` also changes.  A missing or unknown token is 401, a viewer's change
403; neither changes anything.

Reads come from the core's snapshots (``core.stats``, ``core.node_view``, ``core.service_views``,
``core.connections``, ``core.explain``); the takeover phases are the metrics' own
(:func:`~distributor.metrics.takeover_phases`), so the console and the histogram agree.  Changes
are :class:`~distributor.admin.AdminRequest` events fed to the core through the runtime, whose
:class:`~distributor.admin.AdminReply` answers the HTTP request with its status.  The API decides
nothing about nodes or roles: the core validates, refuses a change on a distributor that is not
the active one (409, naming the active), applies, logs who made the change, saves and replicates
it.

Endpoints (GET unless said)::

    /health                                   200 while the daemon runs (no token needed)
    /api/v1/status                            the distributor, its mode, role, runtime state version
    /api/v1/nodes                             every node: state, counter, weight, connections, new/s
    /api/v1/nodes/{node}                      one node; POST .../drain, .../maint, .../ready,
                                              PUT .../weight {"weight": W[, "service": S]},
                                              DELETE removes it
    POST /api/v1/nodes                        add {"name", "address", "services": {S: {"port", "weight"}}}
    /api/v1/services                          services, policies, their nodes; PUT .../{s}/policy {"policy"}
    /api/v1/explain?client=A[:P][&service=S]  where a new connection from A:P would go, and why
    /api/v1/connections?node=N&limit=L        table entries
    /api/v1/failover                          role, term, peers, replication lag, last takeover's
                                              phases (seconds: decided, claimed, first_forward)
    /api/v1/events?since=ID                   recent events; /api/v1/events/stream: server-sent events
    POST /api/v1/login-links                  (admin) a one-time console login link
    /, /login?once=CODE                       the console; the link sets its session cookie

Content and tasks on the nodes (with an ``[administration]`` section; docs/administration.md)::

    /api/v1/content                           the content status: the desired version and paths; per node
                                              its state, version, every managed path's version and digest,
                                              what differs; the nodes that differ
    PUT /api/v1/content?path=DEST             push: the body is streamed into the blob store (never whole
                                              in memory).  application/octet-stream: one file at DEST;
                                              application/x-tar (plain or compressed): a tree, every regular
                                              file under DEST/ ("" or "/": the document root), all or nothing.
                                              With &check=1&size=N: only whether it would be taken now
    DELETE /api/v1/content?path=DEST          delete a managed path, or every managed path under DEST/
    POST /api/v1/tasks                        run {"name", "nodes"?: [...], "priority"?, "args"?}
    /api/v1/tasks?limit=N, /api/v1/tasks/ID   task requests; one with each node's state, exit status,
                                              output and duration
    /api/v1/bundles                           the signed task bundles every node must hold (what each
                                              manifest says), per node its bundles version and what differs
    POST /api/v1/bundles                      add a signed bundle (the body: the file distributor-sign made,
                                              at most 4 MiB), or a new version of one; distributed like content
    DELETE /api/v1/bundles/NAME               remove a bundle from every node

A bundle's shape is checked here (JSON, format, manifest, every file's digest, the signature's form)
with the rules the nodes apply (:mod:`common.bundle`), but not its signature: the distributor holds
no operator key, and every node verifies the signature against the keys it trusts.

A push's destination is checked before a byte is read (a bad path is refused, counted and logged with
who asked, as every refusal and change is), and so is the role: only the active distributor takes
changes (409 naming the active).  The core decides everything else (:mod:`distributor.contentcore`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import collections
import hashlib
import hmac
import html
import ipaddress
import itertools
import json
import logging
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from aiohttp import web

from common import bundle as bundles
from common.paths import PathRefused

from .admin import AdminOp, AdminReply, AdminRequest
from .blobstore import BlobStore, TreeRefused
from .contentcore import (BundleAdd, BundleRemove, BundleSpec, ContentDelete, ContentPut, ContentRefused, FileSpec,
                          TaskRequested, destination_refusal, tree_prefix)
from .metrics import PHASES, takeover_phases

__all__ = ["ApiToken", "ControlApi", "EventLog", "parse_token_file", "inspect_bundle"]

log = logging.getLogger("distributor.api")

CONSOLE = Path(__file__).with_name("console.html")
SESSION_COOKIE = "distributor_session"
LINK_LIFETIME = 300.0  # seconds a one-time login link stays valid
SESSION_LIFETIME = 12 * 3600.0
REPLY_TIMEOUT = 10.0
UPLOAD_CHUNK = 1 << 20  # bytes handed to a worker thread at a time (hashed and written there, off the loop)
TAR_TYPES = ("application/x-tar", "application/tar", "application/gzip", "application/x-gzip")


@dataclass(frozen=True)
class ApiToken:
    name: str  # who: every change is logged with it
    role: str  # "viewer" or "admin"
    token: str


def parse_token_file(text: str, source: str) -> list[ApiToken]:
    """``ROLE NAME TOKEN`` per line (``#`` comments); raises ValueError naming the line."""
    tokens = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in ("viewer", "admin") or len(parts[2]) < 16:
            raise ValueError(f"{source}:{number}: expected 'viewer|admin NAME TOKEN' with a token of 16 or more "
                             f"characters, got {line[:40]!r}")
        tokens.append(ApiToken(parts[1], parts[0], parts[2]))
    return tokens


class EventLog:
    """Recent events (alerts, warnings, changes) with ids, for /api/v1/events and the console's stream."""

    def __init__(self, size: int = 500):
        self._events: collections.deque[dict] = collections.deque(maxlen=size)
        self._ids = itertools.count(1)
        self._listeners: set[asyncio.Queue] = set()

    def add(self, kind: str, **fields: Any) -> None:
        event = {"id": next(self._ids), "time": time.time(), "kind": kind, **fields}
        self._events.append(event)
        for queue in list(self._listeners):
            if queue.qsize() < 1000:
                queue.put_nowait(event)

    def since(self, last: int) -> list[dict]:
        return [e for e in self._events if e["id"] > last]

    def subscribe(self) -> asyncio.Queue:
        queue: asyncio.Queue = asyncio.Queue()
        self._listeners.add(queue)
        return queue

    def unsubscribe(self, queue: asyncio.Queue) -> None:
        self._listeners.discard(queue)


class ControlApi:
    def __init__(self, core, feed: Callable[[object], None], tokens: list[ApiToken], events: EventLog,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 role: Callable[[], str] = lambda: "alone", mode: str = "", name: str = "",
                 blobs: BlobStore | None = None, max_upload: int = 1 << 30):
        """``blobs``: where pushed content goes (content management on); ``max_upload``: bytes one push may have."""
        self.core = core
        self.blobs = blobs
        self.max_upload = max_upload
        self.feed = feed
        self.events = events
        self.clock = clock
        self.wall_clock = wall_clock
        self.role = role
        self.mode = mode
        self.name = name
        self._tokens = {t.token: t for t in tokens}
        self._links: dict[str, tuple[ApiToken, float]] = {}
        self._sessions: dict[str, tuple[ApiToken, float]] = {}
        self._pending: dict[int, asyncio.Future] = {}
        self._ids = itertools.count(1)
        self._rates: dict[str, tuple[float, int, float]] = {}  # node -> (time, connections total, rate)
        self._runner: web.AppRunner | None = None
        self._streams: set[asyncio.Task] = set()  # open event streams: ended at stop, not left to their next write
        self.base_url = ""

    # -- the core's answers ------------------------------------------------------------------------------
    def reply(self, command: AdminReply) -> None:
        """The executor of AdminReply: hand the answer to the request waiting for it."""
        future = self._pending.pop(command.request_id, None)
        if future is not None and not future.done():
            future.set_result(command)

    # -- serving ----------------------------------------------------------------------------------------
    async def start(self, host: str, port: int) -> None:
        app = web.Application(middlewares=[self._errors])
        r = app.router
        r.add_get("/health", self.health)
        r.add_get("/", self.console)
        r.add_get("/login", self.login)
        r.add_get("/api/v1/status", self.status)
        r.add_get("/api/v1/nodes", self.nodes)
        r.add_post("/api/v1/nodes", self.add_node)
        r.add_get("/api/v1/nodes/{node}", self.node)
        r.add_delete("/api/v1/nodes/{node}", self.remove_node)
        r.add_post("/api/v1/nodes/{node}/drain", self.drain)
        r.add_post("/api/v1/nodes/{node}/maint", self.maint)
        r.add_post("/api/v1/nodes/{node}/ready", self.ready)
        r.add_put("/api/v1/nodes/{node}/weight", self.weight)
        r.add_get("/api/v1/services", self.services)
        r.add_put("/api/v1/services/{service}/policy", self.policy)
        r.add_get("/api/v1/explain", self.explain)
        r.add_get("/api/v1/connections", self.connections)
        r.add_get("/api/v1/failover", self.failover)
        r.add_get("/api/v1/events", self.event_list)
        r.add_get("/api/v1/events/stream", self.event_stream)
        r.add_post("/api/v1/login-links", self.login_link)
        r.add_get("/api/v1/content", self.content_status)
        r.add_put("/api/v1/content", self.content_put)
        r.add_delete("/api/v1/content", self.content_delete)
        r.add_get("/api/v1/tasks", self.task_list)
        r.add_post("/api/v1/tasks", self.task_run)
        r.add_get("/api/v1/tasks/{task}", self.task_show)
        r.add_get("/api/v1/bundles", self.bundle_status)
        r.add_post("/api/v1/bundles", self.bundle_add)
        r.add_delete("/api/v1/bundles/{name}", self.bundle_remove)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        shown = f"[{host}]" if ":" in host else host
        self.base_url = f"http://{shown}:{port}"
        log.info("control API and console on %s/", self.base_url)

    async def stop(self) -> None:
        for future in self._pending.values():
            if not future.done():
                future.cancel()
        for task in list(self._streams):
            task.cancel()
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @web.middleware
    async def _errors(self, request: web.Request, handler):
        try:
            return await handler(request)
        except web.HTTPException:
            raise
        except (UnicodeDecodeError, UnicodeEncodeError) as exc:
            # Not ``exc.args[0]`` (the codec's name): say which input was not valid text.
            return _json({"error": f"the request is not valid UTF-8 text ({exc.reason} at byte {exc.start})"}, 400)
        except (KeyError, ValueError) as exc:
            return _json({"error": str(exc.args[0]) if exc.args else str(exc)}, 404 if isinstance(exc, KeyError) else 400)

    # -- who is asking ------------------------------------------------------------------------------------
    def _who(self, request: web.Request) -> ApiToken:
        return self._authenticate(request)[0]

    def _authenticate(self, request: web.Request) -> tuple[ApiToken, bool]:
        """Who is asking, and whether the console's session cookie (not a token) said so."""
        header = request.headers.get("Authorization", "")
        if header.startswith("Bearer ") and header.isascii():  # tokens are ASCII; anything else matches none
            token = self._match(header[7:].strip())
            if token is not None:
                return token, False
        session = request.cookies.get(SESSION_COOKIE)
        if session:
            found = self._sessions.get(session)
            if found is not None and found[1] > self.clock():
                return found[0], True
        raise web.HTTPUnauthorized(text=json.dumps({"error": "a valid bearer token is needed (Authorization: Bearer "
                                                             "TOKEN), or a console session"}),
                                   content_type="application/json", headers={"WWW-Authenticate": "Bearer"})

    def _match(self, presented: str) -> ApiToken | None:
        for token, identity in self._tokens.items():
            if hmac.compare_digest(token.encode(), presented.encode()):
                return identity
        return None

    def _admin(self, request: web.Request) -> ApiToken:
        who, by_session = self._authenticate(request)
        if who.role != "admin":
            raise web.HTTPForbidden(text=json.dumps({"error": f"{who.name} has the viewer role; changes need an "
                                                              "admin token"}), content_type="application/json")
        if by_session and request.headers.get("X-Requested-With") != "distributor-console":
            # A cookie alone must not be enough for a change: another site's form could send it
            # (whatever else the request carries: an Authorization header that matched no token too).
            raise web.HTTPForbidden(text=json.dumps({"error": "console changes need the console's header"}),
                                    content_type="application/json")
        return who

    # -- reads ----------------------------------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "role": self.role()})

    async def status(self, request: web.Request) -> web.Response:
        self._who(request)
        stats = self.core.stats(self.clock())
        return _json({"name": self.name, "mode": self.mode, "role": self.role(), "state_version": stats.state_version,
                      "connections": stats.interposer.connections, "capacity": stats.interposer.capacity})

    def _node_views(self) -> list[dict]:
        now = self.clock()
        views = []
        for node in self.core.nodes():
            view = self.core.node_view(node, now)
            view["new_per_second"] = self._rate(node, sum(s["connections_total"] for s in view["services"]), now)
            views.append(view)
        return views

    def _rate(self, node: str, total: int, now: float) -> float:
        last = self._rates.get(node)
        if last is None:
            self._rates[node] = (now, total, 0.0)
            return 0.0
        at, before, rate = last
        if now - at >= 1.0:
            rate = (total - before) / (now - at)
            self._rates[node] = (now, total, rate)
        return round(rate, 1)

    async def nodes(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self._node_views())

    async def node(self, request: web.Request) -> web.Response:
        self._who(request)
        name = request.match_info["node"]
        if name not in self.core.nodes():
            raise KeyError(f"no node {name!r}")
        return _json(self.core.node_view(name, self.clock()))

    async def services(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json([{"name": service.name, "vip": service.vip, "port": service.port, "policy": service.policy,
                       "nodes": list(service.nodes)} for service in self.core.service_views()])

    async def explain(self, request: web.Request) -> web.Response:
        self._who(request)
        given = request.query.get("client", "")
        client, port = given, request.query.get("port")
        if client.startswith("[") and "]:" in client:
            client, port = client[1:].split("]:", 1)
        elif client.startswith("[") and client.endswith("]"):
            client = client[1:-1]
        elif client.count(":") == 1:
            client, port = client.split(":")
        try:
            ipaddress.ip_address(client)
        except ValueError:
            raise ValueError(f"client {given!r}: expected an IPv4 address, optionally with :PORT (1-65535), or an "
                             "IPv6 address, optionally as [ADDRESS]:PORT") from None
        # ASCII digits only: int() also takes "+80", "1_000", " 80" and other scripts' digits.
        if port is not None and not (port.isascii() and port.isdigit() and 1 <= int(port) <= 65535):
            raise ValueError(f"port {port!r} is not valid; expected a number from 1 to 65535")
        return _json(self.core.explain(client, int(port) if port is not None else 40000, request.query.get("service"),
                                       self.clock()))

    async def connections(self, request: web.Request) -> web.Response:
        self._who(request)
        node = request.query.get("node")
        limit = min(_whole(request, "limit", 100), 10_000)
        return _json([{"client": conn.client, "vip": conn.vip, "service": conn.service, "node": conn.node,
                       "state": conn.state, "idle": round(conn.idle, 3)}
                      for conn in self.core.connections(self.clock(), node, limit)])

    async def failover(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self._failover_view())

    def _failover_view(self) -> dict:
        stats = self.core.stats(self.clock()).failover
        if stats is None:
            return {"role": "alone", "peers": []}
        takeover = stats.last_takeover
        phases = None
        if takeover is not None:
            # The metrics' phases, so the console and the histogram agree: each phase from the one before
            # (decided from the old active's last heartbeat), first_forward without idle time; None while
            # unknown, and decided is None for a first election (there was no old active).
            known = takeover_phases(takeover)
            phases = {"term": takeover.term,
                      **{phase: round(known[phase], 4) if phase in known else None for phase in PHASES}}
        return {"role": stats.role.name.lower(), "term": stats.term, "caught_up": stats.caught_up,
                "replication_lag_batches": stats.lag_batches,
                "peers": [{"name": p.name, "role": p.role.name.lower(), "alive": p.alive, "term": p.term,
                           "priority": p.priority} for p in stats.peers],
                "last_takeover": phases}

    async def event_list(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self.events.since(_whole(request, "since", 0)))

    async def event_stream(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: every event as it happens (``event``), and once a second the nodes, this
        distributor's role and its failover view (``nodes``: ``{"nodes", "role", "failover"}``)."""
        self._who(request)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue = self.events.subscribe()
        task = asyncio.current_task()
        if task is not None:
            self._streams.add(task)
        try:
            await response.write(_sse("nodes", self._snapshot()))
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), 1.0)
                    await response.write(_sse("event", event))
                except asyncio.TimeoutError:
                    await response.write(_sse("nodes", self._snapshot()))
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.events.unsubscribe(queue)
            self._streams.discard(task)
        return response

    def _snapshot(self) -> dict:
        # One shape for every "nodes" event, the first included: a client needs one parser.
        return {"nodes": self._node_views(), "role": self.role(), "failover": self._failover_view()}

    # -- changes ----------------------------------------------------------------------------------------------
    async def _change(self, request: web.Request, op: AdminOp, args: dict) -> web.Response:
        who = self._admin(request)
        return await self._submit(lambda request_id, now, wall: AdminRequest(request_id, op, args, who.name, now, wall),
                                  who, op.value, args)

    async def _submit(self, make_event: Callable[[int, float, float], object], who: ApiToken, op: str,
                      args: dict) -> web.Response:
        """Feed the core one change (``make_event(request_id, now, wall)``) and answer with its AdminReply."""
        request_id = next(self._ids)
        future = asyncio.get_running_loop().create_future()
        self._pending[request_id] = future
        try:
            self.feed(make_event(request_id, self.clock(), self.wall_clock()))
            reply: AdminReply = await asyncio.wait_for(future, REPLY_TIMEOUT)
        except asyncio.TimeoutError:
            return _json({"error": "the core did not answer in time"}, 504)
        finally:
            self._pending.pop(request_id, None)  # answered, timed out, or the feed raised: never left behind
        if reply.status == 200 and not reply.body.get("unchanged"):
            self.events.add("change", who=who.name, op=op, args=args)
        return _json(dict(reply.body), reply.status)

    async def _body(self, request: web.Request) -> dict:
        if not request.can_read_body:
            return {}
        try:
            body = await request.json()
        except json.JSONDecodeError as exc:
            raise ValueError(f"the body is not JSON: {exc}") from None
        except RecursionError:
            raise ValueError("the body is not JSON this API takes: nested too deeply") from None
        if not isinstance(body, dict):
            raise ValueError("the body must be a JSON object")
        return body

    async def add_node(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return await self._change(request, AdminOp.ADD_NODE, {"node": body.get("name"), "address": body.get("address"),
                                                              "services": body.get("services")})

    async def remove_node(self, request: web.Request) -> web.Response:
        return await self._change(request, AdminOp.REMOVE_NODE, {"node": request.match_info["node"]})

    async def drain(self, request: web.Request) -> web.Response:
        return await self._change(request, AdminOp.DRAIN, {"node": request.match_info["node"]})

    async def maint(self, request: web.Request) -> web.Response:
        return await self._change(request, AdminOp.MAINT, {"node": request.match_info["node"]})

    async def ready(self, request: web.Request) -> web.Response:
        return await self._change(request, AdminOp.READY, {"node": request.match_info["node"]})

    async def weight(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        args = {"node": request.match_info["node"], "weight": body.get("weight")}
        if body.get("service") is not None:
            args["service"] = body["service"]
        return await self._change(request, AdminOp.SET_WEIGHT, args)

    async def policy(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        return await self._change(request, AdminOp.SET_POLICY, {"service": request.match_info["service"],
                                                                "policy": body.get("policy")})

    # -- content and tasks on the nodes ---------------------------------------------------------------------
    def _content_core(self):
        content = getattr(self.core, "content", None)
        if content is None or self.blobs is None:
            raise web.HTTPNotFound(text=json.dumps({"error": "content and task management is off: the distributor's "
                                                             "config has no [administration] section"}),
                                   content_type="application/json")
        return content

    def _refuse_content(self, who: ApiToken, reason: str, detail: str, status: int = 400,
                        what: str = "content change") -> web.Response:
        """A content request refused before it reached the core: the core counts and logs it."""
        self.feed(ContentRefused(reason, detail, who.name, self.clock(), what))
        return _json({"error": detail, "reason": reason}, status)

    async def content_status(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self._content_core().status(self.wall_clock()))

    async def content_put(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        self._content_core()
        refusal = self.core.change_refusal()
        if refusal is not None:  # before a byte of the body is read
            return _json(refusal, 409)
        tree = request.content_type in TAR_TYPES
        path = request.query.get("path", "")
        if tree:
            path = path.strip("/")
        problem = destination_refusal(path, tree)
        if problem is not None:
            return self._refuse_content(who, problem.reason, str(problem))
        declared = request.content_length if "check" not in request.query else _whole(request, "size", 0)
        if declared is not None and declared > self.max_upload:
            return self._refuse_content(who, "too_large", f"the push has {declared} bytes; at most {self.max_upload} "
                                                          "(administration.max_upload)", 413)
        if "check" in request.query:  # a preflight: would this push be taken now?  (distributorctl asks first,
            return _json({"ok": True, "path": path, "tree": tree})  # so a refusal never meets a half-sent body)
        assert self.blobs is not None
        writer = await asyncio.to_thread(self.blobs.writer)
        try:
            received = await self._receive(request, writer)
            if received is None:
                return self._refuse_content(who, "too_large", f"the push has more than {self.max_upload} bytes "
                                                              "(administration.max_upload)", 413)
            if tree:
                archive = await asyncio.to_thread(writer.close)
                try:
                    found = await asyncio.to_thread(self.blobs.ingest_tar, archive, tree_prefix(path))
                except (TreeRefused, PathRefused) as exc:
                    return self._refuse_content(who, exc.reason, f"in the tree: {exc}")
                files = tuple(FileSpec(p, size, sha256) for p, sha256, size in found)
            else:
                sha256, size = await asyncio.to_thread(writer.commit)
                files = (FileSpec(path, size, sha256),)
        finally:
            await asyncio.to_thread(writer.abort)
        args = ({"tree": path or "/", "files": len(files), "bytes": sum(f.size for f in files)} if tree
                else {"path": path, "bytes": files[0].size, "sha256": files[0].sha256})
        return await self._submit(lambda request_id, now, wall: ContentPut(request_id, files, who.name, now, wall,
                                                                           tree=path if tree else None),
                                  who, "content_put", args)

    async def _receive(self, request: web.Request, writer) -> int | None:
        """Stream the body into ``writer`` a chunk at a time; its size, or None past max_upload."""
        size = 0
        buffer = bytearray()
        while True:
            chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > self.max_upload:
                return None
            buffer += chunk
            if len(buffer) >= UPLOAD_CHUNK:
                await asyncio.to_thread(writer.write, bytes(buffer))
                buffer.clear()
        if buffer:
            await asyncio.to_thread(writer.write, bytes(buffer))
        return size

    async def content_delete(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        self._content_core()
        path = request.query.get("path", "").strip("/")
        problem = destination_refusal(path, tree=False)
        if problem is not None:
            return self._refuse_content(who, problem.reason, str(problem))
        return await self._submit(lambda request_id, now, wall: ContentDelete(request_id, path, who.name, now, wall),
                                  who, "content_delete", {"path": path})

    async def task_run(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        self._content_core()
        body = await self._body(request)
        name, nodes, priority, args = body.get("name"), body.get("nodes"), body.get("priority"), body.get("args", {})
        if not isinstance(name, str):
            raise ValueError(f"name {name!r} is not valid; expected a task's name such as \"disk-usage\"")
        if nodes is not None and (not isinstance(nodes, list) or not all(isinstance(n, str) for n in nodes)):
            raise ValueError(f"nodes {nodes!r} is not valid; expected a list of node names, or null for every node")
        if priority is not None and not isinstance(priority, str):
            raise ValueError(f"priority {priority!r} is not valid; expected high, normal or low")
        if not isinstance(args, dict):
            raise ValueError(f"args {args!r} is not valid; expected an object")
        task_id = secrets.token_hex(8)
        return await self._submit(lambda request_id, now, wall: TaskRequested(
            request_id, task_id, name, tuple(nodes) if nodes is not None else None, priority, args, who.name, now, wall),
            who, "task_run", {"name": name, "id": task_id, "nodes": ",".join(nodes) if nodes else "all",
                              "priority": priority or "default"})

    async def bundle_status(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self._content_core().bundle_status(self.wall_clock()))

    async def bundle_add(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        self._content_core()
        refusal = self.core.change_refusal()
        if refusal is not None:  # before a byte of the body is read
            return _json(refusal, 409)
        limit = bundles.MAX_BUNDLE_BYTES
        too_large = f"a bundle has at most {limit} bytes"
        if request.content_length is not None and request.content_length > limit:
            return self._refuse_content(who, "too_large", f"{too_large}; this one {request.content_length}", 413,
                                        "bundle add")
        data = bytearray()
        while chunk := await request.content.readany():
            data += chunk
            if len(data) > limit:
                return self._refuse_content(who, "too_large", too_large, 413, "bundle add")
        try:
            manifest, key = inspect_bundle(bytes(data))
        except bundles.BundleRefused as exc:
            return self._refuse_content(who, "bad_bundle", str(exc), 400, "bundle add")
        assert self.blobs is not None
        sha256, size = await asyncio.to_thread(_store, self.blobs, bytes(data))
        spec = BundleSpec(manifest.name, manifest.version, manifest.priority, manifest.time_limit,
                          manifest.memory_limit, key, size, sha256, manifest.description, manifest.signed_at)
        return await self._submit(lambda request_id, now, wall: BundleAdd(request_id, spec, who.name, now, wall),
                                  who, "bundle_add", {"name": spec.name, "version": spec.version, "key": key,
                                                      "sha256": sha256})

    async def bundle_remove(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        self._content_core()
        name = request.match_info["name"]
        return await self._submit(lambda request_id, now, wall: BundleRemove(request_id, name, who.name, now, wall),
                                  who, "bundle_remove", {"name": name})

    async def task_list(self, request: web.Request) -> web.Response:
        self._who(request)
        limit = _whole(request, "limit", 100)
        return _json(self._content_core().task_list(max(1, min(limit, 10_000))))

    async def task_show(self, request: web.Request) -> web.Response:
        self._who(request)
        return _json(self._content_core().task_view(request.match_info["task"]))

    # -- the console ------------------------------------------------------------------------------------------
    async def login_link(self, request: web.Request) -> web.Response:
        who = self._admin(request)
        role = (await self._body(request)).get("role", who.role)
        if role not in ("viewer", "admin"):
            raise ValueError(f"role {role!r} is not valid; expected viewer or admin")
        code = secrets.token_urlsafe(24)
        self._links[code] = (ApiToken(who.name, role, ""), self.clock() + LINK_LIFETIME)
        log.info("one-time console link for %s (%s), valid %.0f s", who.name, role, LINK_LIFETIME)
        return _json({"url": f"{self.base_url}/login?once={code}", "expires_in": LINK_LIFETIME})

    async def login(self, request: web.Request) -> web.Response:
        code = request.query.get("once", "")
        found = self._links.pop(code, None)  # one use only
        if found is None or found[1] < self.clock():
            return web.Response(status=401, text="this login link is unknown, used or expired; ask for a new one "
                                                 "(distributorctl console-url)\n")
        session = secrets.token_urlsafe(32)
        self._sessions[session] = (found[0], self.clock() + SESSION_LIFETIME)
        response = web.HTTPFound("/")
        response.set_cookie(SESSION_COOKIE, session, httponly=True, samesite="Strict", max_age=int(SESSION_LIFETIME))
        raise response  # aiohttp deprecates returning an HTTPException

    async def console(self, request: web.Request) -> web.Response:
        try:
            who = self._who(request)
        except web.HTTPUnauthorized:
            return web.Response(status=401, text="sign in with a one-time link (distributorctl console-url)\n")
        # Token names come from a file an operator writes; escaped, a name with "<" cannot become markup.
        page = CONSOLE.read_text().replace("{{ROLE}}", html.escape(who.role)).replace("{{USER}}", html.escape(who.name))
        return web.Response(text=page, content_type="text/html")


def inspect_bundle(data: bytes) -> tuple[bundles.BundleManifest, str]:
    """A signed bundle's manifest and the fingerprint of the key it names; raises BundleRefused ("bad_bundle").

    Everything a node checks before it trusts a bundle (:func:`common.bundle.open_bundle`: size, JSON, format,
    the manifest's fields, the files against their digests), and the signature's form, but not the signature
    itself: the distributor holds no operator key (bundles are signed offline), the nodes verify it."""
    def refuse(message: str) -> bundles.BundleRefused:
        return bundles.BundleRefused("bad_bundle", message)

    if len(data) > bundles.MAX_BUNDLE_BYTES:
        raise refuse(f"bundle of {len(data)} bytes exceeds {bundles.MAX_BUNDLE_BYTES}")
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as exc:
        raise refuse(f"bundle is not JSON (is it the file distributor-sign made?): {exc}") from None
    if not isinstance(document, dict) or document.get("format") != bundles.FORMAT:
        raise refuse(f"bundle format is not {bundles.FORMAT!r}")
    signature, manifest_data, encoded = document.get("signature"), document.get("manifest"), document.get("files")
    if not isinstance(signature, dict) or not isinstance(manifest_data, dict) or not isinstance(encoded, dict):
        raise refuse("bundle lacks its signature, manifest or files")
    key = signature.get("key")
    if not isinstance(key, str) or not re.fullmatch(r"[0-9a-f]{16}", key):
        raise refuse(f"bundle signature names key {str(key)[:20]!r}; expected a fingerprint of 16 hex digits")
    try:
        raw = base64.b64decode(str(signature.get("ed25519", "")), validate=True)
    except binascii.Error:
        raw = b""
    if len(raw) != 64:
        raise refuse("bundle signature is not an Ed25519 signature (base64 of 64 bytes)")
    # The nodes' own manifest rules (common.bundle's), so the distributor takes nothing every node would refuse.
    manifest = bundles.check_manifest(manifest_data)
    if set(encoded) != set(manifest.files):
        raise refuse("bundle files differ from the ones its manifest lists")
    for name, meta in manifest.files.items():
        try:
            content = base64.b64decode(str(encoded[name]), validate=True)
        except binascii.Error:
            raise refuse(f"bundle file {name!r} is not base64") from None
        if hashlib.sha256(content).hexdigest() != meta["sha256"]:
            raise refuse(f"bundle file {name!r} does not match its signed digest")
    return manifest, key


def _store(blobs: BlobStore, data: bytes) -> tuple[str, int]:
    """Put ``data`` in the blob store (blocking): (sha256, size)."""
    writer = blobs.writer()
    try:
        writer.write(data)
        return writer.commit()
    finally:
        writer.abort()


def _whole(request: web.Request, name: str, default: int) -> int:
    """A query parameter that must be a whole number >= 0; ValueError (a 400) naming it otherwise."""
    text = request.query.get(name)
    if text is None:
        return default
    if not text.isascii() or not text.isdigit() or len(text) > 18:  # ASCII: isdigit takes other scripts' digits
        raise ValueError(f"{name}={text[:40]!r} is not valid; expected a whole number >= 0")
    return int(text)


def _json(body: Any, status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(body), status=status, content_type="application/json")


def _sse(name: str, data: Any) -> bytes:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n".encode()
