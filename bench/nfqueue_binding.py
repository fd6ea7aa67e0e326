"""Our NFQUEUE binding against python-netfilterqueue, and what rewrite mode could reach with it.

Every packet of the VIP's connections (both directions) is queued on dist1,
as in rewrite mode, and a consumer that decides nothing handles it; kernel
DNAT does the NAT, except in ``own rewrite``.  Measured side by side with DNAT
alone, in interleaved rounds (the order rotates each round), for four loads
(wrk from the client): 1 KiB keep-alive and 1 KiB with a new connection
each (32 connections), 64 KiB (32) and 1 MiB (16) keep-alive responses.

* ``dnat``             -- kernel DNAT alone (the reference);
* ``nfq accept``       -- netfilterqueue's C loop, each packet accepted as it is;
* ``nfq copy``         -- netfilterqueue, each packet's bytes copied out and handed back
                          (rewrite mode's round trip today: no F_GSO, one verdict per syscall);
* ``own accept``       -- distributor.nfqueue with F_GSO, plain accepts (one VERDICT_BATCH per read);
* ``own copy no-gso``  -- distributor.nfqueue without F_GSO, bytes handed back, one sendmsg per read;
* ``own copy``         -- the same with F_GSO (partial checksums completed: the kernel forgets
                          CHECKSUM_PARTIAL on a mangled packet, and conntrack then verifies it);
* ``own rewrite``      -- no DNAT: the consumer rewrites client -> VIP to client -> node (node chosen by
                          the client port) and node -> client to VIP -> client, F_GSO on, checksums by
                          distributor.partialsum: what rewrite mode could reach with this binding;
* ``own rewrite+nft``  -- the same for client -> VIP only; node -> client is rewritten in the kernel by an
                          nft payload statement (``ip saddr set``), which updates a partial checksum by the
                          pseudo-header rule and leaves the packet CHECKSUM_PARTIAL (a kernel return path);
* ``own rewrite+nft+observe`` -- the same, and user space still sees every node -> client packet: a second
                          queue copies its first 128 bytes and accepts it without a payload (so it stays
                          CHECKSUM_PARTIAL and GSO) before the nft statement rewrites its source.

    python -m bench.nfqueue_binding [--rounds 3] [--duration 4] [--variants a,b,...]   (root)

Consumers run inside dist1 as ``python -m bench.nfqueue_binding --consume VARIANT``.
"""

from __future__ import annotations

import argparse
import json
import os
import select
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

QUEUE = 7
OBSERVE_QUEUE = 8  # "own rewrite+nft+observe": headers of node -> client packets
VIP = "203.0.113.1"
NODES = ("198.51.100.11", "198.51.100.12", "198.51.100.13")
_VIP_MATCH = f"-d {VIP}/32 -p tcp -m tcp --dport 80"
_TO_QUEUE = f"-j NFQUEUE --queue-num {QUEUE}"

VARIANTS = ["dnat", "nfq accept", "nfq copy", "own accept", "own copy no-gso", "own copy", "own rewrite",
            "own rewrite+nft", "own rewrite+nft+observe"]
EXTRA_VARIANTS = ["own accept no-gso"]  # measured on request only (--variants)
LOADS = {  # name: (path, connections, Connection: close)
    "1k keep-alive": ("/1k.bin", 32, False),
    "1k new conn": ("/1k.bin", 32, True),
    "64k keep-alive": ("/64k.bin", 32, False),
    "1m keep-alive": ("/1m.bin", 16, False),
}

NFQ_CONSUMER = """
import sys
from netfilterqueue import NetfilterQueue
copy = sys.argv[1] == "copy"
def handle(packet):
    if copy:
        packet.set_payload(packet.get_payload())
    packet.accept()
queue = NetfilterQueue()
queue.bind(%d, handle, max_len=4096, sock_len=4096 * 4096)
queue.run()
""" % QUEUE


