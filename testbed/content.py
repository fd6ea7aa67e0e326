"""The files every web node serves: known names, sizes and digests.

Contract: :data:`FILES` maps a URL path to its size; :func:`body` gives the
exact bytes (deterministic, the same on every node) and :func:`sha256` their
digest, so a client can check a download through the VIP arrived intact
whichever node served it.
"""

from __future__ import annotations

import functools
import hashlib

FILES = {
    "/health": 3,  # "ok\n": what node agents probe
    "/1k.bin": 1024,
    "/64k.bin": 64 * 1024,
    "/1m.bin": 1024 * 1024,
    "/4m.bin": 4 * 1024 * 1024,
}
BIG_FILE = "/1m.bin"


@functools.lru_cache(maxsize=None)
def body(path: str) -> bytes:
    if path == "/health":
        return b"ok\n"
    size = FILES[path]
    return hashlib.shake_256(f"distributor testbed {path}".encode()).digest(size)


@functools.lru_cache(maxsize=None)
def sha256(path: str) -> str:
    return hashlib.sha256(body(path)).hexdigest()
