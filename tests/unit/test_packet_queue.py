"""The NFQUEUE adapter (distributor/datapath.py) without root: a queue double in place of the binding.

``FakeQueue`` plays the kernel's side of :class:`distributor.nfqueue.NfQueue`: packets wait in it
with ids, ``read`` hands out at most ``limit`` of them, and a verdict counts as *given* only when
``flush`` sends it (as the real binding sends a batch's verdicts in one ``sendmsg``).  What the
tests check is what the kernel would do with each packet: the verdict, in order, and the bytes or
the mark it carries.  The packets and decisions come from the real interposer where bytes matter,
with checksums verified independently (tests/packets.py).
"""

from __future__ import annotations

import collections
import logging
from dataclasses import dataclass

import pytest

from backup.failover import FirstForward, PacketsHandled
from distributor.conntable import ConnectionTable
from distributor.datapath import DRAIN_BATCH, KERNEL_MODE_COPY, PacketQueue, QueueError
from distributor.nfqueue import ACCEPT, COPY_WHOLE, DROP, REPEAT
from distributor.reroute import END_MARK, MARK_BASE, ConnectionOpened, Interposer, Mode, Reason
from tests.packets import CLIENT, VIP, WEB, checksums_valid, tcp, udp
from tests.unit.test_reroute import service_spec


@dataclass
class FakePacket:
    id: int
    payload: memoryview


class FakeQueue:
    """The binding's interface (read / verdict / flush / close), with the kernel's bookkeeping."""

    def __init__(self, queue, *, fail_open, gso, copy_range, max_len, batch):
        self.config = dict(queue=queue, fail_open=fail_open, gso=gso, copy_range=copy_range, max_len=max_len,
                           batch=batch)
        self.waiting: collections.deque[FakePacket] = collections.deque()
        self.next_id = 1
        self.pending: list = []
        self.given: list[tuple] = []  # (packet id, verdict, bytes or None, mark or None), as sent
        self.flushes = 0
        self.reads: list[int] = []  # the limit of every read
        self.closed_with: object = "open"
        self.timeline: list | None = None  # shared with a test's deliver(), to order verdicts and events

    # -- the kernel queues packets --------------------------------------------------------------------------
    def queue_packets(self, *packets: bytes) -> list[int]:
        ids = []
        for data in packets:
            self.waiting.append(FakePacket(self.next_id, memoryview(bytearray(data))))
            ids.append(self.next_id)
            self.next_id += 1
        return ids

    # -- the binding's methods -------------------------------------------------------------------------------
    def fileno(self) -> int:
        return 99

    def stats(self) -> dict[str, int]:
        return {"queued": len(self.waiting)}

    def read(self, limit=None):
        self.reads.append(limit)
        count = len(self.waiting) if limit is None else min(limit, len(self.waiting))
        return [self.waiting.popleft() for _ in range(count)]

    def verdict(self, packet_id, verdict, payload=None, mark=None):
        self.pending.append((packet_id, verdict, payload, mark))

    def flush(self):
        self.flushes += 1
        for packet_id, verdict, payload, mark in self.pending:
            given = (packet_id, verdict, None if payload is None else bytes(payload), mark)
            self.given.append(given)
            if self.timeline is not None:
                self.timeline.append(("verdict", packet_id, verdict))
        self.pending = []

    def close(self, settle=None):
        self.closed_with = settle


class Clock:
    """A monotonic clock the test moves; every reading is counted."""

    def __init__(self, now: float = 100.0):
        self.now = now
        self.readings = 0

    def __call__(self) -> float:
        self.readings += 1
        return self.now


def make(decide, mode=Mode.REWRITE, deliver=None, clock=None):
    events: list = []
    fakes: list[FakeQueue] = []

    def binding(*args, **kwargs):
        fakes.append(FakeQueue(*args, **kwargs))
        return fakes[-1]

    queue = PacketQueue(3, decide, deliver or events.append, mode, 512, clock or Clock(), lambda: 1.7e9,
                        binding=binding)
    return queue, fakes[0], events