# -- the consumers (run inside dist1) ------------------------------------------------------------------------------
def consume(variant: str, batch: int) -> None:
    from distributor import partialsum
    from distributor.nfqueue import NfQueue

    queue = NfQueue(QUEUE, fail_open=False, gso=not variant.endswith("no-gso"), max_len=4096, batch=batch)
    accept = queue.accept
    complete = partialsum.complete
    patch_full, patch_partial = partialsum.patch_full, partialsum.patch_partial
    vip = socket.inet_aton(VIP)
    nodes = [socket.inet_aton(n) for n in NODES]
    to_node = [partialsum.address_delta(vip, n) for n in nodes]
    to_vip = {n: partialsum.address_delta(n, vip) for n in nodes}
    CSUMNOTREADY, GSO = partialsum.SKB_CSUMNOTREADY, partialsum.SKB_GSO

    def plain(packets) -> None:
        for packet in packets:
            accept(packet)

    def copy(packets) -> None:
        # DNAT's conntrack verifies the checksum of a packet that is no longer CHECKSUM_PARTIAL
        # in PREROUTING, GSO or not: every partial packet handed back must be completed.
        for packet in packets:
            data = packet.payload
            if packet.skb_info & CSUMNOTREADY:
                ihl = (data[0] & 15) * 4
                complete(data, ihl, ((data[2] << 8) | data[3]) - ihl)
            accept(packet, data)

    def rewrite(packets) -> None:
        for packet in packets:
            data = packet.payload
            ihl = (data[0] & 15) * 4
            if data[16:20] == vip:  # client -> VIP: to the node the client port picks
                index = data[ihl + 1] % 3
                data[16:20] = nodes[index]
                delta = to_node[index]
            else:  # node -> client: from the VIP
                delta = to_vip[bytes(data[12:16])]
                data[12:16] = vip
            patch_full(data, 10, delta)
            info = packet.skb_info
            if info & CSUMNOTREADY:
                patch_partial(data, ihl + 16, delta)
                if not info & GSO:
                    complete(data, ihl, ((data[2] << 8) | data[3]) - ihl)
            else:
                patch_full(data, ihl + 16, delta)
            accept(packet, data)

    handle = {"own accept": plain, "own accept no-gso": plain, "own copy": copy, "own copy no-gso": copy, "own rewrite": rewrite,
              "own rewrite+nft": rewrite, "own rewrite+nft+observe": rewrite}[variant]
    poll = select.poll()
    poll.register(queue.fileno(), select.POLLIN)
    queues = {queue.fileno(): (queue, handle)}
    if variant == "own rewrite+nft+observe":
        observer = NfQueue(OBSERVE_QUEUE, fail_open=False, gso=True, copy_range=128, max_len=4096, batch=batch)
        seen = [0]

        def observe(packets) -> None:
            for packet in packets:  # what the daemon's table would read: the 4-tuple and the flags
                data = packet.payload
                ihl = (data[0] & 15) * 4
                seen[0] += data[ihl + 13] & 0x07  # FIN/SYN/RST
                observer.accept(packet)

        poll.register(observer.fileno(), select.POLLIN)
        queues[observer.fileno()] = (observer, observe)
    class Stop(Exception):
        pass

    def stop(*_) -> None:
        raise Stop  # poll() is retried after a handler that returns (PEP 475)

    signal.signal(signal.SIGTERM, stop)
    print("ready", flush=True)
    try:
        while True:
            for fd, _ in poll.poll():
                ready, handle_batch = queues[fd]
                while packets := ready.read():
                    handle_batch(packets)
                ready.flush()
    except Stop:
        pass
    totals: dict[str, int] = {}
    for ready, _ in queues.values():
        for key, value in ready.stats().items():
            totals[key] = totals.get(key, 0) + value
    print(json.dumps(totals), flush=True)
    for ready, _ in queues.values():
        ready.close()


# -- the driver (root, outside the testbed) ----------------------------------------------------------------------
def _rules(variant: str) -> list[tuple[str, list[str]]]:
    """(table, rules of a BENCH-Q chain hooked first into the table's chain) for a variant."""
    if variant in ("dnat",):
        return []
    if variant.startswith("own rewrite"):
        raw = [f"{_VIP_MATCH} -j CT --notrack", f"{_VIP_MATCH} {_TO_QUEUE}"]
        raw += [f"-s {n}/32 -p tcp -m tcp --sport 80 -j CT --notrack" for n in NODES]
        if variant == "own rewrite+nft":
            return [("raw PREROUTING", raw)]
        if variant == "own rewrite+nft+observe":
            observe = [f"-s {n}/32 -p tcp -m tcp --sport 80 -j NFQUEUE --queue-num {OBSERVE_QUEUE}" for n in NODES]
            return [("raw PREROUTING", raw), ("mangle POSTROUTING", observe)]
        post = [f"-s {n}/32 -p tcp -m tcp --sport 80 {_TO_QUEUE}" for n in NODES]
        return [("raw PREROUTING", raw), ("mangle POSTROUTING", post)]
    return [("raw PREROUTING", [f"{_VIP_MATCH} {_TO_QUEUE}", f"-s 198.51.100.0/24 -p tcp -m tcp --sport 80 {_TO_QUEUE}"])]


