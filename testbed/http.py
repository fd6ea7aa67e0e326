"""A tiny HTTP client that runs from inside a testbed namespace.

Contract: :func:`get` opens one TCP connection from namespace ``netns`` (see
:mod:`testbed.netns`), sends one GET and returns a :class:`Reply` with the
status, the ``X-Node`` header and the body; network errors raise ``OSError``.
"""

from __future__ import annotations

import http.client
from dataclasses import dataclass

from . import netns


@dataclass
class Reply:
    status: int
    node: str | None
    body: bytes


def get(netns_name: str, host: str, port: int = 80, path: str = "/", timeout: float = 5.0) -> Reply:
    sock = netns.connect_in(netns_name, (host, port), timeout=timeout)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        body = response.read()
        return Reply(response.status, response.getheader("X-Node"), body)
    except http.client.HTTPException as exc:
        raise OSError(f"bad HTTP answer from {host}:{port}{path}: {exc!r}") from None
    finally:
        conn.close()


def hold(netns_name: str, host: str, port: int = 80, path: str = "/health", timeout: float = 5.0) -> tuple[http.client.HTTPConnection, str | None]:
    """Open a keep-alive connection from ``netns``, make one request on it and return it still open, with its X-Node."""
    sock = netns.connect_in(netns_name, (host, port), timeout=timeout)
    conn = http.client.HTTPConnection(host, port, timeout=timeout)
    conn.sock = sock
    conn.request("GET", path)
    response = conn.getresponse()
    response.read()
    return conn, response.getheader("X-Node")
