"""The NFQUEUE binding's messages and bookkeeping, against a socket double that plays the kernel (no root).

The messages the kernel would send are built here by hand from the uapi
layouts (linux/netlink.h, linux/netfilter/nfnetlink_queue.h), and what the
binding sends is parsed back by hand: nothing below reuses the binding's own
packing code to check itself.
"""

from __future__ import annotations

import errno
import socket
import struct
from collections import deque

import pytest

from distributor import nfqueue
from distributor.nfqueue import ACCEPT, DROP, REPEAT, NfQueue, NfQueueError

QUEUE = 7


# -- the kernel's side, written from the uapi headers ----------------------------------------------------------
def nla(kind: int, value: bytes) -> bytes:
    return struct.pack("=HH", 4 + len(value), kind) + value + b"\0" * (-len(value) % 4)


def nlmsg(kind: int, body: bytes, flags: int = 0, seq: int = 0) -> bytes:
    return struct.pack("=IHHII", 16 + len(body), kind, flags, seq, 0) + body


def packet_message(packet_id: int, payload: bytes, *, mark: int = 0, skb_info: int = 0, hook: int = 0,
                   indev: int = 0, outdev: int = 0, cap_len: int | None = None, family: int = socket.AF_INET) -> bytes:
    """An NFQNL_MSG_PACKET in the order nfqnl_build_packet_message writes its attributes."""
    body = struct.pack("=BBH", family, 0, socket.htons(QUEUE))
    body += nla(1, struct.pack(">IHB", packet_id, 0x0800, hook))  # NFQA_PACKET_HDR (7 bytes, padded)
    if indev:
        body += nla(5, struct.pack(">I", indev))
    if outdev:
        body += nla(6, struct.pack(">I", outdev))
    if mark:
        body += nla(3, struct.pack(">I", mark))
    body += nla(9, struct.pack(">HH8s", 6, 0, b"\x02\0\0\0\0\x01\0\0"))  # NFQA_HWADDR: skipped by the parser
    if cap_len is not None:
        body += nla(13, struct.pack(">I", cap_len))
    if skb_info:
        body += nla(14, struct.pack(">I", skb_info))
    body += nla(10, payload)  # NFQA_PAYLOAD comes last
    return nlmsg((3 << 8) | 0, body)


def error_message(code: int, seq: int = 0) -> bytes:
    """NLMSG_ERROR: the negative errno, then the header of the request it answers."""
    return nlmsg(2, struct.pack("=i", -code) + struct.pack("=IHHII", 16, 0, 0, seq, 0), seq=seq)


def parse_sent(datagram: bytes) -> list[dict]:
    """Every nfqueue message in one datagram the binding sent, decoded by hand."""
    messages = []
    offset = 0
    while offset < len(datagram):
        length, kind, flags, seq, pid = struct.unpack_from("=IHHII", datagram, offset)
        family, version, res_id = struct.unpack_from("=BBH", datagram, offset + 16)
        message = {"type": kind, "flags": flags, "seq": seq, "res_id": socket.ntohs(res_id), "attrs": {}}
        at = offset + 20
        while at < offset + length:
            size, attr = struct.unpack_from("=HH", datagram, at)
            message["attrs"][attr] = datagram[at + 4:at + size]
            at += (size + 3) & ~3
        assert at == offset + length, "attributes overrun their message"
        messages.append(message)
        offset += (length + 3) & ~3
    assert offset == len(datagram)
    return messages


def verdicts_of(message: dict) -> tuple[int, int]:
    return struct.unpack(">II", message["attrs"][2])  # NFQA_VERDICT_HDR: verdict, id


