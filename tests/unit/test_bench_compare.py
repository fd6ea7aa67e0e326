"""bench.compare's pure parts: the plan and its clock, run names, targets, results.json and results.md (no root)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from bench import compare
from bench.compare import (LATENCY, MODES, ROWS, Eta, Record, RowResult, Settings, Step, claim_run_name,
                           duration_text, evaluate, load_records, parse_args, parse_rows, plan, progress_line,
                           report, results_json, round_ratios, turns)
from testbed.runner import check_project

KEYS = [row.key for row in ROWS]
# Requests/s per mode and row, round 0; every later round scales a mode by (1 + 0.02 * round).
RPS = {
    "direct": [50_000, 13_000, 9_000, 700, 52_000, 12_000],
    "dnat": [42_000, 10_000, 8_000, 600, 44_000, 10_000],
    "haproxy": [28_000, 7_000, 5_000, 400, 38_000, 8_500],
    "rewrite": [21_000, 5_000, 4_400, 290, 30_000, 5_000],
    "kernel": [41_000, 12_500, 7_900, 610, 43_000, 9_000],
}


def row_result(key: str, rps: float, errors: int = 0, drops: int = 0, cpu: bool = False) -> RowResult:
    row = compare.ROW_BY_KEY[key]
    return RowResult(rps, int(rps * 5), errors, drops, int(rps * 20), 1.5 if cpu else None,
                     80.0 if cpu and row.close else None, rps * row.size / 2**20)


def fake_records(rounds: int = 3, modes=MODES, keys=KEYS, errors: int = 0, drops: int = 0) -> list[Record]:
    records = []
    for r in range(rounds):
        for mode in modes:
            rows = {k: row_result(k, RPS[mode][KEYS.index(k)] * (1 + 0.02 * r), cpu=mode in ("haproxy", "rewrite", "kernel"))
                    for k in keys}
            if mode == "rewrite" and r == 0:
                first = next(iter(rows))
                rows[first].errors, rows[first].queue_drops = errors, drops
            records.append(Record.build(mode, r, rows, {"errors": 0, "p50_ms": 0.9, "p99_ms": 3.0 + r}, 0))
    return records


def settings(**changes) -> Settings:
    values = dict(rounds=3, duration=5.0, rate=2000.0, modes=list(MODES), rows=list(KEYS), run="bc123",
                  date="2026-12-01", machine="2 x Test CPU, 8 GiB, Linux 6.1", chart="docs/bench/results.png")
    values.update(changes)
    return Settings(**values)


# -- the plan -----------------------------------------------------------------------------------------------------
def test_the_plan_measures_every_row_and_the_latency_for_every_mode_in_every_round():
    steps = plan(MODES, KEYS, 5)
    assert len(steps) == 5 * 5 * (6 + 1)
    for r in range(5):
        for mode in MODES:
            turn = [s for s in steps if s.round == r and s.mode == mode]
            assert sorted(s.row for s in turn[:-1]) == sorted(KEYS) and turn[-1].row == LATENCY
            assert [s.first for s in turn] == [True] + [False] * 6
    assert len(turns(steps)) == 25 and all(len(t) == 7 for t in turns(steps))


def test_the_order_of_modes_and_rows_rotates_each_round():
    steps = plan(["dnat", "rewrite", "kernel"], ["1k-keepalive-32", "1k-close-32"], 3, latency=False)
    order = [(s.round, s.mode, s.row) for s in steps]
    assert order[:2] == [(0, "dnat", "1k-keepalive-32"), (0, "dnat", "1k-close-32")]
    assert [t[0].mode for t in turns(steps)] == ["dnat", "rewrite", "kernel", "rewrite", "kernel", "dnat",
                                                  "kernel", "dnat", "rewrite"]
    assert [s.row for s in steps if s.round == 1 and s.mode == "dnat"] == ["1k-close-32", "1k-keepalive-32"]
    assert [s.first for s in steps if s.round == 2 and s.mode == "dnat"] == [True, False]


def test_a_plan_without_rows_is_the_latency_runs_alone():
    steps = plan(["dnat", "kernel"], [], 2)
    assert [(s.mode, s.row, s.first) for s in steps[:2]] == [("dnat", LATENCY, True), ("kernel", LATENCY, True)]
    assert all(len(t) == 1 for t in turns(steps))


# -- its clock ----------------------------------------------------------------------------------------------------
def test_the_first_estimate_is_the_sum_of_the_priors():
    steps = plan(MODES, KEYS, 5)
    eta = Eta(steps, duration=5.0)
    per_step = 5.0 + compare.STEP_OVERHEAD
    setups = 5 * sum(compare.SETUP[m] for m in MODES)
    assert eta.left(0) == pytest.approx(len(steps) * per_step + setups)
    assert eta.left(len(steps)) == 0
    # The last step alone: one latency run, not the first of its turn.
    assert eta.left(len(steps) - 1) == pytest.approx(per_step)


def test_the_estimate_follows_what_the_measurements_took():
    steps = plan(["dnat", "kernel"], ["1k-keepalive-32", "1k-close-32"], 2)
    eta = Eta(steps, duration=5.0)
    # The dnat turn of round 1 took twice its priors.
    for i in range(3):
        eta.record(i, 2 * eta.priors[i])
    left = eta.left(3)
    # Steps of the same mode and kind take the observed factor; kernel's first step borrows the other firsts'.
    assert eta.factor(steps[3]) == pytest.approx(2.0)  # kernel, first: from dnat's first step
    assert eta.factor(steps[4]) == pytest.approx(2.0)
    assert left == pytest.approx(2 * sum(eta.priors[3:]))
    # Kernel's first step then takes 3 times its prior: kernel's first steps follow it, dnat's keep 2.
    eta.record(3, 3 * eta.priors[3])
    dnat_first = next(i for i, s in enumerate(steps) if i > 3 and s.mode == "dnat" and s.first)
    kernel_first = next(i for i, s in enumerate(steps) if i > 3 and s.mode == "kernel" and s.first)
    assert eta.factor(steps[dnat_first]) == pytest.approx(2.0)
    assert eta.factor(steps[kernel_first]) == pytest.approx(3.0)
    assert eta.left(4) < left


def test_durations_read_as_seconds_minutes_and_hours():
    assert duration_text(0) == "0 s"
    assert duration_text(44.6) == "45 s"
    assert duration_text(61) == "1 min 01 s"
    assert duration_text(1325) == "22 min 05 s"
    assert duration_text(3600 + 5 * 60 + 59) == "1 h 05 min"


def test_the_progress_line_names_the_round_mode_row_and_time_left():
    step = Step(1, "kernel", "64k-keepalive-32", False)
    line = progress_line(step, 36, 175, 5, 860)
    assert line == ("bench.compare: round 2/5, kernel-assisted, 64 KiB responses, keep-alive, 32 conns "
                    "(measurement 37/175), about 14 min 20 s left")
    assert "latency run" in progress_line(Step(0, "dnat", LATENCY, False), 0, 1, 1, 5)


# -- the command line and the run's name --------------------------------------------------------------------------
def test_rows_are_picked_by_number_or_key_in_the_tables_order():
    assert parse_rows("all") == KEYS
    assert parse_rows("4,1k-keepalive-32,3") == ["1k-keepalive-32", "64k-keepalive-32", "1m-keepalive-16"]
    with pytest.raises(ValueError, match="unknown row"):
        parse_rows("7")
    with pytest.raises(ValueError):
        parse_rows("2k-keepalive-32")


def test_the_command_line_keeps_its_options_and_adds_rows(tmp_path):
    args = parse_args(["--rounds", "2", "--duration", "1", "--modes", "dnat,kernel", "--out", str(tmp_path),
                       "--rows", "3,4"])
    assert (args.rounds, args.duration, args.modes, args.out) == (2, 1.0, ["dnat", "kernel"], tmp_path)
    assert args.rows == ["64k-keepalive-32", "1m-keepalive-16"] and args.rate == 2000.0
    assert parse_args([]).rows == KEYS and parse_args([]).modes == MODES
    for bad in (["--modes", "dnat,nginx"], ["--rows", "9"], ["--rounds", "0"], ["--modes", "dnat,dnat"]):
        with pytest.raises(SystemExit):
            parse_args(bad)


def test_run_names_are_per_process_and_held_while_the_run_lives(tmp_path):
    name, held = claim_run_name(pid=1234567, lock_dir=tmp_path)
    assert name == "bc34567" and check_project(name) == name
    # Another process holding that name: this one takes the next.
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, sys; f = open(sys.argv[1], 'a'); "
                               "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
                               str(tmp_path / "bc777.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        other, other_held = claim_run_name(pid=777, lock_dir=tmp_path)
        assert other == "bc778"
        other_held.close()
    finally:
        holder.stdin.close()
        holder.wait(timeout=10)
    held.close()
    again, again_held = claim_run_name(pid=777, lock_dir=tmp_path)  # released: the name is free again
    assert again == "bc777"
    again_held.close()
    assert len(claim_run_name(pid=99999, lock_dir=tmp_path)[0]) <= 12


# -- targets ------------------------------------------------------------------------------------------------------
def test_targets_compare_medians_and_report_the_rounds_range():
    results = {(r.target.mode, r.target.row, r.target.base): r for r in evaluate(fake_records())}
    assert len(results) == len(compare.TARGETS)
    rewrite_64k = results[("rewrite", "64k-keepalive-32", "dnat")]
    assert rewrite_64k.value == pytest.approx(4400 / 8000) and rewrite_64k.met
    rewrite_1m = results[("rewrite", "1m-keepalive-16", "dnat")]
    assert rewrite_1m.value == pytest.approx(290 / 600) and rewrite_1m.met is False
    kernel_close = results[("kernel", "1k-close-32", "haproxy")]
    assert kernel_close.value == pytest.approx(12500 / 7000) and kernel_close.met
    kernel_close_256 = results[("kernel", "1k-close-256", "dnat")]
    assert kernel_close_256.value == pytest.approx(0.9) and kernel_close_256.met
    assert results[("kernel", "1k-close-256", "haproxy")].met is False  # 9,000 / 8,500 < 1.2
    assert results[("kernel", "1m-keepalive-16", "dnat")].met  # 610 / 600
    assert results[("kernel", "64k-keepalive-32", "dnat")].value == pytest.approx(7900 / 8000)
    # Every round scales every mode alike: the per-round ratios are all the same.
    assert rewrite_64k.low == pytest.approx(rewrite_64k.high) == pytest.approx(rewrite_64k.value)


def test_per_round_ratios_pair_each_round_with_its_own_dnat():
    records = fake_records(rounds=2, modes=["dnat", "kernel"], keys=["1k-keepalive-32"])
    records[2].rows["1k-keepalive-32"].rps = 84_000  # dnat of round 1 doubles
    ratios = round_ratios(records, "kernel", "1k-keepalive-32", "dnat")
    assert ratios == pytest.approx([41_000 / 42_000, 41_000 * 1.02 / 84_000])


def test_targets_not_measured_are_said_so():
    results = evaluate(fake_records(modes=["dnat", "kernel"], keys=["1k-close-32"]))
    by_key = {(r.target.mode, r.target.row, r.target.base): r for r in results}
    assert by_key[("kernel", "1k-close-32", "dnat")].met is True
    assert by_key[("kernel", "1k-close-32", "haproxy")].met is None  # no HAProxy in this run
    assert by_key[("rewrite", "64k-keepalive-32", "dnat")].value is None


# -- results.json ---------------------------------------------------------------------------------------------------
def test_results_json_has_the_settings_every_row_of_every_record_and_the_targets():
    records = fake_records()
    data = json.loads(json.dumps(results_json(records, settings())))
    assert data["schema"] == 2 and data["run"] == "bc123" and data["date"] == "2026-12-01"
    assert data["settings"] == {"rounds": 3, "duration_s": 5.0, "latency_rate": 2000.0, "modes": MODES, "rows": KEYS,
                                "family": 4}
    assert list(data["rows"]) == KEYS
    assert data["rows"]["1m-keepalive-16"] == {"label": "1 MiB responses, keep-alive, 16 conns", "path": "/1m.bin",
                                               "bytes": 1024 * 1024, "connections": 16, "new_connection_each": False}
    assert len(data["records"]) == 15
    record = data["records"][0]
    # Version 1's fields stay, from the 1 KiB, 32-connection rows.
    for name in ("mode", "round", "keepalive_rps", "close_rps", "p50_ms", "p99_ms", "errors", "queue_drops",
                 "cpu_us_per_packet", "cpu_us_per_connection", "packets"):
        assert name in record
    assert record["keepalive_rps"] == record["rows"]["1k-keepalive-32"]["rps"]
    assert record["close_rps"] == record["rows"]["1k-close-32"]["rps"]
    assert set(record["rows"]) == set(KEYS)
    assert set(record["rows"]["1k-close-256"]) == {"rps", "requests", "errors", "queue_drops", "packets",
                                                   "cpu_us_per_packet", "cpu_us_per_connection", "mib_per_s"}
    medians = data["medians"]["64k-keepalive-32"]
    assert medians["rewrite"]["vs_dnat"] == pytest.approx(4400 / 8000)
    assert medians["dnat"]["min_rps"] == 8000 and medians["dnat"]["max_rps"] == pytest.approx(8000 * 1.04)
    assert len(data["targets"]) == len(compare.TARGETS)
    assert {t["met"] for t in data["targets"]} == {True, False}
    assert data["errors"] == 0 and data["queue_drops"] == 0
    assert load_records(data) == records  # what was written reads back


def test_version_one_fields_are_empty_when_their_rows_were_not_measured():
    record = fake_records(rounds=1, modes=["kernel"], keys=["1m-keepalive-16"])[0]
    assert record.keepalive_rps is None and record.close_rps is None and record.packets is None
    assert record.p99_ms == 3.0


def test_errors_and_drops_add_up_over_rows_and_the_latency_run():
    rows = {"1k-keepalive-32": row_result("1k-keepalive-32", 1000, errors=2, drops=3),
            "1k-close-32": row_result("1k-close-32", 500, errors=1)}
    record = Record.build("rewrite", 0, rows, {"errors": 4, "p50_ms": 1.0, "p99_ms": 2.0}, 5)
    assert (record.errors, record.queue_drops, record.latency_errors, record.latency_queue_drops) == (7, 8, 4, 5)


# -- results.md -----------------------------------------------------------------------------------------------------
def test_the_markdown_has_what_the_readme_section_needs():
    text = report(fake_records(), settings())
    assert "Measured 2026-12-01 on 2 x Test CPU, 8 GiB, Linux 6.1" in text
    assert "3 interleaved rounds of 5 s per measurement" in text and "2000 requests/s" in text
    assert "| work | direct | DNAT | HAProxy | rewrite | kernel-assisted |" in text
    for row in ROWS:
        assert f"| {row.label} |" in text
    assert "| 64 KiB responses, keep-alive, 32 conns | 9,180 (1.12x) | 8,160 (1.00x) |" in text
    assert ("| 1 KiB, new connection each, 256 conns | distributor kernel-assisted | 9,180 | 9,000-9,360 | 9 | 0.90x "
            "| 1.06x | 1.5 | 80.0 | 0 | 0 |") in text
    assert "| kernel DNAT | 0.90 | 4.00 | 3.00-5.00 | 0 | 0 |" in text
    assert ("- distributor rewrite, 1 MiB responses, keep-alive, 16 conns: 0.48x kernel DNAT (target >= 0.5x; "
            "rounds 0.48-0.48x): NOT met") in text
    assert ("- distributor kernel-assisted, 1 KiB, new connection each, 32 conns: 1.79x HAProxy TCP (target >= 1.2x; "
            "rounds 1.79-1.79x): met") in text
    assert "- 0 errors: 0 in this run: met" in text and "- 0 queue drops: 0 in this run: met" in text
    assert "ratio targets met; 0 errors, 0 queue drops." in text
    assert text.rstrip().endswith("![side by side](docs/bench/results.png)")
    assert "Incomplete" not in text


def test_the_markdown_says_errors_drops_missing_targets_and_an_early_stop():
    records = fake_records(modes=["dnat", "rewrite"], keys=["1k-keepalive-32", "64k-keepalive-32"], errors=3, drops=7)
    text = report(records, settings(modes=["dnat", "rewrite"], note="stopped after 4 of 6 mode turns"))
    assert text.startswith("**Incomplete run: stopped after 4 of 6 mode turns**")
    assert "- 0 errors: 3 in this run: NOT met" in text and "- 0 queue drops: 7 in this run: NOT met" in text
    assert "target >= 1.2x HAProxy TCP: not measured in this run" in text
    assert "1 of 1 ratio targets met (9 not measured)" in text
    assert "| work | DNAT | rewrite |" in text


def test_without_a_latency_run_there_is_no_latency_table():
    records = [Record.build(r.mode, r.round, r.rows) for r in fake_records(rounds=1)]
    text = report(records, settings(rate=0.0))
    assert "Latency" not in text and "| p50 |" not in text


def test_the_chart_has_a_panel_per_row(tmp_path):
    pytest.importorskip("matplotlib")
    compare.chart(fake_records(), tmp_path / "all.png")
    compare.chart(fake_records(modes=["haproxy", "kernel"], keys=["1k-close-256"]), tmp_path / "no-dnat.png")
    assert (tmp_path / "all.png").stat().st_size > 10_000 and (tmp_path / "no-dnat.png").stat().st_size > 1_000


def test_a_ratio_just_under_its_target_is_not_rounded_up_to_it():
    records = fake_records(rounds=1, modes=["dnat", "rewrite"], keys=["1m-keepalive-16"])
    records[1].rows["1m-keepalive-16"].rps = 0.4975 * 600
    text = report(records, settings(modes=["dnat", "rewrite"]))
    assert "0.497x kernel DNAT (target >= 0.5x; rounds 0.50-0.50x): NOT met" in text or \
        "0.498x kernel DNAT (target >= 0.5x; rounds 0.50-0.50x): NOT met" in text
    records[1].rows["1m-keepalive-16"].rps = 0.5 * 600
    assert "0.50x kernel DNAT (target >= 0.5x; rounds 0.50-0.50x): met" in report(records, settings())


def test_an_ipv6_run_says_so_in_its_report_and_its_settings():
    records = [Record.build("dnat", 0, {KEYS[0]: row_result(KEYS[0], 1000)}),
               Record.build("rewrite", 0, {KEYS[0]: row_result(KEYS[0], 700)})]
    ipv6 = settings(family=6)
    assert "over IPv6" in report(records, ipv6) and "over IPv6" not in report(records, settings())
    assert results_json(records, ipv6)["settings"]["family"] == 6
    assert parse_args(["--family", "6"]).family == 6 and parse_args([]).family == 4
