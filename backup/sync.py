"""Connection-table replication from the active distributor to the backups (pure).

Contract
--------
:class:`SyncSender` (on the active) collects table changes as the
interposer reports them (``opened`` / ``ended``, by 12-byte connection key)
and cuts them into
:class:`~distributor.wire.SyncBatch` payloads numbered consecutively.  On a
backup's request it also streams a snapshot of every open connection, in
chunks interleaved with the live batches and numbered in the same sequence;
the first snapshot batch carries ``SNAPSHOT_START``, the last
``SNAPSHOT_END``.  A connection opened or ended while the snapshot runs is
in the live batches, so the two together are always complete.

:class:`SyncReceiver` (on a backup) applies batches in order to its
:class:`Replica` (the interposer's table: install, end, clear).  A missing batch number is a gap: it answers that a snapshot is
needed.  ``SNAPSHOT_START`` clears the replica first.  The replica is
*caught up* once a snapshot completed with no gap since and the active's
last advertised batch has been applied.

The failover core adds the only rule that ties replication to the data
path: the active releases a SYN that opened a connection only after the batch
that announces it has been sent (``HoldNewSyns`` / ``ReleaseNewSyns``).
"""

from __future__ import annotations

from typing import Callable, Iterator, Protocol

from common.wire import END, OPEN, SyncBatch, SyncRecord


class Replica(Protocol):
    """What replication needs of the local connection table (the interposer provides it)."""

    def install(self, key: bytes, backend_index: int, now: float) -> bool: ...

    def end(self, key: bytes, now: float) -> None: ...

    def clear(self) -> int: ...

    def hold_expiry(self, now: float) -> None: ...

    def open_connections(self) -> list[tuple[bytes, int]]: ...

    def is_open(self, key: bytes) -> bool: ...

    def __len__(self) -> int: ...


class SyncSender:
    def __init__(self) -> None:
        self.batch = 0  # number of the last batch cut
        self.pending: list[SyncRecord] = []
        self.records_sent = 0
        self.snapshots = 0
        self._snapshot: Iterator[tuple[bytes, int]] | None = None
        self._snapshot_started = False

    def opened(self, key: bytes, backend_index: int) -> None:
        self.pending.append(SyncRecord(OPEN, key, backend_index))

    def ended(self, key: bytes) -> None:
        self.pending.append(SyncRecord(END, key, 0))

    def start_snapshot(self, conns: list[tuple[bytes, int]]) -> None:
        """Stream ``conns``, (key, backend index) of every open connection, copied from the table now."""
        self._snapshot = iter(conns)
        self._snapshot_started = False
        self.snapshots += 1

    @property
    def snapshot_running(self) -> bool:
        return self._snapshot is not None

    def live_batches(self) -> list[bytes]:
        """The pending changes as payloads (empty list when there are none)."""
        payloads = []
        while self.pending:
            chunk, self.pending = self.pending[: SyncBatch.MAX_RECORDS], self.pending[SyncBatch.MAX_RECORDS:]
            payloads.append(self._cut(0, chunk))
        return payloads

    def snapshot_batches(self, limit: int, still_open: "Callable[[bytes], bool]") -> list[bytes]:
        """Up to ``limit`` payloads of the running snapshot.

        A connection that ended since the snapshot started is skipped (``still_open``):
        its END already went out in a live batch, and an OPEN after it would resurrect it.
        """
        payloads: list[bytes] = []
        while self._snapshot is not None and len(payloads) < limit:
            chunk: list[SyncRecord] = []
            for key, backend_index in self._snapshot:
                if not still_open(key):
                    continue
                chunk.append(SyncRecord(OPEN, key, backend_index))
                if len(chunk) == SyncBatch.MAX_RECORDS:
                    break
            flags = 0 if self._snapshot_started else SyncBatch.SNAPSHOT_START
            self._snapshot_started = True
            if len(chunk) < SyncBatch.MAX_RECORDS:
                flags |= SyncBatch.SNAPSHOT_END
                self._snapshot = None
            payloads.append(self._cut(flags, chunk))
        return payloads

    def _cut(self, flags: int, records: list[SyncRecord]) -> bytes:
        self.batch += 1
        self.records_sent += len(records)
        return SyncBatch(self.batch, flags, records).pack()


class SyncReceiver:
    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.applied: int | None = None  # number of the last batch applied
        self.snapshot_complete = False
        self._in_snapshot = False
        self.gaps = 0
        self.records_applied = 0
        self.rejected_records = 0

    def reset(self) -> None:
        """Forget the stream (a new active is followed): the next batch starts it again."""
        self.applied = None
        self.snapshot_complete = False
        self._in_snapshot = False

    def receive(self, batch: SyncBatch, now: float) -> bool:
        """Apply one batch; returns True when a snapshot is needed (a gap was found)."""
        gap = False
        if self.applied is not None:
            if batch.batch <= self.applied:
                return False  # a duplicate or a stale one
            if batch.batch != self.applied + 1:
                gap = True
                self.gaps += 1
                self.snapshot_complete = False
                self._in_snapshot = False
        if batch.flags & SyncBatch.SNAPSHOT_START:
            self.replica.clear()
            self._in_snapshot = True
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
        return gap

    @property
    def in_snapshot(self) -> bool:
        """A snapshot is arriving (its first batch came, its last not yet)."""
        return self._in_snapshot

    def caught_up(self, active_batch: int) -> bool:
        return self.snapshot_complete and self.applied is not None and active_batch - self.applied <= 1

    def lag(self, active_batch: int) -> int | None:
        return None if self.applied is None else max(0, active_batch - self.applied)
