"""Side-by-side benchmark: the distributor against kernel NAT and HAProxy, in one testbed run.

One command stands the namespace testbed up and measures, in interleaved rounds
(the order of the modes rotates each round, so slow drifts of a shared machine
hit every mode alike), each data path between the client and the web nodes:

* ``direct``  -- the client talks to the nodes themselves, dist1 only routes (the ceiling);
* ``dnat``    -- kernel iptables DNAT, round-robin (``-m statistic --mode nth``);
* ``haproxy`` -- HAProxy (Debian's) in TCP mode, round-robin, on dist1;
* ``rewrite`` -- the distributor rewriting every packet in user space;
* ``kernel``  -- the distributor deciding first packets, conntrack NAT for the rest.

The distributor runs as deployed: dist1 active, dist2 its backup, replication on.

Per mode and round: keep-alive requests/s and new connections/s (wrk, 32
connections), p50/p99 latency at a fixed rate below saturation
(:mod:`bench.fixed_rate`), the balancer process's CPU time per forwarded packet
and per connection (the distributor, or HAProxy; kernel paths have no process),
socket errors, and NFQUEUE drops.  Writes ``results.json`` (one record per mode
and round), ``results.md`` (medians, ranges, ratios against DNAT and HAProxy,
the targets) and ``results.png``.

    python -m bench.compare [--rounds 5] [--duration 5] [--rate 2000] [--out bench/results]   (root)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from testbed import wrk
from testbed.runner import Options, Testbed, TestbedError, wait_until

MODES = ["direct", "dnat", "haproxy", "rewrite", "kernel"]
LABELS = {"direct": "direct (ceiling)", "dnat": "kernel DNAT", "haproxy": "HAProxy TCP",
          "rewrite": "distributor rewrite", "kernel": "distributor kernel-assisted"}
CONNECTIONS = 32
TARGETS = {  # (keep-alive vs DNAT, vs HAProxy), (new connections vs DNAT, vs HAProxy)
    "kernel": ((0.95, 1.3), (0.9, 1.2)),
    "rewrite": ((0.5, None), (0.5, None)),
}


@dataclass
class Record:
    mode: str
    round: int
    keepalive_rps: float
    close_rps: float
    p50_ms: float | None
    p99_ms: float | None
    errors: int
    queue_drops: int
    cpu_us_per_packet: float | None
    cpu_us_per_connection: float | None
    packets: int


class Bench:
    def __init__(self, bed: Testbed, duration: float, rate: float):
        self.bed = bed
        self.duration = duration
        self.rate = rate
        self.haproxy: subprocess.Popen | None = None
        self.vip = bed.vip
        self.nodes = [str(h.address_on("int")) for h in bed.topology.web_nodes]

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
            self.bed.run("client", ["ip", "route", "replace", "198.51.100.0/24", "via", "203.0.113.2"])
        elif mode == "dnat":
            rules = ["*nat", ":BENCH-DNAT - [0:0]", "-A PREROUTING -j BENCH-DNAT"]
            for i, node in enumerate(self.nodes):
                nth = f"-m statistic --mode nth --every {len(self.nodes) - i} --packet 0 " if i < len(self.nodes) - 1 else ""
                rules.append(f"-A BENCH-DNAT -d {self.vip}/32 -p tcp -m tcp --dport 80 {nth}-j DNAT --to-destination {node}:80")
            rules.append("COMMIT")
            self.bed.run("dist1", ["iptables-restore", "--noflush"], input="\n".join(rules) + "\n")
        elif mode == "haproxy":
            config = self.bed.host_dir("dist1") / "haproxy.cfg"
            servers = "\n".join(f"    server web{i + 1} {node}:80" for i, node in enumerate(self.nodes))
            config.write_text(HAPROXY_CONF.format(vip=self.vip, servers=servers))
            self.haproxy = self.bed.popen("dist1", ["haproxy", "-f", str(config), "-db"],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.bed.wait_vip(20)
            return self.haproxy.pid
        self._wait_answers(mode)
        return None

    def leave(self, mode: str) -> None:
        if mode in ("rewrite", "kernel"):
            self.bed.stop_service("dist2", "distributor")  # the backup first: no takeover churn
            self.bed.stop_service("dist1", "distributor")
            return
        if mode == "direct":
            self.bed.run("client", ["ip", "route", "del", "198.51.100.0/24"], check=False)
        elif mode == "dnat":
            self.bed.run("dist1", ["iptables-restore", "--noflush"], check=False,
                         input="*nat\n-D PREROUTING -j BENCH-DNAT\n-F BENCH-DNAT\n-X BENCH-DNAT\nCOMMIT\n")
        elif mode == "haproxy" and self.haproxy is not None:
            self.haproxy.terminate()
            self.haproxy.wait(timeout=10)
            self.haproxy = None
        self._addresses("del", vip=mode != "direct")

    def _addresses(self, op: str, vip: bool) -> None:
        self.bed.run("dist1", ["ip", "addr", op, "198.51.100.1/24", "dev", "int0"], check=False)
        if vip:
            self.bed.run("dist1", ["ip", "addr", op, f"{self.vip}/32", "dev", "ext0"], check=False)
        # Neighbour entries may still point at dist2 from a distributor round.
        self.bed.run("client", ["ip", "neigh", "flush", "dev", "eth0"], check=False)
        for host in self.bed.topology.web_nodes:
            self.bed.run(host.name, ["ip", "neigh", "flush", "dev", "eth0"], check=False)

    def _wait_answers(self, mode: str) -> None:
        for url in self.urls(mode):
            wait_until(lambda: self.bed.run("client", ["curl", "-s", "-o", "/dev/null", "-m", "1", url],
                                            check=False).returncode == 0, 10, f"{url} to answer")

    def urls(self, mode: str) -> list[str]:
        if mode == "direct":
            return [f"http://{node}/1k.bin" for node in self.nodes]
        return [f"http://{self.vip}/1k.bin"]

    # -- measurements ----------------------------------------------------------------
    def measure(self, mode: str, round_number: int) -> Record:
        pid = self.enter(mode)
        try:
            queue_before = self._queue_drops()
            packets_before, cpu_before = self._packets(), _cpu_seconds(pid)
            keepalive = self._wrk(mode, close=False)
            packets_mid, cpu_mid = self._packets(), _cpu_seconds(pid)
            close = self._wrk(mode, close=True)
            cpu_after = _cpu_seconds(pid)
            latency = self._fixed_rate(mode)
            drops = self._queue_drops() - queue_before
        finally:
            self.leave(mode)
        packets = packets_mid - packets_before
        connections = sum(r.requests for r in close)
        per_packet = per_connection = None
        if pid is not None and cpu_before is not None:
            per_packet = (cpu_mid - cpu_before) * 1e6 / max(packets, 1)
            per_connection = (cpu_after - cpu_mid) * 1e6 / max(connections, 1)
        errors = sum(r.errors for r in keepalive + close) + latency["errors"]
        return Record(mode, round_number, sum(r.rps for r in keepalive), sum(r.rps for r in close),
                      latency["p50_ms"], latency["p99_ms"], errors, drops, per_packet, per_connection, packets)

    def _wrk(self, mode: str, close: bool) -> list[wrk.WrkResult]:
        urls = self.urls(mode)
        per_url = max(1, CONNECTIONS // len(urls))
        threads = 2 if len(urls) == 1 else 1
        runs = [self.bed.popen("client", wrk.command(url, duration=self.duration, connections=per_url, threads=threads,
                                                     close=close), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True) for url in urls]
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
    """User + system CPU time of a process and its threads."""
    if pid is None:
        return None
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
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


# -- reporting -------------------------------------------------------------------------
def _median(records: list[Record], field: str) -> float | None:
    values = [getattr(r, field) for r in records if getattr(r, field) is not None]
    return statistics.median(values) if values else None


def _range(records: list[Record], field: str) -> str:
    values = [getattr(r, field) for r in records if getattr(r, field) is not None]
    return f"{min(values):,.0f}-{max(values):,.0f}" if values else "-"


def machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor() or "unknown CPU")
    memory = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal"))) // (1024 * 1024)
    return f"{os.cpu_count()} x {model}, {memory} GiB, Linux {platform.release()}"


def report(records: list[Record], rounds: int, duration: float, rate: float) -> str:
    present = [mode for mode in MODES if any(r.mode == mode for r in records)]
    by_mode = {mode: [r for r in records if r.mode == mode] for mode in present}
    med = {mode: {f: _median(rs, f) for f in ("keepalive_rps", "close_rps", "p50_ms", "p99_ms", "cpu_us_per_packet",
                                              "cpu_us_per_connection")} for mode, rs in by_mode.items()}

    def ratio(mode: str, field: str, base: str) -> str:
        if base not in med:
            return "-"
        value, reference = med[mode][field], med[base][field]
        return f"{value / reference:.2f}x" if value and reference else "-"

    def fmt(value: float | None, spec: str = ",.0f") -> str:
        return "-" if value is None else format(value, spec)

    lines = [
        f"Measured {time.strftime('%Y-%m-%d')} on {machine()}; client, distributors and nodes share it "
        f"(network namespaces). {rounds} interleaved rounds of {duration:g} s per measurement; medians, with the "
        f"range over the rounds. wrk: {CONNECTIONS} connections, 1 KiB responses. Latency: {rate:g} requests/s "
        f"on 16 keep-alive connections.",
        "",
        "| mode | keep-alive req/s | range | vs DNAT | vs HAProxy | new conn/s | range | vs DNAT | vs HAProxy "
        "| p50 ms | p99 ms | CPU us/packet | CPU us/conn | errors | queue drops |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode in present:
        rs = by_mode[mode]
        m = med[mode]
        lines.append(
            f"| {LABELS[mode]} | {fmt(m['keepalive_rps'])} | {_range(rs, 'keepalive_rps')} | "
            f"{ratio(mode, 'keepalive_rps', 'dnat')} | {ratio(mode, 'keepalive_rps', 'haproxy')} | "
            f"{fmt(m['close_rps'])} | {_range(rs, 'close_rps')} | {ratio(mode, 'close_rps', 'dnat')} | "
            f"{ratio(mode, 'close_rps', 'haproxy')} | {fmt(m['p50_ms'], '.2f')} | {fmt(m['p99_ms'], '.2f')} | "
            f"{fmt(m['cpu_us_per_packet'], '.1f')} | {fmt(m['cpu_us_per_connection'], '.1f')} | "
            f"{sum(r.errors for r in rs)} | {sum(r.queue_drops for r in rs)} |")
    lines += ["", "Targets (medians of this run):", ""]
    for mode, ((ka_dnat, ka_ha), (cl_dnat, cl_ha)) in TARGETS.items():
        if mode not in med:
            continue
        for field, dnat_target, ha_target, what in (("keepalive_rps", ka_dnat, ka_ha, "keep-alive"),
                                                    ("close_rps", cl_dnat, cl_ha, "new connections")):
            value = med[mode][field]
            checks = []
            for base, target in (("dnat", dnat_target), ("haproxy", ha_target)):
                if target is None or not value or base not in med or not med[base][field]:
                    continue
                got = value / med[base][field]
                checks.append(f"{got:.2f}x {LABELS[base]} (target {target}x: {'met' if got >= target else 'NOT met'})")
            lines.append(f"- {LABELS[mode]}, {what}: " + "; ".join(checks))
    return "\n".join(lines) + "\n"


def chart(records: list[Record], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [mode for mode in MODES if any(r.mode == mode for r in records)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, field, title in ((axes[0], "keepalive_rps", "keep-alive requests/s"),
                             (axes[1], "close_rps", "new connections/s (Connection: close)")):
        meds, lows, highs = [], [], []
        for mode in modes:
            values = [getattr(r, field) for r in records if r.mode == mode]
            m = statistics.median(values)
            meds.append(m)
            lows.append(m - min(values))
            highs.append(max(values) - m)
        colours = {"direct": "#999999", "dnat": "#4c72b0", "haproxy": "#dd8452", "rewrite": "#55a868", "kernel": "#c44e52"}
        ax.bar([LABELS[m].replace("distributor ", "distributor\n") for m in modes], meds, yerr=[lows, highs],
               capsize=4, color=[colours[m] for m in modes])
        ax.set_title(title)
        ax.tick_params(axis="x", labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("Side by side, medians of interleaved rounds (bars: range)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.compare", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default: 5)")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement (default: 5)")
    parser.add_argument("--rate", type=float, default=2000.0, help="requests/s of the latency run (default: 2000)")
    parser.add_argument("--modes", default=",".join(MODES), help=f"comma-separated subset of {','.join(MODES)}")
    parser.add_argument("--out", type=Path, default=Path("bench/results"), help="directory for the results")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown or args.rounds < 1 or args.duration <= 0:
        parser.error(f"bad --modes {unknown}" if unknown else "--rounds and --duration must be positive")
    if os.geteuid() != 0:
        print("bench.compare: needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    args.out.mkdir(parents=True, exist_ok=True)
    bed = Testbed("bench", Options(nodes=3, policy="round-robin"))
    records: list[Record] = []
    try:
        bed.up()
        bed.stop_service("dist2", "distributor")
        bed.stop_service("dist1", "distributor")
        bench = Bench(bed, args.duration, args.rate)
        for round_number in range(args.rounds):
            order = modes[round_number % len(modes):] + modes[:round_number % len(modes)]
            for mode in order:
                record = bench.measure(mode, round_number)
                records.append(record)
                print(f"round {round_number + 1}/{args.rounds} {mode:8}: keep-alive {record.keepalive_rps:9,.0f}/s, "
                      f"new connections {record.close_rps:8,.0f}/s, p99 {record.p99_ms} ms, errors {record.errors}, "
                      f"queue drops {record.queue_drops}", flush=True)
    except TestbedError as exc:
        print(f"bench.compare: {exc}", file=sys.stderr)
        return 1
    finally:
        bed.down()
    (args.out / "results.json").write_text(json.dumps([asdict(r) for r in records], indent=1))
    text = report(records, args.rounds, args.duration, args.rate)
    (args.out / "results.md").write_text(text)
    chart(records, args.out / "results.png")
    print("\n" + text)
    print(f"wrote {args.out}/results.json, results.md, results.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
