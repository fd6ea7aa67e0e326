"""Authentication of administration requests and responses over HTTP (pure: no sockets, no clock).

The heartbeats' key scheme (:class:`common.wire.Keys`: ``KEY_ID HEX_SECRET``
lines, rotation by key id) carried in HTTP headers instead of a datagram.
Both ends use it: the node's broker verifies requests and signs its answers,
the distributor's admin client signs requests and verifies the answers.

Headers (every request and every response)::

    X-Admin-Key         key id that signed it (decimal)
    X-Admin-Sender      who signed it: a distributor's name, or the node's id in a response
    X-Admin-Sequence    only grows per sender (wire.SequenceCounter: starts at the clock in us)
    X-Admin-Time        sender's wall clock, seconds since the epoch, as sent (e.g. "1700000000.123456")
    X-Admin-Body-SHA256 hex SHA-256 of the body ("e3b0c442..." for an empty one).  For a streamed
                        upload it is the declared digest of the file; the receiver verifies it
                        at the end, before anything becomes visible.
    X-Admin-MAC         hex HMAC-SHA256(secret, canonical string below)
    X-Admin-Reply-To    responses only: "SENDER SEQUENCE" of the request answered

Canonical strings (UTF-8, fields joined by "\\n"; the domain tag keeps a
response MAC from ever passing as a request MAC)::

    request:  "distributor-admin/1 request",  METHOD, RAW_PATH_AND_QUERY, KEY_ID, SENDER, SEQUENCE, TIME, BODY_SHA256
    response: "distributor-admin/1 response", STATUS, REPLY_SENDER, REPLY_SEQUENCE, KEY_ID, SENDER, SEQUENCE, TIME, BODY_SHA256

Contract
--------
* :func:`sign_request` / :func:`sign_response` return the headers to send.
  The path is signed exactly as it goes on the wire (the client must send it
  pre-encoded; the server checks against ``request.raw_path``), so no
  normalisation on either side can make two spellings share a MAC.
* :meth:`RequestVerifier.check` never raises.  Cheap checks first: every
  header present and well formed, known sender, its source address, known key
  id, freshness window, replay window; the HMAC last.  Only a request that
  passes everything moves the sender's replay marks, so a forgery cannot lock
  a real sender out.  A refusal is a :class:`Refusal` reason string.
* Replay: a sender's requests may arrive slightly out of order (two HTTP
  connections), so each sender has a window of the last ``REPLAY_WINDOW``
  sequences it used, like IPsec's anti-replay window (RFC 4303 section
  3.4.3): a sequence is accepted once, and only if it is above the window's
  floor.  :meth:`RequestVerifier.marks` is what to persist so that a
  restarted receiver refuses everything older than what it accepted.
* :func:`verify_response` checks a node's answer: the expected node, a known
  key, freshness, bound to the request it answers, the MAC, the body digest.
"""

from __future__ import annotations

import hashlib
import heapq
import hmac
from dataclasses import dataclass
from typing import Mapping

from .wire import Keys

__all__ = [
    "EMPTY_SHA256",
    "REPLAY_WINDOW",
    "Refusal",
    "Authenticated",
    "ReplayWindow",
    "RequestVerifier",
    "sign_request",
    "sign_response",
    "verify_response",
    "is_sha256_hex",
]

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
REPLAY_WINDOW = 256
_TAG_REQUEST = "distributor-admin/1 request"
_TAG_RESPONSE = "distributor-admin/1 response"
_MAX_SENDER = 64

H_KEY = "X-Admin-Key"
H_SENDER = "X-Admin-Sender"
H_SEQUENCE = "X-Admin-Sequence"
H_TIME = "X-Admin-Time"
H_BODY = "X-Admin-Body-SHA256"
H_MAC = "X-Admin-MAC"
H_REPLY_TO = "X-Admin-Reply-To"


class Refusal:
    """Why a request or response failed authentication (the label of the refusal counter)."""

    MISSING_HEADER = "missing_header"
    BAD_HEADER = "bad_header"
    UNKNOWN_SENDER = "unknown_sender"
    WRONG_ADDRESS = "wrong_address"
    UNKNOWN_KEY = "unknown_key"
    STALE = "stale"
    REPLAY = "replay"
    BAD_MAC = "bad_mac"
    BAD_DIGEST = "bad_digest"  # the body is not what the MAC covers
    WRONG_REPLY = "wrong_reply"  # a response to another request


