"""Cluster administration decisions: content syncs, the content gate, task requests (pure).

Contract
--------
:class:`ContentCore` decides, the adapter (:class:`distributor.adminclient.NodeAdministrator`) talks
to the node brokers.  It is composed into :class:`~distributor.core.DistributorCore`, which routes
events to it and applies its gate to the balancer; it never reads a clock and never touches a socket.

* Events in: the operator's :class:`ContentPut`, :class:`ContentDelete`, :class:`TaskRequested`,
  :class:`BundleAdd`, :class:`BundleRemove` (from the control API, who asked included) and
  :class:`ContentRefused` (a request the API refused before it reached the core: counted and logged
  here); what a broker answered,
  :class:`SyncReported` and :class:`TaskReported`; the distributor core's view of the cluster,
  :class:`NodesChanged` (the layout), :class:`NodeLiveness` (heartbeating, or dead),
  :class:`ActiveChanged` (only the active distributor administers) and, on a standby,
  :class:`DesiredReplicated` (the active's desired content); and :class:`~common.sansio.Tick`
  (the distributor core ticks at least every second).
* Commands out: :class:`SyncNode`, :class:`RunTask`, :class:`FetchTask` (one node each, carried
  out off the packet path), :class:`SetContentGate`, :class:`SaveAdministration` (the state file),
  :class:`CollectBlobs`, :class:`~distributor.admin.AdminReply` (the API's answer),
  :class:`~common.sansio.Log` and :class:`~common.sansio.WakeUpAt`.

Content
-------
Every change (a put of one file or a tree, a delete of a path or of everything under it) is one or
more numbered versions of :class:`~distributor.content.DesiredContent`.  Each node has a content
state (:class:`ContentState`), moved only through the table :data:`CONTENT_MOVES`:

* ``matches``: the node was confirmed to hold the desired version (or, after a restart, was
  confirmed at it before and is being checked again);
* ``updating``: it matched, a change was made, and its sync toward it is on the way: it serves the
  previous version, which is whole (every file is published atomically), so it keeps serving;
* ``behind``: it is known to lack a change: it was dead or unreachable during one, a sync failed,
  a check found a difference, it is new, or it came back from the dead (its disk could be anything
  until checked);
* ``ahead``: it holds a newer version than this distributor (the desired state was lost, or another
  distributor pushed): never rolled back (:func:`~distributor.content.plan` refuses), never held out.

Which node gets a sync (:class:`SyncNode`, one at a time per node; a change during a sync asks for
another after it): every node that is not dead at each change; a node whose heartbeats return after
it was dead; a node whose sync failed, again after ``retry`` seconds doubling to ``max_retry``
(nodes that heartbeat but whose broker does not answer); every node every ``check_interval``
seconds (anti-entropy: drift is found and repaired); every node when this distributor becomes the
active one.  A dead node is not contacted: it is ``behind`` for every change it misses.

**The content gate** (:class:`SetContentGate`): a ``behind`` node takes no new connections while
another live node has content to serve (``matches`` or ``updating``), until a sync reports that it
matches.  Content never empties the cluster: when no live node matches, nobody is held out for
content (and the mismatch metric says so).  Only the active distributor gates; a standby opens
every gate, and on becoming active it starts from its own saved state.

Signed task bundles
-------------------
A bundle (:mod:`common.bundle`: a script and its manifest, signed offline with ``distributor-sign``)
is distributed like content, to the brokers' ``bundles`` area: :attr:`ContentCore.bundles` is a
second :class:`~distributor.content.DesiredContent` (paths are bundle names,
:func:`~common.paths.check_bundle_name`) with its own numbered versions, and each node has a
second sync state for it (the same states and moves, :class:`SyncNode` and :class:`SyncReported`
with ``area="bundles"``): a change goes to every live node, a node that was dead gets it when its
heartbeats return, a failed sync is retried, every node is checked every ``check_interval``.  It
never gates connections (a node without a bundle serves content as well), and while nothing was ever
added no node is asked about bundles.  The core does not verify signatures (the nodes do, against
the operator keys they trust); it refuses a bundle named like a built-in task (:data:`BUILTIN_TASKS`,
the nodes would refuse it) and one whose signed version is lower than one it distributed under that
name before (the nodes never go back: ``rollback``).  A task request naming a desired bundle waits,
per node, until that node's bundle sync has reached it (``pending`` meanwhile), so a node that comes
back gets the bundle before the task that needs it.

Tasks
-----
:class:`TaskRequested` names a task, a priority and the nodes (all by default).  Each node's part is
sent (:class:`RunTask`, the request id the API chose) at once to a live node; a node that is dead or
does not answer gets it when it returns or on a retry, for as long as it is wanted
(``task_wanted_for`` seconds; the node also drops a request that could not start before that,
``not_after``).  The broker runs a request id once, ever, so a resend is safe: a part is resent only
until a node acknowledged it, never after.  Unfinished parts are polled (:class:`FetchTask`) every
``task_poll`` seconds; a part ends with the node's final record (``done``, ``failed``,
``timed_out``, ``expired``, ``interrupted``), ``refused`` (the node refused the request, signed) or
``abandoned`` (not delivered in time, or the node was removed).

Persistence
-----------
:meth:`ContentCore.saved` is the JSON the state file keeps (:class:`SaveAdministration` after each
change): the desired content, the version each node was last confirmed at, and the last
``keep_tasks`` task requests with their records (each node's output cut at ``output_limit``
characters).  :meth:`ContentCore.restore` takes it back: a node confirmed at the desired version
starts ``matches``, any other starts ``behind``, a part that was being sent is sent again.  The
bundles' desired state, what each bundle's manifest says, the highest version each name was ever
distributed at and each node's confirmed bundles version are kept the same way (``"bundles"``).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import re
from collections import Counter, OrderedDict
from typing import Any, Mapping

from common.adminauth import is_sha256_hex
from common.machine import TransitionTable
from common.paths import PathRefused, check_bundle_name, check_path
from common.sansio import Command, Level, Log, Tick, WakeUpAt

from .admin import AdminReply
from .content import DesiredContent, NodeReport, differences

__all__ = [
    "AdministrationOptions", "ContentState", "ContentEvent", "CONTENT_MOVES", "FileSpec",
    "ContentPut", "ContentDelete", "ContentRefused", "TaskRequested", "SyncReported", "TaskReported",
    "BundleSpec", "BundleAdd", "BundleRemove", "AREAS", "BUILTIN_TASKS",
    "NodesChanged", "NodeLiveness", "ActiveChanged", "DesiredReplicated",
    "SyncNode", "RunTask", "FetchTask", "SetContentGate", "SaveAdministration", "CollectBlobs",
    "ContentCore", "ContentStats", "NodeContentStats", "REFUSAL_REASONS", "SYNC_RESULTS", "PRIORITIES",
    "NODE_FINISHED", "destination_refusal", "tree_prefix",
]

FORMAT = "distributor-administration/1"
PRIORITIES = ("high", "normal", "low")
# A node's own final task states (node/tasks.py), and the distributor's: refused by the node, or never delivered.
NODE_FINISHED = frozenset({"done", "failed", "timed_out", "expired", "interrupted"})
FINISHED = NODE_FINISHED | {"refused", "abandoned"}
# Why the distributor refused an operator's content or task request (the refusal counter's labels).
REFUSAL_REASONS = ("bad_path", "traversal", "absolute", "nul", "reserved", "not_file", "not_managed", "too_large",
                   "bad_tree", "bad_task", "bad_bundle")
SYNC_RESULTS = ("matched", "repaired", "differs", "conflict", "failed")
_TASK_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")  # what the broker accepts as a request id (whole)
MAX_TASK_ARGS = 32
AREAS = ("content", "bundles")  # the brokers' two managed areas (/v1/content, /v1/bundles)
# The nodes' built-in tasks (node.broker.BUILTIN_TASKS, which this package may not import): a bundle may not take
# one of these names (a node refuses it as "reserved").
BUILTIN_TASKS = ("reload-nginx", "rotate-logs", "disk-usage", "scan-access-log")
_PRIORITY_RANK = {"low": 0, "normal": 1, "high": 2}


# -- options ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class AdministrationOptions:
    broker_port: int = 8407  # every node's broker listens on the node's address at this port
    check_interval: float = 60.0  # seconds between anti-entropy checks of a matching node
    retry: float = 2.0  # first retry of a failed sync or send, doubling...
    max_retry: float = 60.0  # ...up to this
    task_poll: float = 1.0  # seconds between polls of a node's unfinished task
    task_wanted_for: float = 3600.0  # a part not delivered within this is abandoned (and the node drops it)
    keep_tasks: int = 200  # task requests kept (the oldest finished ones go first)
    output_limit: int = 16384  # characters of each node's task output kept

    def __post_init__(self) -> None:
        for name in ("check_interval", "retry", "max_retry", "task_poll", "task_wanted_for"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)!r} is not valid; expected seconds > 0")
        if self.keep_tasks < 1 or self.output_limit < 0:
            raise ValueError(f"keep_tasks {self.keep_tasks!r} must be >= 1 and output_limit {self.output_limit!r} >= 0")


# -- the node's content state machine ----------------------------------------------------------------
class ContentState(enum.Enum):
    MATCHES = "matches"
    UPDATING = "updating"
    BEHIND = "behind"
    AHEAD = "ahead"


class ContentEvent(enum.Enum):
    CHANGED = "changed"  # a new version was made and the node is alive: a sync goes to it
    MISSED = "missed"  # a new version was made while the node is dead
    MATCHED = "matched"  # a sync or check confirmed the desired version
    DIFFERS = "differs"  # the node answered and does not hold the desired version, and could not be brought to it
    FAILED = "failed"  # the sync could not reach the node or stopped half way
    CONFLICT = "conflict"  # the node is ahead of the desired state
    RETURNED = "returned"  # its heartbeats came back after it was dead (and content is managed)


def _content_moves() -> dict:
    S, E = ContentState, ContentEvent
    moves = {}
    for state in S:
        moves[(state, E.MATCHED)] = (S.MATCHES, None)
        moves[(state, E.CONFLICT)] = (S.AHEAD, None)
        moves[(state, E.DIFFERS)] = (S.BEHIND, None)
    moves.update({
        (S.MATCHES, E.CHANGED): (S.UPDATING, None),
        (S.UPDATING, E.CHANGED): (S.UPDATING, None),
        (S.BEHIND, E.CHANGED): (S.BEHIND, None),
        (S.AHEAD, E.CHANGED): (S.AHEAD, None),  # its sync will tell whether the new version overtook it
        (S.MATCHES, E.MISSED): (S.BEHIND, None),
        (S.UPDATING, E.MISSED): (S.BEHIND, None),
        (S.BEHIND, E.MISSED): (S.BEHIND, None),
        (S.AHEAD, E.MISSED): (S.AHEAD, None),
        (S.MATCHES, E.FAILED): (S.MATCHES, None),  # a check that could not reach it learned nothing new
        (S.UPDATING, E.FAILED): (S.BEHIND, None),  # it did not get the change
        (S.BEHIND, E.FAILED): (S.BEHIND, None),
        (S.AHEAD, E.FAILED): (S.AHEAD, None),
        (S.MATCHES, E.RETURNED): (S.BEHIND, None),  # anything may have happened to its disk: checked first
        (S.UPDATING, E.RETURNED): (S.BEHIND, None),
        (S.BEHIND, E.RETURNED): (S.BEHIND, None),
        (S.AHEAD, E.RETURNED): (S.AHEAD, None),
    })
    return moves


CONTENT_MOVES = _content_moves()


# -- events -------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One file of a push, already in the blob store."""

    path: str
    size: int
    sha256: str


