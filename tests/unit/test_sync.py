"""Connection-table replication: live batches, snapshots, gaps, and what the replica then forwards."""

import random

from backup.sync import SyncReceiver, SyncSender
from distributor.balancer import Policy
from distributor.reroute import ACCEPT, DROP, ConnectionEnded, ConnectionOpened
from common.wire import SyncBatch
from tests.packets import CLIENT, VIP, WEB, tcp
from tests.unit.test_reroute import make


class Recorded:
    """An active interposer whose effects feed a sync sender, as the distributor core routes them."""

    def __init__(self, interposer, sender):
        self.interposer, self.sender = interposer, sender
        self.table = interposer.table
        self.services = interposer.services

    def handle(self, packet, now):
        reason, out, extra = self.interposer.decide(packet, now)
        for effect in extra or ():
            if isinstance(effect, ConnectionOpened):
                self.sender.opened(effect.conn.key, effect.conn.backend.index)
            elif isinstance(effect, ConnectionEnded):
                self.sender.ended(effect.conn.key)
        return reason.verdict, out


def pair(policy=Policy.LEAST_OUTSTANDING):
    active, replica = make(policy, capacity=100_000), make(policy, capacity=100_000)
    sender = SyncSender()
    return Recorded(active, sender), replica, sender, SyncReceiver(replica)


def deliver(payloads, receiver, now=0.0, drop=()):
    """Deliver the payloads (but those at the indices in ``drop``); the ranges the receiver then misses."""
    for i, payload in enumerate(payloads):
        if i not in drop:
            assert receiver.receive(SyncBatch.unpack(payload), now)
    return receiver.missing()


def snapshot(active, sender, limit):
    return sender.snapshot_batches(limit, active.interposer.open_connections, active.interposer.open_backend)


def open_conn(ip, port, now=0.0):
    ip.handle(tcp(CLIENT, VIP, port, 80, "S"), now)
    ip.handle(tcp(CLIENT, VIP, port, 80, "A"), now)


def table_view(ip):
    return {conn.key: conn.backend.name for conn in ip.table if conn.is_open}


def test_live_batches_replicate_opens_and_ends_and_the_replica_forwards_to_the_same_node():
    active, replica, sender, receiver = pair()
    for port in range(40000, 40300):
        open_conn(active, port)
    for port in range(40000, 40100):
        active.handle(tcp(CLIENT, VIP, port, 80, "R"), 1.0)
    assert deliver(sender.live_batches(), receiver) == []
    assert table_view(replica) == table_view(active) and len(table_view(active)) == 200
    outstanding = [replica.services[0].balancer.outstanding(i) for i in range(2)]
    assert outstanding == [active.services[0].balancer.outstanding(i) for i in range(2)]
    # After a takeover the replica sends every packet of a replicated connection where the active did.
    for port in (40100, 40150, 40299):
        node = active.table.get(tcp(CLIENT, VIP, port, 80, "A")[12:24]).backend.name
        verdict, out = replica.handle(tcp(CLIENT, VIP, port, 80, "PA", b"more"), 2.0)
        assert verdict == ACCEPT and out == tcp(CLIENT, WEB[node], port, 80, "PA", b"more")
        verdict, out = replica.handle(tcp(WEB[node], CLIENT, 80, port, "FA"), 2.0)
        assert verdict == ACCEPT and out is None  # followed; the kernel gives it the VIP
    # An ended one is not resurrected: the replica holds it closed (its last segments may still pass) and
    # does not count it; a segment of a connection the active never had is dropped.
    for port in (40000, 40050, 40099):
        key = tcp(CLIENT, VIP, port, 80, "A")[12:24]
        assert replica.table.get(key) is not None and not replica.is_open(key)
    assert replica.handle(tcp(CLIENT, VIP, 45000, 80, "PA", b"x"), 2.0) == (DROP, None)


def test_a_lost_batch_is_asked_for_again_and_the_ones_after_it_wait_in_order():
    active, replica, sender, receiver = pair()
    for port in range(40000, 40000 + 5 * SyncBatch.MAX_RECORDS):
        open_conn(active, port)
    payloads = sender.live_batches()
    assert len(payloads) == 5
    assert deliver(payloads, receiver, drop={1, 2}) == [(2, 3)]  # 3 wait behind the gap, in order
    assert receiver.gaps == 1 and receiver.waiting == 2 and receiver.applied == 1
    assert len(table_view(replica)) == SyncBatch.MAX_RECORDS
    again, too_old = sender.resend([(2, 3)])
    assert not too_old and deliver(again, receiver) == []
    assert receiver.applied == 5 and table_view(replica) == table_view(active)