def interposer(mode=Mode.REWRITE):
    return Interposer([service_spec()], ConnectionTable(100), mode)


def syn(port: int) -> bytes:
    return tcp(CLIENT, VIP, port, 80, "S", seq=1)


def syn_to(node: str, port: int) -> bytes:
    """What the node must receive for ``syn(port)``: only the destination rewritten."""
    return tcp(CLIENT, WEB[node], port, 80, "S", seq=1)


# -- binding -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode,copy_range", [(Mode.REWRITE, COPY_WHOLE), (Mode.KERNEL, KERNEL_MODE_COPY)])
def test_the_queue_is_bound_fail_closed_without_gso_with_the_modes_copy_range_and_a_bounded_batch(mode, copy_range):
    queue, fake, _ = make(interposer(mode).decide, mode)
    assert fake.config == dict(queue=3, fail_open=False, gso=False, copy_range=copy_range, max_len=512,
                               batch=DRAIN_BATCH)
    assert queue.fileno() == 99


def test_a_queue_that_cannot_be_bound_raises_a_queue_error_naming_the_queue():
    def refuse(*args, **kwargs):
        raise PermissionError(1, "Operation not permitted")

    with pytest.raises(QueueError, match="cannot bind NFQUEUE 3: .*Operation not permitted"):
        PacketQueue(3, interposer().decide, lambda event: None, binding=refuse)


# -- one batch -------------------------------------------------------------------------------------------------
def test_each_packet_gets_its_interposers_verdict_in_order_with_the_rewritten_bytes_in_one_flush():
    clock = Clock(100.0)
    queue, fake, events = make(interposer().decide, clock=clock)
    ids = fake.queue_packets(syn(40000), udp(CLIENT, VIP, 5000, 80), tcp(CLIENT, VIP, 40001, 80, "PA", b"GET /"),
                             syn(40002))
    queue.drain()

    assert fake.given == [
        (ids[0], ACCEPT, syn_to("web1", 40000), None),  # a new connection, rewritten to its node
        (ids[1], ACCEPT, None, None),  # not TCP: passed unchanged
        (ids[2], DROP, None, None),  # mid-stream segment of an unknown connection
        (ids[3], ACCEPT, syn_to("web2", 40002), None),  # round robin: the next node
    ]
    assert all(checksums_valid(out) for _, _, out, _ in fake.given if out is not None)
    assert fake.flushes == 1 and fake.pending == []
    # The core hears of the batch once, with the effects of every packet (the two connections opened).
    [handled] = events
    assert isinstance(handled, PacketsHandled) and (handled.now, handled.wall) == (100.0, 1.7e9)
    assert [type(e) for e in handled.effects] == [ConnectionOpened, ConnectionOpened]
    assert [e.conn.key for e in handled.effects] == [syn(40000)[12:24], syn(40002)[12:24]]
    assert (queue.drains, queue.packets, queue.errors) == (1, 4, 0)


def test_every_packet_of_a_batch_is_decided_with_one_clock_reading():
    clock = Clock(5.0)
    seen: list[float] = []

    def decide(packet, now):
        seen.append(now)
        clock.now += 1.0  # time goes on while the batch is handled
        return Reason.NOT_TCP, None, None

    queue, fake, events = make(decide, clock=clock)
    fake.queue_packets(*(udp(CLIENT, VIP, 5000 + i, 80) for i in range(3)))
    queue.drain()
    assert seen == [5.0, 5.0, 5.0] and events[0].now == 5.0


def test_kernel_mode_hands_back_marks_and_repeats_a_connections_end_through_the_hook():
    queue, fake, _ = make(interposer(Mode.KERNEL).decide, Mode.KERNEL)
    ids = fake.queue_packets(syn(40000), tcp(CLIENT, VIP, 40000, 80, "FA"), tcp(CLIENT, VIP, 40001, 80, "SF"))
    queue.drain()
    assert fake.given == [
        (ids[0], ACCEPT, None, MARK_BASE),  # the mark selects web1's DNAT rule
        (ids[1], REPEAT, None, END_MARK),  # the first FIN goes through the hook again, marked
        (ids[2], DROP, None, None),  # impossible flags
    ]


