"""State machines as tables keyed by (state, event), shared by every core (pure).

Contract
--------
A :class:`TransitionTable` is built once from ``{(state, event): (new_state, action)}`` (the
action may be ``None``); states and events are enums.  :meth:`TransitionTable.move` looks the
pair up: an absent pair raises :class:`IllegalTransition` naming the machine, the state and the
event, so an impossible move is a loud bug, never a silent one.  A move to a different state is
counted in :attr:`TransitionTable.counts` by ``(old, new)``; a self-loop is allowed but neither
counted nor reported, so the caller logs each real transition exactly once.

The table keeps no per-object state: the state lives on the object (a connection, a node, a
role machine), so one table serves a million connections without a machine object each.  This
is the shape of h11's ``_state.py``: all the legal moves in one place, readable as a table.
"""

from __future__ import annotations

import collections
import enum
from typing import Generic, Hashable, Iterable, Mapping, TypeVar

__all__ = ["IllegalTransition", "TransitionTable"]

S = TypeVar("S", bound=enum.Enum)
E = TypeVar("E", bound=enum.Enum)
A = TypeVar("A", bound=Hashable)


class IllegalTransition(RuntimeError):
    pass


class TransitionTable(Generic[S, E, A]):
    def __init__(self, name: str, moves: Mapping[tuple[S, E], tuple[S, A | None]]):
        self.name = name
        self._moves = dict(moves)
        self.counts: collections.Counter[tuple[S, S]] = collections.Counter()

    def allowed(self, state: S, event: E) -> bool:
        return (state, event) in self._moves

    def target(self, state: S, event: E) -> tuple[S, A | None]:
        """The (new state, action) of ``event`` in ``state``; raises IllegalTransition when there is none."""
        try:
            return self._moves[(state, event)]
        except KeyError:
            raise IllegalTransition(f"{self.name}: event {event.name} is not allowed in state {state.name}") from None

    def move(self, state: S, event: E, who: str = "") -> tuple[S, A | None, bool]:
        """``(new state, action, changed)`` for ``event`` in ``state``; counts the move when the state changes."""
        try:
            new, action = self._moves[(state, event)]
        except KeyError:
            subject = f" ({who})" if who else ""
            raise IllegalTransition(f"{self.name}{subject}: event {event.name} is not allowed in state {state.name}") from None
        if new is not state:
            self.counts[(state, new)] += 1
            return new, action, True
        return new, action, False

    def states(self) -> set[S]:
        found: set[S] = set()
        for (state, _), (new, _) in self._moves.items():
            found.update((state, new))
        return found

    def rows(self) -> Iterable[tuple[S, E, S, A | None]]:
        """Every legal move, for documentation and tests."""
        for (state, event), (new, action) in self._moves.items():
            yield state, event, new, action
