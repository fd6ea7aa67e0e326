"""Runtime administration: what an operator changes while the distributor runs (pure).

Contract
--------
:class:`RuntimeState` is everything an operator may change at run time, as a difference to the
configuration: a node's admin state (:class:`AdminState`: ready, drain, maint), nodes added or
removed, weights, service policies.  It has a version that grows with every change, and a JSON
form (:meth:`RuntimeState.to_json`, :meth:`RuntimeState.from_json`) that is both the state file
(so a restart keeps the changes, as HAProxy's server-state file does) and what the active
distributor replicates to the standbys (so a takeover keeps them).

:func:`validate` checks one :class:`AdminRequest` against the current layout and returns an error
(``status``, ``message``) or None; :meth:`RuntimeState.apply` records a valid one.  The distributor
core (:mod:`distributor.core`) applies the state to the interposer and the health core, and answers
each request with an :class:`AdminReply`; every change is logged with who made it.

Admin states are orthogonal to health: a node takes new connections only while it is healthy
*and* ready.  ``drain``: no new connections, the open ones finish, and the end of the drain (its
last connection closed) is reported.  ``maint``: out at once, its open connections are reset, its
heartbeat counter keeps counting (its health is still known when it comes back).
"""

from __future__ import annotations

import dataclasses
import enum
import ipaddress
import json
import re
from typing import Any, Mapping

from common.sansio import Command

__all__ = ["AdminState", "AdminOp", "AdminRequest", "AdminReply", "SaveState", "RuntimeState", "AddedNode",
           "validate", "LayoutView"]


class AdminState(enum.Enum):
    READY = "ready"
    DRAIN = "drain"
    MAINT = "maint"


class AdminOp(enum.Enum):
    ADD_NODE = "add_node"  # args: node, address, services {service: {port, weight}}
    REMOVE_NODE = "remove_node"  # args: node
    SET_WEIGHT = "set_weight"  # args: node, weight, service (optional: every service of the node)
    DRAIN = "drain"  # args: node
    MAINT = "maint"  # args: node
    READY = "ready"  # args: node
    SET_POLICY = "set_policy"  # args: service, policy


@dataclasses.dataclass(frozen=True)
class AdminRequest:
    """An authenticated operator's change (the API checked who may make it)."""

    request_id: int
    op: AdminOp
    args: Mapping[str, Any]
    who: str
    now: float
    wall: float


@dataclasses.dataclass(frozen=True)
class AdminReply(Command):
    """The answer to an AdminRequest: ``status`` as in HTTP (200, 400, 404, 409), a JSON-able body."""

    request_id: int
    status: int
    body: Mapping[str, Any]


@dataclasses.dataclass(frozen=True)
class SaveState(Command):
    """Write the runtime state file (atomically: a restart reads either the old or the new one)."""

    text: str


@dataclasses.dataclass(frozen=True)
class AddedNode:
    address: str
    services: Mapping[str, tuple[int, int]]  # service -> (port, weight)


class LayoutView:
    """What validation needs to know of the running layout (the core passes its own)."""

    def __init__(self, nodes: Mapping[str, str], services: Mapping[str, set[str]], policies: set[str],
                 endpoints: Mapping[tuple[str, int], str], vips: set[str] = frozenset(),
                 ipv6_services: set[str] = frozenset()):
        self.nodes = nodes  # node -> address, every node currently known (config + added - removed)
        self.services = services  # service -> its node names
        self.policies = policies  # valid policy names
        self.endpoints = endpoints  # (address, port) -> the service it serves
        self.vips = vips  # the services' VIPs (no node may have one)
        self.ipv6_services = ipv6_services  # services whose VIP is IPv6 (their nodes' addresses come from the config)


