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
* :meth:`BlobStore.path` is where a blob's bytes are (KeyError when absent);
  :meth:`BlobStore.remove_unused` deletes the blobs no desired path refers to.
* Blocking file I/O: call it from a worker thread in an event loop.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path
from typing import Iterable

from common.adminauth import is_sha256_hex
from common.paths import check_path

__all__ = ["BlobStore", "CHUNK"]

CHUNK = 1 << 20


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

    def ingest(self, source: str | Path) -> tuple[str, int]:
        temp = self.root / f".incoming-{secrets.token_hex(8)}"
        digest = hashlib.sha256()
        size = 0
        try:
            with open(source, "rb") as src, open(temp, "xb") as dst:
                while chunk := src.read(CHUNK):
                    digest.update(chunk)
                    dst.write(chunk)
                    size += len(chunk)
                dst.flush()
                os.fsync(dst.fileno())
            sha256 = digest.hexdigest()
            final = self.root / sha256[:2] / sha256
            final.parent.mkdir(exist_ok=True)
            os.replace(temp, final)
        finally:
            temp.unlink(missing_ok=True)
        return sha256, size

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

    def remove_unused(self, keep: Iterable[str]) -> int:
        wanted = set(keep)
        removed = 0
        for path in self.root.glob("??/*"):
            if path.name not in wanted:
                path.unlink()
                removed += 1
        return removed
