"""When an active-active distributor announces its VIPs to the router (pure).

Contract
--------
In active-active mode (``[announce]``, docs/scale-out.md) every distributor serves every VIP at
once, and the router spreads flows over those that announce it (BGP, by the BIRD that the daemon
runs).  A distributor must announce a VIP only while it can serve it, or the router keeps sending
it flows it would drop.  :class:`AnnounceCore` decides, one state machine per VIP:

* events in: :class:`ServingChanged` (whether the VIP can be served now: this distributor's data
  path rules are installed *and* one of the VIP's services has a node that may take a new
  connection; the distributor core computes it) and :class:`~common.sansio.StopRequested`;
* commands out: :class:`AnnounceRoute` and :class:`WithdrawRoute` (the adapter puts the VIP's
  route in, or takes it out of, the kernel table that BIRD exports), and one
  :class:`~common.sansio.Log` per transition.

The transitions are a table keyed by (state, event); each is counted (:attr:`AnnounceCore.counts`).
A stopped distributor withdraws and never announces again.  Withdrawal on a crash is not this
core's: BIRD dies with the daemon (the adapter starts it so), and the router drops the paths as its
BGP session closes.
"""

from __future__ import annotations

import dataclasses
import enum
from typing import Iterable

from common.sansio import Command, Level, Log, StopRequested

__all__ = ["AnnounceState", "AnnounceEvent", "AnnounceCore", "ServingChanged", "AnnounceRoute", "WithdrawRoute",
           "TRANSITIONS"]


class AnnounceState(enum.Enum):
    WITHDRAWN = "withdrawn"
    ANNOUNCED = "announced"
    STOPPED = "stopped"


class AnnounceEvent(enum.Enum):
    CAN_SERVE = "can_serve"
    CANNOT_SERVE = "cannot_serve"
    STOP = "stop"


# (state, event) -> new state; a pair not listed changes nothing.
TRANSITIONS: dict[tuple[AnnounceState, AnnounceEvent], AnnounceState] = {
    (AnnounceState.WITHDRAWN, AnnounceEvent.CAN_SERVE): AnnounceState.ANNOUNCED,
    (AnnounceState.WITHDRAWN, AnnounceEvent.STOP): AnnounceState.STOPPED,
    (AnnounceState.ANNOUNCED, AnnounceEvent.CANNOT_SERVE): AnnounceState.WITHDRAWN,
    (AnnounceState.ANNOUNCED, AnnounceEvent.STOP): AnnounceState.STOPPED,
}


@dataclasses.dataclass(frozen=True)
class ServingChanged:
    """Whether ``vip`` can be served now, and why not (said in the withdrawal's log line)."""

    vip: str
    serving: bool
    why: str = ""


@dataclasses.dataclass(frozen=True)
class AnnounceRoute(Command):
    vip: str


@dataclasses.dataclass(frozen=True)
class WithdrawRoute(Command):
    vip: str


class AnnounceCore:
    def __init__(self, vips: Iterable[str]):
        self.states: dict[str, AnnounceState] = {vip: AnnounceState.WITHDRAWN for vip in vips}
        if not self.states:
            raise ValueError("announcing needs at least one VIP")
        self.counts: dict[tuple[AnnounceState, AnnounceState], int] = {}

    def start(self) -> list[Command]:
        """A route a crashed run left in the table goes first: nothing is announced before it can be served."""
        return [WithdrawRoute(vip) for vip in self.states]

    def handle(self, event) -> list[Command]:
        if isinstance(event, ServingChanged):
            if event.vip not in self.states:
                raise ValueError(f"VIP {event.vip!r} is not announced here; announced: {', '.join(self.states)}")
            kind = AnnounceEvent.CAN_SERVE if event.serving else AnnounceEvent.CANNOT_SERVE
            return self._apply(event.vip, kind, event.why)
        if isinstance(event, StopRequested):
            commands: list[Command] = []
            for vip in self.states:
                commands += self._apply(vip, AnnounceEvent.STOP, "stopping")
            return commands
        raise TypeError(f"the announce core takes no {type(event).__name__} event")

    def _apply(self, vip: str, event: AnnounceEvent, why: str) -> list[Command]:
        state = self.states[vip]
        new = TRANSITIONS.get((state, event))
        if new is None:
            return []
        self.states[vip] = new
        self.counts[(state, new)] = self.counts.get((state, new), 0) + 1
        if new is AnnounceState.ANNOUNCED:
            return [AnnounceRoute(vip), Log(Level.INFO, f"announcing VIP {vip}: this distributor can serve it")]
        if state is AnnounceState.ANNOUNCED:
            return [WithdrawRoute(vip), Log(Level.WARNING, f"withdrawing VIP {vip}: {why or 'it cannot be served'}")]
        return []  # stopped while withdrawn: nothing to take back

    def announced(self, vip: str) -> bool:
        return self.states.get(vip) is AnnounceState.ANNOUNCED
