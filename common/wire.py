"""Every datagram the programs exchange, authenticated (pure; no sockets, no clock).

Layout (network byte order)::

    magic    4   b"DSTB"
    version  1   VERSION
    kind     1   Kind
    key id   2   which shared key signed it (keys file; rotation by id)
    sender  16   sender id, ASCII, NUL-padded
    sequence 8   only grows per sender (see SequenceCounter)
    time     8   sender's wall clock, seconds since the epoch (float64)
    length   2   payload length
    payload  length
    mac     32   HMAC-SHA256(key, everything above)

Contract
--------
* :func:`seal` builds a datagram; :meth:`Verifier.verify` checks one and
  returns ``(Message, None)`` or ``(None, Reject)``.  It never raises, for any
  bytes.  Cheap checks come first (length, magic, version, kind, length
  field, known sender and source address, known key id, freshness, replay);
  the HMAC is checked last, and only a datagram that passes everything moves
  the sender's replay mark, so a forgery cannot lock a real sender out.
* Sequences: a sender's counter follows its wall clock in microseconds and
  counts up from there (:class:`SequenceCounter`, which takes the time from
  its caller), so a restarted sender's sequences are above anything it sent
  before (unless it sent more than a million datagrams a second) without
  keeping state on disk.  A receiver that restarts forgets the marks; the
  freshness window bounds what could be replayed to it then.
* Keys file: one ``KEY_ID HEX_SECRET`` per line (``#`` comments); secrets of
  at least 16 bytes.  Senders sign with one id; receivers accept every id in
  the file, which is how keys rotate.
"""

from __future__ import annotations

import enum
import hashlib
import hmac
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Mapping

__all__ = [
    "VERSION",
    "Kind",
    "Reject",
    "Message",
    "Keys",
    "KeysError",
    "seal",
    "Verifier",
    "SequenceCounter",
    "NodeHeartbeat",
    "DistHeartbeat",
    "SyncBatch",
    "SyncRecord",
    "SyncRequest",
    "AdminChunk",
    "Resign",
    "HEADER_SIZE",
    "MAC_SIZE",
    "MAX_PAYLOAD",
]

MAGIC = b"DSTB"
VERSION = 1
_HEADER = struct.Struct("!4sBBH16sQdH")
HEADER_SIZE = _HEADER.size
MAC_SIZE = 32
# Keep datagrams within one Ethernet frame: IP 20 + UDP 8 + header + mac.
MAX_PAYLOAD = 1500 - 28 - HEADER_SIZE - MAC_SIZE
MIN_SECRET = 16


class Kind(enum.IntEnum):
    NODE_HEARTBEAT = 1
    DIST_HEARTBEAT = 2
    STATE_SYNC = 3
    RESIGN = 4
    SYNC_REQUEST = 5
    ADMIN_STATE = 6  # the active's runtime state (admin states, nodes added/removed, weights, policies)


class Reject(enum.Enum):
    SHORT = "short"
    BAD_MAGIC = "bad_magic"
    BAD_VERSION = "bad_version"
    BAD_KIND = "bad_kind"
    BAD_LENGTH = "bad_length"
    UNKNOWN_SENDER = "unknown_sender"
    WRONG_ADDRESS = "wrong_address"
    UNKNOWN_KEY = "unknown_key"
    STALE = "stale"
    BEFORE_START = "before_start"
    REPLAY = "replay"
    BAD_MAC = "bad_mac"
    BAD_PAYLOAD = "bad_payload"


@dataclass(frozen=True)
class Message:
    kind: Kind
    sender: str
    sequence: int
    timestamp: float
    key_id: int
    payload: bytes


class KeysError(ValueError):
    pass


