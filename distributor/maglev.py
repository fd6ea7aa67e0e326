"""Maglev consistent hashing: a lookup table every distributor builds alike (pure).

Contract
--------
* :func:`build_table` fills a lookup table of prime size ``M`` (default
  :data:`TABLE_SIZE` = 65,537) from a set of named backends, as in section 3.4
  of the Maglev paper (Eisenbud et al., NSDI 2016): backend ``b`` prefers the
  slots ``(offset_b + j * skip_b) mod M`` for ``j = 0, 1, ...``, where
  ``offset_b`` and ``skip_b`` come from a hash of its *name*; backends take
  turns claiming their next preferred free slot until the table is full.
  Because ``M`` is prime, every ``skip`` in ``1..M-1`` walks all ``M`` slots.
* The table depends only on the set of ``(name, weight)`` pairs and ``M``:
  the order they are given in does not matter (turns go in the order of the
  names' UTF-8 bytes), nothing is salted per process (no ``hash()``), and all
  arithmetic is on integers.  Two distributors given the same set build the
  same table, entry for entry.
* Weights: a backend of weight ``w`` takes ``w`` turns for every turn of a
  weight-1 backend, interleaved by stride scheduling: the next turn goes to
  the backend with the smallest ``pass``, a turn adds ``stride = L // w`` to
  it, ties go to the earlier name.  ``L`` is the least common multiple of the
  weights, so strides are exact and ``(3, 6)`` builds the same table as
  ``(1, 2)``; when that multiple passes 2**62 (many distinct, coprime
  weights) ``L`` is 2**62 and a near-tie may fall to rounding -- still the
  same integers on every distributor.  With equal weights this *is* the
  paper's round-robin, and a faster loop computes it.  Katran's MaglevHashV2 gives the same shares (a backend takes a turn in
  a round when its accumulated weight reaches the largest weight); stride
  scheduling gets there in O(M log N) instead of O(M * max_w / mean_w * N).
  Weight 0 leaves a backend out.
* Balance: with equal weights each backend owns ``floor(M/N)`` or
  ``ceil(M/N)`` slots, so the spread between the largest and the smallest
  share is ``ceil(M/N) / floor(M/N)``; under 1 % needs ``M >= 100 N`` (the
  paper's advice), e.g. 131,071 for 1,000 backends, where 65,537 gives 1.5 %.
* Disruption: when a backend leaves, every slot it owned moves (to the
  others, spread evenly), and *a few* slots of backends that stayed move too:
  the refill is a new race, and a backend that takes a freed slot earlier
  than before skips ahead in its permutation and can claim a slot another
  backend held.  Maglev trades this small extra churn for its even balance;
  it does not promise that no flow of a staying backend moves.  Measured
  (bench/maglev_bench.py, M = 65,537): removing one of 10 backends moves its
  own 10 % of the slots plus 0.2 % of the others'; one of 100: 1 % plus
  0.6 %; one of 1,000: 0.1 % plus 0.6 %.  Modulo hashing would move
  (N-1)/N of everything.  The connection table is what keeps an established
  flow on its node when its slot moves.
* :func:`flow_slot` maps a connection's 12-byte key (``client_ip vip
  client_port vip_port``, the ``key`` of distributor/conntable.py) to a slot
  with BLAKE2b (keyed by an optional secret shared by the distributors, so
  that an outsider cannot aim flows at one slot).
* :class:`MaglevBalancer` offers the methods of
  :class:`distributor.balancer.Balancer` with ``acquire(key)``: the pick
  depends only on the flow key and the set of eligible backends, so every
  distributor sends a flow to the same node without sharing state.  Making a
  backend unavailable, or changing its weight, rebuilds the table without it
  (see :meth:`MaglevBalancer.set_available` for the cost).
"""

from __future__ import annotations

import hashlib
import heapq
import math
from array import array
from typing import Sequence

from distributor.balancer import MAX_WEIGHT, Policy

__all__ = [
    "TABLE_SIZE",
    "KEY_LENGTH",
    "MaglevTable",
    "MaglevBalancer",
    "build_table",
    "flow_slot",
    "is_prime",
    "permutation",
]

TABLE_SIZE = 65_537  # the paper's size: a prime
KEY_LENGTH = 12  # client_ip(4) vip(4) client_port(2) vip_port(2)
MAX_TABLE_SIZE = 1 << 24  # 16.7 M slots (a 64 MiB list): a sanity bound, not a limit of the method
EMPTY = -1  # slot value of a table with no backend

# Stride scheduling: a turn adds lcm(weights) // weight to the backend's pass
# (exact), or _MAX_STRIDE_BASE // weight when the multiple is larger: rounding
# then stays far below one turn over a table of up to 2**24 slots.
_MAX_STRIDE_BASE = 1 << 62
# Domain separation: these hashes mean only this, whatever else hashes names.
_PERMUTATION_PERSON = b"maglev-perm-v1"
_FLOW_PERSON = b"maglev-flow-v1"


