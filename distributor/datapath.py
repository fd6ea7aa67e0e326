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

import errno
import logging
import socket
import subprocess
import time
from typing import Callable, Iterable

from .reroute import ACCEPT, END_MARK, MARK_MASK, Reason, ServiceSpec, backend_marks

__all__ = ["Rules", "PacketQueue", "RawSender", "RulesError", "render_rules"]

log = logging.getLogger("distributor.datapath")


class RulesError(RuntimeError):
    pass


def chain_names(queue: int) -> tuple[str, str]:
    return f"DIST{queue}-IN", f"DIST{queue}-OUT"


# Where each mode's chains hang: (table, built-in chain, our chain suffix).
_MODE_HOOKS = {
    "rewrite": (("raw", "PREROUTING", "IN"), ("mangle", "POSTROUTING", "OUT"), ("raw", "OUTPUT", "LOCAL")),
    "kernel": (("mangle", "PREROUTING", "IN"), ("nat", "PREROUTING", "NAT"), ("raw", "OUTPUT", "LOCAL")),
}
_TABLES = ("raw", "mangle", "nat")
_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


def _render_local(queue: int, services: tuple[ServiceSpec, ...]) -> list[str]:
    # Packets the distributor sends itself from a VIP (RSTs, reset probes) stay out of conntrack,
    # so a client's answer to them is not taken for a reply of a tracked connection.
    return [f"-A DIST{queue}-LOCAL -s {service.vip}/32 -p tcp -m tcp --sport {service.port} -j CT --notrack"
            for service in services]


def render_rules(queue: int, services: Iterable[ServiceSpec], mode: str = "rewrite") -> dict[tuple[str, str], list[str]]:
    """The rule lines of every owned chain, keyed by (table, chain) (pure, for tests and install)."""
    services = tuple(services)
    if mode == "kernel":
        return _render_kernel(queue, services)
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
    return {("raw", chain_in): raw, ("mangle", chain_out): mangle, ("raw", f"DIST{queue}-LOCAL"): _render_local(queue, services)}


def _render_kernel(queue: int, services: tuple[ServiceSpec, ...]) -> dict[tuple[str, str], list[str]]:
    # Kernel-assisted mode: user space sees a connection's first packet (conntrack NEW: a SYN, or the
    # first segment after a takeover) and its first FIN or RST; conntrack NAT does everything else.
    # Every forwarded packet walks DIST<q>-IN, so the common one (established, no FIN/RST) leaves
    # after two rules: each xt match costs, through nft's compat layer.
    chain_in, chain_new, chain_nat = f"DIST{queue}-IN", f"DIST{queue}-NEW", f"DIST{queue}-NAT"
    to_queue = f"-j NFQUEUE --queue-num {queue}"
    end = f"{END_MARK:#x}/{END_MARK:#x}"
    mangle_in = [
        f"-A {chain_in} -m conntrack --ctstate NEW,INVALID -j {chain_new}",
        f"-A {chain_in} -p tcp -m tcp --tcp-flags FIN,RST NONE -j RETURN",
        f"-A {chain_in} -m connmark --mark {end} -j RETURN",
        # A connection's first FIN or RST comes back from user space with NF_REPEAT and END_MARK
        # set: remember it in the connmark, so the connection's later FINs stay in the kernel.
        f"-A {chain_in} -m mark --mark {end} -j CONNMARK --save-mark --nfmask {END_MARK:#x} --ctmask {END_MARK:#x}",
        f"-A {chain_in} -m mark --mark {end} -j RETURN",
    ]
    mangle_new: list[str] = []
    nat: list[str] = []
    marks = backend_marks(services)
    for service in services:
        match_vip = f"-d {service.vip}/32 -p tcp -m tcp --dport {service.port}"
        mangle_new.append(f"-A {chain_new} {match_vip} -m conntrack --ctstate NEW {to_queue}")
        mangle_in.append(f"-A {chain_in} {match_vip} {to_queue}")  # its first FIN or RST
        for index, backend in enumerate(service.backends):
            match_backend = f"-s {backend.address}/32 -p tcp -m tcp --sport {backend.port}"
            # A node's segment that conntrack cannot tie to a NATed connection (after a takeover,
            # before the client's next segment) would reach the client with the node's address.
            mangle_new.append(f"-A {chain_new} {match_backend} -j DROP")
            mangle_in.append(f"-A {chain_in} {match_backend} {to_queue}")
            mark = marks[(service.name, index)]
            nat.append(f"-A {chain_nat} {match_vip} -m mark --mark {mark:#x}/{MARK_MASK:#x} "
                       f"-j DNAT --to-destination {backend.address}:{backend.port}")
    return {("mangle", chain_new): mangle_new, ("mangle", chain_in): mangle_in, ("nat", chain_nat): nat,
            ("raw", f"DIST{queue}-LOCAL"): _render_local(queue, services)}


