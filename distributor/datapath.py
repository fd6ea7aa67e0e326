"""The NFQUEUE adapter: packets from the kernel to the interposer and verdicts back; raw sends.

Contract
--------
:class:`PacketQueue` binds an NFQUEUE and hands each packet's bytes to the
interposer's ``decide``, which returns ``(reason, out, extra)``; it executes
the verdict (accept with the new bytes or the mark, drop, or repeat) and
collects ``extra``.  After each bounded batch it delivers one
:class:`~backup.failover.PacketsHandled` event with the batch's effects (and a
:class:`~backup.failover.FirstForward` when armed) to the core, whose commands
may release the SYNs it holds.  Every packet gets a verdict: if ``decide``
raises, the packet is dropped (a half-decided packet could reach the wrong
backend; TCP retransmits it) and the error is counted and logged.

It decides nothing itself: holding new SYNs (:meth:`PacketQueue.hold`) and
timing the first forwarded packet (:meth:`PacketQueue.arm_first_forward`)
are commands of the failover core.

:class:`RawSender` sends packets the core crafted (RSTs, probes).
"""

from __future__ import annotations

import errno
import logging
import socket
import time
from typing import Callable

from netfilterqueue import NetfilterQueue

from backup.failover import FirstForward, PacketsHandled

from .reroute import ACCEPT, Mode, Reason

__all__ = ["PacketQueue", "RawSender", "QueueError", "DRAIN_BATCH"]

log = logging.getLogger("distributor.datapath")


class QueueError(RuntimeError):
    pass


# Packets handled per wake-up before the event loop gets its turn (timers, heartbeats).
DRAIN_BATCH = 256


class _BudgetedSocket:
    """A non-blocking recv that reports EAGAIN once ``left`` packets were read.

    netfilterqueue's ``run_socket`` reads until EAGAIN; this is how a drain is bounded.
    It runs once per packet, hence the slots and the prebuilt exception.
    """

    __slots__ = ("sock", "left", "_recv")
    _DONE = BlockingIOError(errno.EAGAIN, "batch done")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)
        self._recv = sock.recv
        self.left = 0

    def recv(self, size: int) -> bytes:
        left = self.left
        if left <= 0:
            raise self._DONE
        self.left = left - 1
        return self._recv(size)


# Kernel mode decides on headers only: IPv4 (20) + TCP with options (60) fit.
KERNEL_MODE_COPY = 128

Decider = Callable[[bytes, float], "tuple[Reason, bytes | int | None, tuple | None]"]
_VERDICTS = [reason.verdict for reason in Reason]
_NEW = Reason.NEW_CONNECTION
_REPEAT = -1  # kernel mode: the packet walks the hook again (to save its mark in the connmark)


class PacketQueue:
    """One bound NFQUEUE, read from an asyncio loop; see the module docstring."""

    def __init__(self, queue: int, decide: Decider, deliver: Callable[[object], None], mode: Mode = Mode.REWRITE,
                 max_len: int = 4096, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        """``decide(bytes, now)`` is the interposer's; ``deliver(event)`` feeds the core."""
        self.queue = queue
        self.marks = mode is Mode.KERNEL
        self.decide = decide
        self._deliver = deliver
        self._clock = clock
        self._wall_clock = wall_clock
        self._now = clock()
        # Kernel mode's end of a connection is repeated through the hook rather than accepted.
        self._verdicts = list(_VERDICTS)
        if self.marks:
            self._verdicts[Reason.CONNECTION_END] = _REPEAT
        self.errors = 0
        self.batch = DRAIN_BATCH
        self.drains = 0  # wake-ups that read the queue
        self.packets = 0  # packets read (a batch per wake-up at most)
        self._hold_new = False
        self._held: list = []
        self._effects: list = []
        self._armed = False
        self._forwarded_at: float | None = None
        self._last_error_log = 0.0
        self._nfq = NetfilterQueue()
        try:
            # One packet of up to 4 KiB in flight per slot; the socket buffer
            # must hold a full queue or the kernel reports ENOBUFS and drops.
            if self.marks:
                self._nfq.bind(queue, self._on_packet, max_len=max_len, range=KERNEL_MODE_COPY,
                               sock_len=max_len * (KERNEL_MODE_COPY + 512))
            else:
                self._nfq.bind(queue, self._on_packet, max_len=max_len, sock_len=max_len * 4096)
        except OSError as exc:
            raise QueueError(f"cannot bind NFQUEUE {queue}: {exc} (another daemon bound to it? CAP_NET_ADMIN missing?)") \
                from None
        self._budget = _BudgetedSocket(socket.fromfd(self._nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW))

    def fileno(self) -> int:
        return self._nfq.get_fd()

    # -- commands ---------------------------------------------------------------------------------
    def hold(self, hold: bool) -> None:
        """HoldNewSyns: keep each new connection's SYN until :meth:`release_held`."""
        self._hold_new = hold
        if not hold and self._held:
            self.release_held()

    def release_held(self) -> None:
        """ReleaseNewSyns: their sync batch has been sent."""
        held, self._held = self._held, []
        for packet in held:
            packet.accept()
        if held and self._armed:
            self._armed = False
            self._forwarded_at = self._clock()

    def arm_first_forward(self) -> None:
        self._armed = True
        self._forwarded_at = None

    def drain(self) -> None:
        """Handle up to ``batch`` waiting packets without blocking, then report the batch to the core.

        The bound matters: under sustained traffic the socket never empties, and
        an unbounded drain would keep the event loop from its timers, so the
        distributor would stop heartbeating and its backup would take over.
        One clock reading serves the whole batch.
        """
        self._now = self._clock()
        self._budget.left = self.batch
        self.drains += 1
        try:
            self._nfq.run_socket(self._budget)
        finally:
            self.packets += self.batch - self._budget.left
            effects, self._effects = self._effects, []
            self._deliver(PacketsHandled(self._now, self._wall_clock(), tuple(effects)))
            if self._forwarded_at is not None:
                at, self._forwarded_at = self._forwarded_at, None
                self._deliver(FirstForward(at))

    def close(self) -> None:
        self.release_held()
        self._nfq.unbind()
        self._budget.sock.close()

    # -- per packet ---------------------------------------------------------------------------------
    def _on_packet(self, packet) -> None:
        verdict = 0
        held = False
        try:
            reason, out, extra = self.decide(packet.get_payload(), self._now)
            if extra is not None:
                self._effects.extend(extra)
            if out is not None:
                if self.marks:
                    packet.set_mark(out)
                else:
                    packet.set_payload(out)
                if reason is _NEW and self._hold_new:
                    self._held.append(packet)
                    held = True
                elif self._armed:
                    self._armed = False
                    self._forwarded_at = self._now
            verdict = self._verdicts[reason]
        except Exception:
            verdict = 0
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 5.0:
                self._last_error_log = now
                log.exception("packet handler failed (%d failures so far); the packet is dropped", self.errors)
        finally:
            if held:
                pass
            elif verdict == ACCEPT:
                packet.accept()
            elif verdict == _REPEAT:
                packet.repeat()
            else:
                packet.drop()


class RawSender:
    """Sends complete IPv4 packets the core crafted (RSTs to clients) through a raw socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._sock.setblocking(False)
        self.sent = 0
        self.failed = 0

    def send(self, packet: bytes) -> None:
        try:
            self._sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
            self.sent += 1
        except OSError as exc:
            self.failed += 1
            log.warning("cannot send a crafted packet to %s: %s", socket.inet_ntoa(packet[16:20]), exc)

    def close(self) -> None:
        self._sock.close()
