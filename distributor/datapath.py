"""Adapters between the interposer core and the kernel: iptables rules and NFQUEUE.

Contract
--------
:class:`Rules` owns two chains per queue number, ``DIST<q>-IN`` in the raw
table (hooked from PREROUTING) and ``DIST<q>-OUT`` in the mangle table
(hooked from POSTROUTING).  :meth:`Rules.install` replaces whatever a previous
run of the same queue number left behind and installs the current rules in one
``iptables-restore --noflush`` transaction; :meth:`Rules.remove` removes the
chains and the jumps to them, also in one transaction.  Nothing else in the
tables is touched.

Why these hooks (kernel behaviour): the destination is rewritten in raw
PREROUTING, before the routing decision, so the packet is routed to the
backend; the source is rewritten in mangle POSTROUTING, after routing,
because a packet whose source is a local address (the VIP) arriving before
routing is a martian and dropped.  Both directions are marked ``CT
--notrack``: conntrack would otherwise track the pre-rewrite tuple and
mismatch the reply.  No ``--queue-bypass``: while the daemon is down but its
rules are in place, packets for the VIP are dropped and clients retransmit,
rather than reaching the gateway's own stack and being reset.

:class:`PacketQueue` binds an NFQUEUE and hands each packet's bytes to a
handler returning ``(verdict, new_bytes)``.  Every packet gets a verdict: if
the handler raises, the packet is dropped (a half-decided packet could reach
the wrong backend; TCP retransmits it) and the error is counted and logged.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import time
from typing import Callable, Iterable

from .reroute import ACCEPT, Reason, ServiceSpec

__all__ = ["Rules", "PacketQueue", "RawSender", "RulesError", "render_rules"]

log = logging.getLogger("distributor.datapath")


class RulesError(RuntimeError):
    pass


def chain_names(queue: int) -> tuple[str, str]:
    return f"DIST{queue}-IN", f"DIST{queue}-OUT"


def render_rules(queue: int, services: Iterable[ServiceSpec]) -> dict[str, list[str]]:
    """The rule lines of both owned chains, per table (pure, for tests and install)."""
    chain_in, chain_out = chain_names(queue)
    raw: list[str] = []
    mangle: list[str] = []
    for service in services:
        match_vip = f"-d {service.vip}/32 -p tcp -m tcp --dport {service.port}"
        raw.append(f"-A {chain_in} {match_vip} -j CT --notrack")
        raw.append(f"-A {chain_in} {match_vip} -j NFQUEUE --queue-num {queue}")
        for backend in service.backends:
            match_backend = f"-s {backend.address}/32 -p tcp -m tcp --sport {backend.port}"
            raw.append(f"-A {chain_in} {match_backend} -j CT --notrack")
            mangle.append(f"-A {chain_out} {match_backend} -j NFQUEUE --queue-num {queue}")
    return {"raw": raw, "mangle": mangle}


class Rules:
    def __init__(self, queue: int, services: Iterable[ServiceSpec], *, netns_exec: tuple[str, ...] = ()):
        self.queue = queue
        self.services = tuple(services)
        self._prefix = netns_exec
        self.chain_in, self.chain_out = chain_names(queue)
        self._hooks = {"raw": ("PREROUTING", self.chain_in), "mangle": ("POSTROUTING", self.chain_out)}

    def install(self, known_absent: bool = False) -> None:
        """Install the rules; ``known_absent`` skips looking for old ones (after :meth:`remove`), saving time on a takeover."""
        lines = render_rules(self.queue, self.services)
        script: list[str] = []
        existing = {table: (0, False) for table in self._hooks} if known_absent else self._existing()
        for table, (hook, chain) in self._hooks.items():
            script.append(f"*{table}")
            script.extend(f"-D {hook} -j {chain}" for _ in range(existing[table][0]))
            script.append(f":{chain} - [0:0]")  # declaring an existing chain flushes it
            script.extend(lines[table])
            script.append(f"-I {hook} 1 -j {chain}")
            script.append("COMMIT")
        self._restore(script)
        log.info("installed %d rules in %s and %s (queue %d)", sum(map(len, lines.values())), self.chain_in, self.chain_out, self.queue)

    def remove(self) -> bool:
        """Remove the owned chains and their jumps; returns False when there was nothing to remove."""
        existing = self._existing()
        script: list[str] = []
        for table, (hook, chain) in self._hooks.items():
            jumps, present = existing[table]
            if not jumps and not present:
                continue
            script.append(f"*{table}")
            script.extend(f"-D {hook} -j {chain}" for _ in range(jumps))
            if present:
                script += [f"-F {chain}", f"-X {chain}"]
            script.append("COMMIT")
        if not script:
            return False
        self._restore(script)
        log.info("removed chains %s and %s", self.chain_in, self.chain_out)
        return True

    def _existing(self) -> dict[str, tuple[int, bool]]:
        """Per table: how many jumps to our chain the hook has, and whether the chain exists."""
        found = {}
        for table, (hook, chain) in self._hooks.items():
            out = self._run(["iptables-save", "-t", table]).stdout
            jumps = sum(1 for line in out.splitlines() if line.strip() == f"-A {hook} -j {chain}")
            present = any(line.startswith(f":{chain} ") for line in out.splitlines())
            found[table] = (jumps, present)
        return found

    def _restore(self, script: list[str]) -> None:
        self._run(["iptables-restore", "--noflush"], "\n".join(script) + "\n")

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([*self._prefix, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise RulesError(f"{argv[0]} is not installed (Debian package: iptables)") from None
        if result.returncode != 0:
            raise RulesError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result


Decider = Callable[[bytes], "tuple[Reason, bytes | None]"]
_VERDICTS = [reason.verdict for reason in Reason]


class PacketQueue:
    """One bound NFQUEUE, read from an asyncio loop; see the module docstring.

    With ``hold_new`` set, the SYN of every new connection waits for its
    verdict until the whole batch read from the socket is handled and
    ``before_release`` has run (the daemon sends the replication batch that
    announces these connections there), so a backup learns of a connection
    before its node does.
    """

    def __init__(self, queue: int, decide: Decider, max_len: int = 4096):
        from netfilterqueue import NetfilterQueue  # imported here: the core never needs it

        self.queue = queue
        self.decide = decide
        self.errors = 0
        self.hold_new = False
        self.before_release: Callable[[], None] | None = None
        # Set to a clock to time the next forwarded packet (a takeover's first).
        self.await_forward: Callable[[], float] | None = None
        self.first_forward_at: float | None = None
        self._held: list = []
        self._last_error_log = 0.0
        self._nfq = NetfilterQueue()
        try:
            # One packet of up to 4 KiB in flight per slot; the socket buffer
            # must hold a full queue or the kernel reports ENOBUFS and drops.
            self._nfq.bind(queue, self._on_packet, max_len=max_len, sock_len=max_len * 4096)
        except OSError as exc:
            raise RulesError(f"cannot bind NFQUEUE {queue}: {exc} (is another daemon bound to it? are you root?)") from None

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def drain(self) -> None:
        """Handle every packet waiting on the socket without blocking, then release held SYNs."""
        try:
            self._nfq.run(block=False)
        finally:
            if self._held:
                self._release()

    def close(self) -> None:
        if self._held:
            self._release()
        self._nfq.unbind()

    def _release(self) -> None:
        held, self._held = self._held, []
        try:
            if self.before_release is not None:
                self.before_release()
        except Exception:
            # The SYNs still go: a lost replication batch costs a snapshot, not the connections.
            self.errors += 1
            log.exception("could not run the pre-release hook; releasing %d held SYN(s) anyway", len(held))
        finally:
            for packet in held:
                packet.accept()
            if self.await_forward is not None:
                self._forwarded()

    def _forwarded(self) -> None:
        assert self.await_forward is not None
        self.first_forward_at = self.await_forward()
        self.await_forward = None

    def _on_packet(self, packet) -> None:
        verdict = 0
        held = False
        try:
            reason, out = self.decide(packet.get_payload())
            if out is not None:
                packet.set_payload(out)
            verdict = _VERDICTS[reason]
            if reason is Reason.NEW_CONNECTION and self.hold_new:
                self._held.append(packet)
                held = True
            elif out is not None and self.await_forward is not None:
                self._forwarded()
        except Exception:
            verdict = 0
            self.errors += 1
            now = time.monotonic()
            if now - self._last_error_log > 5.0:
                self._last_error_log = now
                log.exception("packet handler failed (%d failures so far); the packet is dropped", self.errors)
        finally:
            if held:
                pass
            elif verdict == ACCEPT:
                packet.accept()
            else:
                packet.drop()


class RawSender:
    """Sends complete IPv4 packets the core crafted (RSTs to clients) through a raw socket."""

    def __init__(self) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self._sock.setblocking(False)
        self.sent = 0
        self.failed = 0

    def send_all(self, packets: list[bytes]) -> None:
        for packet in packets:
            try:
                self._sock.sendto(packet, (socket.inet_ntoa(packet[16:20]), 0))
                self.sent += 1
            except OSError as exc:
                self.failed += 1
                log.warning("cannot send a crafted packet to %s: %s", socket.inet_ntoa(packet[16:20]), exc)
        packets.clear()

    def close(self) -> None:
        self._sock.close()
