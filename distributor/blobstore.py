"""The distributor's copy of every content version's bytes, by SHA-256 (adapter: files).

Contract
--------
* :meth:`BlobStore.ingest` copies a file in (streamed, 1 MiB at a time,
  hashed on the way), publishes it atomically as ``<root>/<sha256[:2]>/<sha256>``
  and returns ``(sha256, size)``.  Storing by digest means a node that was
  away during a change later receives exactly the bytes of that change, even
  if the operator's source file changed since, and identical files are kept once.
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

from .adminauth import is_sha256_hex

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

    def remove_unused(self, keep: Iterable[str]) -> int:
        wanted = set(keep)
        removed = 0
        for path in self.root.glob("??/*"):
            if path.name not in wanted:
                path.unlink()
                removed += 1
        return removed