def test_batches_older_than_the_history_cost_a_snapshot_which_skips_the_gap(monkeypatch):
    from backup import sync

    monkeypatch.setattr(sync, "HISTORY", 64)
    active, replica, sender, receiver = pair()
    open_conn(active, 40000)
    deliver(sender.live_batches(), receiver)
    lost = []
    for port in range(40001, 40001 + sync.HISTORY + 10):  # one batch each; all of them lost
        open_conn(active, port)
        lost += sender.live_batches()
    assert receiver.missing(up_to=sender.batch) == [(2, sender.batch)]
    _, too_old = sender.resend(receiver.missing(up_to=sender.batch))
    assert too_old
    sender.request_snapshot()
    for payload in snapshot(active, sender, 10_000):
        receiver.receive(SyncBatch.unpack(payload), 1.0)
    assert receiver.snapshot_complete and receiver.missing() == []
    assert table_view(replica) == table_view(active) and receiver.caught_up(sender.batch)


def test_a_snapshot_while_the_table_keeps_changing_converges_also_with_lost_datagrams_resent():
    active, replica, sender, receiver = pair()
    for port in range(40000, 40500):
        open_conn(active, port)
    deliver(sender.live_batches(), receiver)
    sender.request_snapshot()
    rng = random.Random(1)
    port = 41000
    sent = 0
    while sender.snapshot_running:
        live = sender.live_batches()  # changes first, then a chunk: the daemon's order
        chunk = snapshot(active, sender, 2)
        batch = live + chunk
        sent += len(batch)
        missing = deliver(batch, receiver, drop={i for i in range(len(batch)) if rng.random() < 0.3})
        if missing:  # the core asks for what it misses; here the answer arrives whole
            deliver(sender.resend(missing)[0], receiver)
        for _ in range(30):  # the table keeps changing during the snapshot
            if rng.random() < 0.6:
                open_conn(active, port)
                port += 1
            else:
                victim = rng.choice(list(table_view(active)))
                active.handle(tcp(CLIENT, VIP, int.from_bytes(victim[8:10], "big"), 80, "R"), 1.0)
    deliver(sender.live_batches(), receiver)
    missing = receiver.missing(up_to=sender.batch)
    if missing:
        deliver(sender.resend(missing)[0], receiver)
    assert sent > 5 and receiver.caught_up(sender.batch)
    assert table_view(replica) == table_view(active)


def test_a_connection_reopened_on_another_node_during_a_snapshot_is_not_sent_with_its_old_node():
    active, replica, sender, receiver = pair(Policy.ROUND_ROBIN)
    for port in range(40000, 40000 + SyncBatch.MAX_RECORDS + 2):
        open_conn(active, port)
    deliver(sender.live_batches(), receiver)
    sender.request_snapshot()
    deliver(snapshot(active, sender, 1), receiver)  # the first chunk; the rest is still to come
    last = 40000 + SyncBatch.MAX_RECORDS + 1
    active.handle(tcp(CLIENT, VIP, last, 80, "R"), 1.0)  # ends, and the port is reused at once
    open_conn(active, last, 1.0)
    deliver(sender.live_batches() + snapshot(active, sender, 10), receiver)
    assert table_view(replica) == table_view(active)


def test_empty_table_snapshot_completes_and_duplicates_are_ignored():
    active, replica, sender, receiver = pair()
    sender.request_snapshot()
    payloads = snapshot(active, sender, 10)
    assert len(payloads) == 1
    deliver(payloads + payloads, receiver)
    assert receiver.caught_up(sender.batch) and receiver.gaps == 0


def test_full_datagrams_split_records_over_consecutive_batches():
    active, replica, sender, receiver = pair()
    for port in range(40000, 40000 + SyncBatch.MAX_RECORDS * 2 + 5):
        open_conn(active, port)
    payloads = sender.live_batches()
    assert len(payloads) == 3 and [SyncBatch.unpack(p).batch for p in payloads] == [1, 2, 3]
    deliver(payloads, receiver)
    assert len(replica.table) == SyncBatch.MAX_RECORDS * 2 + 5
