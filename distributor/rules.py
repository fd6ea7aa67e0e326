"""The data path's iptables rules: rendered (pure) and installed (adapter).

Contract
--------
:func:`render_rules` returns the rule lines of every chain a queue number owns
(``DIST<q>-*``), for a :class:`~distributor.reroute.Mode`.  :class:`Rules`
installs them, replacing whatever a previous run of the same queue number
left behind, in one ``iptables-restore --noflush`` transaction, and removes the
chains and the jumps to them, also in one transaction.  Nothing else in the
tables is touched.

Rewrite mode (why these hooks, kernel behaviour): the destination is rewritten
in raw PREROUTING, before the routing decision, so the packet is routed to the
backend; the source of a node's packets is rewritten after routing, because a
packet whose source is a local address (the VIP) arriving before routing is a
martian and dropped -- statelessly, by an nft payload statement
(:func:`render_return_path`), so the heavy direction never crosses user space
and keeps its GSO packets whole; user space sees only a node's SYN-ACK, FIN and
RST (mangle POSTROUTING, queued unchanged).  Both directions are marked ``CT --notrack``: conntrack
would otherwise track the pre-rewrite tuple and mismatch the reply.  No
``--queue-bypass`` (but for ICMP errors addressed to a VIP, which then reach
this host's own stack and are ignored there): while the daemon is down but its
rules are in place, packets for the VIP are dropped and clients retransmit,
rather than reaching the gateway's own stack and being reset; an ICMP error
toward a client that quotes a node is dropped rather than leaving untranslated.

Kernel-assisted mode: see :func:`_render_kernel`.

Direct server return (dsr mode): see :func:`_render_dsr` and :class:`DsrRoutes` (the per-node
routes its marks select).

IPv6 services (rewrite and kernel modes; dsr mode serves IPv4 VIPs only): the same rules of the
same shape, in the same chain names of the ip6 tables (``render_rules(..., family=6)``, installed
with ``ip6tables-restore --noflush``, one transaction per family), and rewrite mode's return path in
``table ip6 dist<q>``.  The IPv4 rules are those of the layout's IPv4 services, exactly as without
IPv6.  The IPv6 ones are installed only when the layout has an IPv6 service; leftovers of both
families are always removed, so a layout that loses its last IPv6 service leaves nothing in the ip6
tables, and an IPv4-only host needs no ip6tables.  ICMPv6: only the errors (``ICMPV6_ERROR_TYPES``)
and, with ``vip_echo = "drop"``, the echo request are ever matched by type; neighbour discovery and
MLD are never queued nor dropped.  The guard (:func:`render_guard`) likewise.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import subprocess
from dataclasses import dataclass
from typing import Iterable

from .reroute import END_MARK, ICMP_ERROR_TYPES, ICMPV6_ERROR_TYPES, MARK_MASK, Mode, RuleService

__all__ = ["Rules", "Guard", "GuardSpec", "RulesError", "render_rules", "render_return_path", "render_guard",
           "DsrRoutes", "render_dsr_routes", "dsr_rule_pref", "dsr_table", "DSR_MAX_QUEUE",
           "chain_names", "UNKNOWN_REPLY_TAG", "ICMP_FLOOD_TAG", "ECHO_REFUSED_TAG", "ICMPV6_ERROR_TYPES",
           "is_ipv6", "ToolMissing"]

log = logging.getLogger("distributor.rules")

# Rewrite mode queues the ICMP errors that quote a segment (reroute.ICMP_ERROR_TYPES); kernel mode
# leaves them to conntrack.
ICMP_QUEUE_LIMIT = 1000  # ICMP errors a second (per VIP, and toward clients) user space translates; the rest are dropped
ICMP_FLOOD_TAG = "dist:icmp_flood"
ECHO_REFUSED_TAG = "dist:echo_refused"  # [distributor] vip_echo = "drop"

# Rules whose drops are counted by the kernel carry a --comment tag; Chains.counters() reads them back.
GUARD_TAG = "dist-guard"
UNKNOWN_REPLY_TAG = "dist:unknown_reply"  # kernel mode: a node's segment conntrack cannot tie to a NATed connection


class RulesError(RuntimeError):
    pass


class ToolMissing(RulesError):
    """A program the rules need is not installed (the message names its Debian package)."""


@dataclass(frozen=True)
class _Family:
    """What differs between the IPv4 rules (iptables) and the IPv6 ones (ip6tables): the same shape otherwise."""

    version: int
    host: str  # an address's prefix as a rule matches it
    icmp: str  # the ICMP protocol's name for -p
    icmp_type: str  # matching an ICMP type, followed by the type
    error_types: tuple[int, ...]  # the ICMP errors that quote a segment, queued in rewrite mode
    echo_request: int
    nft: str  # nft's family of the rewrite mode's return-path table


_V4 = _Family(4, "/32", "icmp", "-p icmp -m icmp --icmp-type", ICMP_ERROR_TYPES, 8, "ip")
# ICMPv6: only the errors (RFC 4443 section 3) and the echo request are ever matched by type; neighbour
# discovery (133-137) and MLD (130-132, 143) are never queued nor dropped by any rule of ours.
_V6 = _Family(6, "/128", "ipv6-icmp", "-p ipv6-icmp -m icmp6 --icmpv6-type", tuple(ICMPV6_ERROR_TYPES), 128, "ip6")
_FAMILIES = {4: _V4, 6: _V6}


def is_ipv6(address) -> bool:
    """Whether an address (text, or an ipaddress object) is an IPv6 one: IPv4 text has no colon."""
    return ":" in str(address)


def _of_family(services: Iterable[RuleService], family: _Family) -> tuple[RuleService, ...]:
    """The services of one family (a service's backends have its VIP's family)."""
    return tuple(service for service in services if is_ipv6(service.vip) == (family.version == 6))


def chain_names(queue: int) -> tuple[str, str]:
    return f"DIST{queue}-IN", f"DIST{queue}-OUT"


# Where each mode's chains hang: (table, built-in chain, our chain suffix).
_MODE_HOOKS = {
    Mode.REWRITE: (("raw", "PREROUTING", "IN"), ("mangle", "POSTROUTING", "OUT"), ("raw", "OUTPUT", "LOCAL")),
    Mode.KERNEL: (("mangle", "PREROUTING", "IN"), ("nat", "PREROUTING", "NAT"), ("raw", "OUTPUT", "LOCAL")),
    Mode.DSR: (("raw", "PREROUTING", "IN"), ("raw", "OUTPUT", "LOCAL")),
}
_TABLES = ("raw", "mangle", "nat")
_BUILTIN = ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING")


def _render_local(queue: int, services: tuple[RuleService, ...], to_nodes: bool = False,
                  family: _Family = _V4) -> list[str]:
    # Packets the distributor sends itself from a VIP (RSTs, reset probes) stay out of conntrack,
    # so a client's answer to them is not taken for a reply of a tracked connection.
    host = family.host
    lines = [f"-A DIST{queue}-LOCAL -s {service.vip}{host} -p tcp -m tcp --sport {service.port} -j CT --notrack"
             for service in services]
    if to_nodes:
        # Rewrite mode also sends segments to nodes in a client's name (a SYN sent on to another
        # node, an RST for an expired flow): untracked like the segments it rewrites, or the
        # node's answer would meet an entry made for a locally sent packet.
        lines += [f"-A DIST{queue}-LOCAL -d {backend.address}{host} -p tcp -m tcp --dport {backend.port} -j CT --notrack"
                  for service in services for backend in service.backends]
    return lines


def render_rules(queue: int, services: Iterable[RuleService], mode: Mode = Mode.REWRITE,
                 answer_echo: bool = True, *, family: int = 4) -> dict[tuple[str, str], list[str]]:
    """The rule lines of every owned chain, keyed by (table, chain) (pure, for tests and install).

    ``services`` is the interposer's live layout (:meth:`~distributor.reroute.Interposer.rule_layout`):
    nodes added at run time are in it, with their kernel-mode marks.  ``answer_echo``: whether ICMP
    echo requests to a VIP reach this host's stack, which answers them (they are never forwarded to a
    node: no rule of either mode queues or NATs them); False drops them first in the IN chain.

    ``family`` 4: the iptables lines of the layout's IPv4 services (always rendered, even for none);
    6: the ip6tables lines of its IPv6 services, the same shape in the same chain names (``{}`` when
    it has none: nothing is installed in the ip6 tables then).  Dsr mode serves IPv4 VIPs only.
    """
    fam = _FAMILIES[family]
    services = _of_family(services, fam)
    if fam is _V6 and not services:
        return {}
    if mode is Mode.DSR:
        if fam is _V6:
            raise RulesError(f"dsr mode serves IPv4 VIPs only, not {services[0].vip} (service {services[0].name!r})")
        return _render_dsr(queue, services, answer_echo)
    if mode is Mode.KERNEL:
        rendered = _render_kernel(queue, services, fam)
        if not answer_echo:
            rendered[("mangle", f"DIST{queue}-IN")][:0] = _refuse_echo(f"DIST{queue}-IN", services, fam)
        return rendered
    return _render_rewrite(queue, services, answer_echo, fam)


def _render_rewrite(queue: int, services: tuple[RuleService, ...], answer_echo: bool,
                    fam: _Family) -> dict[tuple[str, str], list[str]]:
    chain_in, chain_out = chain_names(queue)
    host = fam.host
    raw: list[str] = [] if answer_echo else _refuse_echo(chain_in, services, fam)
    # A node's data segments never reach user space (the nft return path rewrites them); only its
    # SYN-ACK, FIN and RST are queued, for the connection's state and the node's health.
    mangle: list[str] = [f"-A {chain_out} -p tcp -m tcp --tcp-flags SYN,FIN,RST NONE -j RETURN"]
    for service in services:
        match_vip = f"-d {service.vip}{host} -p tcp -m tcp --dport {service.port}"
        raw.append(f"-A {chain_in} {match_vip} -j CT --notrack")
        raw.append(f"-A {chain_in} {match_vip} -j NFQUEUE --queue-num {queue}")
        for backend in service.backends:
            match_backend = f"-s {backend.address}{host} -p tcp -m tcp --sport {backend.port}"
            raw.append(f"-A {chain_in} {match_backend} -j CT --notrack")
            mangle.append(f"-A {chain_out} {match_backend} -j NFQUEUE --queue-num {queue}")
    # ICMP errors about VIP connections, which conntrack cannot translate (the connections are
    # untracked): user space matches each to its connection by the segment it quotes
    # (Interposer._icmp).  One from the outside is addressed to the VIP and rewritten before
    # routing, so it is routed to the node; one toward a client (from the cluster LAN, or from this
    # host's own stack) quotes a segment sent to a node and gets the VIP as its source, so only
    # after routing (a local source before routing is a martian).  Nothing else is queued: errors
    # addressed to this host's own sockets, or about anyone else's traffic, stay the kernel's.
    # While no daemon listens, an error to a VIP passes (--queue-bypass: this host's stack ignores
    # it), and one toward a client is dropped (it would leave quoting a node).  A flood of forged
    # errors must not take the queue from the connections: past ICMP_QUEUE_LIMIT a second in each
    # direction they are dropped (errors are advisory, and routers rate-limit their own, RFC 1812
    # section 4.3.2.8).  IPv6: the same for the ICMPv6 errors (ICMPV6_ERROR_TYPES); neighbour
    # discovery and MLD share DIST<q>-IERR's first rule only and return from it, never queued.
    errors_in, errors_in_typed = f"DIST{queue}-IERR", f"DIST{queue}-IQ"
    errors_out, errors_queue = f"DIST{queue}-OERR", f"DIST{queue}-OQ"
    limit = f"-m limit --limit {ICMP_QUEUE_LIMIT}/second --limit-burst {ICMP_QUEUE_LIMIT}"
    queue_icmp = f"{limit} -j NFQUEUE --queue-num {queue} --queue-bypass"
    queue_icmp_out = f"{limit} -j NFQUEUE --queue-num {queue}"
    flood = f'-m comment --comment "{ICMP_FLOOD_TAG}" -j DROP'
    # Every packet of a connection walks DIST<q>-IN (its nodes' replies too, after their notrack):
    # ICMP costs them one rule there, its types are told apart in DIST<q>-IERR.
    raw.append(f"-A {chain_in} -p {fam.icmp} -j {errors_in}")
    raw_typed = [f"-A {errors_in} {fam.icmp_type} {kind} -g {errors_in_typed}" for kind in fam.error_types]
    for kind in fam.error_types:
        mangle.append(f"-A {chain_out} {fam.icmp_type} {kind} -j {errors_out}")
    vips = list(dict.fromkeys(str(service.vip) for service in services))
    raw_errors = [f"-A {errors_in_typed} -d {vip}{host} -j CT --notrack" for vip in vips]
    raw_errors += [f"-A {errors_in_typed} -d {vip}{host} {queue_icmp}" for vip in vips]
    raw_errors += [f"-A {errors_in_typed} -d {vip}{host} {flood}" for vip in vips]
    nodes = list(dict.fromkeys((str(b.address), b.port) for service in services for b in service.backends))
    quotes = _quotes6 if fam is _V6 else _quotes
    # Forwarded errors about a segment sent to a node are untracked like that segment.
    raw_errors += [f'-A {errors_in_typed} -m u32 --u32 "{quotes(address, port)}" -j CT --notrack'
                   for address, port in nodes]
    out_errors = [f"-A {errors_out} -m addrtype --dst-type LOCAL -j RETURN"]
    out_errors += [f'-A {errors_out} -m u32 --u32 "{quotes(address, port)}" -j {errors_queue}' for address, port in nodes]
    out_queue = [f"-A {errors_queue} {queue_icmp_out}", f"-A {errors_queue} {flood}"]
    return {("raw", chain_in): raw, ("mangle", chain_out): mangle,
            ("raw", f"DIST{queue}-LOCAL"): _render_local(queue, services, to_nodes=True, family=fam),
            ("raw", errors_in): raw_typed, ("raw", errors_in_typed): raw_errors, ("mangle", errors_out): out_errors,
            ("mangle", errors_queue): out_queue}


def _render_dsr(queue: int, services: tuple[RuleService, ...], answer_echo: bool) -> dict[tuple[str, str], list[str]]:
    """Direct server return: every client segment to a VIP:port is queued, untracked, before routing.

    The verdict's mark then selects the node's route (:class:`DsrRoutes`), so the unchanged packet
    is forwarded to the node's MAC; the node answers the client itself, and nothing of the reply
    direction reaches this host.  Untracked: this host sees one direction only, and a flow that a
    router moves here mid-stream would be INVALID to conntrack.  No ``--queue-bypass``: while the
    daemon is down, the VIP's segments wait and are dropped (BIRD, which dies with the daemon, has
    withdrawn the VIP by then).  This host does not hold the VIP, so it cannot answer an echo
    (``answer_echo`` is refused by the config).
    """
    chain_in, _ = chain_names(queue)
    raw: list[str] = [] if answer_echo else _refuse_echo(chain_in, services)
    for service in services:
        match_vip = f"-d {service.vip}/32 -p tcp -m tcp --dport {service.port}"
        raw.append(f"-A {chain_in} {match_vip} -j CT --notrack")
        raw.append(f"-A {chain_in} {match_vip} -j NFQUEUE --queue-num {queue}")
    # ICMP errors to a VIP go to the node that sent the quoted segment (Interposer._icmp_dsr), at most
    # ICMP_QUEUE_LIMIT a second (a flood of forged errors must not take the queue from the connections).
    errors_in, errors_queue = f"DIST{queue}-IERR", f"DIST{queue}-IQ"
    vips = list(dict.fromkeys(str(service.vip) for service in services))
    raw += [f"-A {chain_in} -d {vip}/32 -p icmp -j {errors_in}" for vip in vips]
    typed = [f"-A {errors_in} -p icmp -m icmp --icmp-type {kind} -g {errors_queue}" for kind in ICMP_ERROR_TYPES]
    limit = f"-m limit --limit {ICMP_QUEUE_LIMIT}/second --limit-burst {ICMP_QUEUE_LIMIT}"
    queued = [f"-A {errors_queue} -j CT --notrack", f"-A {errors_queue} {limit} -j NFQUEUE --queue-num {queue}",
              f'-A {errors_queue} -m comment --comment "{ICMP_FLOOD_TAG}" -j DROP']
    return {("raw", chain_in): raw, ("raw", f"DIST{queue}-LOCAL"): _render_local(queue, services),
            ("raw", errors_in): typed, ("raw", errors_queue): queued}


DSR_MAX_QUEUE = 9999  # dsr queue numbers (the config refuses higher ones: their rule priorities would repeat)


def dsr_rule_pref(queue: int) -> int:
    """The priority of a dsr queue's mark rules; its VIPs' blackhole rule has the next one.  Both come
    before the main table's rule (32766), and no two queues up to DSR_MAX_QUEUE share them."""
    return 10000 + 2 * (queue % 10000)