def test_an_empty_queue_still_reports_an_empty_batch():
    queue, fake, events = make(interposer().decide)
    queue.drain()
    assert fake.given == [] and [type(e) for e in events] == [PacketsHandled] and events[0].effects == ()


# -- every packet gets a verdict ---------------------------------------------------------------------------------
def test_a_packet_whose_handler_raises_is_dropped_and_the_rest_of_the_batch_is_decided(caplog):
    real = interposer().decide
    poison = udp(CLIENT, VIP, 6666, 80)

    def decide(packet, now):
        if packet == poison:
            raise RuntimeError("bug in the interposer")
        return real(packet, now)

    queue, fake, events = make(decide)
    ids = fake.queue_packets(syn(40000), poison, syn(40001), poison)
    with caplog.at_level(logging.ERROR, logger="distributor.datapath"):
        queue.drain()

    assert fake.given == [(ids[0], ACCEPT, syn_to("web1", 40000), None), (ids[1], DROP, None, None),
                          (ids[2], ACCEPT, syn_to("web2", 40001), None), (ids[3], DROP, None, None)]
    assert queue.errors == 2
    # Logged once with its traceback, not once per packet.
    failures = [r for r in caplog.records if "packet handler failed" in r.getMessage()]
    assert len(failures) == 1 and failures[0].exc_info[0] is RuntimeError
    # The batch is still reported, with the effects of the packets that were decided.
    assert [e.conn.key for e in events[0].effects] == [syn(40000)[12:24], syn(40001)[12:24]]


@pytest.mark.parametrize("answer", [
    None,  # not a verdict at all
    ("not a reason", None, None),
    (Reason.NEW_CONNECTION, b"x", 42),  # effects that are not a tuple
])
def test_a_handler_that_answers_nonsense_gets_its_packet_dropped(answer):
    queue, fake, _ = make(lambda packet, now: answer)
    ids = fake.queue_packets(syn(40000))
    queue.drain()
    assert fake.given == [(ids[0], DROP, None, None)] and queue.errors == 1


def test_a_failed_read_counts_an_error_and_the_next_drain_carries_on():
    queue, fake, events = make(interposer().decide)
    fake.read = lambda limit=None: (_ for _ in ()).throw(OSError(105, "No buffer space available"))
    queue.drain()
    assert queue.errors == 1 and events == [] and fake.given == []
    del fake.read  # the instance attribute goes: FakeQueue.read again
    ids = fake.queue_packets(syn(40000))
    queue.drain()
    assert fake.given == [(ids[0], ACCEPT, syn_to("web1", 40000), None)]


# -- bounded drains ------------------------------------------------------------------------------------------------
def test_a_drain_handles_at_most_one_batch_and_the_next_drains_take_the_rest_in_order():
    queue, fake, events = make(lambda packet, now: (Reason.NOT_TCP, None, None))
    total = 2 * DRAIN_BATCH + 88
    ids = fake.queue_packets(*(udp(CLIENT, VIP, 1000 + i, 80) for i in range(total)))

    queue.drain()
    assert [g[0] for g in fake.given] == ids[:DRAIN_BATCH] and len(fake.waiting) == total - DRAIN_BATCH
    assert fake.reads == [DRAIN_BATCH] and fake.flushes == 1 and len(events) == 1
    queue.drain()
    queue.drain()
    assert [g[0] for g in fake.given] == ids and {g[1] for g in fake.given} == {ACCEPT}
    assert fake.reads == [DRAIN_BATCH] * 3 and fake.flushes == 3 and len(events) == 3
    assert (queue.drains, queue.packets) == (3, total) and not fake.waiting


