"""Run wrk inside a testbed host and read its figures.

Contract: :func:`run` runs wrk from ``host`` (default the client) and returns
a :class:`WrkResult`: completed requests, requests/s, socket errors by kind,
non-2xx responses, latency percentiles, and, when ``count_nodes`` is set, how
many responses each node (``X-Node``) served.  Counting nodes runs a Lua
``response`` hook, which costs wrk throughput; benchmarks leave it off.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

COUNT_NODES_LUA = """
local threads = {}
function setup(thread) table.insert(threads, thread) end
function init(args) nodes = {} end
function response(status, headers, body)
  local node = headers["X-Node"] or "none"
  nodes[node] = (nodes[node] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, thread in ipairs(threads) do
    for node, count in pairs(thread:get("nodes")) do total[node] = (total[node] or 0) + count end
  end
  for node, count in pairs(total) do io.write(string.format("node %s %d\\n", node, count)) end
end
"""

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


@dataclass
class WrkResult:
    requests: int = 0
    rps: float = 0.0
    socket_errors: dict[str, int] = field(default_factory=dict)
    non_2xx: int = 0
    latency_ms: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, int] = field(default_factory=dict)
    output: str = ""

    @property
    def errors(self) -> int:
        return sum(self.socket_errors.values()) + self.non_2xx


def parse(output: str) -> WrkResult:
    result = WrkResult(output=output)
    match = re.search(r"(\d+) requests in", output)
    if match is None:
        raise ValueError(f"wrk printed no request count:\n{output}")
    result.requests = int(match.group(1))
    match = re.search(r"Requests/sec:\s+([\d.]+)", output)
    result.rps = float(match.group(1)) if match else 0.0
    match = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output)
    if match:
        result.socket_errors = dict(zip(("connect", "read", "write", "timeout"), map(int, match.groups())))
    match = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    result.non_2xx = int(match.group(1)) if match else 0
    for pct, value, unit in re.findall(r"^\s+(\d+(?:\.\d+)?)%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M):
        result.latency_ms[f"p{pct.rstrip('0').rstrip('.') if '.' in pct else pct}"] = float(value) * _UNITS[unit]
    match = re.search(r"^\s+Latency\s+\S+?\s+\S+?\s+([\d.]+)(us|ms|s|m)\s", output, re.M)
    if match:
        result.latency_ms["max"] = float(match.group(1)) * _UNITS[match.group(2)]
    for node, count in re.findall(r"^node (\S+) (\d+)$", output, re.M):
        result.nodes[node] = int(count)
    return result


def command(url: str, duration: float = 3.0, connections: int = 20, threads: int = 2, close: bool = False,
            script: str | None = None, timeout: float = 5.0) -> list[str]:
    argv = ["wrk", f"-t{threads}", f"-c{connections}", f"-d{duration:g}s", f"--timeout={timeout:g}s", "--latency"]
    if close:
        argv += ["-H", "Connection: close"]
    if script:
        argv += ["-s", script]
    return argv + [url]


def run(bed, url: str, host: str = "client", count_nodes: bool = False, **options) -> WrkResult:
    with tempfile.TemporaryDirectory(prefix="wrk-") as tmp:
        script = None
        if count_nodes:
            script = str(Path(tmp) / "count_nodes.lua")
            Path(script).write_text(COUNT_NODES_LUA)
        argv = command(url, script=script, **options)
        completed = bed.run(host, argv, timeout=options.get("duration", 3.0) + 60)
    return parse(completed.stdout)