@dataclasses.dataclass(frozen=True)
class ContentPut:
    """Put files (one, or a tree's) into the desired content; one version each."""

    request_id: int
    files: tuple[FileSpec, ...]
    who: str
    now: float
    wall: float
    tree: str | None = None  # the destination of a tree push (for the log), None for one file


@dataclasses.dataclass(frozen=True)
class ContentDelete:
    """Delete a managed path, or every managed path under it (a directory)."""

    request_id: int
    path: str
    who: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class ContentRefused:
    """The API refused a content request before it reached the core (a bad path, a bad tree, too large)."""

    reason: str  # one of REFUSAL_REASONS
    detail: str
    who: str
    now: float
    what: str = "content change"  # for the log: "bundle add" for a bundle


@dataclasses.dataclass(frozen=True)
class TaskRequested:
    request_id: int
    task_id: str  # chosen by the API (unique), sent to the nodes as the request id
    name: str
    nodes: tuple[str, ...] | None  # None: every node
    priority: str | None  # None: the task's own
    args: Mapping[str, Any]
    who: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class BundleSpec:
    """A signed bundle the API received and stored (its bytes in the blob store): what its manifest says."""

    name: str
    version: int  # the manifest's (signed) version
    priority: str  # the highest priority it may run at
    time_limit: float
    memory_limit: int  # MiB
    key: str  # fingerprint of the key it says signed it (the nodes verify)
    size: int
    sha256: str  # of the whole bundle file
    description: str = ""
    signed_at: float = 0.0


@dataclasses.dataclass(frozen=True)
class BundleAdd:
    """Add a signed bundle (or a new version of one) to the bundles every node must hold; one version."""

    request_id: int
    bundle: BundleSpec
    who: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class BundleRemove:
    request_id: int
    name: str
    who: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class SyncReported:
    """What a :class:`SyncNode` found: ``reached`` (a manifest was read), ``matches`` at ``target``."""

    node: str
    target: int
    reached: bool
    matches: bool
    report: NodeReport | None  # the node's manifest after the sync (or as first read)
    conflict: str | None
    error: str | None
    operations: int  # operations the plan sent (a check of a matching node sends none)
    now: float
    wall: float
    area: str = "content"  # or "bundles"
    # The SyncNode.request it answers.  A report whose number is not the node's sync in flight (one
    # from before the distributor became active again, a duplicate) is dropped; None: not tied to one.
    request: int | None = None


@dataclasses.dataclass(frozen=True)
class TaskReported:
    """A broker's answer to RunTask or FetchTask: its record, or why there is none."""

    task_id: str
    node: str
    record: Mapping[str, Any] | None
    error: str | None  # no record: the reason
    refused: bool  # the node refused the request (signed): final; otherwise it is retried
    now: float
    wall: float
    # The RunTask/FetchTask.request it answers.  A report whose number is not the part's request in
    # flight (one from before a standby spell, a duplicate) is dropped; None: not tied to one.
    request: int | None = None