@dataclasses.dataclass
class RuntimeState:
    version: int = 0
    admin: dict[str, AdminState] = dataclasses.field(default_factory=dict)  # only nodes not READY
    weights: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)  # node -> service -> weight
    added: dict[str, AddedNode] = dataclasses.field(default_factory=dict)
    removed: set[str] = dataclasses.field(default_factory=set)
    policies: dict[str, str] = dataclasses.field(default_factory=dict)  # service -> policy name

    def admin_state(self, node: str) -> AdminState:
        return self.admin.get(node, AdminState.READY)

    def apply(self, request: AdminRequest) -> bool:
        """Record a request :func:`validate` accepted: True, and the version grows by one, when it
        changed something; False for a repeat (a drain of a draining node), which changes nothing."""
        before = self.to_json()
        self._apply(request)
        if self.to_json() == before:
            return False
        self.version += 1
        return True

    def _apply(self, request: AdminRequest) -> None:
        op, args = request.op, request.args
        node = args.get("node")
        if op in (AdminOp.DRAIN, AdminOp.MAINT, AdminOp.READY):
            state = {AdminOp.DRAIN: AdminState.DRAIN, AdminOp.MAINT: AdminState.MAINT,
                     AdminOp.READY: AdminState.READY}[op]
            if state is AdminState.READY:
                self.admin.pop(node, None)
            else:
                self.admin[node] = state
        elif op is AdminOp.SET_WEIGHT:
            for service in args["services"]:
                self.weights.setdefault(node, {})[service] = int(args["weight"])
        elif op is AdminOp.ADD_NODE:
            self.removed.discard(node)
            self.added[node] = AddedNode(str(args["address"]), {s: (int(v["port"]), int(v.get("weight", 1)))
                                                              for s, v in args["services"].items()})
        elif op is AdminOp.REMOVE_NODE:
            if node in self.added:
                del self.added[node]
            else:
                self.removed.add(node)
            self.admin.pop(node, None)
            self.weights.pop(node, None)
        elif op is AdminOp.SET_POLICY:
            self.policies[args["service"]] = str(args["policy"])

    # -- the file and the replica --------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps({
            "version": self.version,
            "admin": {node: state.value for node, state in sorted(self.admin.items())},
            "weights": self.weights,
            "added": {node: {"address": a.address, "services": {s: {"port": p, "weight": w}
                                                                 for s, (p, w) in a.services.items()}}
                      for node, a in sorted(self.added.items())},
            "removed": sorted(self.removed),
            "policies": self.policies,
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "RuntimeState":
        """Parse a state file or a replica; raises ValueError naming what is wrong."""
        try:
            data = json.loads(text)
            state = cls(
                version=int(data.get("version", 0)),
                admin={str(n): AdminState(v) for n, v in data.get("admin", {}).items()},
                weights={str(n): {str(s): int(w) for s, w in v.items()} for n, v in data.get("weights", {}).items()},
                added={str(n): AddedNode(str(v["address"]), {str(s): (int(x["port"]), int(x.get("weight", 1)))
                                                             for s, x in v["services"].items()})
                       for n, v in data.get("added", {}).items()},
                removed={str(n) for n in data.get("removed", [])},
                policies={str(s): str(p) for s, p in data.get("policies", {}).items()},
            )
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(f"not a distributor runtime state: {type(exc).__name__}: {exc}") from None
        return state


