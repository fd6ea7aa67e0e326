"""Per-backend byte counters of the interposer: rewrite mode counts what it forwards to the nodes."""

from __future__ import annotations

from distributor.conntable import ConnectionTable
from distributor.reroute import ACCEPT, Interposer, Mode
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.unit.test_reroute import service_spec


def _bytes_in(ip: Interposer) -> dict[str, int]:
    return {b.node: b.bytes_in for b in ip.stats().backends}


def test_rewrite_mode_counts_every_ip_byte_it_forwards_to_each_backend():
    ip = Interposer([service_spec()], ConnectionTable(100))
    syn = tcp(CLIENT, VIP, 40000, 80, "S", seq=1)
    syn_ack = tcp(WEB["web1"], CLIENT, 80, 40000, "SA", seq=9, ack=2)
    ack = tcp(CLIENT, VIP, 40000, 80, "A", seq=2, ack=10)
    request = tcp(CLIENT, VIP, 40000, 80, "PA", b"GET / HTTP/1.1\r\n\r\n", seq=2, ack=10)
    for packet in (syn, syn_ack, ack, request, request):  # the last takes the inline path
        assert ip.handle(packet, 1.0)[0] == ACCEPT
    # The node's packets are seen, not forwarded by user space (the nft return path rewrites them).
    assert _bytes_in(ip) == {"web1": len(syn) + len(ack) + 2 * len(request), "web2": 0}


def test_dropped_packets_count_no_bytes_and_kernel_mode_counts_none():
    rewrite = Interposer([service_spec()], ConnectionTable(100))
    rewrite.handle(tcp(CLIENT, VIP, 40000, 80, "PA", b"unknown flow"), 1.0)
    assert _bytes_in(rewrite) == {"web1": 0, "web2": 0}
    kernel = Interposer([service_spec()], ConnectionTable(100), Mode.KERNEL)
    assert kernel.handle(tcp(CLIENT, VIP, 40000, 80, "S"), 1.0)[0] == ACCEPT
    assert _bytes_in(kernel) == {"web1": 0, "web2": 0}