@dataclasses.dataclass(frozen=True)
class NodesChanged:
    nodes: Mapping[str, str]  # every node now: name -> address
    now: float


@dataclasses.dataclass(frozen=True)
class NodeLiveness:
    node: str
    alive: bool  # heartbeating (not dead)
    now: float


@dataclasses.dataclass(frozen=True)
class ActiveChanged:
    active: bool
    now: float


@dataclasses.dataclass(frozen=True)
class DesiredReplicated:
    """A standby received the active's desired content (:meth:`ContentCore.replicated`: DesiredContent.to_dict()
    with, once a bundle was added, the bundles' under ``"bundles"``; not the bytes)."""

    desired: Mapping[str, Any]
    now: float


# -- commands -----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class SyncNode(Command):
    """Bring one node's ``area`` to ``desired`` (a DesiredContent.to_dict() snapshot) and report SyncReported."""

    node: str
    address: str  # the broker: address:broker_port
    target: int
    desired: Mapping[str, Any] = dataclasses.field(compare=False, repr=False)
    area: str = "content"  # or "bundles" (paths are bundle names)
    request: int = 0  # numbered by the core, echoed by SyncReported


@dataclasses.dataclass(frozen=True)
class RunTask(Command):
    node: str
    address: str
    task_id: str
    name: str
    priority: str | None
    args: Mapping[str, Any] = dataclasses.field(compare=False)
    not_after: float | None = None
    request: int = 0  # numbered by the core, echoed by TaskReported


@dataclasses.dataclass(frozen=True)
class FetchTask(Command):
    node: str
    address: str
    task_id: str
    request: int = 0  # numbered by the core, echoed by TaskReported


@dataclasses.dataclass(frozen=True)
class SetContentGate(Command):
    """Whether ``node`` may take new connections as far as its content goes."""

    node: str
    allowed: bool


@dataclasses.dataclass(frozen=True)
class SaveAdministration(Command):
    """Write the administration state file (atomically)."""

    text: str = dataclasses.field(repr=False)


@dataclasses.dataclass(frozen=True)
class CollectBlobs(Command):
    """Delete the blobs that no desired path refers to (none is being sent now)."""

    keep: frozenset[str] = dataclasses.field(repr=False)


# -- snapshots ------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class NodeContentStats:
    node: str
    state: ContentState
    confirmed: int | None  # the version it was last confirmed at
    held_out: bool
    mismatch: bool  # not confirmed at the desired version


@dataclasses.dataclass(frozen=True)
class ContentStats:
    version: int
    paths: int
    bytes: int
    nodes: tuple[NodeContentStats, ...]
    refusals: Mapping[str, int]
    syncs: Mapping[str, int]  # by SYNC_RESULTS
    tasks: int
    active: bool  # only the active distributor checks nodes: a standby's node figures mean nothing


# -- pure helpers the API uses too --------------------------------------------------------------------
def destination_refusal(path: str, tree: bool) -> PathRefused | None:
    """Why ``path`` cannot be a push's destination (a file's path, or a tree's directory; "" is the root
    for a tree), or None."""
    if tree and path == "":
        return None
    try:
        check_path(path)
    except PathRefused as exc:
        return exc
    return None


def tree_prefix(path: str) -> str:
    """The prefix a tree's member paths get: "" for the root, else ``path`` and a slash."""
    return f"{path}/" if path else ""


# -- the core -----------------------------------------------------------------------------------------
@dataclasses.dataclass
class _Sync:
    """One node's sync state of its bundles (its content's is on :class:`_Node` itself, with the same names)."""

    state: ContentState
    confirmed: int | None = None
    report: NodeReport | None = None
    checked_wall: float | None = None
    syncing: int | None = None
    request: int = 0  # the number of the sync in flight (SyncNode.request)
    wanted: bool = True
    retry_at: float | None = None
    failures: int = 0
    next_check: float | None = None
    error: str | None = None
    conflict: str | None = None
    answered: bool = True  # the last sync since the node fell behind read its manifest (tasks stop waiting for it)


@dataclasses.dataclass
class _Node:
    address: str
    state: ContentState
    confirmed: int | None = None
    report: NodeReport | None = None
    checked_wall: float | None = None
    alive: bool = True
    syncing: int | None = None  # the target of the sync in flight
    request: int = 0  # its number (SyncNode.request)
    wanted: bool = True  # a sync is due (now, or at retry_at)
    retry_at: float | None = None
    failures: int = 0
    next_check: float | None = None
    error: str | None = None
    conflict: str | None = None
    gate: bool = True  # the last SetContentGate sent
    bundles: _Sync = dataclasses.field(default_factory=lambda: _Sync(ContentState.MATCHES))


@dataclasses.dataclass
class _Part:
    state: str = "pending"  # pending, sending, then the node's states, refused, abandoned
    delivered: bool = False  # the node acknowledged the request: never sent again, only polled
    record: dict | None = None
    error: str | None = None
    sends: int = 0
    busy: bool = False  # a RunTask or FetchTask is in flight
    request: int = 0  # the number of the one in flight
    retry_at: float | None = None
    failures: int = 0

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclasses.dataclass
class _Task:
    id: str
    name: str
    priority: str | None
    args: dict
    who: str
    requested: float  # wall
    not_after: float  # wall
    parts: dict[str, _Part]

    @property
    def finished(self) -> bool:
        return all(part.finished for part in self.parts.values())