def validate(request: AdminRequest, layout: LayoutView) -> tuple[int, str] | None:
    """Why the request cannot be carried out (status, message), or None when it can."""
    op, args = request.op, request.args
    node = args.get("node")
    if op is AdminOp.SET_POLICY:
        service = args.get("service")
        if not isinstance(service, str) or service not in layout.services:
            return 404, f"no service {service!r}; services: {', '.join(sorted(layout.services))}"
        if not isinstance(args.get("policy"), str) or args.get("policy") not in layout.policies:
            return 400, f"policy {args.get('policy')!r} is not valid; expected one of {', '.join(sorted(layout.policies))}"
        return None
    if op is AdminOp.ADD_NODE and not is_node_name(node):  # other ops name a node that exists
        return 400, f"node {node!r} is not valid; expected {NODE_NAME_RULE}"
    if not isinstance(node, str) or not node or len(node.encode()) > 16 or not node.isascii():
        return 400, f"node {node!r} is not valid; expected a name of 1 to 16 ASCII characters"
    if op is AdminOp.ADD_NODE:
        if node in layout.nodes:
            return 409, f"node {node} exists already"
        address = args.get("address")
        services = args.get("services")
        if not isinstance(address, str) or not _is_ipv4(address):
            return 400, f"address {address!r} is not valid; expected an IPv4 address such as \"198.51.100.14\""
        unusable = _unusable_node_address(address, layout)
        if unusable is not None:
            return 400, f"address {address} is not valid: {unusable}; expected a node's unicast address"
        if not isinstance(services, Mapping) or not services:
            return 400, "services: expected {service: {port: P, weight: W}} with at least one service"
        ports: dict[int, str] = {}
        for service, spec in services.items():
            if service not in layout.services:
                return 404, f"no service {service!r}; services: {', '.join(sorted(layout.services))}"
            if service in layout.ipv6_services:
                return 400, (f"service {service} has an IPv6 VIP, and a node added at run time has an IPv4 address "
                             f"only; put {node} in {service} through the configuration ([nodes.{node}] address6) "
                             "and a reload")
            if not isinstance(spec, Mapping):
                return 400, f"services.{service}: expected {{port: P, weight: W}}"
            port, weight = spec.get("port"), spec.get("weight", 1)
            if not _integer(port, 1, 65535):
                return 400, f"services.{service}.port: {port!r} is not valid; expected 1 to 65535"
            if not _integer(weight, 0, 10_000):
                return 400, f"services.{service}.weight: {weight!r} is not valid; expected 0 to 10000"
            owner = layout.endpoints.get((address, int(port))) or ports.get(int(port))
            if owner is not None:
                return 409, f"{address}:{port} already serves {owner}; give {node} another port"
            ports[int(port)] = f"{node} in {service}"
        return None
    if node not in layout.nodes:
        return 404, f"no node {node!r}; nodes: {', '.join(sorted(layout.nodes))}"
    if op is AdminOp.SET_WEIGHT:
        weight = args.get("weight")
        if not _integer(weight, 0, 10_000):
            return 400, f"weight {weight!r} is not valid; expected an integer from 0 to 10000"
        service = args.get("service")
        if service is not None and (not isinstance(service, str) or node not in layout.services.get(service, ())):
            return 404, f"{node} is not in service {service!r}"
    return None


# A node's name goes into logs, metrics labels, URLs (/api/v1/nodes/NAME) and the heartbeats' sender
# id (16 bytes): no "/", no "..", no spaces or control characters (a terminal escape in
# `distributorctl nodes`).
_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,15}")
NODE_NAME_RULE = "1 to 16 letters, digits, '.', '_' or '-', starting with a letter or a digit"


def is_node_name(name: Any) -> bool:
    return isinstance(name, str) and _NODE_NAME.fullmatch(name) is not None and ".." not in name


def _integer(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _is_ipv4(text: str) -> bool:
    """Dotted decimal, ASCII digits only (``str.isdigit`` takes any script's digits and superscripts)."""
    parts = text.split(".")
    return len(parts) == 4 and all(p and len(p) <= 3 and all("0" <= c <= "9" for c in p) and int(p) <= 255
                                   and (p == "0" or not p.startswith("0")) for p in parts)


def unusable_address(address: ipaddress.IPv4Address) -> str | None:
    """Why a VIP or a node cannot have ``address``, or None (the config and run-time adds alike)."""
    if address.is_unspecified:
        return "the unspecified address"
    if address == ipaddress.IPv4Address("255.255.255.255"):
        return "the broadcast address"
    if address.is_loopback:
        return "a loopback address (that would be this distributor)"
    if address.is_multicast:
        return "a multicast address"
    return None


def _unusable_node_address(text: str, layout: "LayoutView") -> str | None:
    """Why a (well-formed) IPv4 address cannot be a node added at run time, or None."""
    if text in layout.vips:
        return "a service's VIP (its traffic would loop)"
    return unusable_address(ipaddress.IPv4Address(text))