class FakeKernel:
    """A NETLINK_NETFILTER socket double: acks config requests, hands out queued datagrams, records sends."""

    def __init__(self, refuse: int = 0):
        self.refuse = refuse  # errno for the first config request, 0 = ack everything
        self.configs: list[dict] = []
        self.replies: deque[bytes] = deque()
        self.incoming: deque = deque()
        self.sent: list[bytes] = []  # verdict datagrams (one per sendmsg)
        self.options: dict[int, int] = {}
        self.closed = False

    # the socket surface NfQueue uses
    def bind(self, address):
        assert address == (0, 0)

    def setsockopt(self, level, option, value):
        self.options[option] = value

    def getsockopt(self, level, option):
        return 2 * self.options.get({socket.SO_SNDBUF: 32}.get(option, option), 212992)

    def settimeout(self, timeout):
        pass

    def setblocking(self, flag):
        pass

    def fileno(self):
        return 99

    def close(self):
        self.closed = True

    def send(self, data: bytes) -> int:
        for message in parse_sent(bytes(data)):
            if message["type"] == (3 << 8) | 2:
                self.configs.append(message)
                code, self.refuse = self.refuse, 0
                # The binding waits for the first two acks; later ones arrive among the packets.
                waiting = self.replies if len(self.configs) <= 2 else self.incoming
                waiting.append(error_message(code, message["seq"]))
            else:
                self.sent.append(bytes(data))
        return len(data)

    def recv(self, size: int) -> bytes:
        return self.replies.popleft()

    def recv_into(self, buffer, size: int) -> int:
        if not self.incoming:
            raise BlockingIOError(errno.EAGAIN, "nothing waits")
        item = self.incoming.popleft()
        if isinstance(item, BaseException):
            raise item
        assert len(item) <= size, "the binding offered a buffer smaller than a message"
        buffer[:len(item)] = item
        return len(item)

    def sendmsg(self, iov) -> int:
        datagram = b"".join(bytes(part) for part in iov)
        self.sent.append(datagram)
        return len(datagram)


def bound(**options) -> tuple[NfQueue, FakeKernel]:
    kernel = FakeKernel()
    options.setdefault("fail_open", False)
    return NfQueue(QUEUE, sock=kernel, **options), kernel


IP_PACKET = bytes.fromhex("450000280001000040060000c0000201c0000202") + bytes(20)


# -- binding and configuration ----------------------------------------------------------------------------------
def test_bind_sends_bind_then_flags_and_maxlen_then_the_copy_range():
    queue, kernel = bound(gso=True, fail_open=True, copy_range=128, max_len=2048)
    bind, limits, params = kernel.configs
    assert all(m["type"] == (3 << 8) | 2 and m["res_id"] == QUEUE and m["flags"] == 0x1 | 0x4 for m in kernel.configs)
    assert bind["attrs"] == {1: struct.pack(">BxH", 1, 0)}  # NFQA_CFG_CMD: BIND
    assert struct.unpack(">I", limits["attrs"][3]) == (2048,)  # NFQA_CFG_QUEUE_MAXLEN
    assert struct.unpack(">I", limits["attrs"][5]) == (nfqueue.F_GSO | nfqueue.F_FAIL_OPEN,)  # NFQA_CFG_FLAGS
    assert struct.unpack(">I", limits["attrs"][4])[0] & (nfqueue.F_GSO | nfqueue.F_FAIL_OPEN)  # NFQA_CFG_MASK covers them
    assert params["attrs"] == {2: struct.pack(">IB", 128, 2)}  # NFQA_CFG_PARAMS: range, COPY_PACKET (9 bytes)
    assert kernel.options[33] == 2048 * 16384  # SO_RCVBUFFORCE, sized for whole GSO packets


def test_fail_open_off_clears_the_flag_and_the_mask_still_names_it():
    _, kernel = bound(fail_open=False)
    flags = struct.unpack(">I", kernel.configs[1]["attrs"][5])[0]
    mask = struct.unpack(">I", kernel.configs[1]["attrs"][4])[0]
    assert flags & nfqueue.F_FAIL_OPEN == 0 and mask & nfqueue.F_FAIL_OPEN


def test_fail_open_must_be_chosen():
    with pytest.raises(TypeError):
        NfQueue(QUEUE, sock=FakeKernel())
    with pytest.raises(TypeError, match="fail_open"):
        NfQueue(QUEUE, fail_open=1, sock=FakeKernel())


@pytest.mark.parametrize("options, match", [({"copy_range": 0}, "copy_range 0"), ({"copy_range": 70000}, "65531"),
                                            ({"max_len": 0}, "max_len 0"), ({"extra_flags": 1 << 9}, "0x200")])
def test_bad_options_name_the_value_and_what_is_valid(options, match):
    with pytest.raises(ValueError, match=match):
        NfQueue(QUEUE, fail_open=False, sock=FakeKernel(), **options)