class Rules:
    """The iptables chains of one queue number (``DIST<q>-*``), installed and removed in single transactions."""

    def __init__(self, queue: int, services: Iterable[ServiceSpec], mode: str = "rewrite", *,
                 netns_exec: tuple[str, ...] = ()):
        if mode not in _MODE_HOOKS:
            raise ValueError(f"mode {mode!r}: expected one of {', '.join(_MODE_HOOKS)}")
        self.queue = queue
        self.mode = mode
        self.services = tuple(services)
        self._prefix = netns_exec
        self._ours = f"DIST{queue}-"

    def install(self, known_absent: bool = False) -> None:
        """Install the rules in one transaction, replacing any this queue number left (skip the look with ``known_absent``)."""
        lines = render_rules(self.queue, self.services, self.mode)
        existing = {table: ([], []) for table in _TABLES} if known_absent else self._existing()
        script: list[str] = []
        for table in _TABLES:
            wanted = [chain for (t, chain) in lines if t == table]
            jumps, present = existing[table]
            hooks = [(hook, f"{self._ours}{suffix}") for t, hook, suffix in _MODE_HOOKS[self.mode] if t == table]
            if not wanted and not jumps and not present:
                continue
            body = [f":{chain} - [0:0]" for chain in wanted]  # declaring an existing chain flushes it
            body += [f"-D {jump}" for jump in jumps]
            stale = [chain for chain in present if chain not in wanted]
            body += [f"-F {chain}" for chain in stale] + [f"-X {chain}" for chain in stale]
            for chain in wanted:
                body += lines[(table, chain)]
            body += [f"-I {hook} 1 -j {chain}" for hook, chain in hooks]
            script += [f"*{table}", *body, "COMMIT"]
        self._restore(script)
        log.info("installed %d %s-mode rules for queue %d", sum(map(len, lines.values())), self.mode, self.queue)

    def remove(self) -> bool:
        """Remove every ``DIST<q>-*`` chain and every jump to one; returns False when there was nothing to remove."""
        script: list[str] = []
        for table, (jumps, present) in self._existing().items():
            if jumps or present:
                script += [f"*{table}", *[f"-D {jump}" for jump in jumps], *[f"-F {chain}" for chain in present],
                           *[f"-X {chain}" for chain in present], "COMMIT"]
        if not script:
            return False
        self._restore(script)
        log.info("removed the chains of queue %d", self.queue)
        return True

    def _existing(self) -> dict[str, tuple[list[str], list[str]]]:
        """Per table: the jumps from built-in chains to ours (as rule specs) and our chains."""
        found = {}
        for table in _TABLES:
            out = self._run(["iptables-save", "-t", table]).stdout.splitlines()
            jumps = [line[3:] for line in out
                     if line.startswith("-A ") and line.split()[1] in _BUILTIN and f" -j {self._ours}" in line]
            present = [line[1:].split()[0] for line in out if line.startswith(f":{self._ours}")]
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


# Packets handled per wake-up before the event loop gets its turn (timers, heartbeats).
DRAIN_BATCH = 256


class _BudgetedSocket:
    """A non-blocking recv that reports EAGAIN once ``left`` packets were read.

    netfilterqueue's ``run_socket`` reads until EAGAIN; this is how a drain is bounded.
    It runs once per packet, hence the slots and the prebuilt exception.
    """

    __slots__ = ("sock", "left", "_recv")
    _DONE = BlockingIOError(errno.EAGAIN, "batch done")

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.sock.setblocking(False)
        self._recv = sock.recv
        self.left = 0

    def recv(self, size: int) -> bytes:
        left = self.left
        if left <= 0:
            raise self._DONE
        self.left = left - 1
        return self._recv(size)


# Kernel mode decides on headers only: IPv4 (20) + TCP with options (60) fit.
KERNEL_MODE_COPY = 128

Decider = Callable[[bytes, float], "tuple[Reason, bytes | int | None]"]
_VERDICTS = [reason.verdict for reason in Reason]
_NEW = Reason.NEW_CONNECTION
_REPEAT = -1  # kernel mode: the packet walks the hook again (to save its mark in the connmark)