# -- held SYNs: a standby knows a connection before its node does ---------------------------------------------------
def test_held_syns_get_their_verdict_only_after_the_batch_was_reported_then_in_arrival_order():
    timeline: list = []
    box: dict = {}

    def deliver(event):
        # What the runtime does with the failover core's answer: send the sync batch, then ReleaseNewSyns.
        timeline.append(("sync batch", tuple(e.conn.key for e in event.effects)))
        box["queue"].release_held()

    queue, fake, events = make(interposer().decide, deliver=deliver)
    box["queue"] = queue
    fake.timeline = timeline
    queue.hold(True)
    ids = fake.queue_packets(syn(40000), udp(CLIENT, VIP, 5000, 80), syn(40001))
    queue.drain()

    assert timeline == [
        ("verdict", ids[1], ACCEPT),  # not a new connection: not held
        ("sync batch", (syn(40000)[12:24], syn(40001)[12:24])),
        ("verdict", ids[0], ACCEPT),
        ("verdict", ids[2], ACCEPT),
    ]
    assert fake.given == [(ids[1], ACCEPT, None, None), (ids[0], ACCEPT, syn_to("web1", 40000), None),
                          (ids[2], ACCEPT, syn_to("web2", 40001), None)]


def test_held_syns_wait_across_drains_until_released_and_other_packets_are_not_held_behind_them():
    queue, fake, _ = make(interposer().decide)
    # A connection opened before the hold (its node answered, the client acknowledged).
    fake.queue_packets(syn(40005), tcp(WEB["web1"], CLIENT, 80, 40005, "SA", seq=5000, ack=2),
                       tcp(CLIENT, VIP, 40005, 80, "A", seq=2, ack=5001))
    queue.drain()
    before = len(fake.given)
    queue.hold(True)
    [new] = fake.queue_packets(syn(40000))
    queue.drain()
    assert fake.given[before:] == []  # held: the kernel still has it
    [data] = fake.queue_packets(tcp(CLIENT, VIP, 40005, 80, "PA", b"GET / HTTP/1.1\r\n\r\n", seq=2, ack=5001))
    queue.drain()
    assert fake.given[before:] == [
        (data, ACCEPT, tcp(CLIENT, WEB["web1"], 40005, 80, "PA", b"GET / HTTP/1.1\r\n\r\n", seq=2, ack=5001), None)]
    queue.release_held()
    assert fake.given[before + 1:] == [(new, ACCEPT, syn_to("web2", 40000), None)]
    queue.release_held()  # nothing left: nothing is given twice
    assert len(fake.given) == before + 2


def test_kernel_mode_releases_held_syns_with_their_marks():
    queue, fake, _ = make(interposer(Mode.KERNEL).decide, Mode.KERNEL)
    queue.hold(True)
    ids = fake.queue_packets(syn(40000), syn(40001))
    queue.drain()
    assert fake.given == []
    queue.release_held()
    assert fake.given == [(ids[0], ACCEPT, None, MARK_BASE), (ids[1], ACCEPT, None, MARK_BASE + 1)]


def test_ending_the_hold_releases_what_was_held_and_new_syns_then_pass_at_once():
    queue, fake, _ = make(interposer().decide)
    queue.hold(True)
    [held] = fake.queue_packets(syn(40000))
    queue.drain()
    queue.hold(False)  # giving up: nothing may stay queued in the kernel
    assert fake.given == [(held, ACCEPT, syn_to("web1", 40000), None)]
    [later] = fake.queue_packets(syn(40001))
    queue.drain()
    assert fake.given[1:] == [(later, ACCEPT, syn_to("web2", 40001), None)]


def test_closing_gives_held_syns_their_verdict_and_settles_the_rest_with_drop():
    queue, fake, _ = make(interposer().decide)
    queue.hold(True)
    [held] = fake.queue_packets(syn(40000))
    queue.drain()
    queue.close()
    assert fake.given == [(held, ACCEPT, syn_to("web1", 40000), None)] and fake.closed_with == DROP