def dsr_table(queue: int, mark: int) -> int:
    """The routing table a dsr mark selects: above the 16-bit ids people number their own tables with."""
    return (queue % 0x8000 + 1) << 16 | mark


def render_dsr_routes(queue: int, services: Iterable[RuleService]) -> tuple[list[str], list[str]]:
    """``(rules, routes)``: the ``ip`` policy rules and routes of a dsr layout, as ``ip -batch`` lines (pure).

    Each node's mark selects a table whose default route goes via the node (``ip rule fwmark``):
    the kernel forwards the client's unchanged segment to the node's MAC (the node must share a
    link with this host).  A VIP's packet that no verdict marked (another port, ICMP, a packet queued
    while the node's route was missing) meets a blackhole rule: it must not follow the default
    route back to the router, which would send it here again until its TTL ran out.
    """
    pref = dsr_rule_pref(queue)
    rules: list[str] = []
    routes: list[str] = []
    vips: list[str] = []
    for service in services:
        if str(service.vip) not in vips:
            vips.append(str(service.vip))
        for backend in service.backends:
            table = dsr_table(queue, backend.mark)
            rules.append(f"rule add pref {pref} fwmark {backend.mark:#x}/{MARK_MASK:#x} lookup {table}")
            routes.append(f"route replace default via {backend.address} table {table}")
    rules += [f"rule add pref {pref + 1} to {vip}/32 blackhole" for vip in vips]
    return rules, routes