@dataclass(frozen=True)
class Authenticated:
    sender: str
    sequence: int
    timestamp: float
    key_id: int
    body_sha256: str  # what the MAC covers; the body must be checked against it


def is_sha256_hex(value: str) -> bool:
    return len(value) == 64 and all(c in "0123456789abcdef" for c in value)


def _mac(secret: bytes, fields: list[str]) -> str:
    return hmac.new(secret, "\n".join(fields).encode(), hashlib.sha256).hexdigest()


def _format_time(now: float) -> str:
    return f"{now:.6f}"


def sign_request(keys: Keys, sender: str, sequence: int, now: float, method: str, raw_path: str,
                 body_sha256: str = EMPTY_SHA256) -> dict[str, str]:
    """The headers that authenticate one request; ``raw_path`` is the path and query exactly as sent."""
    if not is_sha256_hex(body_sha256):
        raise ValueError(f"body digest {body_sha256!r} is not valid; expected 64 lower-case hex digits")
    stamp = _format_time(now)
    fields = [_TAG_REQUEST, method.upper(), raw_path, str(keys.signing_id), sender, str(sequence), stamp, body_sha256]
    return {
        H_KEY: str(keys.signing_id),
        H_SENDER: sender,
        H_SEQUENCE: str(sequence),
        H_TIME: stamp,
        H_BODY: body_sha256,
        H_MAC: _mac(keys.secrets[keys.signing_id], fields),
    }


def sign_response(keys: Keys, sender: str, sequence: int, now: float, status: int, reply_sender: str,
                  reply_sequence: int, body_sha256: str) -> dict[str, str]:
    stamp = _format_time(now)
    fields = [_TAG_RESPONSE, str(status), reply_sender, str(reply_sequence), str(keys.signing_id), sender,
              str(sequence), stamp, body_sha256]
    return {
        H_KEY: str(keys.signing_id),
        H_SENDER: sender,
        H_SEQUENCE: str(sequence),
        H_TIME: stamp,
        H_BODY: body_sha256,
        H_REPLY_TO: f"{reply_sender} {reply_sequence}",
        H_MAC: _mac(keys.secrets[keys.signing_id], fields),
    }


@dataclass(frozen=True)
class _Parsed:
    key_id: int
    sender: str
    sequence: int
    stamp: str
    timestamp: float
    body_sha256: str
    mac: str


def _parse(headers: Mapping[str, str]) -> tuple[_Parsed | None, str | None]:
    values = {}
    for name in (H_KEY, H_SENDER, H_SEQUENCE, H_TIME, H_BODY, H_MAC):
        value = headers.get(name)
        if value is None:
            return None, Refusal.MISSING_HEADER
        values[name] = value
    key, sequence, stamp = values[H_KEY], values[H_SEQUENCE], values[H_TIME]
    sender, body, mac = values[H_SENDER], values[H_BODY], values[H_MAC]
    # ASCII digits only: str.isdigit() also takes "²" and other scripts' digits, which int() refuses.
    if not (key.isascii() and key.isdigit() and len(key) <= 5 and sequence.isascii() and sequence.isdigit()
            and len(sequence) <= 20):
        return None, Refusal.BAD_HEADER
    if not (0 < len(sender) <= _MAX_SENDER and sender.isascii() and sender.isprintable() and " " not in sender):
        return None, Refusal.BAD_HEADER
    if not (is_sha256_hex(body) and is_sha256_hex(mac)) or len(stamp) > 32:
        return None, Refusal.BAD_HEADER
    try:
        timestamp = float(stamp)
    except ValueError:
        return None, Refusal.BAD_HEADER
    return _Parsed(int(key), sender, int(sequence), stamp, timestamp, body, mac), None