class Keys:
    """Shared HMAC keys by id, and the id this program signs with."""

    def __init__(self, secrets: Mapping[int, bytes], signing_id: int | None = None):
        if not secrets:
            raise KeysError("no key: a keys file needs at least one 'KEY_ID HEX_SECRET' line")
        for key_id, secret in secrets.items():
            if not 0 <= key_id <= 0xFFFF:
                raise KeysError(f"key id {key_id} must be from 0 to 65535")
            if len(secret) < MIN_SECRET:
                raise KeysError(f"key {key_id}: secret of {len(secret)} bytes is too short; use at least {MIN_SECRET}")
        self.secrets = dict(secrets)
        self.signing_id = max(self.secrets) if signing_id is None else signing_id
        if self.signing_id not in self.secrets:
            raise KeysError(f"signing key id {self.signing_id} is not in the keys file (ids: {sorted(self.secrets)})")

    @classmethod
    def parse(cls, text: str, path: str, signing_id: int | None = None) -> "Keys":
        """Keys from the text of a keys file (``path`` names it in errors)."""
        secrets: dict[int, bytes] = {}
        for number, line in enumerate(text.splitlines(), 1):
            line = line.split("#", 1)[0].strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) != 2 or not (parts[0].isascii() and parts[0].isdigit()):  # not "1_0", "+1" or "١"
                    raise ValueError
                key_id, secret = int(parts[0]), bytes.fromhex(parts[1])
            except ValueError:
                raise KeysError(f"{path}:{number}: expected 'KEY_ID HEX_SECRET', got {line[:40]!r}") from None
            if key_id in secrets:
                raise KeysError(f"{path}:{number}: key id {key_id} appears twice")
            secrets[key_id] = secret
        try:
            return cls(secrets, signing_id)
        except KeysError as exc:
            raise KeysError(f"{path}: {exc}") from None


def _sender_field(sender: str) -> bytes:
    raw = sender.encode("ascii")
    if not raw or len(raw) > 16:
        raise ValueError(f"sender id {sender!r} must be 1 to 16 ASCII characters")
    return raw.ljust(16, b"\0")


def seal(keys: Keys, kind: Kind, sender: str, sequence: int, timestamp: float, payload: bytes = b"") -> bytes:
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"payload of {len(payload)} bytes exceeds {MAX_PAYLOAD}")
    header = _HEADER.pack(MAGIC, VERSION, kind, keys.signing_id, _sender_field(sender), sequence, timestamp, len(payload))
    body = header + payload
    return body + hmac.new(keys.secrets[keys.signing_id], body, hashlib.sha256).digest()


class Verifier:
    """Checks datagrams of some kinds from known senders; keeps each sender's replay mark."""

    def __init__(self, keys: Keys, senders: Mapping[str, str | None], kinds: set[Kind], window: float = 5.0,
                 not_before: float = 0.0):
        """``senders`` maps an id to the source address it must come from (None: any address);
        datagrams sealed before ``not_before`` (wall clock) are refused."""
        if window <= 0:
            raise ValueError(f"freshness window {window!r} must be > 0 seconds")
        self.not_before = not_before
        self.keys = keys
        self.senders = {_sender_field(name): (name, address) for name, address in senders.items()}
        self.kinds = frozenset(kinds)
        self.window = window
        self.last_sequence: dict[str, int] = {}

    def add_sender(self, name: str, address: str | None) -> None:
        self.senders[_sender_field(name)] = (name, address)

    def remove_sender(self, name: str) -> None:
        self.senders.pop(_sender_field(name), None)
        self.last_sequence.pop(name, None)

    def verify(self, data: bytes, source: str | None, now: float) -> tuple[Message | None, Reject | None]:
        if len(data) < HEADER_SIZE + MAC_SIZE:
            return None, Reject.SHORT
        magic, version, kind, key_id, sender_raw, sequence, timestamp, length = _HEADER.unpack_from(data)
        if magic != MAGIC:
            return None, Reject.BAD_MAGIC
        if version != VERSION:
            return None, Reject.BAD_VERSION
        if kind not in self.kinds:
            return None, Reject.BAD_KIND
        if HEADER_SIZE + length + MAC_SIZE != len(data):
            return None, Reject.BAD_LENGTH
        known = self.senders.get(sender_raw)
        if known is None:
            return None, Reject.UNKNOWN_SENDER
        sender, address = known
        if address is not None and source != address:
            return None, Reject.WRONG_ADDRESS
        secret = self.keys.secrets.get(key_id)
        if secret is None:
            return None, Reject.UNKNOWN_KEY
        if not abs(now - timestamp) <= self.window:  # also rejects NaN
            return None, Reject.STALE
        if timestamp < self.not_before:
            return None, Reject.BEFORE_START
        if sequence > (now + self.window) * 1_000_000:
            # Sequences follow the sender's wall clock in microseconds (SequenceCounter): one from
            # the future, once accepted, would make every honest datagram after it a "replay".
            return None, Reject.REPLAY
        if sequence <= self.last_sequence.get(sender, -1):
            return None, Reject.REPLAY
        body = data[: HEADER_SIZE + length]
        if not hmac.compare_digest(hmac.new(secret, body, hashlib.sha256).digest(), data[HEADER_SIZE + length :]):
            return None, Reject.BAD_MAC
        self.last_sequence[sender] = sequence
        return Message(Kind(kind), sender, sequence, timestamp, key_id, bytes(data[HEADER_SIZE : HEADER_SIZE + length])), None


