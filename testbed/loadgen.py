"""Request recorders: clients that keep requesting through the VIP and note each outcome.

Contract: :class:`Recorder` starts ``clients`` threads in the client host,
each sending GETs on a new connection to the VIP (or ``vip``: ``bed.vip6`` for IPv6), back to
back, until :meth:`stop`; each result is a :class:`Request` ``(started, ok, node, seconds)``
(start wall time, success, X-Node, duration), so a test can ask which requests *started* after a
moment (a failure, an exclusion, a takeover), whether they all succeeded and how long they took.

:func:`kill_under_load` kills an active-active distributor in the middle of a wrk run with a
recorder beside it (the e2e test and ``bench.scaleout`` both use it).
"""

from __future__ import annotations

import concurrent.futures
import subprocess
import threading
import time
from typing import NamedTuple

from . import http, wrk


class Request(NamedTuple):
    started: float  # wall time
    ok: bool
    node: str | None  # the X-Node header
    seconds: float  # how long it took, connection set-up included


class Recorder:
    def __init__(self, bed, clients: int = 4, path: str = "/1k.bin", timeout: float = 2.0, vip: str | None = None):
        self.bed = bed
        self.vip = vip or bed.vip
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
                reply = http.get(self.bed.ns("client"), self.vip, 80, self.path, timeout=self.timeout)
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


def forwarded(bed, host: str) -> float:
    """Packets the distributor on ``host`` sent to nodes (new, known and adopted connections)."""
    return sum(value for (name, labels), value in bed.metrics(host).items()
               if name == "distributor_packets_total"
               and dict(labels).get("reason") in ("new_connection", "to_backend", "adopted_flow"))


class KillRun(NamedTuple):
    result: "wrk.WrkResult"  # wrk's, whose latency starts once its connection is up
    withdrawn: float  # seconds from the kill until the router's route had lost the victim's path
    recorded: list[Request]  # a recorder's beside wrk: new connections, timed whole (a lost SYN shows here)


def kill_under_load(bed, victim: str, close: bool, duration: float = 8.0, connections: int = 24) -> KillRun:
    """Run wrk through the VIP and kill the distributor ``victim`` (every process, links down) in its
    middle, once wrk's flows pass through it; the router must have every path to begin with."""
    from .runner import wait_until  # the runner imports nothing of this module; this keeps it so

    paths = len(bed.topology.by_role("distributor"))
    bed.wait_paths(paths, 30)
    load = bed.popen("client", wrk.command(f"http://{bed.vip}/1k.bin", duration=duration, connections=connections,
                                           close=close, timeout=5),
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        with Recorder(bed, clients=4, timeout=5.0) as recorder:
            start = forwarded(bed, victim)
            wait_until(lambda: forwarded(bed, victim) - start > 500, 10, f"wrk's flows through {victim}")
            killed, killed_wall = time.monotonic(), time.time()
            bed.kill(victim)
            wait_until(lambda: len(bed.router_paths()) == paths - 1, 10, f"the router to drop {victim}")
            withdrawn = time.monotonic() - killed
            # The requests at risk start before the withdrawal; one that starts 1.5 s after the kill
            # means every one of them has had its SYN retransmission (1 s) and its answer.
            wait_until(lambda: recorder.after(killed_wall + 1.5), 10, "the recorder's requests past the kill")
    finally:
        output = load.communicate(timeout=duration + 60)[0]
    return KillRun(wrk.parse(output), withdrawn, recorder.results)