class ReplayWindow:
    """The sequences one sender used lately: each is accepted once, and only above the floor."""

    def __init__(self, floor: int = -1, size: int = REPLAY_WINDOW):
        self.floor = floor
        self.size = size
        self._heap: list[int] = []
        self._seen: set[int] = set()

    def fresh(self, sequence: int) -> bool:
        return sequence > self.floor and sequence not in self._seen

    def accept(self, sequence: int) -> None:
        heapq.heappush(self._heap, sequence)
        self._seen.add(sequence)
        if len(self._heap) > self.size:
            oldest = heapq.heappop(self._heap)
            self._seen.discard(oldest)
            self.floor = max(self.floor, oldest)

    @property
    def highest(self) -> int:
        return max(self._heap, default=self.floor)


class RequestVerifier:
    """Checks the requests of known senders; keeps each sender's replay window."""

    def __init__(self, keys: Keys, senders: Mapping[str, str | None], window: float = 10.0,
                 marks: Mapping[str, int] | None = None):
        """``senders`` maps a name to the source address it must come from (None: any);
        ``marks`` are the highest sequences accepted before a restart (see :meth:`marks`)."""
        if window <= 0:
            raise ValueError(f"freshness window {window!r} must be > 0 seconds")
        self.keys = keys
        self.senders = dict(senders)
        self.window = window
        self.replay = {name: ReplayWindow((marks or {}).get(name, -1)) for name in self.senders}

    def check(self, method: str, raw_path: str, headers: Mapping[str, str], source: str | None,
              now: float) -> tuple[Authenticated | None, str | None]:
        parsed, refusal = _parse(headers)
        if parsed is None:
            return None, refusal
        if parsed.sender not in self.senders:
            return None, Refusal.UNKNOWN_SENDER
        address = self.senders[parsed.sender]
        if address is not None and source != address:
            return None, Refusal.WRONG_ADDRESS
        secret = self.keys.secrets.get(parsed.key_id)
        if secret is None:
            return None, Refusal.UNKNOWN_KEY
        if not abs(now - parsed.timestamp) <= self.window:  # also refuses NaN
            return None, Refusal.STALE
        window = self.replay[parsed.sender]
        if parsed.sequence > (now + self.window) * 1_000_000 or not window.fresh(parsed.sequence):
            # A sequence ahead of the sender's clock (SequenceCounter: wall-clock microseconds) would
            # become the floor a restarted broker keeps: every honest request after it a "replay".
            return None, Refusal.REPLAY
        fields = [_TAG_REQUEST, method.upper(), raw_path, str(parsed.key_id), parsed.sender, str(parsed.sequence),
                  parsed.stamp, parsed.body_sha256]
        if not hmac.compare_digest(_mac(secret, fields), parsed.mac):
            return None, Refusal.BAD_MAC
        window.accept(parsed.sequence)
        return Authenticated(parsed.sender, parsed.sequence, parsed.timestamp, parsed.key_id, parsed.body_sha256), None

    def marks(self) -> dict[str, int]:
        """The highest sequence accepted per sender: a restarted receiver's floors."""
        return {name: w.highest for name, w in self.replay.items() if w.highest >= 0}


def verify_response(keys: Keys, node: str, status: int, headers: Mapping[str, str], body: bytes,
                    request_sender: str, request_sequence: int, now: float,
                    window: float = 10.0) -> str | None:
    """None when ``body`` is ``node``'s signed answer to the request (sender, sequence); else the refusal."""
    parsed, refusal = _parse(headers)
    if parsed is None:
        return refusal
    if parsed.sender != node:
        return Refusal.UNKNOWN_SENDER
    secret = keys.secrets.get(parsed.key_id)
    if secret is None:
        return Refusal.UNKNOWN_KEY
    if not abs(now - parsed.timestamp) <= window:
        return Refusal.STALE
    if headers.get(H_REPLY_TO) != f"{request_sender} {request_sequence}":
        return Refusal.WRONG_REPLY
    fields = [_TAG_RESPONSE, str(status), request_sender, str(request_sequence), str(parsed.key_id), parsed.sender,
              str(parsed.sequence), parsed.stamp, parsed.body_sha256]
    if not hmac.compare_digest(_mac(secret, fields), parsed.mac):
        return Refusal.BAD_MAC
    if hashlib.sha256(body).hexdigest() != parsed.body_sha256:
        return Refusal.BAD_DIGEST
    return None
