"""Events and commands every sans-io core shares (pure).

A core is a function of events: ``core.handle(event) -> list[Command]``.  Time is an event
(:class:`Tick`), a timer is a command (:class:`WakeUpAt`), as in mitmproxy's proxy layers
(``RequestWakeup`` / ``Wakeup``).  Adapters turn the world into events and execute commands; they
decide nothing.  Events and commands are frozen dataclasses, so a test can write a playbook as a
list of ``(event, expected commands)`` and compare with ``==``.

Every event carries ``now`` (the monotonic clock, seconds) and, where a datagram is sealed or
checked for freshness, ``wall`` (seconds since the epoch): the core never reads a clock.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

__all__ = ["Level", "Tick", "StopRequested", "CommandDone", "Command", "Send", "Log", "Alert", "WakeUpAt",
           "earliest"]


class Level(enum.IntEnum):
    """Log priority of a :class:`Log` command (the values of the ``logging`` module's levels)."""

    DEBUG = 10
    INFO = 20
    WARNING = 30
    ERROR = 40


# -- events --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Tick:
    """Time has passed: the core does whatever became due by ``now``."""

    now: float
    wall: float


@dataclass(frozen=True)
class StopRequested:
    """The program is asked to stop (SIGTERM, SIGINT)."""

    now: float
    wall: float


@dataclass(frozen=True)
class CommandDone:
    """An adapter finished a command that takes time (netlink, iptables); ``error`` says why it failed."""

    command: "Command"
    now: float
    error: str | None = None


# -- commands --------------------------------------------------------------------------------------
class Command:
    """Base of every command a core returns; adapters dispatch on the concrete type."""

    __slots__ = ()


@dataclass(frozen=True)
class Send(Command):
    """Send one UDP datagram (already sealed) to ``destination`` (address, port)."""

    data: bytes
    destination: tuple[str, int]


@dataclass(frozen=True)
class Log(Command):
    level: Level
    message: str


@dataclass(frozen=True)
class Alert(Command):
    """A state change an operator is told about (log, alert file, mail): ``subject`` went ``old`` -> ``new``.

    ``level`` is the core's judgement of it: a node failing is a WARNING, a node coming back is not.
    """

    subject: str
    old: str
    new: str
    reason: str
    level: "Level" = field(default=None, compare=False)  # type: ignore[assignment]  # None: WARNING

    def __post_init__(self) -> None:
        if self.level is None:
            object.__setattr__(self, "level", Level.WARNING)


@dataclass(frozen=True)
class WakeUpAt(Command):
    """Deliver a :class:`Tick` no later than ``at`` (monotonic seconds); a later request replaces it."""

    at: float


def earliest(*times: float | None) -> float | None:
    """The earliest of the given deadlines (None: no deadline)."""
    found = [t for t in times if t is not None]
    return min(found) if found else None
