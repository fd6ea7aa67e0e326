"""Which administration task runs when on a node (pure: time and load are inputs).

Contract
--------
* A run request (:meth:`Scheduler.submit`) names a task, a priority and a
  request id.  An id is accepted once, ever: a second request with the same
  id returns the first one's record and runs nothing (the distributor resends
  a request to a node that was away; the node must not run it twice).  Ids of
  records pruned from the history are still remembered (:attr:`Scheduler.forgotten`).
* Priorities gate on the agent's own load measurement (the 1-minute load
  average and the CPU busy fraction it also uses to decide on heartbeats),
  fed in by :meth:`Scheduler.observe`:

  - ``high`` starts at once, whatever the load and whatever else runs;
  - ``normal`` starts while the node is not overloaded (load and CPU within
    the heartbeat thresholds, :attr:`Gate.max_load` / :attr:`Gate.max_cpu`)
    and fewer than :attr:`Gate.max_running` normal/low tasks run;
  - ``low`` starts only when the node has been idle (CPU at most
    :attr:`Gate.idle_cpu` and load at most :attr:`Gate.idle_load`) for
    :attr:`Gate.idle_for` seconds without a break, and under the same
    concurrency limit: housekeeping never competes with serving.

  Requests of one priority start in arrival order.  A queued request shows
  why it waits (``TaskRecord.waiting``).
* A request may carry ``not_after`` (wall time): if it has not started by
  then it ends ``expired`` instead of starting late.
* :meth:`Scheduler.restore` takes persisted records after a restart: one
  that was running becomes ``interrupted`` (it is not run again).
* The scheduler never runs anything: :meth:`due` returns the records to
  start, the adapter (:mod:`node.taskrunner`) starts them and reports
  :meth:`started` / :meth:`finished`.
"""

from __future__ import annotations

import enum
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any, Iterable

__all__ = ["Priority", "State", "LoadSample", "Gate", "TaskRecord", "Scheduler", "FINISHED"]


class Priority(str, enum.Enum):
    HIGH = "high"
    NORMAL = "normal"
    LOW = "low"


class State(str, enum.Enum):
    QUEUED = "queued"
    RUNNING = "running"
    DONE = "done"  # exit status 0
    FAILED = "failed"  # another exit status, a signal, or it could not start
    TIMED_OUT = "timed_out"  # killed at its time limit
    EXPIRED = "expired"  # not started before not_after
    INTERRUPTED = "interrupted"  # the agent stopped while it ran; never run again


FINISHED = frozenset({State.DONE, State.FAILED, State.TIMED_OUT, State.EXPIRED, State.INTERRUPTED})


@dataclass(frozen=True)
class LoadSample:
    load1: float  # 1-minute load average
    cpu: float  # CPU busy fraction since the previous sample, 0..1


@dataclass(frozen=True)
class Gate:
    max_load: float  # normal tasks: the heartbeat thresholds (agent.max_load, agent.max_cpu)
    max_cpu: float
    idle_load: float  # low tasks: the node counts as idle at or under these...
    idle_cpu: float
    idle_for: float = 10.0  # ...for this many seconds in a row
    max_running: int = 1  # normal and low tasks at once (high ones are not limited)

    def __post_init__(self) -> None:
        if self.max_running < 1:
            raise ValueError(f"max_running {self.max_running!r} must be >= 1")
        if self.idle_for < 0:
            raise ValueError(f"idle_for {self.idle_for!r} must be >= 0 seconds")


@dataclass
class TaskRecord:
    id: str
    name: str
    priority: Priority
    args: dict[str, Any]
    sender: str  # who asked
    received: float  # wall time
    not_after: float | None = None
    state: State = State.QUEUED
    waiting: str = ""  # why a queued task has not started
    started: float | None = None
    finished: float | None = None
    exit_status: int | None = None  # negative: killed by that signal
    output: str = ""
    output_truncated: int = 0  # bytes of output beyond the limit, dropped
    error: str = ""  # why it failed to start or was killed

    @property
    def duration(self) -> float | None:
        if self.started is None or self.finished is None:
            return None
        return self.finished - self.started

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["priority"] = self.priority.value
        data["state"] = self.state.value
        data["duration"] = self.duration
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TaskRecord":
        data = dict(data)
        data.pop("duration", None)
        data["priority"] = Priority(data["priority"])
        data["state"] = State(data["state"])
        return cls(**data)


