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

:class:`RawSender` sends packets the core crafted (RSTs, probes), IPv4 or IPv6.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable

from backup.failover import FirstForward, PacketsHandled

from .nfqueue import ACCEPT, COPY_WHOLE, DROP, REPEAT, NfQueue
from .reroute import Mode, Reason

__all__ = ["PacketQueue", "RawSender", "QueueError", "DRAIN_BATCH"]

log = logging.getLogger("distributor.datapath")


class QueueError(RuntimeError):
    pass


# Packets handled per wake-up before the event loop gets its turn (timers, heartbeats).
DRAIN_BATCH = 256

# Coalescing (only when asked: the daemon asks at SCHED_FIFO).  A real-time daemon is woken at every
# packet, ahead of the processes producing them, and handles one packet per wake-up: measured on two
# cores in kernel mode, 3,000-4,300 new connections/s where the normal policy gives 8,100.  After a
# small drain that began soon after the previous one (the queue is busy), it pauses, so that the
# producers run and the next wake-up finds a batch: 7,500-7,900/s, heartbeats still as punctual as
# at SCHED_FIFO (worst gap 101 ms in a 90 s saturation run).  An idle queue is never paused.
COALESCE_BELOW = 32  # packets: a drain that read fewer is small
COALESCE_BUSY = 0.001  # s: a drain that begins this soon after the previous one began means a busy queue
COALESCE_PAUSE = 0.0002  # s: the pause (a few packets' worth at the rates above)

# Kernel mode decides on headers only: IPv4 (20) or IPv6 (40) + TCP with options (60) fit.
KERNEL_MODE_COPY = 128

Decider = Callable[[bytes, float], "tuple[Reason, bytes | int | None, tuple | None]"]
_VERDICTS = [reason.verdict for reason in Reason]
_NEW = Reason.NEW_CONNECTION