def test_bad_queue_number():
    with pytest.raises(ValueError, match="65536.*0..65535"):
        NfQueue(65536, fail_open=False, sock=FakeKernel())


def test_a_refused_bind_names_the_queue_and_the_errno_and_closes_the_socket():
    kernel = FakeKernel(refuse=errno.EBUSY)
    with pytest.raises(NfQueueError, match="NFQUEUE 7: cannot bind.*another process") as raised:
        NfQueue(QUEUE, fail_open=False, sock=kernel)
    assert raised.value.errno == errno.EBUSY and kernel.closed


# -- reading ----------------------------------------------------------------------------------------------------
def test_read_parses_every_field():
    queue, kernel = bound()
    kernel.incoming.append(packet_message(41, IP_PACKET, mark=0x1234, skb_info=3, hook=4, indev=2, outdev=5))
    [packet] = queue.read()
    assert (packet.id, packet.mark, packet.hook, packet.indev, packet.outdev) == (41, 0x1234, 4, 2, 5)
    assert bytes(packet.payload) == IP_PACKET and packet.length == len(IP_PACKET)
    assert packet.csum_not_ready and packet.gso and not packet.csum_not_verified and not packet.truncated
    assert queue.undecided == {41}


def test_absent_attributes_read_as_zero_and_a_truncated_copy_shows_its_real_length():
    queue, kernel = bound(copy_range=40)
    kernel.incoming.append(packet_message(1, IP_PACKET[:40], cap_len=1500))
    [packet] = queue.read()
    assert (packet.mark, packet.skb_info, packet.indev, packet.outdev) == (0, 0, 0, 0)
    assert packet.truncated and packet.length == 1500 and len(packet.payload) == 40


def test_odd_payload_lengths_and_many_packets_per_read():
    queue, kernel = bound(batch=8)
    payloads = [IP_PACKET + bytes(i) for i in range(5)]
    kernel.incoming.extend(packet_message(10 + i, p) for i, p in enumerate(payloads))
    packets = queue.read()
    assert [p.id for p in packets] == [10, 11, 12, 13, 14]
    assert [bytes(p.payload) for p in packets] == payloads


def test_read_stops_at_its_limit_and_leaves_the_rest_queued():
    queue, kernel = bound(batch=4)
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in range(1, 7))
    assert [p.id for p in queue.read()] == [1, 2, 3, 4]
    queue.settle(ACCEPT)
    assert [p.id for p in queue.read(limit=1)] == [5]
    assert len(kernel.incoming) == 1


def test_enobufs_is_counted_and_reading_goes_on():
    queue, kernel = bound()
    kernel.incoming.extend([OSError(errno.ENOBUFS, "No buffer space available"), packet_message(3, IP_PACKET)])
    assert [p.id for p in queue.read()] == [3]
    assert queue.stats()["enobufs"] == 1


def test_other_receive_errors_name_the_queue():
    queue, kernel = bound()
    kernel.incoming.append(OSError(errno.EBADF, "Bad file descriptor"))
    with pytest.raises(NfQueueError, match="NFQUEUE 7: receive failed"):
        queue.read()


def test_acks_are_skipped_and_error_replies_counted_by_errno():
    queue, kernel = bound()
    # The copy-range request's ack is already waiting (FakeKernel answers it in the stream).
    kernel.incoming.extend([error_message(errno.ENOENT), packet_message(5, IP_PACKET), error_message(errno.ENOENT)])
    assert [p.id for p in queue.read()] == [5]
    assert queue.reply_errors == {errno.ENOENT: 2}


def test_a_malformed_message_is_counted_not_raised():
    queue, kernel = bound()
    broken = bytearray(packet_message(9, IP_PACKET))
    struct.pack_into("=H", broken, 32, 2000)  # the second attribute claims more bytes than the message has
    kernel.incoming.extend([bytes(broken), packet_message(10, IP_PACKET)])
    [packet] = queue.read()
    assert packet.id == 10 and queue.malformed == 1
    queue.accept(packet)
    queue.flush()
    # The broken message's packet header was still readable: it got a drop, not a leak in the queue.
    assert [verdicts_of(m) for m in parse_sent(kernel.sent[0])] == [(DROP, 9), (ACCEPT, 10)]