def is_prime(n: int) -> bool:
    """Deterministic primality for table sizes (trial division: sizes are below 2**24)."""
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    limit = math.isqrt(n)
    for d in range(3, limit + 1, 2):
        if n % d == 0:
            return False
    return True


def permutation(name: str, size: int = TABLE_SIZE) -> tuple[int, int]:
    """The backend's ``(offset, skip)``: its j-th preferred slot is ``(offset + j*skip) % size``.

    Both come from one 128-bit BLAKE2b digest of the name (two independent
    64-bit halves stand for the paper's two hash functions).
    """
    digest = hashlib.blake2b(name.encode(), digest_size=16, person=_PERMUTATION_PERSON).digest()
    offset = int.from_bytes(digest[:8], "little") % size
    skip = int.from_bytes(digest[8:], "little") % (size - 1) + 1
    return offset, skip


def flow_slot(key: bytes, size: int = TABLE_SIZE, secret: bytes = b"") -> int:
    """The table slot of a flow: BLAKE2b-64 of its 12-byte key, modulo the table size.

    ``secret`` (up to 64 bytes, the same on every distributor) keys the hash.
    """
    digest = hashlib.blake2b(key, digest_size=8, key=secret, person=_FLOW_PERSON).digest()
    return int.from_bytes(digest, "little") % size


class MaglevTable:
    """A filled lookup table: ``slots[i]`` is the position (in ``names``) of the backend owning slot i."""

    __slots__ = ("size", "names", "weights", "slots")

    def __init__(self, size: int, names: tuple[str, ...], weights: tuple[int, ...], slots: array):
        self.size = size
        self.names = names  # sorted: the turn order
        self.weights = weights
        self.slots = slots

    def owner(self, slot: int) -> str | None:
        index = self.slots[slot]
        return None if index == EMPTY else self.names[index]

    def owners(self) -> list[str | None]:
        """Every slot's backend name: what two distributors compare."""
        names = self.names
        return [None if i == EMPTY else names[i] for i in self.slots]

    def shares(self) -> dict[str, int]:
        """How many slots each backend owns."""
        counts = [0] * len(self.names)
        for index in self.slots:
            if index != EMPTY:
                counts[index] += 1
        return dict(zip(self.names, counts))


def build_table(backends: dict[str, int] | Sequence[tuple[str, int]], size: int = TABLE_SIZE) -> MaglevTable:
    """Fill a Maglev table for ``backends`` (name -> weight, or (name, weight) pairs).

    Raises ``ValueError`` for a size that is not a prime in ``2..MAX_TABLE_SIZE``,
    a duplicate name, a weight outside ``0..MAX_WEIGHT``, or more backends of
    positive weight than slots.
    """
    if not isinstance(size, int) or not 2 <= size <= MAX_TABLE_SIZE or not is_prime(size):
        raise ValueError(f"table size {size!r} must be a prime from 2 to {MAX_TABLE_SIZE} (e.g. 65537, 131071)")
    pairs = list(backends.items()) if isinstance(backends, dict) else list(backends)
    seen: set[str] = set()
    for name, weight in pairs:
        if not isinstance(name, str) or not name:
            raise ValueError(f"backend name {name!r} must be a non-empty string")
        if name in seen:
            raise ValueError(f"backend name {name!r} is given twice; names must be unique")
        seen.add(name)
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"backend {name!r}: weight {weight!r} must be an integer from 0 to {MAX_WEIGHT}")
    # Turn order by the names' bytes, not by the caller's order (identical tables everywhere).
    live = sorted(((name, weight) for name, weight in pairs if weight > 0), key=lambda p: p[0].encode())
    names = tuple(name for name, _ in live)
    weights = tuple(weight for _, weight in live)
    if len(live) > size:
        raise ValueError(f"{len(live)} backends of positive weight do not fit a table of {size} slots; "
                         f"use a prime size of at least 100 x the backends")
    slots = array("i", [EMPTY]) * size
    if live:
        starts = [permutation(name, size) for name in names]
        if all(w == weights[0] for w in weights):
            _fill_round_robin(slots, starts, size)
        else:
            _fill_weighted(slots, starts, weights, size)
    return MaglevTable(size, names, weights, slots)


def _fill_round_robin(slots: array, starts: list[tuple[int, int]], size: int) -> None:
    # The paper's Populate(): each backend in turn claims its next free preferred slot.
    # ``position[b]`` is the next slot of b's permutation to try: adding skip
    # (and folding once) walks (offset + j*skip) mod M without a multiplication.
    position = [offset for offset, _ in starts]
    skips = [skip for _, skip in starts]
    backends = range(len(starts))
    free = size
    while True:
        for b in backends:
            pos = position[b]
            skip = skips[b]
            while slots[pos] != EMPTY:
                pos += skip
                if pos >= size:
                    pos -= size
            slots[pos] = b
            pos += skip
            position[b] = pos - size if pos >= size else pos
            free -= 1
            if not free:
                return