class Scheduler:
    def __init__(self, gate: Gate, keep_results: int = 1000):
        self.gate = gate
        self.keep_results = keep_results
        self.records: "OrderedDict[str, TaskRecord]" = OrderedDict()  # arrival order
        self.forgotten: set[str] = set()  # ids pruned from the history: still never run again
        self.sample: LoadSample | None = None
        self.idle_since: float | None = None
        self.sampled_at: float | None = None

    # -- inputs ------------------------------------------------------------------
    def observe(self, now: float, sample: LoadSample) -> None:
        """A new load measurement (monotonic time ``now``)."""
        self.sample = sample
        self.sampled_at = now
        if sample.cpu <= self.gate.idle_cpu and sample.load1 <= self.gate.idle_load:
            if self.idle_since is None:
                self.idle_since = now
        else:
            self.idle_since = None

    def submit(self, request_id: str, name: str, priority: Priority, args: dict[str, Any], sender: str,
               received: float, not_after: float | None = None) -> tuple[TaskRecord, bool]:
        """(record, True) for a new request; (the earlier record, False) for an id seen before.

        A forgotten id returns a bare record in state ``expired`` with an explanation."""
        known = self.records.get(request_id)
        if known is not None:
            return known, False
        if request_id in self.forgotten:
            return TaskRecord(request_id, name, priority, args, sender, received, state=State.EXPIRED,
                              error="this request id ran before; its result was pruned from the history"), False
        record = TaskRecord(request_id, name, priority, dict(args), sender, received, not_after)
        self.records[request_id] = record
        return record, True

    def restore(self, records: Iterable[TaskRecord], forgotten: Iterable[str], now: float) -> list[TaskRecord]:
        """Records saved before a restart; returns those that were running (now interrupted)."""
        interrupted = []
        for record in records:
            if record.state is State.RUNNING:
                record.state = State.INTERRUPTED
                record.finished = now
                record.error = "the agent stopped while the task ran; it is not run again"
                interrupted.append(record)
            self.records[record.id] = record
        self.forgotten.update(forgotten)
        return interrupted

    # -- decisions -----------------------------------------------------------------
    def running(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if r.state is State.RUNNING]

    def _why_not(self, record: TaskRecord, now: float, slots: int) -> str:
        if record.priority is Priority.HIGH:
            return ""
        sample = self.sample
        if sample is None:
            return "no load measurement yet"
        if slots <= 0:
            return f"{self.gate.max_running} task(s) running"
        if record.priority is Priority.NORMAL:
            if sample.load1 > self.gate.max_load:
                return f"node loaded: load average {sample.load1:.2f} > {self.gate.max_load:.2f}"
            if sample.cpu > self.gate.max_cpu:
                return f"node loaded: CPU busy {sample.cpu:.0%} > {self.gate.max_cpu:.0%}"
            return ""
        if sample.cpu > self.gate.idle_cpu:
            return f"node not idle: CPU busy {sample.cpu:.0%} > {self.gate.idle_cpu:.0%}"
        if sample.load1 > self.gate.idle_load:
            return f"node not idle: load average {sample.load1:.2f} > {self.gate.idle_load:.2f}"
        idle = 0.0 if self.idle_since is None else now - self.idle_since
        if idle < self.gate.idle_for:
            return f"node idle for {idle:.1f} s of the {self.gate.idle_for:g} s needed"
        return ""

    def due(self, now: float, wall: float) -> tuple[list[TaskRecord], list[TaskRecord]]:
        """(records to start now, records that expired) at monotonic ``now`` and wall time ``wall``.

        High first, then normal, then low; arrival order within a priority."""
        slots = self.gate.max_running - sum(1 for r in self.running() if r.priority is not Priority.HIGH)
        start: list[TaskRecord] = []
        expired: list[TaskRecord] = []
        queued = [r for r in self.records.values() if r.state is State.QUEUED]
        order = {Priority.HIGH: 0, Priority.NORMAL: 1, Priority.LOW: 2}
        for record in sorted(queued, key=lambda r: order[r.priority]):  # sort is stable: arrival order kept
            if record.not_after is not None and wall > record.not_after:
                record.state = State.EXPIRED
                record.finished = wall
                record.waiting = ""
                record.error = f"not started by its deadline ({record.not_after:.0f})"
                expired.append(record)
                continue
            reason = self._why_not(record, now, slots)
            record.waiting = reason
            if reason:
                continue
            start.append(record)
            if record.priority is not Priority.HIGH:
                slots -= 1
        return start, expired

    def started(self, record: TaskRecord, wall: float) -> None:
        record.state = State.RUNNING
        record.waiting = ""
        record.started = wall

    def finished(self, record: TaskRecord, wall: float, state: State, exit_status: int | None, output: str,
                 truncated: int, error: str = "") -> None:
        if state not in FINISHED:
            raise ValueError(f"finished state {state!r} is not valid; expected one of {sorted(s.value for s in FINISHED)}")
        record.state = state
        record.finished = wall
        if record.started is None:
            record.started = wall
        record.exit_status = exit_status
        record.output = output
        record.output_truncated = truncated
        record.error = error
        self.prune()

    def prune(self) -> None:
        """Keep the results of the last ``keep_results`` finished requests; remember older ids only."""
        done = [r.id for r in self.records.values() if r.state in FINISHED]
        for request_id in done[: max(0, len(done) - self.keep_results)]:
            del self.records[request_id]
            self.forgotten.add(request_id)

    def counts(self) -> dict[str, int]:
        counts = {state.value: 0 for state in State}
        for record in self.records.values():
            counts[record.state.value] += 1
        return counts
