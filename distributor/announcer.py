"""Active-active's adapters: the VIP routes BIRD exports, and the BIRD process that dies with the daemon.

Contract
--------
:class:`RouteTable` executes the announce core's commands (distributor.announce):
:class:`~distributor.announce.AnnounceRoute` puts ``VIP/32 dev lo`` in the configured kernel table,
:class:`~distributor.announce.WithdrawRoute` takes it out.  No packet is routed by that table (no
policy rule points at it); it only tells BIRD, whose ``protocol kernel { kernel table N; learn; }``
imports it through netlink at once and announces or withdraws the VIP to the router over BGP.

:class:`BirdProcess` runs BIRD (``bird -f``) as the daemon's child with ``PR_SET_PDEATHSIG``:
when the daemon dies, however it dies, the kernel kills BIRD, its BGP session closes, and the
router drops this distributor's path within milliseconds (docs/scale-out.md has the figures).
Without it, a route left in the table by a crashed daemon would stay announced and the router
would keep sending flows into a dead data path.  A BIRD that exits on its own is logged and started
again after :data:`RESTART_DELAY`.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import subprocess
from typing import Callable

log = logging.getLogger("distributor.announce")

__all__ = ["RouteTable", "BirdProcess", "AnnounceError", "RESTART_DELAY"]

RESTART_DELAY = 2.0  # seconds before a BIRD that exited on its own is started again
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class AnnounceError(RuntimeError):
    pass


class RouteTable:
    """The kernel table BIRD learns the announced VIPs from."""

    def __init__(self, table: int, *, netns_exec: tuple[str, ...] = ()):
        self.table = table
        self._prefix = netns_exec

    def announce(self, vip: str) -> None:
        self._ip(["route", "replace", f"{vip}/32", "dev", "lo", "table", str(self.table), "proto", "static"])
        log.info("VIP %s put in table %d: BIRD announces it", vip, self.table)

    def withdraw(self, vip: str) -> None:
        result = self._ip(["route", "del", f"{vip}/32", "table", str(self.table)], check=False)
        # ESRCH: it was not there; ENOENT ("FIB table does not exist"): the table has never had a route.
        if result.returncode != 0 and not any(gone in result.stderr for gone in ("No such process", "does not exist")):
            raise AnnounceError(f"ip route del {vip}/32 table {self.table} failed: {result.stderr.strip()}")

    def _ip(self, argv: list[str], check: bool = True) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([*self._prefix, "ip", *argv], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise AnnounceError("ip is not installed (Debian package: iproute2)") from None
        if check and result.returncode != 0:
            raise AnnounceError(f"ip {' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child may not dlopen between fork and exec


def _dying_with(parent: int) -> Callable[[], None]:
    """What the child runs between fork and exec: the kernel sends BIRD SIGTERM when the thread that
    forked it (the daemon's main thread) exits, SIGKILL included."""
    def set_death_signal() -> None:
        if _prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            os._exit(127)
        if os.getppid() != parent:  # the daemon died before prctl took effect
            os._exit(0)
    return set_death_signal


class BirdProcess:
    """BIRD in the foreground, the daemon's child; see the module docstring."""

    def __init__(self, binary: str, config: str, socket: str, on_exit: Callable[[int], None] | None = None):
        self.binary = binary
        self.config = config
        self.socket = socket
        self.on_exit = on_exit
        self.process: subprocess.Popen | None = None
        self._stopping = False
        self._watcher: asyncio.Task | None = None

    def check(self) -> None:
        """Parse the configuration only (``bird -p``): a mistake is said before anything starts."""
        try:
            result = subprocess.run([self.binary, "-p", "-c", self.config], capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise AnnounceError(f"announce.bird_binary: {self.binary!r} is not installed (Debian package: bird2)") \
                from None
        if result.returncode != 0:
            raise AnnounceError(f"announce.bird_config: BIRD refuses {self.config}: "
                                f"{(result.stderr or result.stdout).strip()}")

    def start(self) -> None:
        """Start BIRD (from the daemon's main thread: the death signal follows the thread that forked)."""
        self._stopping = False
        self.process = subprocess.Popen([self.binary, "-f", "-c", self.config, "-s", self.socket],
                                        stdin=subprocess.DEVNULL, preexec_fn=_dying_with(os.getpid()))
        log.info("started BIRD (pid %d) with %s", self.process.pid, self.config)
        self._watcher = asyncio.get_running_loop().create_task(self._watch(self.process), name="bird")

    async def _watch(self, process: subprocess.Popen) -> None:
        code = await asyncio.to_thread(process.wait)
        if self._stopping or process is not self.process:
            return
        log.error("BIRD (pid %d) exited with %d: the VIPs are not announced; starting it again in %gs", process.pid,
                  code, RESTART_DELAY)
        if self.on_exit is not None:
            self.on_exit(code)
        await asyncio.sleep(RESTART_DELAY)
        if not self._stopping:
            try:
                self.start()
            except OSError as exc:  # the binary went away: said, and tried again at the same pace
                log.error("cannot start BIRD again: %s", exc)
                self._watcher = asyncio.get_running_loop().create_task(self._watch(process), name="bird")

    async def stop(self, grace: float = 5.0) -> None:
        self._stopping = True
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(process.wait), grace)
        except asyncio.TimeoutError:
            process.kill()
            await asyncio.to_thread(process.wait)
        log.info("BIRD (pid %d) stopped", process.pid)