# -- the first forwarded packet after a takeover ----------------------------------------------------------------------
def test_first_forward_reports_the_first_packet_handed_on_with_new_bytes_once():
    clock = Clock(10.0)
    queue, fake, events = make(interposer().decide, clock=clock)
    queue.arm_first_forward()
    fake.queue_packets(udp(CLIENT, VIP, 5000, 80), tcp(CLIENT, VIP, 40009, 80, "PA", b"x"))
    queue.drain()  # passed unchanged and dropped: neither is forwarded by the distributor
    assert [type(e) for e in events] == [PacketsHandled]

    clock.now = 11.0
    fake.queue_packets(syn(40000))
    queue.drain()
    assert events[1:] == [PacketsHandled(11.0, 1.7e9, events[1].effects), FirstForward(11.0, 11.0)]

    clock.now = 12.0
    fake.queue_packets(syn(40001))
    queue.drain()
    assert [type(e) for e in events[3:]] == [PacketsHandled]  # once per arming


def test_first_forward_of_a_held_syn_is_its_release_and_says_when_it_arrived():
    clock = Clock(20.0)
    box: dict = {}

    def deliver(event):
        events.append(event)
        if isinstance(event, PacketsHandled):
            clock.now = 20.004  # the sync batch took 4 ms to send
            box["queue"].release_held()

    events: list = []
    queue, fake, _ = make(interposer().decide, deliver=deliver, clock=clock)
    box["queue"] = queue
    queue.hold(True)
    queue.arm_first_forward()
    fake.queue_packets(syn(40000))
    queue.drain()
    assert [type(e) for e in events] == [PacketsHandled, FirstForward]
    assert events[1] == FirstForward(20.004, 20.0)
    assert fake.given == [(1, ACCEPT, syn_to("web1", 40000), None)]


def test_arming_again_times_the_next_packet_afresh():
    clock = Clock(30.0)
    queue, fake, events = make(interposer().decide, clock=clock)
    queue.arm_first_forward()
    fake.queue_packets(syn(40000))
    queue.drain()
    clock.now = 40.0
    queue.arm_first_forward()
    fake.queue_packets(syn(40001))
    queue.drain()
    assert [e for e in events if isinstance(e, FirstForward)] == [FirstForward(30.0, 30.0), FirstForward(40.0, 40.0)]


# -- coalescing (the daemon asks for it at SCHED_FIFO) ----------------------------------------------------------
def coalescing(clock):
    pauses: list[float] = []
    fakes: list[FakeQueue] = []

    def binding(*args, **kwargs):
        fakes.append(FakeQueue(*args, **kwargs))
        return fakes[-1]

    queue = PacketQueue(3, interposer().decide, lambda event: None, Mode.REWRITE, 512, clock, lambda: 1.7e9,
                        binding=binding, coalesce=0.0002, sleep=pauses.append)
    return queue, fakes[0], pauses


def test_a_busy_queue_pauses_after_a_small_drain_so_the_next_wake_up_finds_a_batch():
    clock = Clock()
    queue, fake, pauses = coalescing(clock)
    fake.queue_packets(syn(40000))
    queue.drain()  # the first drain: nothing says the queue is busy yet
    clock.now += 0.0003
    fake.queue_packets(syn(40001), syn(40002))
    queue.drain()  # 0.3 ms after the previous one, two packets: busy and small
    assert pauses == [0.0002] and queue.pauses == 1
    assert [given[1] for given in fake.given] == [ACCEPT] * 3  # the pause delays, it decides nothing


def test_an_idle_queue_a_large_drain_and_an_empty_one_are_never_paused():
    clock = Clock()
    queue, fake, pauses = coalescing(clock)
    for step in range(3):  # one packet every 10 ms: idle
        clock.now += 0.01
        fake.queue_packets(syn(41000 + step))
        queue.drain()
    clock.now += 0.0003
    fake.queue_packets(*(syn(42000 + i) for i in range(40)))  # busy, but a batch already
    queue.drain()
    clock.now += 0.0003
    queue.drain()  # busy, and nothing to read
    assert pauses == []


def test_without_coalescing_nothing_pauses():
    clock = Clock()
    queue, fake, _ = make(interposer().decide, clock=clock)
    for step in range(5):
        clock.now += 0.0001
        fake.queue_packets(syn(43000 + step))
        queue.drain()
    assert queue.pauses == 0
