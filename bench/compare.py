"""Side-by-side benchmark: the distributor against kernel NAT and HAProxy, in one testbed run.

One command stands the namespace testbed up and measures, in interleaved rounds
(the order of the modes, and of the rows within a mode, rotates each round, so
slow drifts of a shared machine hit every mode alike), each data path between
the client and the web nodes:

* ``direct``  -- the client talks to the nodes themselves, dist1 only routes (the ceiling);
* ``dnat``    -- kernel iptables DNAT, round-robin (``-m statistic --mode nth``);
* ``haproxy`` -- HAProxy (Debian's) in TCP mode, round-robin, on dist1;
* ``rewrite`` -- the distributor rewriting every packet in user space;
* ``kernel``  -- the distributor deciding first packets, conntrack NAT for the rest.

The distributor runs as deployed: dist1 active, dist2 its backup, replication on.

Per mode and round, six rows of wrk load (issue 10's table; ``--rows`` picks a
subset, by key or number):

1. ``1k-keepalive-32``   -- 1 KiB, keep-alive, 32 connections;
2. ``1k-close-32``       -- 1 KiB, a new connection each request, 32 connections;
3. ``64k-keepalive-32``  -- 64 KiB responses, keep-alive, 32 connections;
4. ``1m-keepalive-16``   -- 1 MiB responses, keep-alive, 16 connections;
5. ``1k-keepalive-512``  -- 1 KiB, keep-alive, 512 connections;
6. ``1k-close-256``      -- 1 KiB, a new connection each request, 256 connections;

and per row: requests/s, socket errors, NFQUEUE drops, the balancer process's
CPU time per forwarded packet (and per connection on the new-connection rows;
the distributor or HAProxy, kernel paths have no process).  Then p50/p99
latency at a fixed rate below saturation (:mod:`bench.fixed_rate`; ``--rate 0``
skips it).  A progress line on stderr names each measurement before it starts:
the round, the mode, the row and the time left.

Writes ``results.json`` (settings, one record per mode and round with its rows,
medians, the targets), ``results.md`` (what the README's "Benchmark" section
shows: date, machine, settings, the tables, issue 10's targets met or not) and
``results.png`` (one panel per row: each mode's ratio to DNAT, with the range
over the rounds).  Each run names its testbed ``bc<pid>``, so two runs at once
do not tear each other down.

``--family 6`` measures the same over IPv6 (the dual-stack testbed: the client reaches the VIP6,
the nodes' IPv6 addresses, DNAT with ip6tables, HAProxy bound to the VIP6; the distributors serve
the service "http6"), so the README can show IPv6 figures beside the IPv4 ones.

    python -m bench.compare [--rounds 5] [--duration 5] [--rate 2000] [--modes a,b] [--rows 1,3] [--family 4|6] [--out bench/results]   (root)
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

from testbed import content, wrk
from testbed.runner import Options, Testbed, TestbedError, check_project, wait_until

MODES = ["direct", "dnat", "haproxy", "rewrite", "kernel"]
LABELS = {"direct": "direct (ceiling)", "dnat": "kernel DNAT", "haproxy": "HAProxy TCP",
          "rewrite": "distributor rewrite", "kernel": "distributor kernel-assisted"}
SHORT = {"direct": "direct", "dnat": "DNAT", "haproxy": "HAProxy", "rewrite": "rewrite", "kernel": "kernel-assisted"}
COLOURS = {"direct": "#999999", "dnat": "#4c72b0", "haproxy": "#dd8452", "rewrite": "#55a868", "kernel": "#c44e52"}
CONNECTIONS = 32  # what Bench._wrk opens by default (bench.nfqueue_floor relies on it)
LATENCY = "latency"  # the plan's name for the fixed-rate latency run that closes each mode's turn
SCHEMA = 2  # results.json: 1 was a bare list of records with the 1 KiB figures only


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    path: str
    connections: int
    close: bool  # a new connection for each request (wrk sends Connection: close)

    @property
    def size(self) -> int:
        return content.FILES[self.path]


ROWS = [
    Row("1k-keepalive-32", "1 KiB, keep-alive, 32 conns", "/1k.bin", 32, False),
    Row("1k-close-32", "1 KiB, new connection each, 32 conns", "/1k.bin", 32, True),
    Row("64k-keepalive-32", "64 KiB responses, keep-alive, 32 conns", "/64k.bin", 32, False),
    Row("1m-keepalive-16", "1 MiB responses, keep-alive, 16 conns", "/1m.bin", 16, False),
    Row("1k-keepalive-512", "1 KiB, keep-alive, 512 conns", "/1k.bin", 512, False),
    Row("1k-close-256", "1 KiB, new connection each, 256 conns", "/1k.bin", 256, True),
]
ROW_BY_KEY = {row.key: row for row in ROWS}
KEEPALIVE_ROW, CLOSE_ROW = "1k-keepalive-32", "1k-close-32"  # the rows behind results.json's version-1 fields


@dataclass(frozen=True)
class Target:
    mode: str
    row: str
    base: str  # the mode the median is compared with
    ratio: float  # the median must reach ratio x the base's median


TARGETS = [  # issue 10
    Target("rewrite", "64k-keepalive-32", "dnat", 0.5),
    Target("rewrite", "1m-keepalive-16", "dnat", 0.5),
    Target("kernel", "64k-keepalive-32", "dnat", 0.95),
    Target("kernel", "1m-keepalive-16", "dnat", 0.95),
    Target("kernel", "1k-close-32", "haproxy", 1.2),
    Target("kernel", "1k-close-32", "dnat", 0.85),
    Target("kernel", "1k-close-256", "haproxy", 1.2),
    Target("kernel", "1k-close-256", "dnat", 0.85),
    Target("kernel", "1k-keepalive-32", "dnat", 0.95),
    Target("kernel", "1k-keepalive-512", "dnat", 0.95),
]


# -- what one measurement yields ------------------------------------------------------------------------------------
@dataclass
class RowResult:
    rps: float
    requests: int
    errors: int  # wrk's socket errors and non-2xx responses
    queue_drops: int  # NFQUEUE drops on dist1 (kernel and user) during the row
    packets: int  # packets received on dist1's two interfaces during the row
    cpu_us_per_packet: float | None  # the balancer process's CPU time (None: no process)
    cpu_us_per_connection: float | None  # new-connection rows only
    mib_per_s: float  # response bodies, rps x size


@dataclass
class Record:
    """One mode in one round.  The flat fields are results.json version 1's (the 1 KiB, 32-connection rows)."""

    mode: str
    round: int
    keepalive_rps: float | None
    close_rps: float | None
    p50_ms: float | None
    p99_ms: float | None
    errors: int  # every row's and the latency run's
    queue_drops: int  # every row's and the latency run's
    cpu_us_per_packet: float | None  # of the 1 KiB keep-alive row
    cpu_us_per_connection: float | None  # of the 1 KiB, 32-connection new-connection row
    packets: int | None  # of the 1 KiB keep-alive row
    rows: dict[str, RowResult] = field(default_factory=dict)
    latency_errors: int | None = None
    latency_queue_drops: int | None = None

    @classmethod
    def build(cls, mode: str, round_number: int, rows: dict[str, RowResult], latency: dict | None = None,
              latency_drops: int = 0) -> "Record":
        keepalive, close = rows.get(KEEPALIVE_ROW), rows.get(CLOSE_ROW)
        latency_errors = latency["errors"] if latency else None
        return cls(mode, round_number,
                   keepalive.rps if keepalive else None, close.rps if close else None,
                   latency.get("p50_ms") if latency else None, latency.get("p99_ms") if latency else None,
                   sum(r.errors for r in rows.values()) + (latency_errors or 0),
                   sum(r.queue_drops for r in rows.values()) + (latency_drops if latency else 0),
                   keepalive.cpu_us_per_packet if keepalive else None,
                   close.cpu_us_per_connection if close else None,
                   keepalive.packets if keepalive else None,
                   dict(rows), latency_errors, latency_drops if latency else None)


