"""The daemon's UDP endpoints (node heartbeats, distributor datagrams): one way to open them.

Contract: :func:`open_endpoint` binds ``host:port`` on the running loop for an
:class:`asyncio.DatagramProtocol`, with SO_REUSEADDR (a restarted daemon binds
at once) and, when asked, SO_BROADCAST; a bind failure raises ``OSError``
naming what the socket is for and the address.
"""

from __future__ import annotations

import asyncio
import socket


async def open_endpoint(protocol: asyncio.DatagramProtocol, host: str, port: int, purpose: str,
                        broadcast: bool = False) -> asyncio.DatagramTransport:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if broadcast:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen for {purpose} on udp {host}:{port}: {exc.strerror}") from None
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: protocol, sock=sock)
    return transport
