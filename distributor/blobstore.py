"""The distributor's copy of every content version's bytes, by SHA-256 (adapter: files).

Contract
--------
* :meth:`BlobStore.ingest` copies a file in (streamed, 1 MiB at a time,
  hashed on the way), publishes it atomically as ``<root>/<sha256[:2]>/<sha256>``
  and returns ``(sha256, size)``.  Storing by digest means a node that was
  away during a change later receives exactly the bytes of that change, even
  if the operator's source file changed since, and identical files are kept once.
* :meth:`BlobStore.ingest_tree` ingests every regular file under a directory
  (a tree push) and returns ``(managed path, sha256, size)`` per file, the
  paths checked by :func:`common.paths.check_path`; symlinks are not
  followed (refused, with the path named), so a tree cannot pull in files
  from elsewhere.
* :meth:`BlobStore.writer` receives a blob a chunk at a time (the control
  API streams an upload into it: never whole in memory); :meth:`BlobWriter.commit`
  publishes it like :meth:`~BlobStore.ingest`, :meth:`BlobWriter.abort` drops it.
* :meth:`BlobStore.ingest_tar` ingests every regular file of a tar archive (a
  tree pushed through the API), all or nothing: every member is checked
  first (regular files and directories only, paths by
  :func:`common.paths.check_path` under the prefix, no path twice), and a
  refusal raises :class:`TreeRefused` or :class:`~common.paths.PathRefused`
  naming the member, before any blob is written.
* :meth:`BlobStore.path` is where a blob's bytes are (KeyError when absent);
  :meth:`BlobStore.remove_unused` deletes the blobs no desired path refers to
  (except those younger than ``grace`` seconds: an upload may be about to use one).
* Blocking file I/O: call it from a worker thread in an event loop.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import tarfile
import time
from pathlib import Path
from typing import BinaryIO, Iterable

from common.adminauth import is_sha256_hex
from common.paths import check_path

__all__ = ["BlobStore", "BlobWriter", "TreeRefused", "CHUNK", "MAX_TREE_FILES"]

CHUNK = 1 << 20
MAX_TREE_FILES = 100_000


class TreeRefused(ValueError):
    """A tar archive that is not a tree of regular files; ``reason`` is the refusal counter's label."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


class BlobWriter:
    """One blob on its way in: :meth:`write` chunks (hashed as they come), then :meth:`commit` or :meth:`abort`."""

    def __init__(self, store: "BlobStore"):
        self.store = store
        self.temp = store.root / f".incoming-{secrets.token_hex(8)}"
        self._file: BinaryIO | None = open(self.temp, "xb")
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, chunk: bytes) -> None:
        assert self._file is not None, "this blob was committed or aborted"
        self._digest.update(chunk)
        self._file.write(chunk)
        self.size += len(chunk)

    def close(self) -> Path:
        """Flush and close the temporary file without publishing it (a tar to read): its path."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        return self.temp

    def commit(self) -> tuple[str, int]:
        """Publish the bytes as ``<root>/<sha256[:2]>/<sha256>``; returns (sha256, size)."""
        self.close()
        sha256 = self._digest.hexdigest()
        final = self.store.root / sha256[:2] / sha256
        final.parent.mkdir(exist_ok=True)
        os.replace(self.temp, final)
        return sha256, self.size

    def abort(self) -> None:
        """Drop whatever was written (a no-op after commit)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        self.temp.unlink(missing_ok=True)


class BlobStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def path(self, sha256: str) -> Path:
        if not is_sha256_hex(sha256):
            raise ValueError(f"digest {sha256!r} is not valid; expected 64 lower-case hex digits")
        path = self.root / sha256[:2] / sha256
        if not path.is_file():
            raise KeyError(f"no blob {sha256} in {self.root}")
        return path

    def writer(self) -> BlobWriter:
        return BlobWriter(self)

    def ingest(self, source: str | Path) -> tuple[str, int]:
        with open(source, "rb") as src:
            return self.ingest_file(src)

    def ingest_file(self, source: BinaryIO) -> tuple[str, int]:
        """Copy an open file's bytes in (streamed); (sha256, size)."""
        writer = self.writer()
        try:
            while chunk := source.read(CHUNK):
                writer.write(chunk)
            return writer.commit()
        finally:
            writer.abort()

    def ingest_tar(self, archive_path: str | Path, prefix: str = "",
                   max_files: int = MAX_TREE_FILES) -> list[tuple[str, str, int]]:
        """Every regular file of a tar archive (plain or compressed), sorted by path: (``prefix`` + member path,
        sha256, size).  Nothing is written unless every member is acceptable (see the module docstring)."""
        try:
            archive = tarfile.open(archive_path, "r:*")
        except (tarfile.TarError, EOFError) as exc:
            raise TreeRefused("bad_tree", f"the body is not a tar archive: {exc}") from None
        with archive:
            try:
                members = archive.getmembers()  # headers only: the data is skipped over
            except (tarfile.TarError, EOFError) as exc:
                raise TreeRefused("bad_tree", f"the tar archive is damaged: {exc}") from None
            wanted: list[tuple[tarfile.TarInfo, str]] = []
            seen: set[str] = set()
            for member in members:
                name = member.name
                while name.startswith("./"):
                    name = name[2:]
                if member.isdir() or name in ("", "."):
                    continue
                if not member.isreg():
                    kind = "symlink" if member.issym() else "hard link" if member.islnk() else "special file"
                    raise TreeRefused("not_file", f"{member.name!r} is a {kind}; a pushed tree holds regular files "
                                                  "and directories only")
                path = check_path(prefix + name)
                if path in seen:
                    raise TreeRefused("bad_tree", f"{member.name!r} appears twice in the tree")
                seen.add(path)
                wanted.append((member, path))
            if not wanted:
                raise TreeRefused("bad_tree", "the tree holds no regular file")
            if len(wanted) > max_files:
                raise TreeRefused("bad_tree", f"the tree holds {len(wanted)} files; at most {max_files} a push")
            found = []
            for member, path in wanted:
                source = archive.extractfile(member)
                assert source is not None, "a regular member always has data"
                with source:
                    sha256, size = self.ingest_file(source)
                found.append((path, sha256, size))
        return sorted(found)

    def ingest_tree(self, directory: str | Path, prefix: str = "") -> list[tuple[str, str, int]]:
        """Every regular file under ``directory``, sorted by path: (``prefix`` + relative path, sha256, size)."""
        base = Path(directory)
        found = []
        for folder, dirs, files in os.walk(base, followlinks=False):
            for name in sorted(dirs + files):
                full = Path(folder) / name
                if full.is_symlink():
                    raise ValueError(f"{full} is a symlink; a pushed tree holds regular files and directories only")
            for name in files:
                full = Path(folder) / name
                if not full.is_file():
                    continue
                path = check_path(prefix + full.relative_to(base).as_posix())
                sha256, size = self.ingest(full)
                found.append((path, sha256, size))
        return sorted(found)

    def remove_unused(self, keep: Iterable[str], grace: float = 0.0) -> int:
        wanted = set(keep)
        young = time.time() - grace
        removed = 0
        for path in self.root.glob("??/*"):
            try:
                if path.name not in wanted and (grace <= 0 or path.stat().st_mtime < young):
                    path.unlink()
                    removed += 1
            except FileNotFoundError:  # removed meanwhile
                continue
        return removed