def _fill_weighted(slots: array, starts: list[tuple[int, int]], weights: tuple[int, ...], size: int) -> None:
    # Stride scheduling over a heap of (pass, backend): the smallest pass takes
    # the next turn, ties go to the earlier name.  Starting every pass at its
    # stride lets the heaviest backends lead the first round; with equal
    # weights the order is exactly _fill_round_robin's.
    position = [offset for offset, _ in starts]
    skips = [skip for _, skip in starts]
    base = math.lcm(*weights)
    if base > _MAX_STRIDE_BASE:
        base = _MAX_STRIDE_BASE
    strides = [base // w for w in weights]
    heap = [(strides[b], b) for b in range(len(starts))]
    heapq.heapify(heap)
    free = size
    while True:
        passed, b = heap[0]
        pos = position[b]
        skip = skips[b]
        while slots[pos] != EMPTY:
            pos += skip
            if pos >= size:
                pos -= size
        slots[pos] = b
        pos += skip
        position[b] = pos - size if pos >= size else pos
        free -= 1
        if not free:
            return
        heapq.heapreplace(heap, (passed + strides[b], b))


class MaglevBalancer:
    """The ``maglev`` policy: the same methods as ``Balancer``, with ``acquire(key)``.

    Backends are identified by their index ``0..n-1`` as in ``Balancer``; the
    table is built from their *names* (which every distributor shares), so the
    index order is the caller's business.  Only eligible backends (available
    and of positive weight) are in the table; a change of eligibility or
    weight rebuilds it at once, so an unavailable backend never receives a
    new connection.

    ``set_ramp`` is recorded but does not change the table: a slow-start ramp
    follows each distributor's own clock, and tables that differ between
    distributors would send a flow that the router moves to a different node.
    """

    policy = Policy.MAGLEV

    def __init__(self, names: Sequence[str], weights: Sequence[int], size: int = TABLE_SIZE,
                 secret: bytes = b"", available: Sequence[bool] | None = None):
        if not names:
            raise ValueError("a balancer needs at least one backend")
        if len(names) != len(weights):
            raise ValueError(f"{len(names)} names but {len(weights)} weights; give one weight per backend")
        if len(secret) > 64:
            raise ValueError(f"flow hash secret of {len(secret)} bytes is too long; BLAKE2b keys are at most 64 bytes")
        self._names = list(names)
        self._count = len(self._names)
        self._weights = list(weights)
        # A backend taken out of its service stays here, unavailable (indexes never move), so a
        # name may repeat among the unavailable ones; the table is built from the available ones.
        self._available = list(available) if available is not None else [True] * self._count
        if len(self._available) != self._count:
            raise ValueError(f"{len(self._available)} availability flags for {self._count} backends")
        self._ramp = [1.0] * self._count
        self._feedback = [1.0] * self._count
        self._outstanding = [0] * self._count
        self.acquired = [0] * self._count  # connections ever given to each backend
        self._size = size
        self._secret = secret
        self.rebuilds = 0
        self._table: MaglevTable
        self._slot_backend: list[int | None]
        self._rebuild()  # validates names, weights and size

    # -- queries -----------------------------------------------------------
    def __len__(self) -> int:
        return self._count

    def outstanding(self, index: int) -> int:
        return self._outstanding[index]

    def weight(self, index: int) -> int:
        return self._weights[index]

    def ramp(self, index: int) -> float:
        return self._ramp[index]

    def feedback(self, index: int) -> float:
        return self._feedback[index]

    def effective_weight(self, index: int) -> float:
        """The weight the table gives the backend: its weight while eligible (ramps and feedback do
        not reshape the table; see the class docstring)."""
        return float(self._weights[index]) if self.eligible(index) else 0.0

    def is_available(self, index: int) -> bool:
        return self._available[index]

    def eligible(self, index: int) -> bool:
        """True when the backend may receive a new connection now (it is in the table)."""
        return self._available[index] and self._weights[index] > 0

    @property
    def table(self) -> MaglevTable:
        return self._table

    def lookup(self, key: bytes, avoid: int | None = None) -> int | None:
        """The backend index the table gives this flow key, without counting a connection.

        ``avoid``: a backend this flow must not go to (it failed the flow's handshake): the next
        slots after the flow's own are tried in order, which every distributor does alike, so the
        table need not be rebuilt for one flow.
        """
        if len(key) != KEY_LENGTH:
            raise ValueError(f"flow key of {len(key)} bytes; expected {KEY_LENGTH} "
                             f"(client_ip vip client_port vip_port)")
        slot = flow_slot(key, self._size, self._secret)
        index = self._slot_backend[slot]
        if avoid is None or index != avoid:
            return index
        slots = self._slot_backend
        for step in range(1, self._size):
            other = slots[(slot + step) % self._size]
            if other is not None and other != avoid:
                return other
        return None  # the avoided backend is the only one in the table

    def peek(self, key: bytes | None = None) -> int | None:
        """The backend a new connection with this key would get (None without a key: no order to tell)."""
        return self.lookup(key) if key is not None else None

    # -- decisions ---------------------------------------------------------
    def acquire(self, key: bytes, avoid: int | None = None) -> int | None:
        """Count a new connection on the flow's backend and return its index; None when none is eligible."""
        index = self.lookup(key, avoid)
        if index is not None:
            self._outstanding[index] += 1
            self.acquired[index] += 1
        return index

    def acquire_at(self, index: int) -> None:
        """Count a new connection placed on ``index`` by the caller's choice (persistence)."""
        self._outstanding[index] += 1
        self.acquired[index] += 1

    def take(self, index: int) -> None:
        """Count an open connection placed on ``index`` by someone else (a replicated one)."""
        self._outstanding[index] += 1

    def release(self, index: int) -> None:
        if self._outstanding[index] <= 0:
            raise ValueError(f"backend {index} has no open connection to release")
        self._outstanding[index] -= 1

    def add(self, weight: int, name: str | None = None) -> int:
        """A new backend, available, with no connection; returns its index (the next one)."""
        if not name:
            raise ValueError("a Maglev backend needs its name: the table is built from names")
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"backend {self._count}: weight {weight!r} must be an integer from 0 to {MAX_WEIGHT}")
        self._names.append(name)
        self._weights.append(weight)
        self._available.append(True)
        self._ramp.append(1.0)
        self._feedback.append(1.0)
        self._outstanding.append(0)
        self.acquired.append(0)
        self._count += 1
        try:
            self._rebuild()
        except ValueError:
            for values in (self._names, self._weights, self._available, self._ramp, self._feedback,
                           self._outstanding, self.acquired):
                values.pop()
            self._count -= 1
            raise
        return self._count - 1

    def set_policy(self, policy: Policy) -> None:
        if policy is not Policy.MAGLEV:
            raise ValueError(f"a MaglevBalancer cannot balance by {policy.value} (reroute.Service.set_policy swaps "
                             "the balancer)")

    def set_available(self, index: int, available: bool) -> None:
        """Gate a backend; a change rebuilds the table at once.

        Measured (bench/maglev_bench.py, M = 65,537): 22 ms at 10 backends,
        43 ms at 1,000; twice that at M = 131,071.  The daemon is
        single-threaded, so packets queue meanwhile: 43 ms at the rewrite
        mode's ~56,000 packets/s is ~2,400 packets, inside the 4,096-packet
        queue (distributor/datapath.py), so a rebuild on a health event is
        a pause, not a loss.  Tables of 131,071 slots and more should be
        built off the packet path (a worker process) and swapped in.
        """
        if self._available[index] == available:
            return
        self._available[index] = available
        self._rebuild()

    def set_weight(self, index: int, weight: int) -> None:
        if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
            raise ValueError(f"backend {index}: weight {weight!r} must be an integer from 0 to {MAX_WEIGHT}")
        if self._weights[index] == weight:
            return
        self._weights[index] = weight
        self._rebuild()

    def set_ramp(self, index: int, factor: float) -> None:
        """Recorded only: see the class docstring for why a ramp does not reshape the table."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"ramp factor {factor!r} must be in (0, 1]")
        self._ramp[index] = factor

    def set_feedback(self, index: int, factor: float) -> None:
        """Recorded only, as a ramp: a node's reports differ between distributors' views of it."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"feedback factor {factor!r} must be in (0, 1]")
        self._feedback[index] = factor

    # -- internals ---------------------------------------------------------
    def _rebuild(self) -> None:
        live = [(name, self._weights[i]) for i, name in enumerate(self._names) if self._available[i]]
        index_of = {name: i for i, name in enumerate(self._names) if self._available[i]}
        if len(index_of) != len(live):
            twice = sorted({n for n, _ in live if sum(1 for m, _ in live if m == n) > 1})
            raise ValueError(f"backend names {twice!r} are given twice; names must be unique")
        self._table = build_table(live, self._size)
        # Table positions are sorted names; map them to the caller's indexes once,
        # so a lookup is one hash and two list reads.
        to_index = [index_of[name] for name in self._table.names]
        self._slot_backend = [None if s == EMPTY else to_index[s] for s in self._table.slots]
        self.rebuilds += 1
