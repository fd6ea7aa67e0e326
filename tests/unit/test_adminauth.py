"""Signed administration requests and responses: every refusal reason, replay windows, no crash on any header."""

import hashlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.adminauth import (EMPTY_SHA256, H_BODY, H_KEY, H_MAC, H_REPLY_TO, H_SENDER, H_SEQUENCE, H_TIME,
                              REPLAY_WINDOW, Refusal, RequestVerifier, ReplayWindow, sign_request, sign_response,
                              verify_response)
from common.wire import Keys

KEYS = Keys({1: b"k" * 32, 2: b"second key, rotated in"})
NOW = 1_800_000_000.0
PATH = "/v1/content?path=index.html&version=3&size=5"
BODY = hashlib.sha256(b"hello").hexdigest()


def verifier(**kw):
    return RequestVerifier(KEYS, {"dist1": "198.51.100.2", "dist2": None}, window=10.0, **kw)


def signed(seq=100, now=NOW, sender="dist1", method="PUT", path=PATH, body=BODY, keys=KEYS):
    return sign_request(keys, sender, seq, now, method, path, body)


def test_a_signed_request_is_accepted_with_who_sent_it():
    auth, refusal = verifier().check("PUT", PATH, signed(), "198.51.100.2", NOW + 1)
    assert refusal is None
    assert (auth.sender, auth.sequence, auth.key_id, auth.body_sha256) == ("dist1", 100, 2, BODY)


@pytest.mark.parametrize("change,reason", [
    (lambda h: h.pop(H_MAC), Refusal.MISSING_HEADER),
    (lambda h: h.pop(H_BODY), Refusal.MISSING_HEADER),
    (lambda h: h.update({H_SEQUENCE: "-5"}), Refusal.BAD_HEADER),
    (lambda h: h.update({H_SEQUENCE: "9" * 30}), Refusal.BAD_HEADER),
    (lambda h: h.update({H_TIME: "soon"}), Refusal.BAD_HEADER),
    (lambda h: h.update({H_MAC: "zz" * 32}), Refusal.BAD_HEADER),
    (lambda h: h.update({H_SENDER: "mallory"}), Refusal.UNKNOWN_SENDER),
    (lambda h: h.update({H_KEY: "7"}), Refusal.UNKNOWN_KEY),
    (lambda h: h.update({H_TIME: f"{NOW - 60:.6f}"}), Refusal.STALE),
    (lambda h: h.update({H_TIME: "nan"}), Refusal.STALE),
    (lambda h: h.update({H_BODY: EMPTY_SHA256}), Refusal.BAD_MAC),  # the body digest is covered
    (lambda h: h.update({H_SEQUENCE: "101"}), Refusal.BAD_MAC),
    (lambda h: h.update({H_MAC: "0" * 64}), Refusal.BAD_MAC),
])
def test_each_tampered_or_missing_header_is_refused_with_its_reason(change, reason):
    headers = signed()
    change(headers)
    assert verifier().check("PUT", PATH, headers, "198.51.100.2", NOW) == (None, reason)


@pytest.mark.parametrize("method,path", [
    ("POST", PATH),  # another method
    ("PUT", PATH.replace("index.html", "..%2Fetc%2Fpasswd")),  # another path: the raw bytes are signed
    ("PUT", PATH.replace("version=3", "version=4")),
    ("PUT", PATH.replace("index.html", "index%2Ehtml")),  # another spelling of the same path is another MAC
])
def test_the_method_and_the_raw_path_and_query_are_covered(method, path):
    assert verifier().check(method, path, signed(), "198.51.100.2", NOW) == (None, Refusal.BAD_MAC)


def test_source_address_is_checked_for_senders_pinned_to_one():
    assert verifier().check("PUT", PATH, signed(), "198.51.100.99", NOW) == (None, Refusal.WRONG_ADDRESS)
    auth, refusal = verifier().check("PUT", PATH, signed(sender="dist2"), "198.51.100.99", NOW)
    assert refusal is None and auth.sender == "dist2"


def test_a_request_is_accepted_once_and_reordering_within_the_window_is_tolerated():
    v = verifier()
    assert v.check("PUT", PATH, signed(seq=100), "198.51.100.2", NOW)[1] is None
    assert v.check("PUT", PATH, signed(seq=100), "198.51.100.2", NOW)[1] == Refusal.REPLAY
    assert v.check("PUT", PATH, signed(seq=102), "198.51.100.2", NOW)[1] is None
    assert v.check("PUT", PATH, signed(seq=101), "198.51.100.2", NOW)[1] is None  # arrived late: still new
    assert v.check("PUT", PATH, signed(seq=101), "198.51.100.2", NOW)[1] == Refusal.REPLAY


