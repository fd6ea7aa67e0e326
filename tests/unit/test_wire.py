"""The shared datagram format: every rejection reason, and no input that crashes the verifier."""

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.keyfile import load_keys
from common.wire import (HEADER_SIZE, Keys, KeysError, Kind, NodeHeartbeat, Reject, SequenceCounter, Verifier,
                              seal)

KEYS = Keys({1: b"k" * 32, 2: b"second key, rotated in"})
NOW = 1_800_000_000.0
HB = NodeHeartbeat(0.5, 0.25, 1.5, 200).pack()


def verifier(**kw):
    return Verifier(KEYS, {"web1": "198.51.100.11", "dist2": None}, {Kind.NODE_HEARTBEAT, Kind.RESIGN}, **kw)


def good(seq=10, ts=NOW, sender="web1", kind=Kind.NODE_HEARTBEAT, keys=KEYS, payload=HB):
    return seal(keys, kind, sender, seq, ts, payload)


def test_a_good_datagram_is_accepted_with_its_fields():
    message, reject = verifier().verify(good(), "198.51.100.11", NOW + 1)
    assert reject is None
    assert (message.kind, message.sender, message.sequence, message.key_id) == (Kind.NODE_HEARTBEAT, "web1", 10, 2)
    assert NodeHeartbeat.unpack(message.payload) == NodeHeartbeat(0.5, 0.25, 1.5, 200)


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0xFF]) + data[offset + 1:]


@pytest.mark.parametrize(
    "data,source,reason",
    [
        (b"", "198.51.100.11", Reject.SHORT),
        (good()[:HEADER_SIZE + 31], "198.51.100.11", Reject.SHORT),
        (b"XSTB" + good()[4:], "198.51.100.11", Reject.BAD_MAGIC),
        (good()[:4] + b"\x07" + good()[5:], "198.51.100.11", Reject.BAD_VERSION),
        (good(kind=Kind.STATE_SYNC), "198.51.100.11", Reject.BAD_KIND),
        (good() + b"x", "198.51.100.11", Reject.BAD_LENGTH),
        (good(sender="web9"), "198.51.100.11", Reject.UNKNOWN_SENDER),
        (good(), "198.51.100.66", Reject.WRONG_ADDRESS),
        (good(keys=Keys({7: b"z" * 32})), "198.51.100.11", Reject.UNKNOWN_KEY),
        (good(ts=NOW - 60), "198.51.100.11", Reject.STALE),
        (good(ts=NOW + 60), "198.51.100.11", Reject.STALE),
        (good(ts=float("nan")), "198.51.100.11", Reject.STALE),
        (_flip(good(), HEADER_SIZE + 2), "198.51.100.11", Reject.BAD_MAC),
        (_flip(good(), len(good()) - 1), "198.51.100.11", Reject.BAD_MAC),
        (good(keys=Keys({2: b"y" * 32})), "198.51.100.11", Reject.BAD_MAC),
    ],
)
def test_each_rejection_reason(data, source, reason):
    assert verifier().verify(data, source, NOW) == (None, reason)


def test_replay_and_old_sequences_are_rejected_but_a_restarted_sender_is_accepted():
    v = verifier()
    assert v.verify(good(seq=100), "198.51.100.11", NOW)[1] is None
    assert v.verify(good(seq=100), "198.51.100.11", NOW) == (None, Reject.REPLAY)
    assert v.verify(good(seq=99), "198.51.100.11", NOW) == (None, Reject.REPLAY)
    first = SequenceCounter()
    seqs = [first.next(NOW) for _ in range(3)]  # the same clock reading: still strictly growing
    restarted = SequenceCounter()  # 1 ms later the agent restarts with a fresh counter
    assert restarted.next(NOW + 0.001) > max(seqs)
    assert seqs == sorted(set(seqs)) and len(seqs) == 3


def test_a_forgery_does_not_move_the_replay_mark():
    v = verifier()
    forged = _flip(good(seq=10**15), len(good()) - 1)
    assert v.verify(forged, "198.51.100.11", NOW) == (None, Reject.BAD_MAC)
    assert v.verify(good(seq=5), "198.51.100.11", NOW)[1] is None


def test_any_address_sender_and_key_rotation():
    v = verifier()
    old_key = Keys({1: b"k" * 32, 2: b"second key, rotated in"}, signing_id=1)
    assert v.verify(seal(old_key, Kind.RESIGN, "dist2", 1, NOW), "10.9.9.9", NOW)[1] is None


def test_keys_file_parsing_and_errors(tmp_path):
    path = tmp_path / "keys"
    path.write_text("# cluster keys\n1 " + "ab" * 16 + "\n2 " + "cd" * 20 + "  # newest\n")
    keys = load_keys(path)
    assert keys.signing_id == 2 and keys.secrets[1] == bytes.fromhex("ab" * 16)
    path.write_text("1 abcd\n")
    with pytest.raises(KeysError, match="too short"):
        load_keys(path)
    path.write_text("one " + "ab" * 16 + "\n")
    with pytest.raises(KeysError, match=r"keys:1: expected 'KEY_ID HEX_SECRET'"):
        load_keys(path)
    with pytest.raises(KeysError, match="cannot read keys file"):
        load_keys(tmp_path / "missing")
    with pytest.raises(KeysError, match="signing key id 5"):
        Keys({1: b"k" * 32}, signing_id=5)


@settings(max_examples=2000, deadline=None)
@given(st.binary(max_size=200), st.one_of(st.none(), st.sampled_from(["198.51.100.11", "1.2.3.4"])))
def test_random_bytes_are_rejected_never_raise(data, source):
    message, reason = verifier().verify(data, source, NOW)
    assert message is None and isinstance(reason, Reject)


@settings(max_examples=1000, deadline=None)
@given(st.integers(0, len(good()) - 1), st.integers(1, 255))
def test_any_single_byte_change_is_rejected(offset, xor):
    data = bytearray(good())
    data[offset] ^= xor
    message, reason = verifier().verify(bytes(data), "198.51.100.11", NOW)
    assert message is None


def test_node_heartbeat_payload_length_is_checked():
    assert NodeHeartbeat.unpack(b"short") is None
    assert len(NodeHeartbeat(1, 0, 0, 0).pack()) == struct.calcsize("!fffI")


def test_a_sequence_from_the_future_is_rejected_and_leaves_the_sender_working():
    v = verifier()
    message, reject = v.verify(good(seq=10 ** 19), "198.51.100.11", NOW)
    assert message is None and reject is Reject.REPLAY
    assert v.verify(good(seq=int(NOW * 1_000_000)), "198.51.100.11", NOW)[0] is not None
