"""Connection-table replication from the active distributor to the standbys, reliable over a lossy LAN (pure).

Contract
--------
:class:`SyncSender` (on the active) collects table changes as the interposer reports them
(``opened`` / ``ended``, by connection key: 12 bytes IPv4, 36 IPv6) and cuts them into
:class:`~common.wire.SyncBatch` payloads numbered consecutively.  It keeps the last ``HISTORY``
payloads, so a standby that lost some can ask for exactly those again (:meth:`SyncSender.resend`);
only what fell out of the history costs a snapshot.  A snapshot streams every open connection in
chunks numbered in the same sequence, interleaved with the live batches; the first chunk carries
``SNAPSHOT_START``, the last ``SNAPSHOT_END``.  The copy of the table is taken when the first chunk
is cut, after every earlier change went out in an earlier batch, and a connection that ends before
its chunk is cut is left out (its END is in a live batch already), so live batches and snapshot
together are always exactly the table.

:class:`SyncReceiver` (on a standby) applies batches to its :class:`Replica` strictly in order.  A
batch that arrives early (a gap) waits in a bounded buffer, and :meth:`SyncReceiver.missing` names
the batch numbers to ask for again; once they arrive everything waiting is applied.  A
``SNAPSHOT_START`` with a gap before it (the active answered with a snapshot) skips the gap and
clears the replica first.  The replica is *caught up* once a snapshot was applied completely,
nothing is missing, and the active's last advertised batch has been applied.

This is the reliable mode conntrackd offers: nothing is assumed delivered, and a lost datagram costs
a retransmission of that datagram, not a full snapshot.  The failover core adds the only rule that
ties replication to the data path: the active releases a SYN that opened a connection only after the
batch that announces it has been sent (``HoldNewSyns`` / ``ReleaseNewSyns``).
"""

from __future__ import annotations

import collections
from typing import Callable, Iterable, Iterator, Protocol

from common.wire import END, OPEN, SyncBatch, SyncRecord

__all__ = ["Replica", "SyncSender", "SyncReceiver", "HISTORY", "MAX_PENDING"]

HISTORY = 4096  # payloads the active keeps for retransmission (at most ~6 MB)
MAX_PENDING = 2048  # early batches a standby buffers behind a gap before it gives up and asks for a snapshot


class Replica(Protocol):
    """What replication needs of the local connection table (the interposer provides it)."""

    def install(self, key: bytes, backend_index: int, now: float) -> bool: ...

    def end(self, key: bytes, now: float) -> None: ...

    def clear(self) -> int: ...

    def hold_expiry(self, now: float) -> None: ...

    def open_connections(self) -> list[tuple[bytes, int]]: ...

    def open_backend(self, key: bytes) -> int | None: ...

    def __len__(self) -> int: ...


class SyncSender:
    def __init__(self) -> None:
        self.batch = 0  # number of the last batch cut
        self.pending: list[SyncRecord] = []
        self.records_sent = 0
        self.snapshots = 0
        self.retransmitted = 0
        self._history: collections.OrderedDict[int, bytes] = collections.OrderedDict()
        self._records_through: collections.OrderedDict[int, int] = collections.OrderedDict()  # batch -> records_sent
        self._snapshot: Iterator[tuple[bytes, int]] | None = None
        self._carried: SyncRecord | None = None  # a snapshot's record that did not fit in the chunk before
        self._snapshot_started = False
        self._snapshot_wanted = False

    def opened(self, key: bytes, backend_index: int) -> None:
        self.pending.append(SyncRecord(OPEN, key, backend_index))

    def ended(self, key: bytes) -> None:
        self.pending.append(SyncRecord(END, key, 0))

    def request_snapshot(self) -> None:
        """Stream a snapshot from the next chunk on (a running one starts over)."""
        self._snapshot_wanted = True
        self._snapshot = None
        self._carried = None
        self.snapshots += 1

    @property
    def snapshot_running(self) -> bool:
        return self._snapshot is not None or self._snapshot_wanted

    def live_batches(self) -> list[bytes]:
        """The pending changes as payloads (empty list when there are none)."""
        payloads = []
        pending, self.pending = self.pending, []
        chunk: list[SyncRecord] = []
        used = 0
        for record in pending:
            size = SyncBatch.record_size(record.key)
            if used + size > SyncBatch.MAX_BYTES:
                payloads.append(self._cut(0, chunk))
                chunk, used = [], 0
            chunk.append(record)
            used += size
        if chunk:
            payloads.append(self._cut(0, chunk))
        return payloads

    def snapshot_batches(self, limit: int, connections: Callable[[], list[tuple[bytes, int]]],
                         backend_of: Callable[[bytes], int | None]) -> list[bytes]:
        """Up to ``limit`` payloads of the snapshot; call after :meth:`live_batches`.

        ``connections()`` copies (key, backend index) of every open connection when the first
        chunk is cut; ``backend_of(key)`` tells whether a copied connection is still open on the
        same backend when its chunk is cut (an ended one is skipped: its END went out already).
        """
        payloads: list[bytes] = []
        if self._snapshot_wanted:
            self._snapshot_wanted = False
            self._snapshot = iter(connections())
            self._carried = None
            self._snapshot_started = False
        while self._snapshot is not None and len(payloads) < limit:
            chunk: list[SyncRecord] = []
            used = 0
            carried, self._carried = self._carried, None
            if carried is not None:  # the record that did not fit in the last chunk
                chunk.append(carried)
                used = SyncBatch.record_size(carried.key)
            full = False
            for key, backend_index in self._snapshot:
                if backend_of(key) != backend_index:
                    continue
                record = SyncRecord(OPEN, key, backend_index)
                size = SyncBatch.record_size(key)
                if used + size > SyncBatch.MAX_BYTES:
                    self._carried, full = record, True
                    break
                chunk.append(record)
                used += size
                if used + SyncBatch.SMALLEST > SyncBatch.MAX_BYTES:
                    full = True
                    break
            flags = 0 if self._snapshot_started else SyncBatch.SNAPSHOT_START
            self._snapshot_started = True
            if not full:
                flags |= SyncBatch.SNAPSHOT_END
                self._snapshot = None
            payloads.append(self._cut(flags, chunk))
        return payloads

    def resend(self, ranges: Iterable[tuple[int, int]], limit: int = 64) -> tuple[list[bytes], bool]:
        """The kept payloads of the batches in ``ranges`` (at most ``limit``); True when some fell out of the history."""
        payloads: list[bytes] = []
        too_old = False
        for first, last in ranges:
            for number in range(max(first, 1), min(last, self.batch) + 1):
                payload = self._history.get(number)
                if payload is None:
                    too_old = True
                elif len(payloads) < limit:
                    payloads.append(payload)
        self.retransmitted += len(payloads)
        return payloads, too_old

    def _cut(self, flags: int, records: list[SyncRecord]) -> bytes:
        self.batch += 1
        self.records_sent += len(records)
        payload = SyncBatch(self.batch, flags, records).pack()
        self._history[self.batch] = payload
        self._records_through[self.batch] = self.records_sent
        if len(self._history) > HISTORY:
            self._history.popitem(last=False)
            self._records_through.popitem(last=False)
        return payload

    def records_after(self, batch: int) -> int | None:
        """Records sent in the batches after ``batch`` (a standby's last applied); None when it fell out of the history."""
        if batch >= self.batch:
            return 0
        through = self._records_through.get(batch)
        return None if through is None else self.records_sent - through