def test_sequences_below_the_window_are_refused():
    window = ReplayWindow()
    for seq in range(1000, 1000 + REPLAY_WINDOW + 5):
        assert window.fresh(seq)
        window.accept(seq)
    assert window.floor == 1004
    assert not window.fresh(1003) and not window.fresh(1004) and window.fresh(1000 + REPLAY_WINDOW + 5)


def test_a_forgery_does_not_move_the_replay_marks():
    v = verifier()
    forged = signed(seq=10**15, keys=Keys({2: b"not the cluster key at all"}))
    assert v.check("PUT", PATH, forged, "198.51.100.2", NOW)[1] == Refusal.BAD_MAC
    assert v.check("PUT", PATH, signed(seq=100), "198.51.100.2", NOW)[1] is None


def test_marks_restore_after_a_restart_refuses_what_was_accepted_before():
    v = verifier()
    assert v.check("PUT", PATH, signed(seq=100), "198.51.100.2", NOW)[1] is None
    restarted = verifier(marks=v.marks())
    assert v.marks() == {"dist1": 100}
    assert restarted.check("PUT", PATH, signed(seq=100), "198.51.100.2", NOW)[1] == Refusal.REPLAY
    assert restarted.check("PUT", PATH, signed(seq=99), "198.51.100.2", NOW)[1] == Refusal.REPLAY
    assert restarted.check("PUT", PATH, signed(seq=101), "198.51.100.2", NOW)[1] is None


def test_keys_rotate_by_id():
    old = Keys({1: b"k" * 32})
    auth, refusal = verifier().check("PUT", PATH, signed(keys=old), "198.51.100.2", NOW)
    assert refusal is None and auth.key_id == 1


def reply(status=200, body=b'{"ok":true}', node="web1", to=("dist1", 100), now=NOW):
    return sign_response(KEYS, node, 5, now, status, to[0], to[1], hashlib.sha256(body).hexdigest())


def test_a_signed_response_verifies_only_for_its_request_node_status_and_body():
    body = b'{"ok":true}'
    assert verify_response(KEYS, "web1", 200, reply(), body, "dist1", 100, NOW) is None
    assert verify_response(KEYS, "web2", 200, reply(), body, "dist1", 100, NOW) == Refusal.UNKNOWN_SENDER
    assert verify_response(KEYS, "web1", 200, reply(), body, "dist1", 101, NOW) == Refusal.WRONG_REPLY
    assert verify_response(KEYS, "web1", 409, reply(), body, "dist1", 100, NOW) == Refusal.BAD_MAC
    assert verify_response(KEYS, "web1", 200, reply(), b'{"ok":false}', "dist1", 100, NOW) == Refusal.BAD_DIGEST
    assert verify_response(KEYS, "web1", 200, reply(now=NOW - 30), body, "dist1", 100, NOW) == Refusal.STALE
    assert verify_response(KEYS, "web1", 200, {}, body, "dist1", 100, NOW) == Refusal.MISSING_HEADER


def test_a_response_mac_never_passes_as_a_request_mac():
    # Same fields where they overlap; the domain tag differs, so the MAC cannot be reused.
    headers = reply(status=200, to=("dist1", 100))
    headers = {k: v for k, v in headers.items() if k != H_REPLY_TO}
    headers[H_SENDER] = "dist1"
    assert verifier().check("PUT", PATH, headers, "198.51.100.2", NOW)[1] in (Refusal.BAD_MAC, Refusal.REPLAY)


@settings(max_examples=150, deadline=None)
@given(st.dictionaries(st.sampled_from([H_KEY, H_SENDER, H_SEQUENCE, H_TIME, H_BODY, H_MAC, "X-Other"]),
                       st.text(max_size=80)),
       st.text(max_size=40))
def test_no_headers_crash_the_verifier(headers, path):
    auth, refusal = verifier().check("GET", path, headers, "198.51.100.2", NOW)
    assert auth is None and refusal is not None


def test_digits_of_other_scripts_and_sequences_from_the_future_are_refused_never_raised():
    # "²".isdigit() is True but int("²") raises: an unsigned request must get a refusal, not a 500.
    for header in (H_SEQUENCE, H_KEY):
        headers = signed()
        headers[header] = "\u00b2"
        assert verifier().check("PUT", PATH, headers, "198.51.100.2", NOW) == (None, Refusal.BAD_HEADER)
    # A sequence far ahead of the sender's clock (wall-clock microseconds) would become the floor a
    # restarted broker keeps, refusing every honest request after it as a replay.
    future = signed(seq=10 ** 19)
    assert verifier().check("PUT", PATH, future, "198.51.100.2", NOW) == (None, Refusal.REPLAY)
    assert verifier().check("PUT", PATH, signed(seq=int(NOW * 1_000_000)), "198.51.100.2", NOW)[1] is None