# -- verdicts ---------------------------------------------------------------------------------------------------
def test_mixed_verdicts_go_in_one_datagram_in_order_with_marks_and_payloads():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2, 3, 4))
    p1, p2, p3, p4 = queue.read()
    new = bytearray(IP_PACKET + b"odd")  # 43 bytes: padded on the wire
    queue.accept(p1, new)
    queue.drop(p2)
    queue.repeat(p3, mark=0x40000000)
    queue.verdict(p4.id, ACCEPT, payload=p4.payload, mark=7)
    queue.flush()
    [datagram] = kernel.sent
    messages = parse_sent(datagram)
    assert [m["type"] for m in messages] == [(3 << 8) | 1] * 4
    assert all(m["res_id"] == QUEUE and m["flags"] == 0x1 for m in messages)
    assert [verdicts_of(m) for m in messages] == [(ACCEPT, 1), (DROP, 2), (REPEAT, 3), (ACCEPT, 4)]
    assert messages[0]["attrs"][10] == bytes(new) and 3 not in messages[0]["attrs"]
    assert messages[2]["attrs"][3] == struct.pack(">I", 0x40000000) and 10 not in messages[2]["attrs"]
    assert messages[3]["attrs"][3] == struct.pack(">I", 7) and messages[3]["attrs"][10] == IP_PACKET
    assert queue.undecided == set() and queue.stats()["sends"] == 1


def test_equal_plain_verdicts_become_one_verdict_batch_message():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (20, 21, 23))  # 22 was never queued to us
    for packet in queue.read():
        queue.accept(packet, mark=5)
    queue.flush()
    [message] = parse_sent(kernel.sent[0])
    assert message["type"] == (3 << 8) | 3 and verdicts_of(message) == (ACCEPT, 23)
    assert message["attrs"][3] == struct.pack(">I", 5)
    assert queue.stats()["batched"] == 3


def test_no_batch_message_while_a_lower_id_is_held_back():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2, 3))
    held, p2, p3 = queue.read()
    queue.accept(p2)
    queue.accept(p3)
    queue.flush()  # a batch up to 3 would also release the held packet 1
    assert [verdicts_of(m) for m in parse_sent(kernel.sent[0])] == [(ACCEPT, 2), (ACCEPT, 3)]
    assert queue.undecided == {held.id}


def test_a_held_packet_with_a_higher_id_does_not_prevent_the_batch():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2, 3))
    p1, p2, _held = queue.read()
    queue.drop(p1)
    queue.drop(p2)
    queue.flush()
    [message] = parse_sent(kernel.sent[0])
    assert message["type"] == (3 << 8) | 3 and verdicts_of(message) == (DROP, 2)


def test_batches_follow_packet_ids_across_the_32_bit_wrap():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (0xFFFFFFFE, 0xFFFFFFFF, 1))
    for packet in queue.read():
        queue.accept(packet)
    queue.flush()
    [message] = parse_sent(kernel.sent[0])
    assert verdicts_of(message) == (ACCEPT, 1)  # the kernel's nfq_id_after: 1 comes after 0xFFFFFFFF


def test_different_verdicts_are_never_batched():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2))
    p1, p2 = queue.read()
    queue.accept(p1)
    queue.drop(p2)
    queue.flush()
    assert [m["type"] for m in parse_sent(kernel.sent[0])] == [(3 << 8) | 1] * 2


def test_explicit_verdict_batch_decides_everything_up_to_its_id():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2, 3))
    queue.read()
    queue.verdict_batch(2, DROP)
    [message] = parse_sent(kernel.sent[0])
    assert message["type"] == (3 << 8) | 3 and verdicts_of(message) == (DROP, 2) and 3 not in message["attrs"]
    assert queue.undecided == {3}


def test_read_flushes_pending_verdicts_before_reusing_its_buffer():
    queue, kernel = bound()
    kernel.incoming.append(packet_message(1, IP_PACKET))
    [packet] = queue.read()
    packet.payload[8] = 63  # rewrite in place, hand the same bytes back
    queue.accept(packet, packet.payload)
    kernel.incoming.append(packet_message(2, b"\xff" * 40))
    queue.read()
    [message] = parse_sent(kernel.sent[0])
    assert message["attrs"][10][8] == 63 and message["attrs"][10][9:] == IP_PACKET[9:]


