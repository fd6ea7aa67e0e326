"""Which interface is the cluster side: looked up once at start over netlink (adapter).

Contract (blocking calls, for a worker thread: pyroute2's synchronous API runs a loop of its own):
:func:`interface_of` names the interface that holds an address (the distributor's own
cluster-LAN address); :func:`interface_towards` names the interface the kernel routes an address
through (a node).  Both take IPv4 or IPv6 addresses (any spelling) and return None when there is
none; netlink errors raise ``OSError``.
"""

from __future__ import annotations

import ipaddress
import socket

from pyroute2 import IPRoute

__all__ = ["interface_of", "interface_towards"]


def _name(ipr: IPRoute, index: int) -> str | None:
    links = ipr.get_links(index)
    return links[0].get_attr("IFLA_IFNAME") if links else None


def _family_and_text(address) -> tuple[int, str]:
    """The address's family and its canonical text (the kernel's spelling, which pyroute2 compares with)."""
    parsed = ipaddress.ip_address(str(address))
    return (socket.AF_INET6 if parsed.version == 6 else socket.AF_INET), str(parsed)


def interface_of(address: str) -> str | None:
    family, text = _family_and_text(address)
    with IPRoute() as ipr:
        for entry in ipr.get_addr(family=family, address=text):
            return _name(ipr, entry["index"])
    return None


def interface_towards(address: str) -> str | None:
    family, text = _family_and_text(address)
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=text, family=family)
        except Exception as exc:  # pyroute2 raises NetlinkError: no route to it
            raise OSError(f"no route to {address}: {exc}") from None
        for route in routes:
            index = route.get_attr("RTA_OIF")
            if index is not None:
                return _name(ipr, index)
    return None