# -- the plan of measurements and its clock -----------------------------------------------------------------------
@dataclass(frozen=True)
class Step:
    round: int
    mode: str
    row: str  # a Row key, or LATENCY
    first: bool  # the first of its mode's turn in the round: it includes setting the mode up


def rotate(items: list, by: int) -> list:
    if not items:
        return []
    by %= len(items)
    return items[by:] + items[:by]


def plan(modes: list[str], rows: list[str], rounds: int, latency: bool = True) -> list[Step]:
    """Every measurement in order: rounds of the modes' turns, each turn its rows then the latency run."""
    steps = []
    for round_number in range(rounds):
        for mode in rotate(modes, round_number):
            turn = rotate(rows, round_number) + ([LATENCY] if latency else [])
            steps += [Step(round_number, mode, row, i == 0) for i, row in enumerate(turn)]
    return steps


def turns(steps: list[Step]) -> list[list[Step]]:
    """The plan cut into the modes' turns (consecutive steps of one mode in one round)."""
    out: list[list[Step]] = []
    for step in steps:
        if step.first or not out:
            out.append([])
        out[-1].append(step)
    return out


# Priors, from a run with --rounds 1 --duration 1 (35 measurements in 42 s): the time around each
# measurement (starting wrk, reading the counters) and the time to set a mode up and down.
STEP_OVERHEAD = 0.1
SETUP = {"direct": 0.3, "dnat": 0.3, "haproxy": 0.5, "rewrite": 2.5, "kernel": 2.5}


class Eta:
    """The time left, from the plan and the measurements' durations so far.

    Each step has a prior (its duration, an overhead, and on the first of a turn
    the mode's setup); once steps have been timed, the priors of the steps left
    are scaled by what the timed ones took against their own priors: those of the
    same mode and kind (first of a turn or not) if there are any, else those of
    the same kind, else all.
    """

    def __init__(self, steps: list[Step], duration: float):
        self.steps = steps
        self.priors = [duration + STEP_OVERHEAD + (SETUP.get(s.mode, 5.0) if s.first else 0.0) for s in steps]
        self.spent: dict[int, float] = {}

    def record(self, index: int, seconds: float) -> None:
        self.spent[index] = seconds

    def _factor(self, keep: Callable[[Step], bool]) -> float | None:
        timed = [i for i in self.spent if keep(self.steps[i])]
        prior = sum(self.priors[i] for i in timed)
        return sum(self.spent[i] for i in timed) / prior if timed and prior > 0 else None

    def factor(self, step: Step) -> float:
        for keep in (lambda s: s.mode == step.mode and s.first == step.first, lambda s: s.first == step.first,
                     lambda s: True):
            value = self._factor(keep)
            if value is not None:
                return value
        return 1.0

    def left(self, index: int) -> float:
        """Seconds from the start of step ``index`` to the end of the plan."""
        factors: dict[tuple[str, bool], float] = {}
        total = 0.0
        for i in range(index, len(self.steps)):
            step = self.steps[i]
            key = (step.mode, step.first)
            if key not in factors:
                factors[key] = self.factor(step)
            total += self.priors[i] * factors[key]
        return total