class SequenceCounter:
    """Sequences that only grow, across restarts too: they follow the sender's wall clock in microseconds."""

    def __init__(self) -> None:
        self._last = 0

    def next(self, wall: float) -> int:
        """The next sequence number at wall-clock time ``wall`` (seconds since the epoch)."""
        self._last = max(self._last + 1, int(wall * 1_000_000))
        return self._last


@dataclass(frozen=True)
class NodeHeartbeat:
    """What a node agent reports with each heartbeat."""

    load1: float  # 1-minute load average
    cpu: float  # busy fraction of all CPUs since the previous probe, 0..1
    response_ms: float  # the probe's response time
    interval_ms: int  # when the next heartbeat is due

    _FORMAT = struct.Struct("!fffI")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.load1, self.cpu, self.response_ms, self.interval_ms)

    @classmethod
    def unpack(cls, payload: bytes) -> "NodeHeartbeat | None":
        """The report, or None when it is not one an agent could send: floats must be finite and
        not negative (a NaN would stay in every smoothed average it entered)."""
        if len(payload) != cls._FORMAT.size:
            return None
        load1, cpu, response_ms, interval_ms = cls._FORMAT.unpack(payload)
        if not all(math.isfinite(v) and v >= 0 for v in (load1, cpu, response_ms)):
            return None
        return cls(load1, cpu, response_ms, interval_ms)


# Terms count elections (one per takeover): 2**63 is never reached honestly, and a peer that
# claims more would leave no term for this distributor's next takeover (the field is 64 bits).
MAX_TERM = 1 << 63


@dataclass(frozen=True)
class DistHeartbeat:
    """What every distributor broadcasts about itself, whatever its role."""

    role: int  # backup.roles.Role value
    priority: int
    term: int
    address: bytes  # 4 bytes: its cluster LAN address, the last tie-breaker
    caught_up: bool  # a backup whose replica is complete and current
    preempt: bool  # it would take the addresses back when it outranks the active
    sync_batch: int  # active: last batch sent; backup: last batch applied
    connections: int  # entries in its table

    _FORMAT = struct.Struct("!BBHQ4sQI")

    def pack(self) -> bytes:
        flags = (1 if self.caught_up else 0) | (2 if self.preempt else 0)
        return self._FORMAT.pack(self.role, flags, self.priority, self.term, self.address, self.sync_batch,
                                 self.connections)

    @classmethod
    def unpack(cls, payload: bytes) -> "DistHeartbeat | None":
        if len(payload) != cls._FORMAT.size:
            return None
        role, flags, priority, term, address, batch, connections = cls._FORMAT.unpack(payload)
        if term >= MAX_TERM:  # a term no election could reach; taking over after it could not be sent
            return None
        return cls(role, priority, term, address, bool(flags & 1), bool(flags & 2), batch, connections)


OPEN = 1
END = 2


@dataclass(frozen=True)
class SyncRecord:
    op: int  # OPEN or END
    key: bytes  # the connection's client -> VIP 4-tuple: 12 bytes (IPv4) or 36 (IPv6)
    backend: int  # index of the backend in its service (OPEN only)


class SyncBatch:
    """Connection table changes, in order: ``batch`` numbers datagrams consecutively per sender.

    A record is its op (the IPV6 bit set for a 36-byte IPv6 key), the key, and the backend index;
    a batch holds as many as fit in :data:`MAX_BYTES` (:data:`MAX_RECORDS` IPv4 ones).
    """

    _HEAD = struct.Struct("!QBH")
    _RECORD = struct.Struct("!B12sH")
    _RECORD6 = struct.Struct("!B36sH")
    IPV6 = 0x10  # op bit: the key is an IPv6 one
    SNAPSHOT_START = 1
    SNAPSHOT_END = 2
    MAX_BYTES = MAX_PAYLOAD - _HEAD.size  # room for records in one datagram
    MAX_RECORDS = MAX_BYTES // _RECORD.size  # IPv4 records in one datagram
    SMALLEST = _RECORD.size

    def __init__(self, batch: int, flags: int, records: list[SyncRecord]):
        self.batch = batch
        self.flags = flags
        self.records = records

    @classmethod
    def record_size(cls, key: bytes) -> int:
        """Bytes a record with this key takes in a batch."""
        return (cls._RECORD6 if len(key) == 36 else cls._RECORD).size

    def pack(self) -> bytes:
        size = sum(self.record_size(r.key) for r in self.records)
        if size > self.MAX_BYTES:
            raise ValueError(f"{len(self.records)} records ({size} bytes) exceed the {self.MAX_BYTES} bytes of a datagram")
        parts = [self._HEAD.pack(self.batch, self.flags, len(self.records))]
        for r in self.records:
            if len(r.key) == 36:
                parts.append(self._RECORD6.pack(r.op | self.IPV6, r.key, r.backend))
            elif len(r.key) == 12:
                parts.append(self._RECORD.pack(r.op, r.key, r.backend))
            else:
                raise ValueError(f"a connection key of {len(r.key)} bytes: expected 12 (IPv4) or 36 (IPv6)")
        return b"".join(parts)

    @classmethod
    def unpack(cls, payload: bytes) -> "SyncBatch | None":
        if len(payload) < cls._HEAD.size:
            return None
        batch, flags, count = cls._HEAD.unpack_from(payload)
        records = []
        offset = cls._HEAD.size
        while offset < len(payload):
            layout = cls._RECORD6 if payload[offset] & cls.IPV6 else cls._RECORD
            if offset + layout.size > len(payload):
                return None
            op, key, backend = layout.unpack_from(payload, offset)
            op &= ~cls.IPV6
            if op not in (OPEN, END):
                return None
            records.append(SyncRecord(op, key, backend))
            offset += layout.size
        if len(records) != count:
            return None
        return cls(batch, flags, records)


