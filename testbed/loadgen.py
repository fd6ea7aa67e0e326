"""Request recorders: clients that keep requesting through the VIP and note each outcome.

Contract: :class:`Recorder` starts ``clients`` threads in the client host,
each sending GETs on a new connection, back to back, until :meth:`stop`; each
result is a :class:`Request` ``(started, ok, node, seconds)`` (start wall time, success, X-Node,
duration), so a test can ask which requests *started* after a moment (a failure, an exclusion, a
takeover), whether they all succeeded and how long they took.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import NamedTuple

from . import http


class Request(NamedTuple):
    started: float  # wall time
    ok: bool
    node: str | None  # the X-Node header
    seconds: float  # how long it took, connection set-up included


class Recorder:
    def __init__(self, bed, clients: int = 4, path: str = "/1k.bin", timeout: float = 2.0):
        self.bed = bed
        self.path = path
        self.timeout = timeout
        self.results: list[Request] = []
        self._stop = threading.Event()
        self._pool = concurrent.futures.ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(self._loop) for _ in range(clients)]

    def _loop(self) -> None:
        while not self._stop.is_set():
            started, clock = time.time(), time.monotonic()
            try:
                reply = http.get(self.bed.ns("client"), self.bed.vip, 80, self.path, timeout=self.timeout)
                self.results.append(Request(started, reply.status == 200, reply.node, time.monotonic() - clock))
            except OSError:
                self.results.append(Request(started, False, None, time.monotonic() - clock))

    def stop(self) -> None:
        self._stop.set()
        for future in self._futures:
            future.result()
        self._pool.shutdown()

    def __enter__(self) -> "Recorder":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def between(self, start: float, end: float = float("inf")) -> list[Request]:
        return [r for r in self.results if start < r.started <= end]

    def after(self, moment: float) -> list[Request]:
        return self.between(moment)
