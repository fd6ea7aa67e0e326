"""The connection table's lifecycle, timeouts and capacity, with a fake clock."""

import pytest

from distributor.conntable import ConnEvent, ACK, FIN, RST, SYN, ConnectionTable, IllegalTransition, TcpState, Timeouts


def key(n: int) -> bytes:
    return b"C" * 8 + n.to_bytes(4, "big")


def reply(n: int) -> bytes:
    return b"N" * 8 + n.to_bytes(4, "big")


def open_conn(table, n, now=0.0):
    return table.open(key(n), reply(n), "svc", "backend", now)


def test_lookup_by_either_key():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    assert table.get(key(1)) is conn and table.get(reply(1)) is conn
    assert len(table) == 1 and list(table) == [conn]


def test_lifecycle_syn_established_fin_fin():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    assert conn.state is TcpState.SYN_SEEN
    assert table.advance(conn, SYN | ACK, False, 0.1) is False
    assert conn.state is TcpState.SYN_SEEN
    assert table.advance(conn, ACK, True, 0.2) is False
    assert conn.state is TcpState.ESTABLISHED
    assert table.advance(conn, FIN | ACK, False, 0.3) is False
    assert conn.state is TcpState.FIN_WAIT
    assert table.advance(conn, FIN | ACK, False, 0.35) is False  # retransmitted FIN
    assert table.advance(conn, FIN | ACK, True, 0.4) is True  # ends exactly once
    assert conn.state is TcpState.CLOSING
    assert table.advance(conn, ACK, False, 0.5) is False
    assert table.advance(conn, RST, True, 0.6) is False  # already ended
    assert conn.state is TcpState.CLOSED


def test_rst_ends_an_open_connection_once():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    assert table.advance(conn, RST, True, 1.0) is True
    assert table.advance(conn, RST | ACK, False, 1.1) is False


@pytest.mark.parametrize(
    "flags_sequence,state,timeout",
    [
        ([], TcpState.SYN_SEEN, 30),
        ([(ACK, True)], TcpState.ESTABLISHED, 900),
        ([(ACK, True), (FIN | ACK, True)], TcpState.FIN_WAIT, 120),
        ([(ACK, True), (FIN | ACK, True), (FIN | ACK, False)], TcpState.CLOSING, 30),
        ([(RST, True)], TcpState.CLOSED, 10),
    ],
)
def test_each_state_expires_after_its_idle_timeout(flags_sequence, state, timeout):
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    for flags, from_client in flags_sequence:
        table.advance(conn, flags, from_client, 0.0)
    assert conn.state is state
    assert table.expire(timeout - 0.001) == [] and len(table) == 1
    ended = table.expire(timeout)
    assert len(table) == 0 and table.get(key(1)) is None and table.get(reply(1)) is None
    assert ended == ([conn] if state in (TcpState.SYN_SEEN, TcpState.ESTABLISHED, TcpState.FIN_WAIT) else [])


def test_traffic_keeps_a_connection_alive():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    table.advance(conn, ACK, True, 0.0)
    for t in range(100, 5000, 100):
        table.advance(conn, ACK, True, float(t))
        assert table.expire(float(t)) == []
    assert table.expire(4900 + 900.0) == [conn]


def test_expiry_respects_the_budget():
    table = ConnectionTable(100)
    for n in range(50):
        open_conn(table, n)
    assert len(table.expire(1000.0, budget=10)) == 10
    assert len(table) == 40
    assert len(table.expire(1000.0)) == 40


def test_configurable_timeouts_and_bad_values():
    table = ConnectionTable(10, Timeouts(syn=2))
    open_conn(table, 1)
    assert len(table.expire(2.0)) == 1
    with pytest.raises(ValueError, match="syn"):
        Timeouts(syn=0)
    with pytest.raises(ValueError, match="capacity"):
        ConnectionTable(0)


def test_a_full_table_evicts_finished_then_the_oldest_half_open_and_refuses_only_when_all_are_established():
    table = ConnectionTable(3)
    a, b, c = open_conn(table, 1), open_conn(table, 2), open_conn(table, 3)
    for conn in (a, b, c):
        table.advance(conn, ACK, True, 0.5)  # all established
    assert open_conn(table, 4) is None and len(table) == 3
    table.advance(a, RST, True, 1.0)
    d = open_conn(table, 4)  # the finished one makes room
    assert d is not None and table.evicted == 1 and table.evicted_open == []
    assert table.get(key(1)) is None and table.get(key(2)) is b
    table.advance(b, RST, True, 1.0)
    e = open_conn(table, 5)  # b (finished) goes first, before the half-open d
    assert e is not None and table.get(key(4)) is d
    f = open_conn(table, 6)  # now only half-open ones can go: the oldest, d
    assert f is not None and table.evicted_half_open == 1 and table.evicted_open == [d]
    assert table.get(key(4)) is None and table.half_open() == 2


def test_a_half_open_entry_is_not_kept_alive_by_the_nodes_syn_ack_retransmissions():
    table = ConnectionTable(10, Timeouts(syn=2))
    conn = open_conn(table, 1)
    for t in (0.5, 1.0, 1.5, 1.9):
        table.advance(conn, SYN | ACK, False, t)  # the node retransmits its SYN-ACK to a spoofed client
    assert table.expire(2.1) == [conn] and len(table) == 0


def test_duplicate_keys_are_refused():
    table = ConnectionTable(10)
    open_conn(table, 1)
    with pytest.raises(KeyError):
        open_conn(table, 1)


def test_illegal_transitions_are_refused():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    table.advance(conn, RST, True, 0.0)
    with pytest.raises(IllegalTransition, match="event CLIENT_ACK is not allowed in state CLOSED"):
        table._move(conn, ConnEvent.CLIENT_ACK, 0.0)
    assert table.transitions[(TcpState.SYN_SEEN, TcpState.CLOSED)] == 1


def test_churn_does_not_accumulate_stale_timer_references():
    table = ConnectionTable(1_000_000)
    keeper = open_conn(table, 0)
    table.advance(keeper, ACK, True, 0.0)  # one long-lived connection at the front
    for n in range(1, 20_001):
        conn = open_conn(table, n, float(n) / 1000)
        table.advance(conn, ACK, True, 0.0)
        table.advance(conn, FIN | ACK, True, 0.0)
        table.advance(conn, FIN | ACK, False, 0.0)
        table.advance(conn, RST, True, 0.0)
        table.remove(conn)
    assert len(table) == 1
    assert sum(len(q) for q in table._queues) < 5_000


def test_held_expiry_keeps_open_replicas_until_the_takeover_then_times_them_from_there():
    table = ConnectionTable(10)
    conn = open_conn(table, 1, now=0.0)
    table.advance(conn, ACK, True, 0.0)
    closed = open_conn(table, 2, now=0.0)
    table.advance(closed, RST, True, 0.0)
    for t in range(0, 5000, 100):  # a backup: no packets, but the replica must survive
        table.hold_expiry(float(t))
        table.expire(float(t))
    assert table.get(key(1)) is conn and table.get(key(2)) is None  # finished entries still go
    assert table.expire(4900 + 899.0) == []
    assert table.expire(4900 + 900.0) == [conn]


def test_segments_after_an_rst_change_nothing():
    table = ConnectionTable(10)
    conn = open_conn(table, 1)
    assert table.advance(conn, RST, True, 0.1) is True
    for flags, from_client in ((FIN | ACK, True), (FIN | ACK, False), (ACK, True), (RST, False)):
        assert table.advance(conn, flags, from_client, 0.2) is False
        assert conn.state is TcpState.CLOSED
