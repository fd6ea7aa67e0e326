"""The daemon's UDP endpoints (node heartbeats, distributor datagrams): one way to open them (adapter).

Contract: :func:`open_endpoint` binds ``host:port`` on the running loop and calls
``on_datagram(data, (address, port))`` for every datagram received, optionally only from one
interface (SO_BINDTODEVICE: the cluster side, so the outside cannot reach it); the returned
:class:`DatagramEndpoint` sends (``send``) and closes.  SO_REUSEADDR lets a restarted daemon
bind at once; SO_BROADCAST is set when asked.  A bind failure raises ``OSError`` naming what the
socket is for and the address.  A send that fails (a link is down) is counted and logged at most
once every few seconds, never raised: the peers notice the silence.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from typing import Callable

__all__ = ["DatagramEndpoint", "open_endpoint"]

log = logging.getLogger("distributor.udp")

OnDatagram = Callable[[bytes, tuple[str, int]], None]


class DatagramEndpoint(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: OnDatagram, purpose: str):
        self.on_datagram = on_datagram
        self.purpose = purpose
        self.transport: asyncio.DatagramTransport | None = None
        self.send_errors = 0
        self._last_error_log = 0.0

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        self._count_error(exc)

    def send(self, data: bytes, destination: tuple[str, int]) -> None:
        if self.transport is None:
            return
        try:
            self.transport.sendto(data, destination)
        except OSError as exc:
            self._count_error(exc)

    def _count_error(self, exc: Exception) -> None:
        self.send_errors += 1
        now = time.monotonic()
        if now - self._last_error_log > 5.0:
            self._last_error_log = now
            log.warning("%s: cannot send: %s (%d send errors so far)", self.purpose, exc, self.send_errors)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
            self.transport = None


async def open_endpoint(on_datagram: OnDatagram, host: str, port: int, purpose: str,
                        broadcast: bool = False, device: str | None = None) -> DatagramEndpoint:
    """``device``: receive only what arrives on that interface (SO_BINDTODEVICE): the cluster side."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    try:
        if device:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode() + b"\0")
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        where = f" on {device}" if device else ""
        raise OSError(f"cannot listen for {purpose} on udp {host}:{port}{where}: {exc.strerror}") from None
    endpoint = DatagramEndpoint(on_datagram, purpose)
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: endpoint, sock=sock)
    endpoint.transport = transport
    return endpoint