class PacketQueue:
    """One bound NFQUEUE, read from an asyncio loop; see the module docstring.

    The queue is bound through :class:`~distributor.nfqueue.NfQueue` (nfnetlink_queue spoken
    directly): a batch's verdicts go back in one ``sendmsg``.  Not fail-open: when the queue is
    full the kernel drops (clients retransmit) rather than letting a packet reach the gateway's
    own stack, which would reset it.  No GSO flag: the kernel completes checksums before copying, so
    the interposer's incremental RFC 1624 patches hold; the heavy direction (node -> client) does
    not cross user space at all in either mode (see distributor/rules.py).
    """

    def __init__(self, queue: int, decide: Decider, deliver: Callable[[object], None], mode: Mode = Mode.REWRITE,
                 max_len: int = 4096, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, *, binding: Callable[..., NfQueue] = NfQueue,
                 coalesce: float = 0.0, sleep: Callable[[float], None] = time.sleep):
        """``decide(bytes, now)`` is the interposer's; ``deliver(event)`` feeds the core.

        ``binding`` opens the queue (:class:`~distributor.nfqueue.NfQueue`'s signature and methods:
        ``read``, ``verdict``, ``flush``, ``fileno``, ``stats``, ``close``); tests pass a double.
        ``coalesce``: seconds to pause after a small drain of a busy queue (see COALESCE_BELOW); 0: never.
        """
        self.queue = queue
        self.marks = mode.marks
        self.decide = decide
        self._deliver = deliver
        self._clock = clock
        self._wall_clock = wall_clock
        self._now = clock()
        # Kernel mode's end of a connection is repeated through the hook rather than accepted.
        self._verdicts = list(_VERDICTS)
        if mode.repeats_end:
            self._verdicts[Reason.CONNECTION_END] = REPEAT
        self.errors = 0
        self.batch = DRAIN_BATCH
        self.drains = 0  # wake-ups that read the queue
        self.packets = 0  # packets read
        self._hold_new = False
        self._held: list[tuple[int, bytes | int]] = []  # (packet id, new bytes or mark) of held SYNs
        self._effects: list = []
        self._armed = False
        self._forwarded_at: float | None = None
        self._arrived_at: float | None = None  # when the packet timed by ArmFirstForward was read
        self._last_error_log = 0.0
        self.coalesce = coalesce
        self._sleep = sleep
        self._last_drain = float("-inf")  # when the previous drain began (its clock reading)
        self.pauses = 0  # coalescing pauses taken
        try:
            self._nfq = binding(queue, fail_open=False, gso=False,
                                copy_range=KERNEL_MODE_COPY if self.marks else COPY_WHOLE,
                                max_len=max_len, batch=self.batch)
        except OSError as exc:
            raise QueueError(f"cannot bind NFQUEUE {queue}: {exc} (another daemon bound to it? CAP_NET_ADMIN "
                             "missing?)") from None

    def fileno(self) -> int:
        return self._nfq.fileno()

    @property
    def kernel_stats(self) -> dict[str, int]:
        return self._nfq.stats()

    # -- commands ---------------------------------------------------------------------------------
    def hold(self, hold: bool) -> None:
        """HoldNewSyns: keep each new connection's SYN until :meth:`release_held`."""
        self._hold_new = hold
        if not hold and self._held:
            self.release_held()

    def release_held(self) -> None:
        """ReleaseNewSyns: their sync batch has been sent."""
        held, self._held = self._held, []
        nfq = self._nfq
        for packet_id, out in held:
            if self.marks:
                nfq.verdict(packet_id, ACCEPT, mark=out)
            else:
                nfq.verdict(packet_id, ACCEPT, payload=out)
        nfq.flush()
        if held and self._armed:
            self._armed = False
            self._forwarded_at = self._clock()

    def arm_first_forward(self) -> None:
        self._armed = True
        self._forwarded_at = None
        self._arrived_at = None

    def drain(self) -> None:
        """Handle up to ``batch`` waiting packets without blocking, then report the batch to the core.

        The bound matters: under sustained traffic the socket never empties, and
        an unbounded drain would keep the event loop from its timers, so the
        distributor would stop heartbeating and its backup would take over.
        One clock reading serves the whole batch; every verdict of the batch goes
        back in one system call.
        """
        self._now = now = self._clock()
        self.drains += 1
        nfq = self._nfq
        try:
            packets = nfq.read(self.batch)
        except OSError as exc:
            self.errors += 1
            log.warning("cannot read NFQUEUE %d: %s", self.queue, exc)
            return
        self.packets += len(packets)
        decide = self.decide
        verdicts = self._verdicts
        effects = self._effects
        marks = self.marks
        for packet in packets:
            try:
                reason, out, extra = decide(bytes(packet.payload), now)
                if extra is not None:
                    effects.extend(extra)
                verdict = verdicts[reason]
                if out is not None and reason is _NEW and self._hold_new:
                    self._held.append((packet.id, out))
                    if self._armed and self._arrived_at is None:
                        self._arrived_at = now
                    continue
                if out is None:
                    nfq.verdict(packet.id, verdict)
                elif marks:
                    nfq.verdict(packet.id, verdict, mark=out)
                else:
                    nfq.verdict(packet.id, verdict, payload=out)
                if self._armed and out is not None:
                    self._armed = False
                    self._forwarded_at = self._arrived_at = now
            except Exception:
                # A half-decided packet could reach the wrong backend: drop it, TCP retransmits.
                nfq.verdict(packet.id, DROP)
                self.errors += 1
                clock = time.monotonic()
                if clock - self._last_error_log > 5.0:
                    self._last_error_log = clock
                    log.exception("packet handler failed (%d failures so far); the packet is dropped", self.errors)
        nfq.flush()
        self._effects = []
        self._deliver(PacketsHandled(now, self._wall_clock(), tuple(effects)))
        if self._forwarded_at is not None:
            at, self._forwarded_at = self._forwarded_at, None
            self._deliver(FirstForward(at, self._arrived_at))
        busy, self._last_drain = now - self._last_drain < COALESCE_BUSY, now
        if self.coalesce and busy and 0 < len(packets) < COALESCE_BELOW:
            self.pauses += 1
            self._sleep(self.coalesce)

    def close(self) -> None:
        self.release_held()
        self._nfq.close(settle=DROP)


class RawSender:
    """Sends complete IPv4 or IPv6 packets the core crafted (RSTs to clients, probes) through raw sockets.

    The first nibble tells the family.  IPv4 goes through an AF_INET ``IPPROTO_RAW`` socket, IPv6
    through an AF_INET6 one: with ``IPPROTO_RAW`` Linux takes the IPv6 header as given too
    (``IPV6_HDRINCL`` is implied), source address included, so a packet leaves from a VIP.  A host
    without IPv6 (``ipv6.disable=1``) has no AF_INET6 socket: its IPv6 packets are counted as failed.
    """

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._sock.setblocking(False)
        self._sock6: socket.socket | None = None
        self._no_ipv6 = ""
        try:
            self._sock6 = socket.socket(socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_RAW)
            self._sock6.setblocking(False)
        except OSError as exc:
            self._no_ipv6 = f"no IPv6 raw socket on this host ({exc.strerror})"
        self.sent = 0
        self.failed = 0

    def send(self, packet: bytes) -> None:
        if packet[0] >> 4 == 6:
            destination, sock = socket.inet_ntop(socket.AF_INET6, packet[24:40]), self._sock6
        else:
            destination, sock = socket.inet_ntoa(packet[16:20]), self._sock
        try:
            if sock is None:
                raise OSError(self._no_ipv6)
            sock.sendto(packet, (destination, 0))
            self.sent += 1
        except OSError as exc:
            self.failed += 1
            log.warning("cannot send a crafted packet to %s: %s", destination, exc)

    def close(self) -> None:
        self._sock.close()
        if self._sock6 is not None:
            self._sock6.close()
