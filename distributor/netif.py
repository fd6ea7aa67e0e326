"""Which interface is the cluster side: looked up once at start over netlink (adapter).

Contract (blocking calls, for a worker thread: pyroute2's synchronous API runs a loop of its own):
:func:`interface_of` names the interface that holds an address (the distributor's own
cluster-LAN address); :func:`interface_towards` names the interface the kernel routes an address
through (a node).  Both return None when there is none; netlink errors raise ``OSError``.
"""

from __future__ import annotations

from pyroute2 import IPRoute

__all__ = ["interface_of", "interface_towards"]


def _name(ipr: IPRoute, index: int) -> str | None:
    links = ipr.get_links(index)
    return links[0].get_attr("IFLA_IFNAME") if links else None


def interface_of(address: str) -> str | None:
    with IPRoute() as ipr:
        for entry in ipr.get_addr(address=address):
            return _name(ipr, entry["index"])
    return None


def interface_towards(address: str) -> str | None:
    with IPRoute() as ipr:
        try:
            routes = ipr.route("get", dst=address)
        except Exception as exc:  # pyroute2 raises NetlinkError: no route to it
            raise OSError(f"no route to {address}: {exc}") from None
        for route in routes:
            index = route.get_attr("RTA_OIF")
            if index is not None:
                return _name(ipr, index)
    return None
