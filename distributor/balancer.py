"""Node selection policies: pure code, no I/O, no clock.

Contract
--------
A :class:`Balancer` chooses one of ``n`` backends (identified by their index
``0..n-1``) for each new connection and keeps the per-backend count of open
("outstanding") connections that the caller reports back:

* :meth:`Balancer.acquire` picks a backend for a new connection, counts the
  connection as open on it and returns its index, or ``None`` when no backend
  may take new connections (all unavailable or of weight 0).
* :meth:`Balancer.release` is called exactly once when a connection acquired
  on a backend ends (both FINs, RST or idle expiry).
* :meth:`Balancer.set_available` gates a backend for *new* connections (the
  heartbeat counters drive it); open connections are not touched.
* :meth:`Balancer.set_weight` changes a weight at run time; weight 0 quiesces.
* :meth:`Balancer.set_ramp` scales a backend's effective weight by a factor in
  (0, 1] during slow start.
* :meth:`Balancer.add` appends a backend at run time (indexes never change);
  :meth:`Balancer.set_policy` changes the policy, keeping every count;
  :meth:`Balancer.peek` says which backend the next :meth:`acquire` would pick.

Policies: round-robin and weighted round-robin (both stride scheduling, so
the interleaving is smooth rather than bursty and a slow-start ramp applies), least-outstanding and weighted
least-outstanding (fewest ``(open + 1) / weight``; the ``+1`` makes a heavier
backend win when both are idle, as HAProxy's leastconn does), and feedback:
weighted least-outstanding where each weight is also scaled by a factor in
(0, 1] the node's own reports give (:meth:`Balancer.set_feedback`; see
:func:`distributor.heartbeat.feedback_factors`), so a slow or loaded node gets
smoothly less new work, never none while it heartbeats.

Every policy is expressed as a sort key per backend; a tournament tree over
the keys yields the minimum at its root, so a pick and every update cost
O(log n) key comparisons.  Ties are broken by the least recently picked
backend, which keeps least-outstanding fair when connections are so short
that every backend sits at zero.
"""

from __future__ import annotations

import enum
from typing import Sequence

__all__ = ["Policy", "Balancer"]

# Stride scheduling: a backend of weight w advances its pass by STRIDE // w on
# each pick.  A large constant keeps the integer rounding error negligible for
# weights up to MAX_WEIGHT.
_STRIDE = 1 << 40
MAX_WEIGHT = 10_000

# Leading element of a key: available backends sort before unavailable ones.
_AVAILABLE = 0
_UNAVAILABLE = 1
_NO_LEAF = -1


class Policy(enum.Enum):
    ROUND_ROBIN = "round-robin"
    WEIGHTED_ROUND_ROBIN = "weighted-round-robin"
    LEAST_OUTSTANDING = "least-outstanding"
    WEIGHTED_LEAST_OUTSTANDING = "weighted-least-outstanding"
    FEEDBACK = "feedback"  # weighted least-outstanding, each weight scaled by what the node reports
    # Consistent hashing of the connection's 4-tuple (distributor/maglev.py): every distributor
    # given the same nodes picks the same one, with no shared state (for scale-out).
    MAGLEV = "maglev"

    @classmethod
    def parse(cls, text: str) -> "Policy":
        for policy in cls:
            if policy.value == text:
                return policy
        valid = ", ".join(p.value for p in cls)
        raise ValueError(f"unknown balancing policy {text!r}; valid policies: {valid}")


# Round-robin is stride scheduling with equal weights: the ramp then works alike.
_STRIDE_POLICIES = (Policy.ROUND_ROBIN, Policy.WEIGHTED_ROUND_ROBIN)
# Policies whose keys depend on the open-connection counts.
_COUNTING_POLICIES = (Policy.LEAST_OUTSTANDING, Policy.WEIGHTED_LEAST_OUTSTANDING, Policy.FEEDBACK)


