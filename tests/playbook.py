"""Playbooks for sans-io cores: feed an event, state the commands that must come out.

In the style of mitmproxy's ``Playbook``: a test reads as a script of events and the commands each
must produce, in order.  ``Log`` and ``WakeUpAt`` commands are left out of the comparison unless the
test asks for them (``keep=``), so a playbook states decisions, not wording.  An expected item is a
command (compared with ``==``), a command class (any instance matches), or a predicate.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable

from common.sansio import Log, WakeUpAt

__all__ = ["Playbook", "only"]

_QUIET = (Log, WakeUpAt)


def _matches(expected: Any, command: Any) -> bool:
    if isinstance(expected, type):
        return isinstance(command, expected)
    if callable(expected) and not hasattr(expected, "__dataclass_fields__"):
        return bool(expected(command))
    return expected == command


def only(kinds: tuple[type, ...], commands: Iterable) -> list:
    return [c for c in commands if isinstance(c, kinds)]


class Playbook:
    def __init__(self, core, keep: tuple[type, ...] = ()):
        self.core = core
        self.keep = keep
        self.history: list[tuple[Any, list]] = []
        self.last: list = []

    def __call__(self, event: Any) -> "Playbook":
        self.last = self.core.handle(event)
        self.history.append((event, self.last))
        return self

    @property
    def decisions(self) -> list:
        """The last answer without Log/WakeUpAt (unless kept)."""
        return [c for c in self.last if not isinstance(c, _QUIET) or isinstance(c, self.keep)]

    def expect(self, *expected: Any) -> "Playbook":
        got = self.decisions
        if len(got) != len(expected) or not all(_matches(e, c) for e, c in zip(expected, got)):
            lines = "\n  ".join(repr(c) for c in got) or "(nothing)"
            want = "\n  ".join(repr(e) for e in expected) or "(nothing)"
            raise AssertionError(f"commands differ\nexpected:\n  {want}\ngot:\n  {lines}")
        return self

    def expect_nothing(self) -> "Playbook":
        return self.expect()

    def of(self, kind: type) -> list:
        return [c for c in self.last if isinstance(c, kind)]

    def logged(self, text: str) -> bool:
        return any(isinstance(c, Log) and text in c.message for c in self.last)

    def wake_at(self) -> float | None:
        wakes = [c.at for c in self.last if isinstance(c, WakeUpAt)]
        return wakes[-1] if wakes else None


def first(commands: Iterable, predicate: Callable[[Any], bool]) -> Any:
    return next(c for c in commands if predicate(c))