def duration_text(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        minutes, rest = divmod(seconds, 60)
        return f"{minutes} min {rest:02d} s"
    hours, rest = divmod(seconds, 3600)
    return f"{hours} h {rest // 60:02d} min"


def row_label(key: str) -> str:
    return "latency run" if key == LATENCY else ROW_BY_KEY[key].label


def progress_line(step: Step, index: int, total: int, rounds: int, left: float) -> str:
    return (f"bench.compare: round {step.round + 1}/{rounds}, {SHORT[step.mode]}, {row_label(step.row)} "
            f"(measurement {index + 1}/{total}), about {duration_text(left)} left")


# -- the testbed side -----------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, bed: Testbed, duration: float, rate: float, family: int = 4):
        self.bed = bed
        self.duration = duration
        self.rate = rate
        self.family = family
        self.haproxy: subprocess.Popen | None = None
        if family == 6:
            self.vip = bed.vip6
            self.nodes = [str(h.address6_on("int")) for h in bed.topology.web_nodes]
            topology = bed.topology
            self.gateway = f"{topology.gateway6}/{topology.bridges6['int'].prefixlen}"
            self.vip_prefix = f"{self.vip}/128"
            self.cluster_lan = str(topology.bridges6["int"])
            self.dist1_outside = str(topology.host("dist1").address6_on("ext"))
        else:
            self.vip = bed.vip
            self.nodes = [str(h.address_on("int")) for h in bed.topology.web_nodes]
            self.gateway = f"{bed.topology.gateway}/{bed.topology.bridges['int'].prefixlen}"
            self.vip_prefix = f"{self.vip}/32"
            self.cluster_lan = str(bed.topology.bridges["int"])
            self.dist1_outside = str(bed.topology.host("dist1").address_on("ext"))

    def _host(self, address: str) -> str:
        """An address as a URL, HAProxy or DNAT target writes it with a port after it."""
        return f"[{address}]" if self.family == 6 else address

    # -- modes -------------------------------------------------------------------
    def enter(self, mode: str) -> int | None:
        """Set the mode up; returns the pid whose CPU time is the balancer's, if any."""
        if mode in ("rewrite", "kernel"):
            self.bed.set_mode(mode)
            self.bed.start_service("dist1", "distributor")
            self.bed.wait_vip(30)
            self.bed.start_service("dist2", "distributor")
            active, _ = self.bed.wait_settled(30)
            return self.bed.service_pid(active, "distributor")
        self._addresses("add", vip=mode != "direct")
        if mode == "direct":
            self.bed.run("client", ["ip", "route", "replace", self.cluster_lan, "via", self.dist1_outside])
        elif mode == "dnat":
            rules = ["*nat", ":BENCH-DNAT - [0:0]", "-A PREROUTING -j BENCH-DNAT"]
            for i, node in enumerate(self.nodes):
                nth = f"-m statistic --mode nth --every {len(self.nodes) - i} --packet 0 " if i < len(self.nodes) - 1 else ""
                rules.append(f"-A BENCH-DNAT -d {self.vip_prefix} -p tcp -m tcp --dport 80 {nth}-j DNAT "
                             f"--to-destination {self._host(node)}:80")
            rules.append("COMMIT")
            self.bed.run("dist1", [self._iptables_restore, "--noflush"], input="\n".join(rules) + "\n")
        elif mode == "haproxy":
            config = self.bed.host_dir("dist1") / "haproxy.cfg"
            servers = "\n".join(f"    server web{i + 1} {self._host(node)}:80" for i, node in enumerate(self.nodes))
            config.write_text(HAPROXY_CONF.format(vip=self._host(self.vip), servers=servers))
            self.haproxy = self.bed.popen("dist1", ["haproxy", "-f", str(config), "-db"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self._wait_answers(mode)  # the VIP of the family measured (HAProxy binds that one only)
            return self.haproxy.pid
        self._wait_answers(mode)
        return None

    def leave(self, mode: str) -> None:
        if mode in ("rewrite", "kernel"):
            self.bed.stop_service("dist2", "distributor")  # the backup first: no takeover churn
            self.bed.stop_service("dist1", "distributor")
            return
        if mode == "direct":
            self.bed.run("client", ["ip", "route", "del", self.cluster_lan], check=False)
        elif mode == "dnat":
            self.bed.run("dist1", [self._iptables_restore, "--noflush"], check=False,
                         input="*nat\n-D PREROUTING -j BENCH-DNAT\n-F BENCH-DNAT\n-X BENCH-DNAT\nCOMMIT\n")
        elif mode == "haproxy" and self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)
            self.haproxy = None
        self._addresses("del", vip=mode != "direct")

    @property
    def _iptables_restore(self) -> str:
        return "ip6tables-restore" if self.family == 6 else "iptables-restore"

    def _addresses(self, op: str, vip: bool) -> None:
        # IPv6 addresses without duplicate address detection: usable at once, as the IPv4 ones.
        nodad = ["nodad"] if self.family == 6 and op == "add" else []
        self.bed.run("dist1", ["ip", "addr", op, self.gateway, "dev", "int0", *nodad], check=False)
        if vip:
            self.bed.run("dist1", ["ip", "addr", op, self.vip_prefix, "dev", "ext0", *nodad], check=False)
        # Neighbour entries may still point at dist2 from a distributor round.
        self.bed.run("client", ["ip", "neigh", "flush", "dev", "eth0"], check=False)
        for host in self.bed.topology.web_nodes:
            self.bed.run(host.name, ["ip", "neigh", "flush", "dev", "eth0"], check=False)

    def _wait_answers(self, mode: str) -> None:
        for url in self.urls(mode):
            wait_until(lambda: self.bed.run("client", ["curl", "-g", "-s", "-o", "/dev/null", "-m", "1", url],
                                            check=False).returncode == 0, 10, f"{url} to answer")

    def urls(self, mode: str, path: str = "/1k.bin") -> list[str]:
        if mode == "direct":
            return [f"http://{self._host(node)}{path}" for node in self.nodes]
        return [f"http://{self._host(self.vip)}{path}"]

    # -- measurements ----------------------------------------------------------------
    def measure(self, mode: str, round_number: int, rows: Iterable[str] = tuple(r.key for r in ROWS),
                latency: bool = True, before: Callable[[str], None] = lambda row: None) -> Record:
        """One mode's turn: set it up, measure the rows then the latency, set it down.

        ``before(row)`` is called before each measurement (``LATENCY`` for the latency
        run); the first call comes before the mode is set up.
        """
        rows = list(rows)
        before(rows[0] if rows else LATENCY)
        pid = self.enter(mode)
        results: dict[str, RowResult] = {}
        figures, latency_drops = None, 0
        try:
            for i, key in enumerate(rows):
                if i:
                    before(key)
                results[key] = self.measure_row(mode, ROW_BY_KEY[key], pid)
            if latency:
                if rows:
                    before(LATENCY)
                drops_before = self._queue_drops()
                figures = self._fixed_rate(mode)
                latency_drops = self._queue_drops() - drops_before
        finally:
            self.leave(mode)
        return Record.build(mode, round_number, results, figures, latency_drops)

    def measure_row(self, mode: str, row: Row, pid: int | None) -> RowResult:
        drops_before, packets_before, cpu_before = self._queue_drops(), self._packets(), _cpu_seconds(pid)
        runs = self._wrk(mode, close=row.close, path=row.path, connections=row.connections)
        cpu_after, packets_after, drops_after = _cpu_seconds(pid), self._packets(), self._queue_drops()
        packets = packets_after - packets_before
        requests = sum(r.requests for r in runs)
        rps = sum(r.rps for r in runs)
        per_packet = per_connection = None
        if cpu_before is not None and cpu_after is not None:
            per_packet = (cpu_after - cpu_before) * 1e6 / max(packets, 1)
            if row.close:
                per_connection = (cpu_after - cpu_before) * 1e6 / max(requests, 1)
        return RowResult(rps, requests, sum(r.errors for r in runs), drops_after - drops_before, packets, per_packet,
                         per_connection, rps * row.size / 2**20)

    def _wrk(self, mode: str, close: bool = False, path: str = "/1k.bin",
             connections: int = CONNECTIONS) -> list[wrk.WrkResult]:
        urls = self.urls(mode, path)
        shares = [connections // len(urls) + (i < connections % len(urls)) for i in range(len(urls))]
        threads = 2 if len(urls) == 1 else 1
        runs = [self.bed.popen("client", wrk.command(url, duration=self.duration, connections=max(1, share),
                                                     threads=threads, close=close),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                for url, share in zip(urls, shares)]
        return [wrk.parse(run.communicate(timeout=self.duration + 60)[0]) for run in runs]

    def _fixed_rate(self, mode: str) -> dict:
        out = self.bed.run("client", [sys.executable, "-m", "bench.fixed_rate", "--rate", str(self.rate), "--duration",
                                      str(self.duration), *self.urls(mode)], timeout=self.duration + 60).stdout
        return json.loads(out)

    def _packets(self) -> int:
        links = json.loads(self.bed.run("dist1", ["ip", "-s", "-j", "link", "show"]).stdout)
        return sum(link["stats64"]["rx"]["packets"] for link in links if link["ifname"] in ("ext0", "int0"))

    def _queue_drops(self) -> int:
        text = self.bed.run("dist1", ["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout
        return sum(int(f[5]) + int(f[6]) for f in (line.split() for line in text.splitlines()) if len(f) >= 7)


def _cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of a process and its threads (None: no process, or it is gone)."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


HAPROXY_CONF = """\
global
    maxconn 8000
defaults
    mode tcp
    timeout connect 5s
    timeout client 60s
    timeout server 60s
frontend vip
    bind {vip}:80
    default_backend nodes
backend nodes
    balance roundrobin
{servers}
"""


# -- the run's name ------------------------------------------------------------------------------------------------
LOCK_DIR = Path(tempfile.gettempdir()) / "bench-compare-runs"


def claim_run_name(pid: int | None = None, lock_dir: Path = LOCK_DIR, tries: int = 100) -> tuple[str, object]:
    """A testbed project name no other live bench.compare holds: ``bc<pid % 100000>`` (or the next free number).

    The name is held by an exclusive flock on ``lock_dir/<name>.lock`` for as long as
    the returned file stays open, so leftovers under that name can only be a dead run's
    (which ``Testbed.up`` removes).  Names fit the testbed's 12 characters.
    """
    pid = os.getpid() if pid is None else pid
    lock_dir.mkdir(parents=True, exist_ok=True)
    for k in range(tries):
        name = check_project(f"bc{(pid + k) % 100000}")
        handle = open(lock_dir / f"{name}.lock", "a")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            continue
        return name, handle
    raise TestbedError(f"no free run name near bc{pid % 100000} (locks in {lock_dir})")


# -- reporting (pure) ------------------------------------------------------------------------------------------------
@dataclass
class Settings:
    rounds: int
    duration: float
    rate: float  # 0: no latency run
    modes: list[str]
    rows: list[str]
    run: str = ""
    date: str = ""
    machine: str = ""
    chart: str = "results.png"  # the chart's path as the markdown links it
    note: str = ""  # e.g. why the run stopped early
    family: int = 4  # the IP version of every path measured


@dataclass(frozen=True)
class TargetResult:
    target: Target
    value: float | None  # the ratio of the medians, None: not measured
    low: float | None  # the range of the per-round ratios
    high: float | None

    @property
    def met(self) -> bool | None:
        return None if self.value is None else self.value >= self.target.ratio


def present_modes(records: list[Record]) -> list[str]:
    return [mode for mode in MODES if any(r.mode == mode for r in records)]


def present_rows(records: list[Record]) -> list[str]:
    return [row.key for row in ROWS if any(row.key in r.rows for r in records)]


def rps_values(records: list[Record], mode: str, row: str) -> list[float]:
    return [r.rows[row].rps for r in records if r.mode == mode and row in r.rows]


def median_rps(records: list[Record], mode: str, row: str) -> float | None:
    values = rps_values(records, mode, row)
    return statistics.median(values) if values else None


def ratio(records: list[Record], mode: str, row: str, base: str) -> float | None:
    value, reference = median_rps(records, mode, row), median_rps(records, base, row)
    return value / reference if value is not None and reference else None


def round_ratios(records: list[Record], mode: str, row: str, base: str) -> list[float]:
    """Per round, the mode's requests/s over the base's of the same round."""
    bases = {r.round: r.rows[row].rps for r in records if r.mode == base and row in r.rows}
    return [r.rows[row].rps / bases[r.round] for r in records
            if r.mode == mode and row in r.rows and bases.get(r.round)]


def evaluate(records: list[Record], targets: list[Target] = TARGETS) -> list[TargetResult]:
    out = []
    for target in targets:
        per_round = round_ratios(records, target.mode, target.row, target.base)
        out.append(TargetResult(target, ratio(records, target.mode, target.row, target.base),
                                min(per_round) if per_round else None, max(per_round) if per_round else None))
    return out


def _fmt(value: float | None, spec: str = ",.0f") -> str:
    return "-" if value is None else format(value, spec)


def _ratio_text(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _value_range(values: list[float], spec: str = ",.0f") -> str:
    return f"{min(values):{spec}}-{max(values):{spec}}" if values else "-"


def _median_of(values: Iterable[float | None]) -> float | None:
    kept = [v for v in values if v is not None]
    return statistics.median(kept) if kept else None


def _verdict_digits(value: float, target: float) -> str:
    """The ratio with two decimals, or as many more as it takes for the rounding not to hide the verdict."""
    for digits in (2, 3, 4):
        text = f"{value:.{digits}f}"
        if (float(text) >= target) == (value >= target):
            break
    return text


def target_line(result: TargetResult) -> str:
    t = result.target
    what = f"{LABELS[t.mode]}, {ROW_BY_KEY[t.row].label}: "
    if result.value is None:
        return what + f"target >= {t.ratio:g}x {LABELS[t.base]}: not measured in this run"
    spread = f"; rounds {result.low:.2f}-{result.high:.2f}x" if result.low is not None else ""
    return (what + f"{_verdict_digits(result.value, t.ratio)}x {LABELS[t.base]} (target >= {t.ratio:g}x{spread}): "
            + ("met" if result.met else "NOT met"))


def report(records: list[Record], settings: Settings) -> str:
    """results.md: everything the README's "Benchmark" section shows."""
    modes, rows = present_modes(records), present_rows(records)
    dnat = "dnat" in modes
    latency_text = (f" Latency: {settings.rate:g} requests/s of 1 KiB on 16 keep-alive connections, open loop "
                    f"(bench.fixed_rate)." if settings.rate > 0 else "")
    lines = []
    if settings.note:
        lines += [f"**Incomplete run: {settings.note}**", ""]
    lines += [
        f"Measured {settings.date} on {settings.machine}; client, distributors and nodes share it (network "
        f"namespaces). {settings.rounds} interleaved round{'s' if settings.rounds != 1 else ''} of "
        f"{settings.duration:g} s per measurement (the order of the modes and of the rows rotates each round); "
        f"medians, with the range over the rounds; ratios are to "
        f"kernel DNAT of the same run. wrk, HTTP/1.1 GETs of the nodes' files"
        f"{', over IPv6 (every path: the VIP6, the nodes IPv6 addresses)' if settings.family == 6 else ''}."
        f"{latency_text}",
        "",
        "Requests/s (medians) and the ratio to kernel DNAT:",
        "",
        "| work | " + " | ".join(SHORT[m] for m in modes) + " |",
        "|---|" + "---|" * len(modes),
    ]
    for key in rows:
        cells = []
        for mode in modes:
            value = median_rps(records, mode, key)
            share = ratio(records, mode, key, "dnat") if dnat else None
            cells.append("-" if value is None else f"{value:,.0f}" + (f" ({share:.2f}x)" if share is not None else ""))
        lines.append(f"| {ROW_BY_KEY[key].label} | " + " | ".join(cells) + " |")

    lines += ["", "Per row and mode: the range over the rounds, response bytes, the balancer process's CPU time "
              "(the distributor or HAProxy; kernel paths have none) per packet dist1 received and, on the "
              "new-connection rows, per connection; errors and NFQUEUE drops summed over the rounds.", "",
              "| work | mode | req/s | range | MiB/s | vs DNAT | vs HAProxy | CPU us/packet | CPU us/conn | errors "
              "| queue drops |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for key in rows:
        for mode in modes:
            mine = [r.rows[key] for r in records if r.mode == mode and key in r.rows]
            if not mine:
                continue
            lines.append(
                f"| {ROW_BY_KEY[key].label} | {LABELS[mode]} | {_fmt(median_rps(records, mode, key))} | "
                f"{_value_range(rps_values(records, mode, key))} | {_fmt(_median_of(r.mib_per_s for r in mine))} | "
                f"{_ratio_text(ratio(records, mode, key, 'dnat'))} | {_ratio_text(ratio(records, mode, key, 'haproxy'))} | "
                f"{_fmt(_median_of(r.cpu_us_per_packet for r in mine), '.1f')} | "
                f"{_fmt(_median_of(r.cpu_us_per_connection for r in mine), '.1f')} | "
                f"{sum(r.errors for r in mine)} | {sum(r.queue_drops for r in mine)} |")

    if any(r.p99_ms is not None or r.latency_errors is not None for r in records):
        lines += ["", f"Latency at {settings.rate:g} requests/s (milliseconds, medians):", "",
                  "| mode | p50 | p99 | p99 range | errors | queue drops |", "|---|---|---|---|---|---|"]
        for mode in modes:
            mine = [r for r in records if r.mode == mode]
            p99s = [r.p99_ms for r in mine if r.p99_ms is not None]
            lines.append(f"| {LABELS[mode]} | {_fmt(_median_of(r.p50_ms for r in mine), '.2f')} | "
                         f"{_fmt(_median_of(p99s), '.2f')} | {_value_range(p99s, '.2f')} | "
                         f"{sum(r.latency_errors or 0 for r in mine)} | {sum(r.latency_queue_drops or 0 for r in mine)} |")

    results = evaluate(records)
    errors = sum(r.errors for r in records)
    drops = sum(r.queue_drops for r in records)
    measured = [r for r in results if r.met is not None]
    lines += ["", "Targets (issue 10; medians of this run):", ""]
    lines += [f"- {target_line(r)}" for r in results]
    lines.append(f"- 0 errors: {errors} in this run: " + ("met" if errors == 0 else "NOT met"))
    lines.append(f"- 0 queue drops: {drops} in this run: " + ("met" if drops == 0 else "NOT met"))
    lines += ["", f"{sum(1 for r in measured if r.met)} of {len(measured)} ratio targets met"
              + (f" ({len(results) - len(measured)} not measured)" if len(measured) < len(results) else "")
              + f"; {errors} errors, {drops} queue drops.", "", f"![side by side]({settings.chart})"]
    return "\n".join(lines) + "\n"


def results_json(records: list[Record], settings: Settings) -> dict:
    """results.json: the settings, every record with its rows, the medians and the targets."""
    modes, rows = present_modes(records), present_rows(records)
    medians = {key: {mode: {"median_rps": median_rps(records, mode, key),
                            "min_rps": min(rps_values(records, mode, key), default=None),
                            "max_rps": max(rps_values(records, mode, key), default=None),
                            "vs_dnat": ratio(records, mode, key, "dnat"),
                            "vs_haproxy": ratio(records, mode, key, "haproxy")}
                     for mode in modes if rps_values(records, mode, key)} for key in rows}
    return {
        "schema": SCHEMA,
        "run": settings.run,
        "date": settings.date,
        "machine": settings.machine,
        "note": settings.note,
        "settings": {"rounds": settings.rounds, "duration_s": settings.duration, "latency_rate": settings.rate,
                     "modes": settings.modes, "rows": settings.rows, "family": settings.family},
        "rows": {row.key: {"label": row.label, "path": row.path, "bytes": row.size, "connections": row.connections,
                           "new_connection_each": row.close} for row in ROWS if row.key in settings.rows},
        "records": [asdict(r) for r in records],
        "medians": medians,
        "targets": [{"mode": r.target.mode, "row": r.target.row, "base": r.target.base, "target": r.target.ratio,
                     "ratio": r.value, "round_low": r.low, "round_high": r.high, "met": r.met} for r in evaluate(records)],
        "errors": sum(r.errors for r in records),
        "queue_drops": sum(r.queue_drops for r in records),
    }


def load_records(data: dict) -> list[Record]:
    """The records of a results.json (schema 2) back as objects."""
    records = []
    for item in data["records"]:
        item = dict(item)
        item["rows"] = {key: RowResult(**value) for key, value in item.get("rows", {}).items()}
        records.append(Record(**item))
    return records


def chart(records: list[Record], path: Path, family: int = 4) -> None:
    """One panel per row: each mode's ratio to DNAT (median), the per-round ratios and their range, the targets
    (``family`` 6: the title says the paths were IPv6)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes, rows = present_modes(records), present_rows(records)
    relative = "dnat" in modes
    columns = min(3, max(1, len(rows)))
    lines = max(1, -(-len(rows) // columns))
    fig, axes = plt.subplots(lines, columns, figsize=(5.2 * columns, 4.4 * lines), squeeze=False)
    for ax in axes.flat[len(rows):]:
        ax.set_visible(False)
    positions = list(range(len(modes)))
    for ax, key in zip(axes.flat, rows):
        heights, lows, highs, dots = [], [], [], []
        for mode in modes:
            if relative:
                value = ratio(records, mode, key, "dnat")
                per_round = round_ratios(records, mode, key, "dnat")
            else:
                value = median_rps(records, mode, key)
                per_round = rps_values(records, mode, key)
            value = value or 0.0
            heights.append(value)
            lows.append(max(0.0, value - min(per_round)) if per_round else 0.0)
            highs.append(max(0.0, max(per_round) - value) if per_round else 0.0)
            dots.append(per_round)
        ax.bar(positions, heights, yerr=[lows, highs], capsize=4, color=[COLOURS[m] for m in modes], alpha=0.85,
               error_kw={"elinewidth": 1.2})
        for x, values in zip(positions, dots):
            ax.plot([x] * len(values), values, "o", color="black", markersize=2.5, alpha=0.6)
        marks = []  # (mode index, height, style) of the targets drawn
        if relative:
            for t in TARGETS:
                if t.row != key or t.mode not in modes:
                    continue
                if t.base == "dnat":
                    marks.append((modes.index(t.mode), t.ratio, "dnat"))
                elif (base := ratio(records, t.base, key, "dnat")) is not None:
                    marks.append((modes.index(t.mode), t.ratio * base, "other"))
        top = max([h + e for h, e in zip(heights, highs)] + [m[1] for m in marks] + [1.0])
        for x, h, high in zip(positions, heights, highs):
            ax.text(x, h + high + top * 0.015, f"{h:.2f}" if relative else f"{h:,.0f}", ha="center", va="bottom",
                    fontsize=8, fontweight="bold")
        if relative:
            ax.axhline(1.0, color="#4c72b0", linewidth=0.8, linestyle=":")
            for x, height, kind in marks:
                ax.hlines(height, x - 0.45, x + 0.45, colors="black" if kind == "dnat" else "#6a3d9a",
                          linestyles="--" if kind == "dnat" else "-.", linewidth=1.4)
            base = median_rps(records, "dnat", key)
            ax.set_title(f"{ROW_BY_KEY[key].label}\n(DNAT: {_fmt(base)} req/s)", fontsize=10)
            ax.set_ylabel("ratio to kernel DNAT")
        else:
            ax.set_title(ROW_BY_KEY[key].label, fontsize=10)
            ax.set_ylabel("requests/s")
        ax.set_ylim(0, top * 1.15)
        ax.set_xticks(positions)
        ax.set_xticklabels([SHORT[m].replace("-", "-\n") for m in modes], fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    what = "ratio to kernel DNAT" if relative else "requests/s"
    over = ", over IPv6" if family == 6 else ""
    fig.suptitle(f"Side by side{over}, {what}: medians of interleaved rounds", fontsize=12)
    from matplotlib.lines import Line2D

    legend = [Line2D([], [], marker="o", color="black", linestyle="none", markersize=3, label="each round"),
              Line2D([], [], color="black", marker="_", markersize=10, label="range over the rounds")]
    if relative:
        legend += [Line2D([], [], color="black", linestyle="--", label="target: x kernel DNAT (issue 10)"),
                   Line2D([], [], color="#6a3d9a", linestyle="-.", label="target: x HAProxy (issue 10)")]
    fig.legend(handles=legend, loc="lower center", ncol=len(legend), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) // (1024 * 1024)
    return f"{os.cpu_count()} x {model}, {memory} GiB, Linux {platform.release()}"


# -- the command ---------------------------------------------------------------------------------------------------
def parse_rows(text: str) -> list[str]:
    """``all``, or comma-separated row keys or numbers (1-6), in the table's order."""
    if text.strip() in ("", "all"):
        return [row.key for row in ROWS]
    chosen = set()
    for item in (part.strip() for part in text.split(",") if part.strip()):
        if item.isdigit() and 1 <= int(item) <= len(ROWS):
            chosen.add(ROWS[int(item) - 1].key)
        elif item in ROW_BY_KEY:
            chosen.add(item)
        else:
            raise ValueError(f"unknown row {item!r}: use 1-{len(ROWS)} or one of {', '.join(ROW_BY_KEY)}")
    return [row.key for row in ROWS if row.key in chosen]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="rows:\n" + "\n".join(f"  {i + 1}. {row.key:18} {row.label}"
                                                                  for i, row in enumerate(ROWS)))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default: 5)")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="requests/s of the latency run (default: 2000; 0: no latency run)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--rows", default="all", help="comma-separated subset of the rows, by number or key (default: all)")
    parser.add_argument("--family", type=int, choices=(4, 6), default=4,
                        help="IP version of every path measured (default: 4; 6: the dual-stack testbed's IPv6)")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the results")
    args = parser.parse_args(argv)
    args.modes = [m for m in args.modes.split(",") if m]
    unknown = [m for m in args.modes if m not in MODES]
    if unknown or not args.modes:
        parser.error(f"bad --modes {unknown or args.modes}: use some of {','.join(MODES)}")
    if len(set(args.modes)) != len(args.modes):
        parser.error("--modes names a mode twice")
    try:
        args.rows = parse_rows(args.rows)
    except ValueError as exc:
        parser.error(str(exc))
    if not args.rows and args.rate <= 0:
        parser.error("nothing to measure: no rows and no latency run")
    if args.rounds < 1 or args.duration <= 0 or args.rate < 0:
        parser.error("--rounds and --duration must be positive, --rate not negative")
    return args


def _terminate(signum, frame):  # SIGTERM: unwind, so the testbed comes down
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if os.geteuid() != 0:
        print("bench.compare: needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    name, name_lock = claim_run_name()
    latency = args.rate > 0
    steps = plan(args.modes, args.rows, args.rounds, latency)
    eta = Eta(steps, args.duration)
    settings = Settings(args.rounds, args.duration, args.rate, args.modes, args.rows, run=name,
                        date=time.strftime("%Y-%m-%d"), machine=machine(), chart=str(args.out / "results.png"),
                        family=args.family)
    print(f"bench.compare: testbed {name}; {len(steps)} measurements planned, about {duration_text(eta.left(0))} "
          f"once the testbed is up", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _terminate)
    bed = Testbed(name, Options(nodes=3, policy="round-robin", ipv6=args.family == 6))
    records: list[Record] = []
    clock = {"index": 0, "started": None, "began": None}

    def before(row: str) -> None:
        now = time.monotonic()
        index = clock["index"]
        if clock["started"] is not None:
            eta.record(index - 1, now - clock["started"])
        else:
            clock["began"] = now
        clock["started"] = now
        step = steps[index]
        assert step.row == row, (step, row)
        print(progress_line(step, index, len(steps), args.rounds, eta.left(index)), file=sys.stderr, flush=True)
        clock["index"] = index + 1

    status = 0
    try:
        bed.up()
        bed.stop_service("dist2", "distributor")
        bed.stop_service("dist1", "distributor")
        bench = Bench(bed, args.duration, args.rate, args.family)
        for turn in turns(steps):
            mode, round_number = turn[0].mode, turn[0].round
            rows = [s.row for s in turn if s.row != LATENCY]
            record = bench.measure(mode, round_number, rows, latency, before)
            records.append(record)
            for key in rows:
                r = record.rows[key]
                print(f"round {round_number + 1}/{args.rounds} {mode:8} {key:17} {r.rps:10,.0f} req/s, errors "
                      f"{r.errors}, queue drops {r.queue_drops}", flush=True)
            if latency:
                print(f"round {round_number + 1}/{args.rounds} {mode:8} {LATENCY:17} p50 {record.p50_ms} ms, p99 "
                      f"{record.p99_ms} ms, errors {record.latency_errors}", flush=True)
        if clock["began"] is not None:
            print(f"bench.compare: {len(steps)} measurements in {duration_text(time.monotonic() - clock['began'])}",
                  file=sys.stderr, flush=True)
    except (TestbedError, ValueError, subprocess.SubprocessError, OSError, KeyboardInterrupt) as exc:
        print(f"bench.compare: {type(exc).__name__}: {exc}", file=sys.stderr)
        settings.note = (f"stopped after {len(records)} of {len(turns(steps))} mode turns "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})")
        status = 1
    finally:
        bed.down()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        name_lock.close()
    if not records:
        return status or 1
    (args.out / "results.json").write_text(json.dumps(results_json(records, settings), indent=1))
    text = report(records, settings)
    (args.out / "results.md").write_text(text)
    chart(records, args.out / "results.png", args.family)
    print("\n" + text)
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return status


if __name__ == "__main__":
    raise SystemExit(main())
