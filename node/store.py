"""The node's managed files: confined to one root, published atomically, a persisted manifest.

Contract
--------
* A :class:`ContentStore` owns one *area*: the web server's document root
  (``content``) or the agent's bundle directory (``bundles``).  Its manifest
  (per managed path: version, size, SHA-256; and the committed content
  version) is kept in a JSON file in the agent's state directory and written
  atomically (temporary file, fsync, rename, fsync of the directory) after
  every change, so it survives a restart or a crash.
* Confinement: a path is first checked lexically
  (:func:`common.paths.check_path`: ``..``, absolute, NUL, ...), then
  walked one component at a time from a descriptor of the root with
  ``O_NOFOLLOW`` (``openat(2)``), and every operation is done relative to the
  parent directory's descriptor.  No symlink is ever followed, so nothing
  written can land outside the root, even when a directory is swapped for a
  link during a transfer.  A symlink anywhere in the path, or as the final
  name, is refused (``symlink``).
* Publishing (:meth:`ContentStore.begin_put` -> :class:`Upload`): the bytes go
  to a temporary file in the target's own directory (same filesystem, so
  ``rename(2)`` is atomic: a reader sees the old file or the new one, never
  half of one); at the end the size and SHA-256 are verified, the file is
  fsynced, renamed over the target, and the directory fsynced.  Nothing is
  visible before the digest matched; a failed or aborted upload leaves
  nothing behind.
* Versions never go backwards: an operation's version must be at least the
  path's current version, and a commit at least the content version and every
  path's version (``stale_version``).  One upload per path at a time
  (``busy``).
* Every method is blocking file I/O: the broker calls them from a worker
  thread so the agent's event loop (and its heartbeats) never stall.  A lock
  makes the manifest safe to read from the loop meanwhile.
* Refusals raise :class:`StoreRefused` with a reason label; nothing changes.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.paths import TEMP_PREFIX, PathRefused, check_path

__all__ = ["StoreRefused", "ContentStore", "Upload", "atomic_write"]

_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


class StoreRefused(Exception):
    """An operation refused; ``reason`` is the refusal counter's label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def atomic_write(path: Path, data: bytes, mode: int = 0o600) -> None:
    """Replace ``path`` with ``data`` all at once, durably (write, fsync, rename, fsync the directory)."""
    temp = path.with_name(f"{TEMP_PREFIX}{path.name}.{secrets.token_hex(4)}")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        temp.unlink(missing_ok=True)
        raise
    os.close(fd)
    os.replace(temp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


@dataclass
class _Held:
    version: int
    size: int
    sha256: str


class ContentStore:
    def __init__(self, area: str, root: Path, manifest_file: Path, check: Callable[[object], str] = check_path,
                 max_size: int = 1 << 30, min_free: int = 64 << 20, file_mode: int = 0o644):
        self.area = area
        self.root = Path(root)
        self.manifest_file = Path(manifest_file)
        self.check = check
        self.max_size = max_size
        self.min_free = min_free
        self.file_mode = file_mode
        self.version = 0
        self.paths: dict[str, _Held] = {}
        self._lock = threading.Lock()
        self._save_lock = threading.Lock()
        self._uploading: set[str] = set()
        self.root.mkdir(parents=True, exist_ok=True)
        self._load()

    # -- manifest -------------------------------------------------------------
    def _load(self) -> None:
        try:
            data = json.loads(self.manifest_file.read_text())
        except FileNotFoundError:
            return
        self.version = int(data["version"])
        self.paths = {p: _Held(int(e["version"]), int(e["size"]), str(e["sha256"])) for p, e in data["paths"].items()}

    def manifest(self) -> dict:
        with self._lock:
            return {"area": self.area, "version": self.version,
                    "paths": {p: {"version": h.version, "size": h.size, "sha256": h.sha256}
                              for p, h in sorted(self.paths.items())}}

    def _save(self) -> None:
        # The snapshot is taken under the save lock, so of two threads saving, the later rename is the newer state.
        with self._save_lock:
            data = self.manifest()
            del data["area"]
            self.manifest_file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.manifest_file, json.dumps(data, separators=(",", ":")).encode())

    def remove_leftovers(self) -> int:
        """Delete temporary files a crash left in the root (never following links); returns how many."""
        removed = 0
        for directory, dirs, files in os.walk(self.root, followlinks=False):
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    try:
                        os.unlink(os.path.join(directory, name))
                        removed += 1
                    except OSError:
                        pass
        return removed

    # -- confinement ------------------------------------------------------------
    def _checked(self, path: object) -> str:
        try:
            return self.check(path)
        except PathRefused as exc:
            raise StoreRefused(exc.reason, str(exc)) from None

    def _open_parent(self, path: str, create: bool, created: list[str] | None = None) -> tuple[int, str]:
        """A descriptor of ``path``'s directory, walked from the root without following links.

        ``created`` collects the directories this call made (relative paths, outermost first), so
        an upload that is refused can take them away again (:meth:`_remove_empty`)."""
        *parents, name = path.split("/")
        fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            for depth, component in enumerate(parents, 1):
                try:
                    child = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except FileNotFoundError:
                    if not create:
                        raise StoreRefused("not_found", f"{self.area} path {path!r}: directory {component!r} does not exist") from None
                    try:
                        os.mkdir(component, 0o755, dir_fd=fd)
                        os.fsync(fd)  # the new directory entry is durable before anything goes in it
                        if created is not None:
                            created.append("/".join(parents[:depth]))
                    except FileExistsError:  # another upload made it meanwhile
                        pass
                    child = os.open(component, _DIR_FLAGS, dir_fd=fd)
                except OSError as exc:
                    if exc.errno in (errno.ENOTDIR, errno.ELOOP):
                        kind = os.lstat(component, dir_fd=fd).st_mode
                        if stat.S_ISLNK(kind):
                            raise StoreRefused("symlink", f"{self.area} path {path!r}: {component!r} is a symlink; links are never followed") from None
                        raise StoreRefused("not_directory", f"{self.area} path {path!r}: {component!r} is a file, not a directory") from None
                    raise
                os.close(fd)
                fd = child
            return fd, name
        except BaseException:
            os.close(fd)
            raise

    @staticmethod
    def _target_kind(dir_fd: int, name: str) -> int | None:
        try:
            return os.lstat(name, dir_fd=dir_fd).st_mode
        except FileNotFoundError:
            return None

    def _check_target(self, path: str, dir_fd: int, name: str) -> None:
        mode = self._target_kind(dir_fd, name)
        if mode is None or stat.S_ISREG(mode):
            return
        if stat.S_ISLNK(mode):
            raise StoreRefused("symlink", f"{self.area} path {path!r} is a symlink; links are never followed or replaced")
        raise StoreRefused("not_file", f"{self.area} path {path!r} exists and is not a regular file")

    def _check_version(self, path: str, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise StoreRefused("bad_request", f"version {version!r} is not valid; expected an integer >= 1")
        held = self.paths.get(path)
        if held is not None and version < held.version:
            raise StoreRefused("stale_version", f"{self.area} path {path!r} is at version {held.version}; {version} is older")

    # -- operations --------------------------------------------------------------
    def begin_put(self, path: object, version: int, size: int, sha256: str) -> "Upload":
        path = self._checked(path)
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise StoreRefused("bad_request", f"size {size!r} is not valid; expected an integer >= 0")
        if size > self.max_size:
            raise StoreRefused("too_large", f"{self.area} path {path!r}: {size} bytes exceed the limit of {self.max_size}")
        with self._lock:
            self._check_version(path, version)
            if path in self._uploading:
                raise StoreRefused("busy", f"{self.area} path {path!r} is being uploaded already")
            self._uploading.add(path)
        try:
            vfs = os.statvfs(self.root)
            free = vfs.f_bavail * vfs.f_frsize
            if free < size + self.min_free:
                raise StoreRefused("no_space", f"{self.area}: {free} bytes free, {size} needed plus a reserve of {self.min_free}")
            created: list[str] = []
            dir_fd, name = self._open_parent(path, create=True, created=created)
            try:
                self._check_target(path, dir_fd, name)
                temp = f"{TEMP_PREFIX}{secrets.token_hex(8)}"
                fd = os.open(temp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            except BaseException:
                os.close(dir_fd)
                self._remove_empty(created)
                raise
        except BaseException:
            with self._lock:
                self._uploading.discard(path)
            raise
        return Upload(self, path, version, size, sha256, dir_fd, name, temp, fd, created)

    def delete(self, path: object, version: int) -> bool:
        """Remove a managed path; False when it was not there (already deleted: nothing to do)."""
        path = self._checked(path)
        with self._lock:
            self._check_version(path, version)
            if path in self._uploading:
                raise StoreRefused("busy", f"{self.area} path {path!r} is being uploaded")
            managed = path in self.paths
        try:
            dir_fd, name = self._open_parent(path, create=False)
        except StoreRefused as exc:
            if exc.reason != "not_found":
                raise
            dir_fd = None
        existed = False
        if dir_fd is not None:
            try:
                self._check_target(path, dir_fd, name)
                try:
                    os.unlink(name, dir_fd=dir_fd)
                    existed = True
                    os.fsync(dir_fd)
                except FileNotFoundError:
                    pass
            finally:
                os.close(dir_fd)
        if managed:
            with self._lock:
                self.paths.pop(path, None)
            self._save()
        return existed or managed

    def commit(self, version: int) -> None:
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise StoreRefused("bad_request", f"version {version!r} is not valid; expected an integer >= 0")
        with self._lock:
            newest = max((h.version for h in self.paths.values()), default=0)
            if version < self.version or version < newest:
                raise StoreRefused("stale_version", f"{self.area}: cannot commit version {version} below the content "
                                                    f"version {self.version} or a path's version {newest}")
            if version == self.version:
                return
            self.version = version
        self._save()

    def _published(self, path: str, version: int, size: int, sha256: str) -> None:
        with self._lock:
            self.paths[path] = _Held(version, size, sha256)
            self._uploading.discard(path)
        self._save()

    def _released(self, path: str) -> None:
        with self._lock:
            self._uploading.discard(path)

    def _remove_empty(self, directories: list[str]) -> None:
        """Take away directories a refused upload made, innermost first, each only while empty
        (another upload may have put something in one meanwhile: rmdir then fails and it stays)."""
        for relative in reversed(directories):
            try:
                os.rmdir(os.path.join(self.root, relative))
            except OSError:
                return  # not empty (or gone): its parents are not empty either


class Upload:
    """One file being received: :meth:`write` the chunks, then :meth:`finish` or :meth:`abort`."""

    def __init__(self, store: ContentStore, path: str, version: int, size: int, sha256: str,
                 dir_fd: int, name: str, temp: str, fd: int, created: list[str] | None = None):
        self.store = store
        self._created = created or []  # directories begin_put made for it: taken away if it is refused
        self._ended = False  # finished or aborted: the path's "busy" mark is released once, by this upload
        self.path = path
        self.version = version
        self.size = size
        self.sha256 = sha256
        self.received = 0
        self._digest = hashlib.sha256()
        self._dir_fd = dir_fd
        self._name = name
        self._temp = temp
        self._fd: int | None = fd

    def write(self, chunk: bytes) -> None:
        self.received += len(chunk)
        if self.received > self.size:
            raise StoreRefused("bad_size", f"{self.store.area} path {self.path!r}: more than the declared {self.size} bytes")
        self._digest.update(chunk)  # hashlib releases the GIL for large buffers
        view = memoryview(chunk)
        while view:
            view = view[os.write(self._fd, view):]

    def temp_bytes(self, limit: int) -> bytes:
        """The received bytes (at most ``limit``) for a validation before publishing (task bundles)."""
        return os.pread(self._fd, limit + 1, 0)

    def finish(self, validate: Callable[["Upload"], None] | None = None) -> None:
        """Verify size and digest (and ``validate``), then publish atomically and durably."""
        try:
            if self.received != self.size:
                raise StoreRefused("bad_size", f"{self.store.area} path {self.path!r}: received {self.received} of {self.size} bytes")
            if self._digest.hexdigest() != self.sha256:
                raise StoreRefused("bad_digest", f"{self.store.area} path {self.path!r}: SHA-256 {self._digest.hexdigest()} is not the declared {self.sha256}")
            if validate is not None:
                validate(self)
            os.fchmod(self._fd, self.store.file_mode)
            os.fsync(self._fd)
            with self.store._lock:  # a newer version may have been published meanwhile
                self.store._check_version(self.path, self.version)
            # rename(2) does not follow a symlink at the destination; _check_target refused one at the start.
            os.rename(self._temp, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
            self._temp = ""
            os.fsync(self._dir_fd)
        except BaseException:
            self.abort()
            raise
        self._close()
        self._ended = True
        self.store._published(self.path, self.version, self.size, self.sha256)

    def abort(self) -> None:
        """Drop the upload; idempotent (a second call, e.g. by the broker after a failed finish, must
        not release the "busy" mark a newer upload of the same path holds by then)."""
        if self._ended:
            return
        self._ended = True
        if self._temp:
            try:
                os.unlink(self._temp, dir_fd=self._dir_fd)
            except OSError:
                pass
            self._temp = ""
        self._close()
        self.store._remove_empty(self._created)
        self.store._released(self.path)

    def _close(self) -> None:
        for attr in ("_fd", "_dir_fd"):
            fd = getattr(self, attr, None)
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
                setattr(self, attr, None)