def test_a_flush_larger_than_max_send_is_split_into_several_datagrams():
    queue, kernel = bound(batch=64, max_send=4096)
    big = bytes(1500)
    kernel.incoming.extend(packet_message(i, big) for i in range(1, 11))
    for packet in queue.read():
        queue.accept(packet, big)
    queue.flush()
    assert len(kernel.sent) == 5  # two 1,536-byte verdict messages fit in 4 KiB, three do not
    assert all(len(d) <= 4096 for d in kernel.sent)
    ids = [verdicts_of(m)[1] for d in kernel.sent for m in parse_sent(d)]
    assert ids == list(range(1, 11))


def test_payload_too_large_for_a_netlink_attribute_is_refused_by_name():
    queue, kernel = bound()
    kernel.incoming.append(packet_message(1, IP_PACKET))
    [packet] = queue.read()
    with pytest.raises(ValueError, match="NFQUEUE 7: payload of 70000 bytes for packet 1"):
        queue.accept(packet, bytes(70000))


def test_a_datagram_the_kernel_refuses_is_resent_message_by_message():
    queue, kernel = bound()
    calls = []

    def refuse_batches(iov):
        calls.append(len(iov))
        raise OSError(errno.ENOBUFS, "No buffer space available")

    kernel.sendmsg = refuse_batches
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2))
    for packet in queue.read():
        queue.accept(packet, packet.payload)
    queue.flush()
    assert calls and [verdicts_of(parse_sent(d)[0])[1] for d in kernel.sent] == [1, 2]


# -- every packet gets a verdict --------------------------------------------------------------------------------
def test_dispatch_gives_the_callers_verdict_to_a_packet_whose_handler_raised():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (1, 2, 3, 4))
    seen = []

    def handle(q, packet):
        if packet.id == 2:
            raise RuntimeError("bad packet")
        if packet.id == 3:
            q.accept(packet)
            raise RuntimeError("decided, then failed")
        if packet.id == 4:
            return  # held on purpose: stays undecided
        q.accept(packet, packet.payload)

    count = queue.dispatch(handle, on_error=DROP, on_exception=lambda p, exc: seen.append((p.id, str(exc))))
    assert count == 4
    assert [verdicts_of(m) for m in parse_sent(kernel.sent[0])] == [(ACCEPT, 1), (DROP, 2), (ACCEPT, 3)]
    assert seen == [(2, "bad packet"), (3, "decided, then failed")]
    assert queue.undecided == {4}


def test_dispatch_requires_a_known_error_verdict():
    queue, _ = bound()
    with pytest.raises(ValueError, match="on_error 9"):
        queue.dispatch(lambda q, p: None, on_error=9)


def test_settle_and_close_decide_what_is_left():
    queue, kernel = bound()
    kernel.incoming.extend(packet_message(i, IP_PACKET) for i in (5, 6))
    queue.read()
    queue.close(settle=ACCEPT)
    [message] = parse_sent(kernel.sent[0])
    assert verdicts_of(message) == (ACCEPT, 6) and message["type"] == (3 << 8) | 3
    assert kernel.configs[-1]["attrs"] == {1: struct.pack(">BxH", 2, 0)}  # UNBIND
    assert kernel.closed and queue.undecided == set()


def test_fileno_is_the_sockets():
    queue, _ = bound()
    assert queue.fileno() == 99


def test_handing_back_a_truncated_copy_is_refused_because_the_kernel_would_trim_the_packet():
    queue, kernel = bound(copy_range=40)
    kernel.incoming.append(packet_message(1, IP_PACKET[:40], cap_len=1500))
    [packet] = queue.read()
    with pytest.raises(ValueError, match="40-byte payload for packet 1 of 1500 bytes would trim it"):
        queue.accept(packet, packet.payload)
    queue.accept(packet, mark=3)  # a mark alone is fine
    queue.flush()
    assert verdicts_of(parse_sent(kernel.sent[0])[0]) == (ACCEPT, 1)