# The kernel return path of "own rewrite+nft*": in POSTROUTING, after routing, and after the mangle
# table (priority -150), where "+observe" queues the headers.
NFT_RETURN = f"""table ip qbench_return {{
  chain postrouting {{
    type filter hook postrouting priority -140; policy accept;
    ip saddr {{ {", ".join(NODES)} }} tcp sport 80 ip saddr set {VIP}
  }}
}}
"""


def _install(bed, variant: str) -> None:
    if variant.startswith("own rewrite+nft"):
        bed.run("dist1", ["nft", "-f", "-"], input=NFT_RETURN)
    for index, (where, rules) in enumerate(_rules(variant)):
        table, chain = where.split()
        script = [f"*{table}", f":BENCH-Q{index} - [0:0]", f"-I {chain} 1 -j BENCH-Q{index}",
                  *[f"-A BENCH-Q{index} {rule}" for rule in rules], "COMMIT"]
        bed.run("dist1", ["iptables-restore", "--noflush"], input="\n".join(script) + "\n")


def _uninstall(bed, variant: str) -> None:
    if variant.startswith("own rewrite+nft"):
        bed.run("dist1", ["nft", "delete", "table", "ip", "qbench_return"], check=False)
    for index, (where, _) in enumerate(_rules(variant)):
        table, chain = where.split()
        bed.run("dist1", ["iptables-restore", "--noflush"], check=False,
                input=f"*{table}\n-D {chain} -j BENCH-Q{index}\n-F BENCH-Q{index}\n-X BENCH-Q{index}\nCOMMIT\n")