@dataclass(frozen=True)
class SyncRequest:
    """A standby asks for batches again (``ranges`` of batch numbers, inclusive), or for a snapshot (no range)."""

    ranges: tuple[tuple[int, int], ...] = ()

    _COUNT = struct.Struct("!H")
    _RANGE = struct.Struct("!QQ")
    MAX_RANGES = 64

    def pack(self) -> bytes:
        if len(self.ranges) > self.MAX_RANGES:
            raise ValueError(f"{len(self.ranges)} ranges exceed {self.MAX_RANGES} per request")
        return self._COUNT.pack(len(self.ranges)) + b"".join(self._RANGE.pack(a, b) for a, b in self.ranges) \
            if self.ranges else b""

    @classmethod
    def unpack(cls, payload: bytes) -> "SyncRequest | None":
        if not payload:
            return cls(())
        if len(payload) < cls._COUNT.size:
            return None
        (count,) = cls._COUNT.unpack_from(payload)
        if count > cls.MAX_RANGES or len(payload) != cls._COUNT.size + count * cls._RANGE.size:
            return None
        ranges = tuple(cls._RANGE.unpack_from(payload, cls._COUNT.size + i * cls._RANGE.size) for i in range(count))
        if any(first > last for first, last in ranges):
            return None
        return cls(ranges)


@dataclass(frozen=True)
class AdminChunk:
    """One piece of a runtime state (zlib-compressed JSON) of ``version``: piece ``index`` of ``count``."""

    version: int
    index: int
    count: int
    data: bytes

    _HEAD = struct.Struct("!QHH")
    SIZE = MAX_PAYLOAD - _HEAD.size

    def pack(self) -> bytes:
        return self._HEAD.pack(self.version, self.index, self.count) + self.data

    @classmethod
    def unpack(cls, payload: bytes) -> "AdminChunk | None":
        if len(payload) < cls._HEAD.size:
            return None
        version, index, count = cls._HEAD.unpack_from(payload)
        if not 0 <= index < count:
            return None
        return cls(version, index, count, bytes(payload[cls._HEAD.size:]))

    @classmethod
    def split(cls, version: int, text: str) -> list["AdminChunk"]:
        blob = zlib.compress(text.encode(), 6)
        pieces = [blob[i:i + cls.SIZE] for i in range(0, len(blob), cls.SIZE)] or [b""]
        return [cls(version, i, len(pieces), piece) for i, piece in enumerate(pieces)]

    @staticmethod
    def join(chunks: "list[AdminChunk]") -> str | None:
        """The text, or None when the pieces do not decompress (a corrupt or mixed set)."""
        try:
            return zlib.decompress(b"".join(c.data for c in sorted(chunks, key=lambda c: c.index))).decode()
        except (zlib.error, UnicodeDecodeError):
            return None


@dataclass(frozen=True)
class Resign:
    term: int
    stopping: bool  # True: the sender shuts down; False: it stays as a standby

    _FORMAT = struct.Struct("!QB")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.term, 1 if self.stopping else 0)

    @classmethod
    def unpack(cls, payload: bytes) -> "Resign | None":
        if len(payload) != cls._FORMAT.size:
            return None
        term, stopping = cls._FORMAT.unpack(payload)
        return cls(term, bool(stopping))
