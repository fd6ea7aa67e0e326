"""Small helpers to act inside a named network namespace from Python.

Contract: :func:`call_in` runs a function in a helper thread that has joined
the namespace (``setns(2)`` changes only the calling thread's namespace), so
the caller's own thread never moves.  A socket created there stays bound to
that namespace for its whole life, which lets tests hold real client
connections from inside the testbed.  :func:`pids` and :func:`names` wrap
``ip netns``.
"""

from __future__ import annotations

import ctypes
import os
import socket
import subprocess
import threading
from typing import Any, Callable

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"

_libc = ctypes.CDLL(None, use_errno=True)


def call_in(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run ``fn(*args, **kwargs)`` inside namespace ``name`` and return its result (or raise its exception)."""
    outcome: dict[str, Any] = {}

    def worker() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, name), os.O_RDONLY)
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns into {name}: {os.strerror(err)}")
            finally:
                os.close(fd)
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # handed to the caller's thread below
            outcome["error"] = exc

    thread = threading.Thread(target=worker, name=f"netns-{name}")
    thread.start()
    thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def socket_in(name: str, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
    return call_in(name, socket.socket, family, kind)


def connect_in(name: str, address: tuple[str, int], timeout: float = 2.0) -> socket.socket:
    """A TCP connection opened from inside namespace ``name``."""

    def connect() -> socket.socket:
        return socket.create_connection(address, timeout=timeout)

    return call_in(name, connect)


def names() -> list[str]:
    result = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    return [line.split()[0] for line in result.stdout.splitlines() if line.strip()]


def pids(name: str) -> list[int]:
    result = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True)
    if result.returncode != 0:
        return []
    return [int(p) for p in result.stdout.split()]


def exists(name: str) -> bool:
    return os.path.exists(os.path.join(NETNS_DIR, name))