class ContentCore:
    def __init__(self, options: AdministrationOptions | None = None):
        self.options = options or AdministrationOptions()
        self._sync_requests = 0  # SyncNode commands numbered so far (their reports are matched by it)
        self._task_requests = 0  # RunTask and FetchTask commands numbered so far (likewise)
        self.desired = DesiredContent()
        self.bundles = DesiredContent(check_bundle_name)  # the signed task bundles every node must hold
        self.bundle_meta: dict[str, dict] = {}  # name -> what its manifest says, who added it and when
        self.bundle_floor: dict[str, int] = {}  # name -> the highest signed version ever distributed under it
        self.nodes: dict[str, _Node] = {}
        self.tasks: "OrderedDict[str, _Task]" = OrderedDict()
        self.active = False
        self.machine = TransitionTable("content", CONTENT_MOVES)
        self.bundle_machine = TransitionTable("bundles", CONTENT_MOVES)  # the same moves, counted apart
        self.refusals: Counter[str] = Counter({reason: 0 for reason in REFUSAL_REASONS})
        self.syncs: Counter[str] = Counter({result: 0 for result in SYNC_RESULTS})
        self.bundle_syncs: Counter[str] = Counter({result: 0 for result in SYNC_RESULTS})
        self._confirmed: dict[str, int] = {}  # restored confirmations, for nodes not known yet
        self._bundles_confirmed: dict[str, int] = {}
        self._blobs_dirty = False
        self._dirty = False  # something the state file keeps changed since the last SaveAdministration
        self._now = 0.0
        self._wall = 0.0

    # -- persistence -----------------------------------------------------------------------------
    @classmethod
    def restore(cls, text: str, options: AdministrationOptions | None = None) -> "ContentCore":
        """A core from a state file :meth:`saved` wrote; raises ValueError naming what is wrong."""
        core = cls(options)
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError(f"format {data.get('format') if isinstance(data, dict) else data!r}; expected {FORMAT!r}")
            core.desired = DesiredContent.from_dict(data.get("desired", {}))
            core._confirmed = {str(node): int(version) for node, version in dict(data.get("confirmed", {})).items()}
            bundles = data.get("bundles")
            if bundles is not None:
                core._adopt_bundles(bundles)
                core._bundles_confirmed = {str(node): int(version)
                                           for node, version in dict(bundles.get("confirmed", {})).items()}
            for item in data.get("tasks", []):
                parts = {}
                for node, part in dict(item["parts"]).items():
                    state = str(part["state"])
                    delivered = bool(part.get("delivered"))
                    if state in ("sending", "pending"):
                        state, delivered = "pending", False  # it may or may not have arrived: resent (the node dedupes)
                    parts[str(node)] = _Part(state, delivered, part.get("record"), part.get("error"),
                                             int(part.get("sends", 0)))
                task = _Task(str(item["id"]), str(item["name"]), item.get("priority"), dict(item.get("args", {})),
                             str(item["who"]), float(item["requested"]), float(item["not_after"]), parts)
                core.tasks[task.id] = task
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a distributor administration state: {type(exc).__name__}: {exc}") from None
        return core

    def saved(self) -> str:
        confirmed = dict(self._confirmed)
        confirmed.update({name: node.confirmed for name, node in self.nodes.items() if node.confirmed is not None})
        tasks = [{"id": t.id, "name": t.name, "priority": t.priority, "args": t.args, "who": t.who,
                  "requested": t.requested, "not_after": t.not_after,
                  "parts": {node: {"state": p.state, "delivered": p.delivered, "record": p.record, "error": p.error,
                                   "sends": p.sends} for node, p in sorted(t.parts.items())}}
                 for t in self.tasks.values()]
        data = {"format": FORMAT, "desired": self.desired.to_dict(), "confirmed": dict(sorted(confirmed.items())),
                "tasks": tasks}
        if self._bundles_managed:
            bundles_confirmed = dict(self._bundles_confirmed)
            bundles_confirmed.update({name: node.bundles.confirmed for name, node in self.nodes.items()
                                      if node.bundles.confirmed is not None})
            data["bundles"] = {**self._bundles_dict(), "confirmed": dict(sorted(bundles_confirmed.items()))}
        return json.dumps(data, sort_keys=True)

    def _bundles_dict(self) -> dict:
        return {"desired": self.bundles.to_dict(), "meta": dict(sorted(self.bundle_meta.items())),
                "floor": dict(sorted(self.bundle_floor.items()))}

    def _adopt_bundles(self, data: Mapping[str, Any]) -> None:
        """Take the bundles' desired state, manifests and floors (a state file's, or the active's); ValueError."""
        bundles = DesiredContent.from_dict(dict(data.get("desired", {})), check_bundle_name)
        meta = {str(name): dict(item) for name, item in dict(data.get("meta", {})).items()}
        floor = {str(name): int(version) for name, version in dict(data.get("floor", {})).items()}
        if set(meta) != set(bundles.entries):
            raise ValueError("bundles: the manifests kept do not name the desired bundles")
        self.bundles, self.bundle_meta, self.bundle_floor = bundles, meta, floor

    @property
    def _bundles_managed(self) -> bool:
        """Whether a bundle was ever added: until then no node is asked about bundles."""
        return self.bundles.version > 0

    @property
    def change_count(self) -> int:
        """Grows with every change of the content or the bundles (what the distributor core replicates)."""
        return self.desired.version + self.bundles.version

    def replicated(self) -> dict:
        """What a standby adopts (:class:`DesiredReplicated`): the desired content, and the bundles' once managed."""
        data = self.desired.to_dict()
        if self._bundles_managed:
            data["bundles"] = self._bundles_dict()
        return data

    # -- events ------------------------------------------------------------------------------------
    def handle(self, event) -> list[Command]:
        self._now = getattr(event, "now", self._now)
        self._wall = getattr(event, "wall", self._wall)
        handler = self._HANDLERS.get(type(event))
        if handler is None:
            raise TypeError(f"the content core takes no {type(event).__name__} event")
        commands = handler(self, event)
        return self._finish(commands)

    def _finish(self, commands: list[Command]) -> list[Command]:
        commands += self._dispatch()
        commands += self._gates()
        if self._dirty:
            self._dirty = False
            commands.append(SaveAdministration(self.saved()))
        if self._blobs_dirty and not any(node.syncing is not None or node.bundles.syncing is not None
                                         for node in self.nodes.values()):
            self._blobs_dirty = False
            commands.append(CollectBlobs(frozenset(e.sha256 for e in self.desired.entries.values())
                                         | frozenset(e.sha256 for e in self.bundles.entries.values())))
        wake = self.next_wakeup
        if wake is not None:
            commands.append(WakeUpAt(wake))
        return commands

    @property
    def next_wakeup(self) -> float | None:
        if not self.active:
            return None
        times: list[float] = []
        for node in self.nodes.values():
            for sync in self._syncs(node):
                if sync.wanted and sync.syncing is None and node.alive and sync.retry_at is not None:
                    times.append(sync.retry_at)
                if sync.next_check is not None and sync.syncing is None:
                    times.append(sync.next_check)
        for task in self.tasks.values():
            for name, part in task.parts.items():
                node = self.nodes.get(name)
                if node is not None and node.alive and not part.finished and not part.busy and part.retry_at is not None:
                    times.append(part.retry_at)
        # Parts not delivered in time are abandoned at a Tick: the distributor core ticks every second.
        return min(times) if times else None

    def _syncs(self, node: _Node) -> list:
        """The node's sync states that are in play: its content's, and its bundles' once a bundle was added."""
        return [node, node.bundles] if self._bundles_managed else [node]

    def _move(self, name: str, node: _Node | _Sync, event: ContentEvent, why: str, area: str = "content") -> list[Command]:
        machine = self.machine if area == "content" else self.bundle_machine
        new, _, changed = machine.move(node.state, event, name)
        if not changed:
            return []
        old, node.state = node.state, new
        level = Level.WARNING if new is ContentState.BEHIND and old is not ContentState.BEHIND else Level.INFO
        if area == "bundles":  # a node without a bundle serves as well as before: not a warning
            level = Level.INFO
        return [Log(level, f"{area}: {name} {old.value} -> {new.value} ({why})")]

    # -- operator changes --------------------------------------------------------------------------
    def _refused(self, reason: str, detail: str, who: str, what: str, request_id: int | None = None,
                 status: int = 400) -> list[Command]:
        self.refusals[reason if reason in REFUSAL_REASONS else "bad_path"] += 1
        commands: list[Command] = [Log(Level.WARNING, f"refused {what} by {who}: {reason}: {detail}")]
        if request_id is not None:
            commands.insert(0, AdminReply(request_id, status, {"error": detail, "reason": reason}))
        return commands

    def _put(self, event: ContentPut) -> list[Command]:
        if not event.files:
            return self._refused("bad_tree", "the push holds no file", event.who, "content push", event.request_id)
        try:
            for spec in event.files:
                check_path(spec.path)
        except PathRefused as exc:
            return self._refused(exc.reason, str(exc), event.who, "content push", event.request_id)
        if len({spec.path for spec in event.files}) != len(event.files):
            return self._refused("bad_tree", "the push names a path twice", event.who, "content push", event.request_id)
        conflict = self.desired.conflict(spec.path for spec in event.files)
        if conflict is not None:  # no node could hold it: every sync would fail
            return self._refused("not_file", conflict, event.who, "content push", event.request_id, 409)
        for spec in event.files:  # all checked before any is applied: a push is applied whole or not at all
            if isinstance(spec.size, bool) or not isinstance(spec.size, int) or spec.size < 0 \
                    or not is_sha256_hex(spec.sha256):
                return self._refused("bad_tree", f"{spec.path}: size {spec.size!r} or sha256 {spec.sha256!r} is not "
                                                 "valid", event.who, "content push", event.request_id)
        first = self.desired.version + 1
        for spec in event.files:
            self.desired.put(spec.path, spec.size, spec.sha256)
        self._blobs_dirty = self._dirty = True
        what = (f"tree {event.tree or '/'} ({len(event.files)} files, {sum(s.size for s in event.files)} bytes)"
                if event.tree is not None else f"{event.files[0].path} ({event.files[0].size} bytes, "
                                                f"sha256 {event.files[0].sha256[:16]}...)")
        commands = [AdminReply(event.request_id, 200, {"ok": True, "version": self.desired.version,
                                                       "versions": [first, self.desired.version],
                                                       "paths": [s.path for s in event.files]}),
                    Log(Level.INFO, f"content put {what} by {event.who}: version {self.desired.version}")]
        return commands + self._changed(f"version {self.desired.version} by {event.who}")

    def _delete(self, event: ContentDelete) -> list[Command]:
        path = event.path.strip("/")
        try:
            check_path(path)
        except PathRefused as exc:
            return self._refused(exc.reason, str(exc), event.who, "content delete", event.request_id)
        doomed = sorted(p for p in self.desired.entries if p == path or p.startswith(path + "/"))
        if not doomed:
            return self._refused("not_managed", f"path {path!r} is not managed content, nor a directory of any "
                                                f"({len(self.desired.entries)} managed paths)",
                                 event.who, "content delete", event.request_id, 404)
        first = self.desired.version + 1
        for doomed_path in doomed:
            self.desired.delete(doomed_path)
        self._blobs_dirty = self._dirty = True
        commands = [AdminReply(event.request_id, 200, {"ok": True, "version": self.desired.version,
                                                       "versions": [first, self.desired.version], "paths": doomed}),
                    Log(Level.INFO, f"content delete {path} ({len(doomed)} path(s)) by {event.who}: version "
                                    f"{self.desired.version}")]
        return commands + self._changed(f"version {self.desired.version} by {event.who}")

    def _changed(self, why: str, area: str = "content") -> list[Command]:
        commands: list[Command] = []
        for name, node in self.nodes.items():
            sync = node if area == "content" else node.bundles
            if area == "bundles":
                sync.answered = False  # the tasks that need the change wait for its sync
            if node.alive or not self.active:
                commands += self._move(name, sync, ContentEvent.CHANGED, why, area)
                sync.wanted, sync.retry_at, sync.failures = True, None, 0
            else:
                commands += self._move(name, sync, ContentEvent.MISSED, f"{why}; the node is dead", area)
                sync.wanted = True  # when it returns
        return commands

    # -- operator's bundles ----------------------------------------------------------------------------
    def _bundle_add(self, event: BundleAdd) -> list[Command]:
        spec = event.bundle

        def refuse(message: str, status: int = 400, reason: str = "bad_bundle") -> list[Command]:
            return self._refused(reason, message, event.who, f"bundle {spec.name!r}", event.request_id, status)

        try:
            check_bundle_name(spec.name)
        except PathRefused as exc:
            return refuse(str(exc))
        if spec.name in BUILTIN_TASKS:
            return refuse(f"bundle {spec.name!r} has the name of a built-in task (the nodes refuse it); sign it under "
                          "another name")
        if spec.priority not in PRIORITIES:
            return refuse(f"bundle {spec.name!r}: priority {spec.priority!r} is not valid")
        floor = self.bundle_floor.get(spec.name, 0)
        if spec.version < floor:
            return refuse(f"bundle {spec.name!r} version {spec.version} is older than version {floor}, which was "
                          "distributed before (the nodes never go back: sign it with a higher --version)", 409)
        current = self.bundles.entries.get(spec.name)
        meta = {"version": spec.version, "priority": spec.priority, "time_limit": spec.time_limit,
                "memory_limit": spec.memory_limit, "key": spec.key, "description": spec.description,
                "signed_at": spec.signed_at, "who": event.who, "added": event.wall}
        if current is not None and current.sha256 == spec.sha256 and current.size == spec.size:
            return [AdminReply(event.request_id, 200, {"ok": True, "unchanged": True, "version": self.bundles.version,
                                                       "bundle": self.bundle_view(spec.name)}),
                    Log(Level.INFO, f"bundle {spec.name} version {spec.version} added again by {event.who}: the same "
                                    f"bytes, nothing to send")]
        try:
            self.bundles.put(spec.name, spec.size, spec.sha256)
        except ValueError as exc:  # a size or digest the API got wrong
            return refuse(str(exc))
        self.bundle_meta[spec.name] = meta
        self.bundle_floor[spec.name] = max(floor, spec.version)
        self._blobs_dirty = self._dirty = True
        commands: list[Command] = [
            AdminReply(event.request_id, 200, {"ok": True, "version": self.bundles.version,
                                               "bundle": self.bundle_view(spec.name)}),
            Log(Level.INFO, f"bundle {spec.name} version {spec.version} ({spec.priority} priority at most, signed by key "
                            f"{spec.key}, {spec.size} bytes, sha256 {spec.sha256[:16]}...) added by {event.who}: "
                            f"bundles version {self.bundles.version}")]
        return commands + self._changed(f"bundles version {self.bundles.version} by {event.who}", "bundles")

    def _bundle_remove(self, event: BundleRemove) -> list[Command]:
        if event.name not in self.bundles.entries:
            return self._refused("not_managed", f"no bundle {event.name!r} (bundles: "
                                                f"{', '.join(sorted(self.bundles.entries)) or 'none'})",
                                 event.who, "bundle remove", event.request_id, 404)
        self.bundles.delete(event.name)
        del self.bundle_meta[event.name]
        self._blobs_dirty = self._dirty = True
        commands: list[Command] = [
            AdminReply(event.request_id, 200, {"ok": True, "version": self.bundles.version, "removed": event.name}),
            Log(Level.INFO, f"bundle {event.name} removed by {event.who}: bundles version {self.bundles.version}")]
        return commands + self._changed(f"bundles version {self.bundles.version} by {event.who}", "bundles")

    # -- what the brokers said -------------------------------------------------------------------------
    def _sync_reported(self, event: SyncReported) -> list[Command]:
        found = self.nodes.get(event.node)
        area = event.area if event.area in AREAS else "content"
        node = found if found is None or area == "content" else found.bundles
        if node is None or node.syncing is None or event.request not in (None, node.request):
            return []  # removed meanwhile, or a report from before this distributor became active again
        desired, counts = (self.desired, self.syncs) if area == "content" else (self.bundles, self.bundle_syncs)
        node.syncing = None
        node.error = event.error
        commands: list[Command] = []
        if event.reached:
            node.report = event.report or node.report
            node.checked_wall = event.wall
            if area == "bundles":
                node.answered = True
        current = event.target == desired.version
        if event.conflict is not None:
            counts["conflict"] += 1
            node.conflict = event.conflict
            node.next_check = event.now + self.options.check_interval
            commands += self._move(event.node, node, ContentEvent.CONFLICT, event.conflict, area)
            if node.failures == 0:
                commands.append(Log(Level.ERROR, f"{area}: {event.node} {event.conflict}"))
            node.failures += 1
            return commands
        node.conflict = None
        if event.matches:
            counts["repaired" if event.operations and node.state is ContentState.MATCHES else "matched"] += 1
            node.failures, node.retry_at = 0, None
            node.next_check = event.now + self.options.check_interval
            if event.operations and node.state is ContentState.MATCHES and current:
                commands.append(Log(Level.WARNING, f"{area}: {event.node} had drifted; repaired with "
                                                   f"{event.operations} operation(s)"))
            if current:
                self._dirty = self._dirty or node.confirmed != event.target
                node.confirmed = event.target
                commands += self._move(event.node, node, ContentEvent.MATCHED, f"holds version {event.target}", area)
            else:
                node.wanted = True  # a newer change came while it synced
            return commands
        # Not matching: it answered but could not be brought to the target, or the sync stopped.
        node.failures += 1
        delay = min(self.options.retry * 2 ** (node.failures - 1), self.options.max_retry)
        node.wanted, node.retry_at = True, event.now + delay
        if event.reached and event.error is None:
            counts["differs"] += 1
            commands += self._move(event.node, node, ContentEvent.DIFFERS, "still differs after its sync", area)
        else:
            counts["failed"] += 1
            commands += self._move(event.node, node, ContentEvent.FAILED, event.error or "sync failed", area)
        commands.append(Log(Level.WARNING if node.failures == 1 else Level.INFO,
                            f"{area}: sync of {event.node} to version {event.target} failed ({event.error or 'differs'}); "
                            f"retry in {delay:g} s"))
        return commands

    def _task_reported(self, event: TaskReported) -> list[Command]:
        task = self.tasks.get(event.task_id)
        part = task.parts.get(event.node) if task is not None else None
        if part is None or not part.busy or event.request not in (None, part.request):
            return []  # not the answer to the request in flight: from before a standby spell, or a duplicate
        part.busy = False
        commands: list[Command] = []
        if event.record is not None:
            first = not part.delivered
            part.delivered, part.failures, part.retry_at, part.error = True, 0, None, None
            record = dict(event.record)
            output = record.get("output")
            if isinstance(output, str) and len(output) > self.options.output_limit:
                record["output"] = output[:self.options.output_limit]
                record["output_truncated"] = int(record.get("output_truncated") or 0) + len(output.encode()) - \
                    len(record["output"].encode())
            state = str(record.get("state", "queued"))
            if state != part.state or first:
                self._dirty = True
                commands.append(Log(Level.INFO, f"task {task.name} {task.id} on {event.node}: {state}"
                                                + (f" (exit {record.get('exit_status')})" if state in NODE_FINISHED
                                                   and record.get("exit_status") is not None else "")))
            part.state, part.record = state, record
            if state not in NODE_FINISHED:
                part.retry_at = event.now + self.options.task_poll
            return commands
        if event.refused:
            part.state, part.error = "refused", event.error
            self._dirty = True
            return [Log(Level.WARNING, f"task {task.name} {task.id}: {event.node} refused it: {event.error}")]
        # No answer: a request not yet acknowledged is sent again (the node runs an id once); a poll is repeated.
        part.failures += 1
        part.error = event.error
        part.retry_at = event.now + min(self.options.retry * 2 ** (part.failures - 1), self.options.max_retry)
        if not part.delivered:
            part.state = "pending"
        if part.failures == 1:
            commands.append(Log(Level.WARNING, f"task {task.name} {task.id}: no answer from {event.node} "
                                               f"({event.error}); tried again while it is wanted"))
        return commands

    # -- operator's tasks ------------------------------------------------------------------------------
    def _task_requested(self, event: TaskRequested) -> list[Command]:
        def refuse(message: str, status: int = 400) -> list[Command]:
            return self._refused("bad_task", message, event.who, f"task {event.name!r}", event.request_id, status)

        try:
            check_bundle_name(event.name)
        except PathRefused:
            return refuse(f"task name {event.name!r} is not valid; expected 1-64 of a-z 0-9 - _ (a built-in such as "
                          "disk-usage, or a bundle's name)")
        if event.priority is not None and event.priority not in PRIORITIES:
            return refuse(f"priority {event.priority!r} is not valid; expected high, normal or low")
        signed = self.bundle_meta.get(event.name, {}).get("priority")
        if event.priority is not None and signed in PRIORITIES and _PRIORITY_RANK[event.priority] > _PRIORITY_RANK[signed]:
            return refuse(f"bundle {event.name!r} is signed for priority {signed} at most; {event.priority} was asked")
        if not isinstance(event.args, Mapping) or len(event.args) > MAX_TASK_ARGS or \
                not all(isinstance(k, str) for k in event.args):
            return refuse(f"args: expected an object of at most {MAX_TASK_ARGS} named values")
        if not isinstance(event.task_id, str) or not _TASK_ID.fullmatch(event.task_id):
            return refuse(f"task id {event.task_id!r} is not valid; expected 1 to 64 letters, digits, '.', '_', ':' "
                          "or '-', starting with a letter or a digit")
        if event.task_id in self.tasks:
            return refuse(f"task id {event.task_id!r} is not new", 409)
        if event.nodes is not None:
            unknown = [n for n in event.nodes if n not in self.nodes]
            if unknown or not event.nodes:
                return refuse(f"nodes {', '.join(unknown) or '(none)'}: not known; nodes: {', '.join(sorted(self.nodes))}",
                              404 if unknown else 400)
        targets = sorted(set(event.nodes)) if event.nodes is not None else sorted(self.nodes)
        if not targets:
            return refuse("there is no node to run it on")
        task = _Task(event.task_id, event.name, event.priority, dict(event.args), event.who, event.wall,
                     event.wall + self.options.task_wanted_for, {node: _Part() for node in targets})
        self.tasks[task.id] = task
        self._prune_tasks()
        self._dirty = True
        down = [n for n in targets if not self.nodes[n].alive]
        commands: list[Command] = [
            Log(Level.INFO, f"task {event.name} ({event.priority or 'its own'} priority) {task.id} on "
                            f"{', '.join(targets)} by {event.who}"
                            + (f"; {', '.join(down)} down: sent when it returns" if down else ""))]
        commands += self._dispatch()  # so the reply shows which parts went out
        commands.insert(0, AdminReply(event.request_id, 200, {"ok": True, "task": self.task_view(task.id)}))
        return commands

    def _prune_tasks(self) -> None:
        while len(self.tasks) > self.options.keep_tasks:
            finished = next((tid for tid, task in self.tasks.items() if task.finished), None)
            del self.tasks[finished if finished is not None else next(iter(self.tasks))]

    # -- the cluster ---------------------------------------------------------------------------------
    def _nodes_changed(self, event: NodesChanged) -> list[Command]:
        commands: list[Command] = []
        managed = self.desired.version > 0 or bool(self.desired.entries)
        for name, address in event.nodes.items():
            node = self.nodes.get(name)
            if node is None:
                confirmed = self._confirmed.pop(name, None)
                known = not managed or confirmed == self.desired.version
                node = self.nodes[name] = _Node(address, ContentState.MATCHES if known else ContentState.BEHIND,
                                                confirmed)
                confirmed = self._bundles_confirmed.pop(name, None)
                if self._bundles_managed and confirmed != self.bundles.version:
                    node.bundles = _Sync(ContentState.BEHIND, confirmed, answered=False)
                else:
                    node.bundles = _Sync(ContentState.MATCHES, confirmed)
            else:
                node.address = address
        for name in [n for n in self.nodes if n not in event.nodes]:
            del self.nodes[name]
            for task in self.tasks.values():
                part = task.parts.get(name)
                if part is not None and not part.finished:
                    part.state, part.error = "abandoned", "the node was removed"
                    self._dirty = True
            commands.append(Log(Level.INFO, f"content: {name} left the layout"))
        return commands

    def _liveness(self, event: NodeLiveness) -> list[Command]:
        node = self.nodes.get(event.node)
        if node is None or node.alive == event.alive:
            return []
        node.alive = event.alive
        if not event.alive:
            return []
        commands: list[Command] = []
        if self.desired.version > 0 or self.desired.entries:
            commands += self._move(event.node, node, ContentEvent.RETURNED, "its heartbeats returned: checked first")
        node.wanted, node.retry_at, node.failures = True, None, 0
        if self._bundles_managed:
            commands += self._move(event.node, node.bundles, ContentEvent.RETURNED,
                                   "its heartbeats returned: checked first", "bundles")
            node.bundles.wanted, node.bundles.retry_at, node.bundles.failures = True, None, 0
            node.bundles.answered = False
        for task in self.tasks.values():
            part = task.parts.get(event.node)
            if part is not None and not part.finished:
                part.retry_at, part.failures = None, 0  # resent or polled now
        return commands

    def _active_changed(self, event: ActiveChanged) -> list[Command]:
        if event.active == self.active:
            return []
        self.active = event.active
        if not event.active:
            for node in self.nodes.values():
                node.syncing = node.bundles.syncing = None  # whatever comes back is from before: ignored
            for task in self.tasks.values():
                for part in task.parts.values():
                    part.busy = False
            return [Log(Level.INFO, "content: not the active distributor: no syncs, no tasks, no content gate")]
        for node in self.nodes.values():
            for sync in (node, node.bundles):
                sync.wanted, sync.retry_at, sync.failures = True, None, 0
        return [Log(Level.INFO, f"content: active: checking {len(self.nodes)} node(s) at version {self.desired.version}"
                                + (f", bundles version {self.bundles.version}" if self._bundles_managed else ""))]

    def _replicated(self, event: DesiredReplicated) -> list[Command]:
        """A standby adopts the active's desired content: it is the one that takes changes."""
        if self.active:
            return []  # an active distributor never takes another's state
        try:
            desired = DesiredContent.from_dict(event.desired)
        except (ValueError, TypeError, AttributeError) as exc:
            return [Log(Level.ERROR, f"content: the active's desired content is unreadable: {exc}")]
        commands: list[Command] = []
        bundles = event.desired.get("bundles")
        if bundles is not None and bundles != self._bundles_dict():
            try:
                self._adopt_bundles(bundles)
            except (ValueError, TypeError, AttributeError) as exc:
                commands.append(Log(Level.ERROR, f"bundles: the active's desired bundles are unreadable: {exc}"))
            else:
                self._dirty = True
                commands += self._changed(f"bundles version {self.bundles.version} replicated from the active",
                                          "bundles")
        if desired.to_dict() == self.desired.to_dict():
            return commands
        self.desired = desired
        self._dirty = True
        return commands + self._changed(f"version {desired.version} replicated from the active")

    def _tick(self, now: float, wall: float) -> list[Command]:
        commands: list[Command] = []
        for node in self.nodes.values():
            for sync in self._syncs(node):
                if sync.next_check is not None and now >= sync.next_check and sync.syncing is None:
                    sync.wanted, sync.next_check = True, None
        for task in self.tasks.values():
            for name, part in task.parts.items():
                if not part.delivered and not part.finished and not part.busy and wall > task.not_after:
                    part.state, part.error = "abandoned", f"not delivered within {self.options.task_wanted_for:g} s"
                    self._dirty = True
                    commands.append(Log(Level.WARNING, f"task {task.name} {task.id}: abandoned on {name}: "
                                                       f"{part.error}"))
        return commands

    # -- decisions ------------------------------------------------------------------------------------
    def _dispatch(self) -> list[Command]:
        """Syncs and task sends/polls that are due now."""
        if not self.active:
            return []
        commands: list[Command] = []
        snapshots: dict[str, Mapping[str, Any]] = {}
        for name, node in self.nodes.items():
            for sync in self._syncs(node):
                area, desired = ("content", self.desired) if sync is node else ("bundles", self.bundles)
                due = sync.retry_at is None or self._now >= sync.retry_at
                if sync.wanted and sync.syncing is None and node.alive and due:
                    if area not in snapshots:
                        snapshots[area] = desired.to_dict()
                    sync.wanted, sync.retry_at, sync.next_check = False, None, None
                    sync.syncing = desired.version
                    self._sync_requests += 1
                    sync.request = self._sync_requests
                    commands.append(SyncNode(name, f"{node.address}:{self.options.broker_port}", desired.version,
                                             snapshots[area], area, sync.request))
        for task in self.tasks.values():
            bundle = task.name in self.bundles.entries
            for name, part in task.parts.items():
                node = self.nodes.get(name)
                if node is None or not node.alive or part.busy or part.finished:
                    continue
                if part.retry_at is not None and self._now < part.retry_at:
                    continue
                if bundle and not part.delivered and self._bundle_pending(node):
                    continue  # sent once the bundle's sync has reached the node
                address = f"{node.address}:{self.options.broker_port}"
                self._task_requests += 1
                part.request = self._task_requests
                if not part.delivered:
                    part.state, part.busy, part.retry_at = "sending", True, None
                    part.sends += 1
                    commands.append(RunTask(name, address, task.id, task.name, task.priority, task.args, task.not_after,
                                            part.request))
                else:
                    part.busy, part.retry_at = True, None
                    commands.append(FetchTask(name, address, task.id, part.request))
        return commands

    def _bundle_pending(self, node: _Node) -> bool:
        """Whether the node's bundles are on their way: not confirmed at the desired version, and no sync since it
        fell behind has reached the node, or one is in flight.  A node that answered and still lacks the bundle
        (one it refuses: an untrusted key, bundles off) gets the task anyway: its refusal tells the operator why."""
        sync = node.bundles
        return sync.state in (ContentState.BEHIND, ContentState.UPDATING) and (
            sync.syncing is not None or not sync.answered)

    def _matches(self, node: _Node) -> bool:
        """Confirmed at the desired version; with nothing ever managed, a node nobody could check matches too
        (there is nothing it could serve differently: no alert for a cluster without content management)."""
        if node.state is not ContentState.MATCHES:
            return False
        managed = self.desired.version > 0 or bool(self.desired.entries)
        return node.confirmed == self.desired.version or (not managed and node.confirmed is None)

    def held_out(self, name: str) -> bool:
        """Whether the content gate keeps ``name`` out of new connections now (see the module docstring)."""
        node = self.nodes.get(name)
        if not self.active or node is None or node.state is not ContentState.BEHIND:
            return False
        return any(other is not node and other.alive and other.state in (ContentState.MATCHES, ContentState.UPDATING)
                   for other in self.nodes.values())

    def _gates(self) -> list[Command]:
        commands: list[Command] = []
        for name, node in self.nodes.items():
            allowed = not self.held_out(name)
            if allowed != node.gate:
                node.gate = allowed
                commands.append(SetContentGate(name, allowed))
                commands.append(Log(Level.INFO if allowed else Level.WARNING,
                                    f"content: {name} {'may take new connections again: its content matches' if allowed else 'held out of new connections until its content matches'}"))
        return commands

    # -- observers --------------------------------------------------------------------------------------
    def exclusion(self, name: str) -> str | None:
        """Why the content gate keeps a node out (for explain), or None."""
        if not self.held_out(name):
            return None
        node = self.nodes[name]
        return (f"content behind: confirmed at version {node.confirmed if node.confirmed is not None else 'none'} of "
                f"{self.desired.version}" + (", syncing" if node.syncing is not None else ""))

    def node_summary(self, name: str) -> dict | None:
        node = self.nodes.get(name)
        if node is None:
            return None
        summary = {"state": node.state.value, "confirmed": node.confirmed, "desired": self.desired.version,
                   "held_out": self.held_out(name), "syncing": node.syncing is not None, "error": node.error}
        if self._bundles_managed:
            summary["bundles"] = {"state": node.bundles.state.value, "confirmed": node.bundles.confirmed,
                                  "desired": self.bundles.version, "error": node.bundles.error}
        return summary

    def status(self, wall: float) -> dict:
        """The content status (the API's GET /api/v1/content): per node its version, paths and differences."""
        nodes = []
        for name, node in sorted(self.nodes.items()):
            report = node.report
            diff = differences(self.desired, report) if report is not None else []
            nodes.append({
                "node": name, "state": node.state.value, "held_out": self.held_out(name), "alive": node.alive,
                "confirmed": node.confirmed, "version": report.version if report is not None else None,
                "matches": self._matches(node),
                "syncing": node.syncing is not None, "error": node.error, "conflict": node.conflict,
                "checked_ago": None if node.checked_wall is None else round(max(0.0, wall - node.checked_wall), 3),
                "paths": {p: e.to_dict() for p, e in sorted(report.entries.items())} if report is not None else None,
                "differs": [{"path": p, "kind": k} for p, k in diff],
            })
        return {"version": self.desired.version, "active": self.active,
                "paths": {p: e.to_dict() for p, e in sorted(self.desired.entries.items())},
                "nodes": nodes, "differing": [n["node"] for n in nodes if not n["matches"]]}

    def bundle_view(self, name: str) -> dict:
        """One desired bundle: what its manifest says, who added it, its change (bundles version) and bytes."""
        entry = self.bundles.entries.get(name)
        if entry is None:
            raise KeyError(f"no bundle {name!r} (bundles: {', '.join(sorted(self.bundles.entries)) or 'none'})")
        return {"name": name, **self.bundle_meta.get(name, {}), "change": entry.version, "size": entry.size,
                "sha256": entry.sha256}

    def bundle_status(self, wall: float) -> dict:
        """The bundles' status (the API's GET /api/v1/bundles): the desired bundles, and per node its bundles
        version, the bundles it holds (name -> sha256) and what differs; the nodes that differ."""
        managed = self._bundles_managed
        nodes = []
        for name, node in sorted(self.nodes.items()):
            sync, report = node.bundles, node.bundles.report
            diff = differences(self.bundles, report) if report is not None else []
            matches = sync.state is ContentState.MATCHES and (sync.confirmed == self.bundles.version or not managed)
            nodes.append({
                "node": name, "state": sync.state.value, "alive": node.alive, "confirmed": sync.confirmed,
                "version": report.version if report is not None else None, "matches": matches,
                "syncing": sync.syncing is not None, "error": sync.error, "conflict": sync.conflict,
                "checked_ago": None if sync.checked_wall is None else round(max(0.0, wall - sync.checked_wall), 3),
                "bundles": {b: e.sha256 for b, e in sorted(report.entries.items())} if report is not None else None,
                "differs": [{"path": b, "kind": k} for b, k in diff],
            })
        return {"version": self.bundles.version, "active": self.active,
                "bundles": {name: self.bundle_view(name) for name in sorted(self.bundles.entries)},
                "nodes": nodes, "differing": [n["node"] for n in nodes if not n["matches"]]}

    def task_view(self, task_id: str) -> dict:
        task = self.tasks.get(task_id)
        if task is None:
            raise KeyError(f"no task {task_id!r} (this distributor keeps the last {self.options.keep_tasks})")
        return {"id": task.id, "name": task.name, "priority": task.priority, "args": task.args, "who": task.who,
                "requested": task.requested, "not_after": task.not_after, "finished": task.finished,
                "nodes": {name: {"state": p.state, "delivered": p.delivered, "sends": p.sends, "error": p.error,
                                 **_record_fields(p.record)}
                          for name, p in sorted(task.parts.items())}}

    def task_list(self, limit: int = 100) -> list[dict]:
        """The newest ``limit`` task requests first, without their output."""
        views = []
        for task in reversed(self.tasks.values()):
            if len(views) >= limit:
                break
            views.append({"id": task.id, "name": task.name, "priority": task.priority, "who": task.who,
                          "requested": task.requested, "finished": task.finished,
                          "nodes": {name: p.state for name, p in sorted(task.parts.items())}})
        return views

    def stats(self) -> ContentStats:
        version = self.desired.version
        nodes = tuple(NodeContentStats(name, node.state, node.confirmed, self.held_out(name), not self._matches(node))
                      for name, node in sorted(self.nodes.items()))
        return ContentStats(version, len(self.desired.entries), sum(e.size for e in self.desired.entries.values()),
                            nodes, dict(self.refusals), dict(self.syncs), len(self.tasks), self.active)


def _record_fields(record: Mapping[str, Any] | None) -> dict:
    """What a node's task record tells an operator."""
    if record is None:
        return {}
    keep = ("exit_status", "output", "output_truncated", "duration", "waiting", "received", "started", "finished")
    fields = {key: record.get(key) for key in keep if key in record}
    if record.get("error"):
        fields["node_error"] = record["error"]
    return fields


# Each event's handler (ContentCore.handle dispatches by the event's type).
ContentCore._HANDLERS = {
    Tick: lambda core, e: core._tick(e.now, e.wall),
    ContentPut: ContentCore._put,
    ContentDelete: ContentCore._delete,
    BundleAdd: ContentCore._bundle_add,
    BundleRemove: ContentCore._bundle_remove,
    ContentRefused: lambda core, e: core._refused(e.reason, e.detail, e.who, e.what),
    TaskRequested: ContentCore._task_requested,
    SyncReported: ContentCore._sync_reported,
    TaskReported: ContentCore._task_reported,
    NodesChanged: ContentCore._nodes_changed,
    NodeLiveness: ContentCore._liveness,
    ActiveChanged: ContentCore._active_changed,
    DesiredReplicated: ContentCore._replicated,
}