class DsrRoutes:
    """Installs and removes a dsr queue's policy rules and node routes (see :func:`render_dsr_routes`).

    An install adds what is missing and deletes what is no longer wanted, so a layout change never
    leaves a VIP's packets without their rules for a moment.  Everything this adapter owns is
    known by its rule priorities, so a crashed run's leftovers are found and replaced too.
    """

    def __init__(self, queue: int, *, netns_exec: tuple[str, ...] = ()):
        self.queue = queue
        self._prefix = netns_exec

    def install(self, services: Iterable[RuleService]) -> None:
        wanted_rules, routes = render_dsr_routes(self.queue, services)
        existing = self._existing()
        wanted = {self._rule_key(line): line for line in wanted_rules}
        # Routes first, so a new mark's rule never points at an empty table.
        script = list(routes)
        script += [line for key, line in wanted.items() if key not in existing]
        stale = [key for key in existing if key not in wanted]
        script += [f"rule del {existing[key]}" for key in stale]
        wanted_tables = {key[2] for key in wanted if key[1] == "lookup"}
        script += [f"route flush table {key[2]}" for key in stale if key[1] == "lookup" and key[2] not in wanted_tables]
        self._batch(script)
        log.info("installed %d dsr rule(s) and %d node route(s) (priority %d)", len(wanted), len(routes),
                 dsr_rule_pref(self.queue))

    def remove(self) -> bool:
        existing = self._existing()
        if not existing:
            return False
        script = [f"rule del {spec}" for spec in existing.values()]
        script += [f"route flush table {key[2]}" for key in existing if key[1] == "lookup"]
        self._batch(script)
        log.info("removed the dsr rules and node routes (priority %d)", dsr_rule_pref(self.queue))
        return True

    @staticmethod
    def _rule_key(line: str) -> tuple[int, str, str, str]:
        """(priority, "lookup" or "blackhole", table or "", fwmark or destination) of a rendered rule line."""
        words = line.split()
        pref = int(words[words.index("pref") + 1])
        if "blackhole" in words:
            return pref, "blackhole", "", words[words.index("to") + 1].removesuffix("/32")
        return pref, "lookup", words[words.index("lookup") + 1], words[words.index("fwmark") + 1].split("/")[0]

    def _existing(self) -> dict[tuple[int, str, str, str], str]:
        """Our rules in the kernel: key (as :meth:`_rule_key`) -> the spec that deletes it.

        Ours: at our priorities, a mark rule looking up a table of our block (:func:`dsr_table`), or
        a blackhole rule to one address; an operator's rule at the same priority is left alone.
        """
        pref = dsr_rule_pref(self.queue)
        block = dsr_table(self.queue, 0) >> 16
        listing = json.loads(self._run(["ip", "-j", "rule", "show"]).stdout or "[]")
        found: dict[tuple[int, str, str, str], str] = {}
        for rule in listing:
            priority = rule.get("priority")
            if priority not in (pref, pref + 1):
                continue
            if priority == pref + 1 and rule.get("action") == "blackhole" and "dst" in rule \
                    and rule.get("dstlen", 32) == 32:
                key = (priority, "blackhole", "", rule["dst"])
                found[key] = f"pref {priority} to {rule['dst']}/32 blackhole"
            elif (priority == pref and "fwmark" in rule and str(rule.get("table", "")).isdigit()
                  and int(rule["table"]) >> 16 == block):
                mark = f"{int(rule['fwmark'], 16):#x}"
                key = (priority, "lookup", str(rule["table"]), mark)
                found[key] = f"pref {priority} fwmark {mark}/{rule.get('fwmask', hex(MARK_MASK))} lookup {rule['table']}"
        return found

    def _batch(self, lines: list[str]) -> None:
        if lines:
            self._run(["ip", "-batch", "-"], "\n".join(lines) + "\n")

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([*self._prefix, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            raise RulesError(f"{argv[0]} is not installed (Debian package: iproute2)") from None
        if result.returncode != 0:
            raise RulesError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result


def _quotes(address: str, port: int) -> str:
    """A u32 match (xt_u32) for an ICMP error quoting a TCP segment sent to ``address``:``port``.

    ``0>>22&0x3C`` is the outer header's length; the quoted IP header starts 8 bytes after it (the
    ICMP header), so its destination is at +24; its own length, read the same way at +8, leads to
    the quoted TCP header, whose destination port is the low half of its first word.
    """
    packed = int.from_bytes(ipaddress.IPv4Address(address).packed, "big")
    return f"0>>22&0x3C@24={packed:#x}&&0>>22&0x3C@8>>22&0x3C@8&0xFFFF={port}"


def _quotes6(address: str, port: int) -> str:
    """The IPv6 :func:`_quotes`: an ICMPv6 error quoting a TCP segment sent to ``address``:``port``.

    IPv6 headers have a fixed length, so the offsets are too, for an error without extension
    headers (its next header, byte 6, is ICMPv6: 58) quoting a segment without any (its next
    header, byte 48 + 6, is TCP): the outer header is 40 bytes and the ICMPv6 header 8, so the
    quoted header starts at 48, its destination address at 72 (four words), the quoted TCP header
    at 88, its destination port the low half of the word at 88.  An error bearing an extension
    header matches nothing (the core refuses those too; Linux sends none).
    """
    packed = ipaddress.IPv6Address(address).packed
    words = "&&".join(f"{72 + 4 * i}={int.from_bytes(packed[4 * i:4 * i + 4], 'big'):#x}" for i in range(4))
    return f"4>>8&0xFF=58&&52>>8&0xFF=6&&{words}&&88&0xFFFF={port}"


def _refuse_echo(chain: str, services: tuple[RuleService, ...], family: _Family = _V4) -> list[str]:
    return [f'-A {chain} -d {vip}{family.host} {family.icmp_type} {family.echo_request} '
            f'-m comment --comment "{ECHO_REFUSED_TAG}" -j DROP'
            for vip in dict.fromkeys(str(service.vip) for service in services)]


def nft_table(queue: int) -> str:
    return f"dist{queue}"


def return_path_tag(service: str, address: str, port: int) -> str:
    """The comment of a backend's return-path rule: which (service, node address, port) its counter counts."""
    return f"{service} {address}:{port}"


def parse_return_path_bytes(listing: str) -> dict[tuple[str, str, int], int]:
    """Bytes per (service, node address, port) from ``nft -j list table ip dist<q>`` (see render_return_path)."""
    found: dict[tuple[str, str, int], int] = {}
    for item in json.loads(listing).get("nftables", []):
        rule = item.get("rule")
        if not rule or "comment" not in rule:
            continue
        service, _, endpoint = rule["comment"].rpartition(" ")
        address, _, port = endpoint.rpartition(":")
        for expr in rule.get("expr", []):
            if "counter" in expr and port.isdigit():
                key = (service, address, int(port))
                found[key] = found.get(key, 0) + int(expr["counter"]["bytes"])
    return found


def render_return_path(queue: int, services: Iterable[RuleService], *, family: int = 4) -> str:
    """Rewrite mode's return path, for ``nft -f``: every node segment leaves with the VIP as its source.

    Stateless: a packet from a backend's address and port gets its service's VIP and port, whatever
    connection it belongs to, so a node's reply needs no table entry (and could leave through any
    distributor).  In POSTROUTING after routing (the VIP as a source before routing would be a
    martian) and after the mangle table's queue (priority -150), which sees the SYN-ACK, FIN and RST
    unchanged first.  The payload statement keeps the packet whole (GSO) and updates a partial
    checksum correctly (``nft_payload`` with ``csum_type inet``); one verdict-map lookup per packet.
    Each backend's chain counts what it rewrites (packets and bytes, per CPU in the kernel): the
    node -> client bytes the interposer never sees, read back by :meth:`Rules.return_path_bytes`.

    ``family`` 4: ``table ip dist<q>``, for the layout's IPv4 services; 6: ``table ip6 dist<q>``, for
    its IPv6 ones (IPv6 has no header checksum: nft updates the TCP checksum for the pseudo-header).
    """
    fam = _FAMILIES[family]
    services = _of_family(services, fam)
    table = nft_table(queue)
    lines = [f"table {fam.nft} {table} {{"]
    elements = []
    chains = []
    index = 0
    for service in services:
        for backend in service.backends:
            chain = f"to_vip_{index}"
            index += 1
            sets = f"{fam.nft} saddr set {service.vip}"
            if backend.port != service.port:
                sets += f" tcp sport set {service.port}"
            chains.append(f'  chain {chain} {{\n    counter {sets} comment "{return_path_tag(service.name, backend.address, backend.port)}"\n  }}')
            elements.append(f"{backend.address} . {backend.port} : goto {chain}")
    lines += chains
    lines.append("  chain postrouting {")
    lines.append("    type filter hook postrouting priority -140; policy accept;")
    if elements:
        match = "ip protocol tcp ip" if fam is _V4 else "meta l4proto tcp ip6"
        lines.append(f"    {match} saddr . tcp sport vmap {{ {', '.join(elements)} }}")
    lines.append("  }")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _render_kernel(queue: int, services: tuple[RuleService, ...],
                   fam: _Family = _V4) -> dict[tuple[str, str], list[str]]:
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
    # A packet user space answered with NF_REPEAT and END_MARK (a first FIN or RST) walks the hook
    # again from DIST<q>-IN's first rule; one conntrack still calls NEW or INVALID (an RST it cannot
    # place) would be queued again, and again, for ever, each pass a verdict, until the queue is
    # full and clients' SYNs are dropped (measured under a malformed flood: 80,000 verdicts/s on
    # 741 looping RSTs, new connections 4,875/s -> 138/s).  So DIST<q>-NEW queues none bearing it.
    not_repeated = f"-m mark ! --mark {end}"
    host = fam.host
    for service in services:
        match_vip = f"-d {service.vip}{host} -p tcp -m tcp --dport {service.port}"
        mangle_new.append(f"-A {chain_new} {match_vip} -m conntrack --ctstate NEW {not_repeated} {to_queue}")
        # An RST conntrack cannot place may answer a SYN cookie (synauth.py): user space checks it, once.
        mangle_new.append(f"-A {chain_new} {match_vip} -m tcp --tcp-flags RST RST -m conntrack --ctstate INVALID "
                          f"{not_repeated} {to_queue}")
        mangle_in.append(f"-A {chain_in} {match_vip} {to_queue}")  # its first FIN or RST
        for backend in service.backends:
            match_backend = f"-s {backend.address}{host} -p tcp -m tcp --sport {backend.port}"
            # A node's segment that conntrack cannot tie to a NATed connection (after a takeover,
            # before the client's next segment) would reach the client with the node's address.
            mangle_new.append(f'-A {chain_new} {match_backend} -m comment --comment "{UNKNOWN_REPLY_TAG}" -j DROP')
            mangle_in.append(f"-A {chain_in} {match_backend} {to_queue}")
            target = f"[{backend.address}]" if fam is _V6 else backend.address
            nat.append(f"-A {chain_nat} {match_vip} -m mark --mark {backend.mark:#x}/{MARK_MASK:#x} "
                       f"-j DNAT --to-destination {target}:{backend.port}")
    return {("mangle", chain_new): mangle_new, ("mangle", chain_in): mangle_in, ("nat", chain_nat): nat,
            ("raw", f"DIST{queue}-LOCAL"): _render_local(queue, services, family=fam)}


@dataclass(frozen=True)
class GuardSpec:
    """Who may reach what through this gateway (pure data; see :func:`render_guard`)."""

    # Addresses of either family: the IPv4 ones go to the iptables chain, the IPv6 ones (the nodes'
    # address6) to the ip6tables chain of the same name, installed only when there is one.
    allowed_sources: tuple[str, ...]  # the cluster's own hosts: nodes, peers, this distributor
    protected: tuple[str, ...]  # addresses the outside must never reach through us: nodes, peers
    control_ports: tuple[int, ...]  # UDP: node heartbeats, distributor datagrams
    interface: str | None = None  # the cluster side: the cluster's own hosts come in there, and only there
    # TCP ports of this distributor that more sources may reach, in order: (port, sources), each source
    # an address ("198.51.100.9") or a network ("198.51.100.0/24"); the metrics port ([metrics] allow),
    # then the control API's ([api] allow).
    openings: tuple[tuple[int, tuple[str, ...]], ...] = ()


def _cidr(source: str) -> str:
    """``source`` as iptables -s takes it: an address as its /32 (as the guard always wrote it), a network as is."""
    return source if "/" in source else f"{source}/128" if is_ipv6(source) else f"{source}/32"


def render_guard(queue: int, spec: GuardSpec, *, family: int = 4) -> dict[tuple[str, str], list[str]]:
    """The guard chain, ``DGRD<q>-IN`` in raw PREROUTING: before routing, before any rewrite.

    Anything but the cluster's own hosts is refused the control ports, and the nodes and peers
    themselves: a client that routes the cluster LAN through the gateway reaches nothing but the
    services, which it reaches at the VIP (whose packets never match: they are addressed to the VIP
    here, and rewritten or NATed only later).  The sources of ``spec.openings`` reach their TCP port
    and nothing else.  Each refusal is counted by the rule's counter (:func:`read_counters`, by the
    ``--comment``).

    ``family`` 4: the iptables chain, of the spec's IPv4 addresses; 6: the ip6tables chain of the
    same shape, of its IPv6 ones (``{}`` when it has none: the ip6 tables are left alone then).
    The control ports are refused in both (control traffic is IPv4: no one outside sends it over IPv6).
    """
    fam = _FAMILIES[family]

    def ours(addresses: Iterable[str]) -> list[str]:
        return [address for address in addresses if is_ipv6(address) == (fam is _V6)]

    allowed, protected = ours(spec.allowed_sources), ours(spec.protected)
    if fam is _V6 and not allowed and not protected:
        return {}
    host = fam.host
    chain = f"DGRD{queue}-IN"
    inside = f" -i {spec.interface}" if spec.interface else ""
    # Only this host sends on lo: its own tools reaching its own cluster-LAN address (distributorctl
    # and the control API, a local Prometheus) must not meet the forged-source refusals below.
    lines = [f"-A {chain} -i lo -j RETURN"]
    lines += [f"-A {chain} -s {source}{host}{inside} -j RETURN" for source in allowed]
    if spec.interface:
        # A cluster host's address arriving from anywhere else is forged: it would be forwarded
        # (reverse-path filtering is off on a router of floating addresses) or reach the control ports.
        lines += [f'-A {chain} -s {source}{host} -m comment --comment "{GUARD_TAG}:spoofed_source" -j DROP'
                  for source in allowed]
    for port, sources in spec.openings:
        # A monitoring host reaches the metrics port, an operator's host the API port, and nothing
        # else (it is no node, no peer).
        lines += [f"-A {chain} -s {_cidr(source)} -p tcp -m tcp --dport {port} -j RETURN" for source in ours(sources)]
    for port in spec.control_ports:
        lines.append(f'-A {chain} -p udp -m udp --dport {port} -m comment --comment "{GUARD_TAG}:control_port" -j DROP')
    for address in protected:
        lines.append(f'-A {chain} -d {address}{host} -m comment --comment "{GUARD_TAG}:cluster_address" -j DROP')
    return {("raw", chain): lines}


class _Chains:
    """Chains with a name prefix, installed and removed in single iptables-restore transactions.

    Both families: the IPv4 chains with iptables-restore, the IPv6 ones (same names, same tables) with
    ip6tables-restore, one transaction each.  The IPv6 chains are installed only when the rendering
    has lines for them; leftovers of either family are always removed (a config that drops its last
    IPv6 service leaves nothing in the ip6 tables).
    """

    def __init__(self, prefix: str, hooks: tuple[tuple[str, str, str], ...], *, netns_exec: tuple[str, ...] = ()):
        self._ours = prefix
        self._hooks = hooks
        self._prefix = netns_exec
        self._has6 = False  # IPv6 chains of ours installed by this adapter (counters() reads them then)

    def _lines(self, family: int = 4) -> dict[tuple[str, str], list[str]]:
        raise NotImplementedError

    def install(self, known_absent: bool = False) -> None:
        """Install the chains in one transaction per family, replacing any left over (skip the look with ``known_absent``)."""
        lines = self._lines(4)
        self._install(4, lines, known_absent)
        lines6 = self._lines(6)
        if lines6:
            self._install(6, lines6, known_absent)
            self._has6 = True
        elif not known_absent or self._has6:
            self._remove6()
        count = sum(map(len, lines.values())) + sum(map(len, lines6.values()))
        log.info("installed %d rules in the %s* chains%s", count, self._ours, " (IPv4 and IPv6)" if lines6 else "")

    def _install(self, family: int, lines: dict[tuple[str, str], list[str]], known_absent: bool) -> None:
        existing = {table: ([], []) for table in _TABLES} if known_absent else self._existing(family)
        script: list[str] = []
        for table in _TABLES:
            wanted = [chain for (t, chain) in lines if t == table]
            jumps, present = existing[table]
            hooks = [(hook, f"{self._ours}{suffix}") for t, hook, suffix in self._hooks if t == table]
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
        self._restore(family, script)

    def remove(self) -> bool:
        """Remove every chain of our prefix and every jump to one, in both families; returns False when there was
        nothing to remove."""
        removed = self._remove(self._existing(4), 4)
        return self._remove6() or removed

    def _remove6(self) -> bool:
        """The IPv6 chains' removal, tolerant where there can be none (no ip6tables installed, and none of ours
        installed by this run): an IPv4-only distributor needs no ip6tables."""
        try:
            existing = self._existing(6)
        except ToolMissing:
            if self._has6:
                raise
            return False
        except RulesError as exc:
            if self._has6:
                raise
            log.warning("cannot look for IPv6 chains of %s* left over (%s); an IPv4-only layout does not need "
                        "them", self._ours, exc)
            return False
        removed = self._remove(existing, 6)
        self._has6 = False
        return removed

    def _remove(self, existing: dict[str, tuple[list[str], list[str]]], family: int) -> bool:
        script: list[str] = []
        for table, (jumps, present) in existing.items():
            if jumps or present:
                script += [f"*{table}", *[f"-D {jump}" for jump in jumps], *[f"-F {chain}" for chain in present],
                           *[f"-X {chain}" for chain in present], "COMMIT"]
        if not script:
            return False
        self._restore(family, script)
        log.info("removed the %s* chains%s", self._ours, " (IPv6)" if family == 6 else "")
        return True

    def counters(self) -> dict[str, int]:
        """Packets matched per ``--comment`` tag of our rules (the guard's refusals, counted by the kernel), both
        families summed (the IPv6 chains when this adapter installed them)."""
        found: dict[str, int] = {}
        for family in (4, 6) if self._has6 else (4,):
            for table in _TABLES:
                for line in self._save(family, table).splitlines():
                    if f" {self._ours}" not in line or "--comment" not in line:
                        continue
                    packets = int(line[1:line.index(":")]) if line.startswith("[") else 0
                    tag = line.split("--comment ", 1)[1].split()[0].strip('"')
                    found[tag] = found.get(tag, 0) + packets
        return found

    def _existing(self, family: int = 4) -> dict[str, tuple[list[str], list[str]]]:
        """Per table: the jumps from built-in chains to ours (as rule specs) and our chains."""
        found = {}
        for table in _TABLES:
            out = self._save(family, table, counters=False).splitlines()
            jumps = [line[3:] for line in out
                     if line.startswith("-A ") and line.split()[1] in _BUILTIN and f" -j {self._ours}" in line]
            present = [line[1:].split()[0] for line in out if line.startswith(f":{self._ours}")]
            found[table] = (jumps, present)
        return found

    def _save(self, family: int, table: str, counters: bool = True) -> str:
        flags = ["-c"] if counters else []
        if family == 6:
            return self._run(["ip6tables-save", *flags, "-t", table]).stdout
        return self._run(["iptables-save", *flags, "-t", table]).stdout

    def _restore(self, family: int, script: list[str]) -> None:
        if not script:
            return
        if family == 6:
            self._run(["ip6tables-restore", "--noflush"], "\n".join(script) + "\n")
        else:
            self._run(["iptables-restore", "--noflush"], "\n".join(script) + "\n")

    def _run(self, argv: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        try:
            result = subprocess.run([*self._prefix, *argv], input=stdin, capture_output=True, text=True, timeout=30)
        except FileNotFoundError:
            package = "nftables" if argv[0] == "nft" else "iptables"
            raise ToolMissing(f"{argv[0]} is not installed (Debian package: {package})") from None
        if result.returncode != 0:
            raise RulesError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
        return result


class Rules(_Chains):
    """The data path's chains of one queue number (``DIST<q>-*``), for a mode and a layout."""

    def __init__(self, queue: int, mode: Mode = Mode.REWRITE, *, netns_exec: tuple[str, ...] = (),
                 answer_echo: bool = True):
        super().__init__(f"DIST{queue}-", _MODE_HOOKS[mode], netns_exec=netns_exec)
        self.queue = queue
        self.mode = mode
        self.answer_echo = answer_echo
        self.layout: tuple[RuleService, ...] = ()
        self.known_absent = False  # True once remove() ran: no chain of ours is left
        self.installs = 0  # install_layout calls: the return path's counters restart at each
        self.routes = DsrRoutes(queue, netns_exec=netns_exec) if mode is Mode.DSR else None

    def install_layout(self, layout: Iterable[RuleService]) -> None:
        """Install (or replace) the rules for a layout.  When this adapter removed them itself last, it
        skips reading the tables first (a takeover is that much faster).  Rewrite mode's return path
        goes in first: a SYN-ACK must never leave with the node's address."""
        self.layout = tuple(layout)
        self.installs += 1
        if self.mode is Mode.REWRITE:
            table = nft_table(self.queue)
            # Declaring, deleting and defining in one transaction replaces whatever was there; the IPv6
            # table is defined only for IPv6 services, and a left-over one deleted in the same transaction.
            script = f"table ip {table} {{}}\ndelete table ip {table}\n" + render_return_path(self.queue, self.layout)
            script += f"table ip6 {table} {{}}\ndelete table ip6 {table}\n"
            if any(is_ipv6(service.vip) for service in self.layout):
                script += render_return_path(self.queue, self.layout, family=6)
            self._run(["nft", "-f", "-"], script)
        if self.routes is not None:
            self.routes.install(self.layout)  # before the queue rules: a marked packet always finds its route
        self.install(known_absent=self.known_absent)
        self.known_absent = False

    def remove(self) -> bool:
        removed = super().remove()
        if self.routes is not None:
            removed = self.routes.remove() or removed
        if self.mode is Mode.REWRITE:
            table = nft_table(self.queue)
            # Queue rules first (above), then the return path: no SYN-ACK ever leaves unrewritten.
            self._run(["nft", "-f", "-"], f"table ip {table} {{}}\ndelete table ip {table}\n"
                                          f"table ip6 {table} {{}}\ndelete table ip6 {table}\n")
        self.known_absent = True
        return removed

    def _lines(self, family: int = 4) -> dict[tuple[str, str], list[str]]:
        return render_rules(self.queue, self.layout, self.mode, self.answer_echo, family=family)

    def return_path_bytes(self) -> dict[tuple[str, str, int], int]:
        """Rewrite mode: node -> client bytes the return path rewrote since it was installed, per
        (service, node address, port); empty while the rules are not installed (a standby) or in kernel mode."""
        if self.mode is not Mode.REWRITE:
            return {}
        try:
            listing = self._run(["nft", "-j", "list", "table", "ip", nft_table(self.queue)]).stdout
        except RulesError:
            return {}  # no table: not active
        found = parse_return_path_bytes(listing)
        if any(is_ipv6(service.vip) for service in self.layout):
            try:
                found.update(parse_return_path_bytes(
                    self._run(["nft", "-j", "list", "table", "ip6", nft_table(self.queue)]).stdout))
            except RulesError:
                pass  # removed meanwhile
        return found


class Guard(_Chains):
    """The guard chain (``DGRD<q>-*``): present whatever the role, from start to stop (see :func:`render_guard`)."""

    def __init__(self, queue: int, spec: GuardSpec, *, netns_exec: tuple[str, ...] = ()):
        super().__init__(f"DGRD{queue}-", (("raw", "PREROUTING", "IN"),), netns_exec=netns_exec)
        self.queue = queue
        self.spec = spec

    def _lines(self, family: int = 4) -> dict[tuple[str, str], list[str]]:
        return render_guard(self.queue, self.spec, family=family)