class PacketQueue:
    """One bound NFQUEUE, read from an asyncio loop; see the module docstring.

    With ``hold_new`` set, the SYN of every new connection waits for its
    verdict until the whole batch read from the socket is handled and
    ``before_release`` has run (the daemon sends the replication batch that
    announces these connections there), so a backup learns of a connection
    before its node does.
    """

    def __init__(self, queue: int, decide: Decider, max_len: int = 4096, marks: bool = False,
                 clock: Callable[[], float] = time.monotonic):
        """``decide(bytes, now)``; with ``marks`` it returns a mark to set (kernel mode), not new bytes, and only headers are copied."""
        from netfilterqueue import NetfilterQueue  # imported here: the core never needs it

        self.queue = queue
        self._clock = clock
        self._now = clock()
        # Kernel mode's end of a connection is repeated through the hook rather than accepted.
        self._verdicts = list(_VERDICTS)
        if marks:
            self._verdicts[Reason.CONNECTION_END] = _REPEAT
        self.marks = marks
        self.decide = decide
        self.errors = 0
        self.hold_new = False
        self.before_release: Callable[[], None] | None = None
        # Set to a clock to time the next forwarded packet (a takeover's first).
        self.await_forward: Callable[[], float] | None = None
        self.first_forward_at: float | None = None
        self._held: list = []
        self._last_error_log = 0.0
        self.batch = DRAIN_BATCH
        self.drains = 0  # wake-ups that read the queue
        self.packets = 0  # packets read (a batch per wake-up at most)
        self._nfq = NetfilterQueue()
        try:
            # One packet of up to 4 KiB in flight per slot; the socket buffer
            # must hold a full queue or the kernel reports ENOBUFS and drops.
            if marks:
                self._nfq.bind(queue, self._on_packet, max_len=max_len, range=KERNEL_MODE_COPY,
                               sock_len=max_len * (KERNEL_MODE_COPY + 512))
            else:
                self._nfq.bind(queue, self._on_packet, max_len=max_len, sock_len=max_len * 4096)
        except OSError as exc:
            raise RulesError(f"cannot bind NFQUEUE {queue}: {exc} (is another daemon bound to it? are you root?)") from None
        self._budget = _BudgetedSocket(socket.fromfd(self._nfq.get_fd(), socket.AF_NETLINK, socket.SOCK_RAW))

    def fileno(self) -> int:
        return self._nfq.get_fd()

    def drain(self) -> None:
        """Handle up to ``batch`` waiting packets without blocking, then release held SYNs.

        The bound matters: under sustained traffic the socket never empties, and
        an unbounded drain would keep the event loop from its timers, so the
        distributor would stop heartbeating and its backup would take over.
        One clock reading serves the whole batch.
        """
        self._now = self._clock()
        self._budget.left = self.batch
        self.drains += 1
        try:
            self._nfq.run_socket(self._budget)
        finally:
            self.packets += self.batch - self._budget.left
            if self._held:
                self._release()

    def close(self) -> None:
        if self._held:
            self._release()
        self._nfq.unbind()
        self._budget.sock.close()

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
            reason, out = self.decide(packet.get_payload(), self._now)
            if out is not None:
                if self.marks:
                    packet.set_mark(out)
                else:
                    packet.set_payload(out)
                if reason is _NEW and self.hold_new:
                    self._held.append(packet)
                    held = True
                elif self.await_forward is not None:
                    self._forwarded()
            verdict = self._verdicts[reason]
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
            elif verdict == _REPEAT:
                packet.repeat()
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


class Conntrack:
    """Kernel mode's view of conntrack: does the kernel still track a connection? (netlink, asyncio)."""

    LIBERAL = "/proc/sys/net/netfilter/nf_conntrack_tcp_be_liberal"

    def __init__(self) -> None:
        self._socket = None

    @classmethod
    def be_liberal(cls) -> None:
        # A backup that takes over meets connections mid-stream: conntrack picks them
        # up (nf_conntrack_tcp_loose), but without window history it would mark some
        # segments INVALID, and INVALID segments are not NATed.
        try:
            # A container's /proc/sys is read-only; its engine sets this one at creation
            # (docker-compose.yml, `sysctls`), so a value already in place needs no write.
            with open(cls.LIBERAL) as f:
                if f.read().strip() == "1":
                    return
        except OSError:
            pass
        try:
            with open(cls.LIBERAL, "w") as f:
                f.write("1\n")
        except OSError as exc:
            log.warning("cannot set %s: %s; connections may break after a takeover", cls.LIBERAL, exc)

    async def _connect(self) -> None:
        if self._socket is None:
            from pyroute2 import AsyncNFCTSocket

            self._socket = AsyncNFCTSocket()

    @staticmethod
    def _tuple(key: bytes):
        from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

        return NFCTAttrTuple(saddr=socket.inet_ntoa(key[0:4]), daddr=socket.inet_ntoa(key[4:8]), proto=socket.IPPROTO_TCP,
                             sport=int.from_bytes(key[8:10], "big"), dport=int.from_bytes(key[10:12], "big"))

    async def tracks(self, key: bytes) -> bool:
        """True when conntrack has the client -> VIP connection of this 12-byte key."""
        from pyroute2.netlink.exceptions import NetlinkError

        await self._connect()
        try:
            result = await self._socket.entry("get", tuple_orig=self._tuple(key))
            if hasattr(result, "__aiter__"):
                result = [entry async for entry in result]
            return bool(result)
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT
                return False
            raise

    async def forget(self, key: bytes) -> bool:
        """Delete the client -> VIP connection of this key from conntrack; False when it was not there."""
        from pyroute2.netlink.exceptions import NetlinkError

        await self._connect()
        try:
            await self._socket.entry("del", tuple_orig=self._tuple(key))
            return True
        except NetlinkError as exc:
            if exc.code == 2:  # ENOENT
                return False
            raise

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
