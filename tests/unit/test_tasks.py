"""The task scheduler's priority gating, with time and load as inputs (pure)."""

import pytest

from node.tasks import Gate, LoadSample, Priority, Scheduler, State, TaskRecord

GATE = Gate(max_load=4.0, max_cpu=0.9, idle_load=1.0, idle_cpu=0.25, idle_for=5.0, max_running=1)
BUSY = LoadSample(3.0, 0.95)
WORKING = LoadSample(2.0, 0.6)  # not overloaded, not idle
IDLE = LoadSample(0.2, 0.05)


def submit(s, request_id, priority, name="disk-usage", now=0.0, not_after=None):
    record, new = s.submit(request_id, name, priority, {}, "dist1", 1000.0 + now, not_after)
    assert new
    return record


def ids(records):
    return [r.id for r in records]


def test_high_starts_at_once_even_loaded_and_without_a_measurement():
    s = Scheduler(GATE)
    submit(s, "h1", Priority.HIGH)
    start, _ = s.due(0.0, 1000.0)
    assert ids(start) == ["h1"]
    s.observe(1.0, BUSY)
    s.started(start[0], 1000.0)
    submit(s, "h2", Priority.HIGH)
    assert ids(s.due(1.0, 1001.0)[0]) == ["h2"]  # not limited by what runs


def test_normal_waits_while_the_node_is_overloaded():
    s = Scheduler(GATE)
    submit(s, "n", Priority.NORMAL)
    assert s.due(0.0, 1000.0)[0] == [] and s.records["n"].waiting == "no load measurement yet"
    s.observe(1.0, BUSY)
    assert s.due(1.0, 1001.0)[0] == [] and "CPU busy 95% > 90%" in s.records["n"].waiting
    s.observe(2.0, LoadSample(5.0, 0.1))
    assert s.due(2.0, 1002.0)[0] == [] and "load average 5.00 > 4.00" in s.records["n"].waiting
    s.observe(3.0, WORKING)
    assert ids(s.due(3.0, 1003.0)[0]) == ["n"]


def test_low_runs_only_after_the_node_was_idle_long_enough_without_a_break():
    s = Scheduler(GATE)
    submit(s, "l", Priority.LOW)
    s.observe(0.0, WORKING)
    assert s.due(0.0, 1000.0)[0] == [] and "not idle: CPU busy 60% > 25%" in s.records["l"].waiting
    s.observe(1.0, IDLE)
    assert s.due(4.0, 1004.0)[0] == [] and "idle for 3.0 s of the 5 s" in s.records["l"].waiting
    s.observe(5.0, BUSY)  # a burst resets the idle time
    s.observe(6.0, IDLE)
    assert s.due(10.0, 1010.0)[0] == []
    assert ids(s.due(11.0, 1011.0)[0]) == ["l"]


def test_idle_needs_the_load_average_low_too():
    s = Scheduler(GATE)
    submit(s, "l", Priority.LOW)
    s.observe(0.0, LoadSample(1.5, 0.05))
    assert s.due(100.0, 1100.0)[0] == [] and "load average 1.50 > 1.00" in s.records["l"].waiting


def test_priority_order_and_the_concurrency_limit():
    s = Scheduler(GATE)
    submit(s, "l1", Priority.LOW)
    submit(s, "n1", Priority.NORMAL)
    submit(s, "n2", Priority.NORMAL)
    submit(s, "h1", Priority.HIGH)
    s.observe(0.0, IDLE)
    start, _ = s.due(10.0, 1010.0)
    assert ids(start) == ["h1", "n1"]  # one normal/low slot; high outside it
    for record in start:
        s.started(record, 1010.0)
    assert s.due(11.0, 1011.0)[0] == [] and "1 task(s) running" in s.records["n2"].waiting
    s.finished(s.records["n1"], 1012.0, State.DONE, 0, "ok", 0)
    assert ids(s.due(12.0, 1012.0)[0]) == ["n2"]


def test_a_request_id_runs_once():
    s = Scheduler(GATE)
    record = submit(s, "r1", Priority.HIGH)
    again, new = s.submit("r1", "rotate-logs", Priority.LOW, {}, "dist2", 2000.0)
    assert not new and again is record and again.name == "disk-usage"


def test_pruned_ids_are_still_never_run_again():
    s = Scheduler(GATE, keep_results=2)
    for n in range(4):
        record = submit(s, f"r{n}", Priority.HIGH)
        s.started(record, 1000.0)
        s.finished(record, 1001.0, State.DONE, 0, "", 0)
    assert list(s.records) == ["r2", "r3"] and s.forgotten == {"r0", "r1"}
    record, new = s.submit("r0", "disk-usage", Priority.HIGH, {}, "dist1", 2000.0)
    assert not new and record.state is State.EXPIRED and "ran before" in record.error


def test_a_request_not_started_by_its_deadline_expires():
    s = Scheduler(GATE)
    submit(s, "l", Priority.LOW, not_after=1005.0)
    s.observe(0.0, BUSY)
    assert s.due(1.0, 1001.0) == ([], [])
    start, expired = s.due(6.0, 1006.0)
    assert start == [] and ids(expired) == ["l"] and s.records["l"].state is State.EXPIRED


def test_after_a_restart_a_running_task_is_interrupted_not_rerun_and_queued_ones_wait():
    s = Scheduler(GATE)
    running = submit(s, "run", Priority.HIGH)
    s.started(running, 1000.0)
    submit(s, "wait", Priority.LOW)
    saved = [TaskRecord.from_dict(r.to_dict()) for r in s.records.values()]
    restarted = Scheduler(GATE)
    interrupted = restarted.restore(saved, [], 1100.0)
    assert ids(interrupted) == ["run"] and restarted.records["run"].state is State.INTERRUPTED
    assert restarted.records["wait"].state is State.QUEUED
    assert ids(restarted.due(0.0, 1100.0)[0]) == []  # interrupted is not started again


def test_results_carry_exit_status_output_and_duration():
    s = Scheduler(GATE)
    record = submit(s, "r", Priority.HIGH)
    s.started(record, 1000.0)
    s.finished(record, 1002.5, State.FAILED, 3, "out", 10, "exit 3")
    data = record.to_dict()
    assert (data["state"], data["exit_status"], data["output"], data["output_truncated"], data["duration"]) == \
        ("failed", 3, "out", 10, 2.5)
    with pytest.raises(ValueError):
        s.finished(record, 1003.0, State.RUNNING, None, "", 0)