class SyncReceiver:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.applied: int | None = None  # number of the last batch applied
        self.snapshot_complete = False
        self._in_snapshot = False
        self._pending: dict[int, SyncBatch] = {}
        self.gaps = 0  # gaps seen (each one asks for retransmission)
        self.overflows = 0  # gaps given up on: a snapshot was needed
        self.records_applied = 0
        self.rejected_records = 0

    def reset(self) -> None:
        """Forget the stream (a new active is followed): the next batch starts it again."""
        self.applied = None
        self.snapshot_complete = False
        self._in_snapshot = False
        self._pending.clear()

    @property
    def in_snapshot(self) -> bool:
        """A snapshot is arriving (its first batch was applied, its last not yet)."""
        return self._in_snapshot

    @property
    def waiting(self) -> int:
        """Batches received early, waiting for a missing one."""
        return len(self._pending)

    def receive(self, batch: SyncBatch, now: float) -> bool:
        """Take one batch; returns False when the buffer behind a gap overflowed (a snapshot is needed)."""
        if self.applied is None:
            self.applied = batch.batch - 1  # the first batch of a stream starts it
        elif batch.batch > self.applied + 1 and batch.flags & SyncBatch.SNAPSHOT_START:
            # The active answered a gap it could not fill with a snapshot: what is missing before it
            # is superseded.
            self._pending = {n: b for n, b in self._pending.items() if n > batch.batch}
            self.applied = batch.batch - 1
        if batch.batch <= self.applied or batch.batch in self._pending:
            return True  # a duplicate or a retransmission already applied
        if batch.batch != self.applied + 1:
            highest = max(self._pending) if self._pending else self.applied
            if batch.batch > highest + 1:
                self.gaps += 1  # a new run of missing batches
            self._pending[batch.batch] = batch
            if len(self._pending) > MAX_PENDING:
                self.overflows += 1
                self._pending.clear()
                self.snapshot_complete = False
                return False
            return True
        self._apply(batch, now)
        while self.applied + 1 in self._pending:
            self._apply(self._pending.pop(self.applied + 1), now)
        return True

    def missing(self, up_to: int | None = None) -> list[tuple[int, int]]:
        """Ranges of batch numbers not yet received, up to the latest seen (or ``up_to``, the active's last)."""
        if self.applied is None:
            return []
        top = max(self._pending) if self._pending else self.applied
        if up_to is not None:
            top = max(top, up_to)
        ranges: list[tuple[int, int]] = []
        start = None
        for number in range(self.applied + 1, top + 1):
            if number not in self._pending:
                if start is None:
                    start = number
            elif start is not None:
                ranges.append((start, number - 1))
                start = None
        if start is not None:
            ranges.append((start, top))
        return ranges

    def _apply(self, batch: SyncBatch, now: float) -> None:
        if batch.flags & SyncBatch.SNAPSHOT_START:
            self.replica.clear()
            self._in_snapshot = True
            self.snapshot_complete = False
        for record in batch.records:
            if record.op == OPEN:
                if not self.replica.install(record.key, record.backend, now):
                    self.rejected_records += 1
            else:
                self.replica.end(record.key, now)
        self.records_applied += len(batch.records)
        if batch.flags & SyncBatch.SNAPSHOT_END and self._in_snapshot:
            self._in_snapshot = False
            self.snapshot_complete = True
        self.applied = batch.batch

    def caught_up(self, active_batch: int) -> bool:
        return (self.snapshot_complete and not self._pending and self.applied is not None
                and active_batch - self.applied <= 1)

    def lag(self, active_batch: int) -> int | None:
        return None if self.applied is None else max(0, active_batch - self.applied)