class Balancer:
    """Chooses a backend per new connection; see the module docstring."""

    def __init__(self, policy: Policy, weights: Sequence[int]):
        if policy is Policy.MAGLEV:
            raise ValueError("the maglev policy hashes flows: use distributor.maglev.MaglevBalancer")
        if not weights:
            raise ValueError("a balancer needs at least one backend")
        for index, weight in enumerate(weights):
            _check_weight(index, weight)
        self.policy = policy
        self._count = len(weights)
        self._weights = list(weights)
        self._ramp = [1.0] * self._count
        self._feedback = [1.0] * self._count
        self._available = [True] * self._count
        self._outstanding = [0] * self._count
        self._last_pick = [0] * self._count
        self._pass = [0] * self._count
        self._picks = 0
        self.acquired = [0] * self._count  # connections ever given to each backend
        self._build()

    def _build(self) -> None:
        size = 1
        while size < self._count:
            size <<= 1
        self._size = size
        self._keys: list[tuple] = [self._key(i) for i in range(self._count)]
        self._tree = [_NO_LEAF] * (2 * size)
        for i in range(self._count):
            self._tree[size + i] = i
        for pos in range(size - 1, 0, -1):
            self._tree[pos] = self._winner(self._tree[2 * pos], self._tree[2 * pos + 1])

    def add(self, weight: int, name: str | None = None) -> int:
        """A new backend, available, with no connection; returns its index (the next one).

        ``name`` is ignored here (MaglevBalancer needs it: its table is built from names)."""
        index = self._count
        _check_weight(index, weight)
        self._count += 1
        self._weights.append(weight)
        self._ramp.append(1.0)
        self._feedback.append(1.0)
        self._available.append(True)
        self._outstanding.append(0)
        self._last_pick.append(0)
        # It starts level with the others: stride scheduling must not owe it every pick it missed.
        self._pass.append(min((self._pass[i] for i in range(index) if self.eligible(i)), default=0))
        self.acquired.append(0)
        self._build()
        return index

    def set_policy(self, policy: Policy) -> None:
        """Change the policy at run time; open-connection counts and weights stay."""
        if policy is self.policy:
            return
        if policy is Policy.MAGLEV:
            raise ValueError("the maglev policy needs a MaglevBalancer (reroute.Service.set_policy swaps it in)")
        self.policy = policy
        self._pass = [0] * self._count
        self._build()

    def peek(self, key: bytes | None = None) -> int | None:
        """The backend the next acquire() would pick, without picking it (None: no candidate).

        ``key`` is ignored here, as by :meth:`acquire`."""
        best = self._tree[1]
        if best == _NO_LEAF or self._keys[best][0] != _AVAILABLE:
            return None
        return best

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
        """The weight this policy gives the backend now: its weight, ramp and (feedback policy) its factor."""
        return self._effective_weight(index) if self._available[index] and self._weights[index] else 0.0

    def is_available(self, index: int) -> bool:
        return self._available[index]

    def eligible(self, index: int) -> bool:
        """True when the backend may receive a new connection now."""
        return self._keys[index][0] == _AVAILABLE

    # -- decisions ---------------------------------------------------------
    def acquire(self, key: bytes | None = None) -> int | None:
        # ``key`` (the flow's 12-byte key) is ignored here; it lets the caller
        # treat this and distributor.maglev.MaglevBalancer alike.
        best = self._tree[1]
        if best == _NO_LEAF or self._keys[best][0] != _AVAILABLE:
            return None
        self._picks += 1
        self._last_pick[best] = self._picks
        if self.policy in _STRIDE_POLICIES:
            self._pass[best] += self._stride(best)
        self._outstanding[best] += 1
        self.acquired[best] += 1
        self._update(best)
        return best

    def acquire_at(self, index: int) -> None:
        """Count a new connection placed on ``index`` by the caller's choice (persistence), as a pick there."""
        self._picks += 1
        self._last_pick[index] = self._picks
        if self.policy in _STRIDE_POLICIES:
            self._pass[index] += self._stride(index)
        self._outstanding[index] += 1
        self.acquired[index] += 1
        self._update(index)

    def take(self, index: int) -> None:
        """Count an open connection placed on ``index`` by someone else (a replicated one)."""
        self._outstanding[index] += 1
        if self.policy in _COUNTING_POLICIES:
            self._update(index)

    def release(self, index: int) -> None:
        if self._outstanding[index] <= 0:
            raise ValueError(f"backend {index} has no open connection to release")
        self._outstanding[index] -= 1
        if self.policy in _COUNTING_POLICIES:
            self._update(index)

    def set_available(self, index: int, available: bool) -> None:
        if self._available[index] == available:
            return
        self._available[index] = available
        if available:
            self._rejoin(index)
        self._update(index)

    def set_weight(self, index: int, weight: int) -> None:
        _check_weight(index, weight)
        was_eligible = self.eligible(index)
        self._weights[index] = weight
        if weight and not was_eligible and self._available[index]:
            self._rejoin(index)
        self._update(index)

    def set_feedback(self, index: int, factor: float) -> None:
        """Scale the backend's weight by what it reports (feedback policy only); a factor in (0, 1]."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"feedback factor {factor!r} must be in (0, 1]")
        self._feedback[index] = factor
        if self.policy is Policy.FEEDBACK:
            self._update(index)

    def set_ramp(self, index: int, factor: float) -> None:
        """Scale the backend's effective weight (slow start); 1.0 is full share."""
        if not 0.0 < factor <= 1.0:
            raise ValueError(f"ramp factor {factor!r} must be in (0, 1]")
        self._ramp[index] = factor
        self._update(index)

    # -- internals ---------------------------------------------------------
    def _effective_weight(self, index: int) -> float:
        # Round-robin ignores configured weights but honours the slow-start ramp.
        base = 1 if self.policy is Policy.ROUND_ROBIN else self._weights[index]
        if self.policy is Policy.FEEDBACK:
            return base * self._ramp[index] * self._feedback[index]
        return base * self._ramp[index]

    def _stride(self, index: int) -> int:
        return int(_STRIDE / self._effective_weight(index))

    def _rejoin(self, index: int) -> None:
        # A backend coming back must not be owed the picks it missed: stride
        # scheduling would otherwise give it every connection until its pass
        # catches up.  Start it at the smallest pass among eligible backends.
        if self.policy in _STRIDE_POLICIES:
            best = self._tree[1]
            if best != _NO_LEAF and self._keys[best][0] == _AVAILABLE and best != index:
                self._pass[index] = max(self._pass[index], self._pass[best])

    def _key(self, i: int) -> tuple:
        if not self._available[i] or self._weights[i] == 0:
            return (_UNAVAILABLE, 0, 0)
        policy = self.policy
        if policy is Policy.LEAST_OUTSTANDING:
            ramp = self._ramp[i]
            load = self._outstanding[i] + 1
            return (_AVAILABLE, load if ramp == 1.0 else load / ramp, self._last_pick[i])
        if policy is Policy.WEIGHTED_LEAST_OUTSTANDING or policy is Policy.FEEDBACK:
            return (_AVAILABLE, (self._outstanding[i] + 1) / self._effective_weight(i), self._last_pick[i])
        return (_AVAILABLE, self._pass[i], self._last_pick[i])

    def _winner(self, left: int, right: int) -> int:
        if right == _NO_LEAF:
            return left
        if left == _NO_LEAF:
            return right
        return left if self._keys[left] <= self._keys[right] else right

    def _update(self, index: int) -> None:
        keys = self._keys
        tree = self._tree
        keys[index] = self._key(index)
        pos = (self._size + index) >> 1
        while pos:
            left = tree[2 * pos]
            right = tree[2 * pos + 1]
            if right == _NO_LEAF:
                tree[pos] = left
            elif left == _NO_LEAF:
                tree[pos] = right
            else:
                tree[pos] = left if keys[left] <= keys[right] else right
            pos >>= 1


def _check_weight(index: int, weight: int) -> None:
    if not isinstance(weight, int) or isinstance(weight, bool) or not 0 <= weight <= MAX_WEIGHT:
        raise ValueError(f"backend {index}: weight {weight!r} must be an integer from 0 to {MAX_WEIGHT}")