def _queued(bed, variant: str) -> tuple[int, int]:
    """Packets the NFQUEUE rules sent to user space so far: (client -> VIP, node -> client)."""
    to_vip = from_nodes = 0
    for index, (where, _) in enumerate(_rules(variant)):
        out = bed.run("dist1", ["iptables", "-t", where.split()[0], "-L", f"BENCH-Q{index}", "-v", "-x", "-n"]).stdout
        for line in out.splitlines():
            fields = line.split()
            if "NFQUEUE" in fields:
                if VIP in fields:
                    to_vip += int(fields[0])
                else:
                    from_nodes += int(fields[0])
    return to_vip, from_nodes


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(bench, bed, variant: str, duration: float, batch: int) -> dict[str, dict]:
    from testbed import wrk

    if variant.startswith("own rewrite"):
        bench._addresses("add", vip=True)  # the VIP (ARP) and the nodes' gateway, no DNAT
    else:
        bench.enter("dnat")
    consumer = None
    try:
        if variant.startswith("nfq"):
            consumer = bed.popen("dist1", [sys.executable, "-c", NFQ_CONSUMER, variant.split()[1]],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        elif variant.startswith("own"):
            consumer = bed.popen("dist1", [sys.executable, "-m", "bench.nfqueue_binding", "--consume", variant,
                                           "--batch", str(batch)], cwd=Path(__file__).resolve().parent.parent,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            if consumer.stdout.readline().strip() != "ready":
                raise RuntimeError(f"the {variant} consumer did not start")
        _install(bed, variant)
        bench._wait_answers("dnat")
        results = {}
        for load, (path, connections, close) in LOADS.items():
            drops_before = bench._queue_drops()
            queued_before = _queued(bed, variant)
            cpu_before = _cpu_seconds(consumer.pid) if consumer else 0.0
            run = bed.popen("client", wrk.command(f"http://{VIP}{path}", duration=duration, connections=connections,
                                                  threads=2, close=close),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            result = wrk.parse(run.communicate(timeout=duration + 60)[0])
            cpu = (_cpu_seconds(consumer.pid) - cpu_before) if consumer else None
            queued = [after - before for after, before in zip(_queued(bed, variant), queued_before)]
            requests = max(result.requests, 1)
            results[load] = {"rps": result.rps, "errors": result.errors, "queue_drops": bench._queue_drops() - drops_before,
                             "cpu_us_per_request": cpu * 1e6 / requests if cpu is not None else None,
                             "queued_in_per_request": queued[0] / requests if consumer else None,
                             "queued_out_per_request": queued[1] / requests if consumer else None}
        return results
    finally:
        _uninstall(bed, variant)
        if consumer is not None:
            consumer.terminate()
            out, _ = consumer.communicate(timeout=10)
            if out and variant.startswith("own"):
                stats = json.loads(out.strip().splitlines()[-1])
                print(f"    {variant} consumer: {stats['received']:,} packets in {stats['sends']:,} verdict sends "
                      f"({stats['received'] / max(stats['sends'], 1):.1f} per sendmsg), {stats['batched']:,} by "
                      f"VERDICT_BATCH, enobufs {stats['enobufs']}, send errors {stats['send_errors']}", flush=True)
        if variant.startswith("own rewrite"):
            bench._addresses("del", vip=True)
        else:
            bench.leave("dnat")


def report(records: list[dict], variants: list[str], rounds: int, duration: float) -> str:
    def med(variant: str, load: str, field: str) -> float | None:
        values = [r["loads"][load][field] for r in records if r["variant"] == variant and r["loads"][load][field] is not None]
        return statistics.median(values) if values else None

    lines = [f"{rounds} interleaved rounds, {duration:g} s per load; medians; ratios to kernel DNAT of the same run.", "",
             "| consumer | " + " | ".join(f"{load} req/s | vs DNAT" for load in LOADS) + " | errors | queue drops |",
             "|---|" + "---|---|" * len(LOADS) + "---|---|"]
    for variant in variants:
        cells = []
        for load in LOADS:
            value, base = med(variant, load, "rps"), med("dnat", load, "rps")
            cells += [f"{value:,.0f}" if value else "-", f"{value / base:.2f}x" if value and base else "-"]
        errors = sum(r["loads"][load]["errors"] for r in records if r["variant"] == variant for load in LOADS)
        drops = sum(r["loads"][load]["queue_drops"] for r in records if r["variant"] == variant for load in LOADS)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {errors} | {drops} |")
    lines += ["", "Consumer CPU per request (us, medians):", "",
              "| consumer | " + " | ".join(LOADS) + " |", "|---|" + "---|" * len(LOADS)]
    for variant in variants:
        if variant == "dnat":
            continue
        cells = [f"{v:.0f}" if (v := med(variant, load, "cpu_us_per_request")) is not None else "-" for load in LOADS]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    lines += ["", "Packets through user space per request, client -> VIP / node -> client (medians):", "",
              "| consumer | " + " | ".join(LOADS) + " |", "|---|" + "---|" * len(LOADS)]
    for variant in variants:
        if variant == "dnat":
            continue
        cells = []
        for load in LOADS:
            to_vip, from_nodes = med(variant, load, "queued_in_per_request"), med(variant, load, "queued_out_per_request")
            cells.append(f"{to_vip:.1f} / {from_nodes:.1f}" if to_vip is not None and from_nodes is not None else "-")
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.nfqueue_binding", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=float, default=4.0)
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of: {', '.join(VARIANTS)}")
    parser.add_argument("--batch", type=int, default=64, help="packets per read for our binding (default 64)")
    parser.add_argument("--out", type=Path, default=None, help="write the records as JSON here")
    parser.add_argument("--consume", choices=[v for v in VARIANTS + EXTRA_VARIANTS if v.startswith("own")],
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.consume:
        consume(args.consume, args.batch)
        return 0
    variants = args.variants.split(",")
    unknown = [v for v in variants if v not in VARIANTS + EXTRA_VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; expected some of {VARIANTS}")
    if "dnat" not in variants:
        variants.insert(0, "dnat")
    if os.geteuid() != 0:
        print("bench.nfqueue_binding: needs root (network namespaces, iptables, NFQUEUE)", file=sys.stderr)
        return 1
    from testbed.runner import Options, Testbed

    from .compare import Bench

    bed = Testbed("qbench", Options(nodes=3))
    records: list[dict] = []
    started = time.monotonic()
    try:
        bed.up()
        bed.stop_service("dist2", "distributor")
        bed.stop_service("dist1", "distributor")
        bench = Bench(bed, args.duration, 1000)
        for r in range(args.rounds):
            for variant in variants[r % len(variants):] + variants[:r % len(variants)]:
                loads = measure(bench, bed, variant, args.duration, args.batch)
                records.append({"round": r, "variant": variant, "loads": loads})
                print(f"round {r + 1}/{args.rounds} {variant:16} " + "  ".join(
                    f"{load}: {v['rps']:8,.0f}/s" + (f" ({v['errors']} err)" if v["errors"] else "")
                    for load, v in loads.items()) + f"   [{time.monotonic() - started:.0f} s]", flush=True)
    finally:
        bed.down()
    if args.out:
        args.out.write_text(json.dumps(records, indent=1))
    print("\n" + report(records, variants, args.rounds, args.duration))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
