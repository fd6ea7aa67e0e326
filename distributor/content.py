"""Content every node must serve, and what each node needs to get there (pure: no I/O, no clock).

Model
-----
* The distributor keeps the **desired content** (:class:`DesiredContent`): a
  change is a numbered version (1, 2, 3, ...), each one ``put`` of a path
  (size and SHA-256 of its bytes) or ``delete`` of a path.  The bytes live in
  the distributor's blob store by digest (:mod:`distributor.blobstore`), so a
  node that comes back later gets exactly the bytes of the version it missed.
* A node reports its **manifest** (:class:`NodeReport`): its content version
  (the last version it committed) and, per managed path (a path the broker
  put; other files in the root are not managed), the version, size and
  SHA-256 it holds.
* :func:`plan` is anti-entropy by version: from the desired state and the
  node's report, the operations that bring the node to the desired version,
  in version order, followed by a commit of that version.  Missed versions
  are compacted: a path changed five times while the node was away is sent
  once, in its final state; a path put and deleted meanwhile costs nothing.
  Because of that, the node's content version moves only at the commit, once
  every operation succeeded: in between the node's content matches no single
  version, and it reports its old one (so it stays out of service).
* Whether a path matches is decided by its bytes (size and SHA-256), not by
  its per-path version: the same bytes pushed again need no transfer.
* :func:`matches` is the balancer's gate: a node whose reported version or
  managed content differs from the desired state takes no new connections.
* A node ahead of the desired state (a higher content or path version: the
  desired state was lost or another distributor pushed) is never rolled back
  by a plan: the plan carries a ``conflict`` and no operations.

Paths
-----
Every path is checked by :func:`common.paths.check_path` (bundle names by
:func:`common.paths.check_bundle_name`), the rule the node applies too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from common.adminauth import is_sha256_hex
from common.paths import check_path

__all__ = [
    "Entry",
    "Change",
    "DesiredContent",
    "NodeReport",
    "Transfer",
    "Delete",
    "Plan",
    "plan",
    "differences",
    "matches",
    "NodeContentStatus",
    "content_status",
    "differing_nodes",
]


@dataclass(frozen=True)
class Entry:
    """One managed path as the desired state or a node knows it."""

    path: str
    version: int  # the version of the change that last put it
    size: int
    sha256: str

    def same_bytes(self, other: "Entry | None") -> bool:
        return other is not None and other.size == self.size and other.sha256 == self.sha256

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "size": self.size, "sha256": self.sha256}


@dataclass(frozen=True)
class Change:
    version: int
    op: str  # "put" or "delete"
    path: str
    size: int = 0
    sha256: str = ""

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {"version": self.version, "op": self.op, "path": self.path}
        if self.op == "put":
            data.update(size=self.size, sha256=self.sha256)
        return data


def _entry_from(path: str, data: Any, where: str) -> Entry:
    if not isinstance(data, dict):
        raise ValueError(f"{where}: expected an object with version, size and sha256, got {data!r}")
    version, size, sha256 = data.get("version"), data.get("size"), data.get("sha256")
    for name, value in (("version", version), ("size", size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{where}.{name}: {value!r} is not valid; expected an integer >= 0")
    if not isinstance(sha256, str) or not is_sha256_hex(sha256):
        raise ValueError(f"{where}.sha256: {sha256!r} is not valid; expected 64 lower-case hex digits")
    return Entry(path, version, size, sha256)


class DesiredContent:
    """What every node must hold: the managed paths after ``version`` numbered changes.

    ``check`` validates paths (:func:`check_path` for a document root,
    :func:`check_bundle_name` for task bundles)."""

    def __init__(self, check=check_path):
        self.version = 0
        self.entries: dict[str, Entry] = {}
        self.deleted: dict[str, int] = {}  # path -> version of its delete (tells a node's delete its version)
        self._check = check

    def conflict(self, paths: Iterable[str]) -> str | None:
        """Why files at ``paths`` (one push) cannot all be managed content, or None: a file cannot be
        where another needs a directory (``a`` and ``a/b``), among the managed paths and the new ones.
        Linear in the size of the tree (every path's depth, once): a push of many files into a large
        tree stays cheap."""
        new = sorted(set(paths))
        taken = set(self.entries).union(new)
        directories: dict[str, str] = {}  # every directory the paths need -> one path below it
        for path in taken:
            parts = path.split("/")
            for depth in range(1, len(parts)):
                directories.setdefault("/".join(parts[:depth]), path)
        for path in new:
            if path in directories:
                return f"{path!r} would be a file where {directories[path]!r} needs a directory"
            parts = path.split("/")
            for depth in range(1, len(parts)):
                parent = "/".join(parts[:depth])
                if parent in taken:
                    return f"{path!r} needs {parent!r} to be a directory, and {parent!r} is a managed file"
        return None

    def put(self, path: str, size: int, sha256: str) -> Change:
        self._check(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise ValueError(f"size {size!r} is not valid; expected an integer >= 0")
        if not is_sha256_hex(sha256):
            raise ValueError(f"sha256 {sha256!r} is not valid; expected 64 lower-case hex digits")
        return self.apply(Change(self.version + 1, "put", path, size, sha256))

    def delete(self, path: str) -> Change:
        self._check(path)
        if path not in self.entries:
            raise KeyError(f"path {path!r} is not managed content (managed: {len(self.entries)} paths)")
        return self.apply(Change(self.version + 1, "delete", path))

    def apply(self, change: Change) -> Change:
        """Apply one change of a log (the next version only): how a saved or replicated log is replayed."""
        if change.version != self.version + 1:
            raise ValueError(f"change version {change.version} is out of order; expected {self.version + 1}")
        if change.op == "put":
            self.entries[change.path] = Entry(change.path, change.version, change.size, change.sha256)
            self.deleted.pop(change.path, None)
        elif change.op == "delete":
            self.entries.pop(change.path, None)
            self.deleted[change.path] = change.version
        else:
            raise ValueError(f"change op {change.op!r} is not valid; expected put or delete")
        self.version = change.version
        return change

    def to_dict(self) -> dict[str, Any]:
        return {"version": self.version, "entries": {p: e.to_dict() for p, e in sorted(self.entries.items())},
                "deleted": dict(sorted(self.deleted.items()))}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], check=check_path) -> "DesiredContent":
        desired = cls(check)
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"version: {version!r} is not valid; expected an integer >= 0")
        desired.version = version
        for path, item in dict(data.get("entries", {})).items():
            check(path)
            desired.entries[path] = _entry_from(path, item, f"entries[{path!r}]")
        for path, deleted_at in dict(data.get("deleted", {})).items():
            desired.deleted[check(path)] = int(deleted_at)
        return desired


@dataclass(frozen=True)
class NodeReport:
    """A node's manifest: its committed content version and its managed paths."""

    version: int
    entries: Mapping[str, Entry] = field(default_factory=dict)

    @classmethod
    def from_manifest(cls, data: Any) -> "NodeReport":
        """From the broker's ``GET .../manifest`` JSON; raises ValueError naming the bad field."""
        if not isinstance(data, dict):
            raise ValueError(f"manifest: expected an object, got {type(data).__name__}")
        version = data.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise ValueError(f"manifest.version: {version!r} is not valid; expected an integer >= 0")
        paths = data.get("paths")
        if not isinstance(paths, dict):
            raise ValueError("manifest.paths: expected an object of path -> {version, size, sha256}")
        return cls(version, {p: _entry_from(p, item, f"manifest.paths[{p!r}]") for p, item in paths.items()})


@dataclass(frozen=True)
class Transfer:
    path: str
    version: int
    size: int
    sha256: str


@dataclass(frozen=True)
class Delete:
    path: str
    version: int


@dataclass(frozen=True)
class Plan:
    node_version: int  # what the node reported
    target: int  # the desired version it is brought to
    operations: tuple[Transfer | Delete, ...]  # in version order
    conflict: str | None = None  # set: the node is ahead; nothing is sent

    @property
    def commit(self) -> bool:
        """Whether the node must be told to commit ``target`` after the operations."""
        return self.conflict is None and (bool(self.operations) or self.node_version != self.target)

    @property
    def in_sync(self) -> bool:
        return self.conflict is None and not self.commit

    @property
    def bytes_to_send(self) -> int:
        return sum(op.size for op in self.operations if isinstance(op, Transfer))


def differences(desired: DesiredContent, report: NodeReport) -> list[tuple[str, str]]:
    """(path, "missing" | "different" | "extra") for every managed path that does not match, sorted by path."""
    found = []
    for path, entry in desired.entries.items():
        held = report.entries.get(path)
        if held is None:
            found.append((path, "missing"))
        elif not entry.same_bytes(held):
            found.append((path, "different"))
    found.extend((path, "extra") for path in report.entries if path not in desired.entries)
    return sorted(found)


def matches(desired: DesiredContent, report: NodeReport | None) -> bool:
    """The balancer's gate: the node committed the desired version and holds exactly its managed bytes."""
    return report is not None and report.version == desired.version and not differences(desired, report)


def plan(desired: DesiredContent, report: NodeReport) -> Plan:
    ahead = [p for p, e in report.entries.items() if e.version > desired.version]
    if report.version > desired.version or ahead:
        what = f"content version {report.version}" if report.version > desired.version else f"path {ahead[0]!r} at version {report.entries[ahead[0]].version}"
        return Plan(report.version, desired.version, (),
                    conflict=f"node holds {what}, ahead of the desired version {desired.version}: not rolled back")
    operations: list[Transfer | Delete] = []
    for path, kind in differences(desired, report):
        if kind == "extra":
            operations.append(Delete(path, desired.deleted.get(path, desired.version)))
        else:
            entry = desired.entries[path]
            operations.append(Transfer(path, entry.version, entry.size, entry.sha256))
    operations.sort(key=lambda op: (op.version, op.path))
    return Plan(report.version, desired.version, tuple(operations))


@dataclass(frozen=True)
class NodeContentStatus:
    node: str
    reachable: bool
    version: int | None
    matches: bool
    lag: int | None  # desired version minus the node's; negative: ahead
    differing: tuple[tuple[str, str], ...]  # (path, kind) as in differences()


def content_status(desired: DesiredContent, reports: Mapping[str, NodeReport | None]) -> list[NodeContentStatus]:
    """Per node (sorted by name): its version, whether it matches, which paths differ. None: unreachable."""
    rows = []
    for node in sorted(reports):
        report = reports[node]
        if report is None:
            rows.append(NodeContentStatus(node, False, None, False, None, ()))
            continue
        diff = tuple(differences(desired, report))
        rows.append(NodeContentStatus(node, True, report.version, report.version == desired.version and not diff,
                                      desired.version - report.version, diff))
    return rows


def differing_nodes(rows: Iterable[NodeContentStatus]) -> list[str]:
    return [row.node for row in rows if not row.matches]
