"""Runs a sans-io core on an asyncio loop: events in, commands executed, one timer (adapter).

Contract
--------
:class:`Runtime` feeds events to ``core.handle`` and executes the commands it returns through a
table of executors keyed by command type (``{Send: ..., InstallRules: ...}``): it holds no ``if``
about what the core decided, only about how a command is carried out.

* :class:`~common.sansio.WakeUpAt` sets the single timer; when it fires, the runtime feeds a
  :class:`~common.sansio.Tick` with the current monotonic and wall clocks.
* An executor is either a plain function (run at once, in order) or a coroutine function (it takes
  time: netlink, iptables).  Within one answer of the core, the commands after a slow one wait for it,
  so an order such as "rules, then addresses, then announcements" holds; commands of later answers
  that come before any slow one run at once, so heartbeats and the data path never wait behind
  netlink.  Slow commands of all answers run one at a time, in the order they were returned, with one
  exception: when a slow command finishes, the core is told with :class:`~common.sansio.CommandDone`
  (with the error text if it raised), and the slow part of that answer continues the command that
  finished (a takeover claims its addresses once its rules are in): it runs next, before the rest of
  the finished command's answer and before other answers' slow commands (a state file being
  written).  A failing command never stops the runtime.
* A command type without an executor is a wiring bug and raises at once.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import time
from typing import Any, Awaitable, Callable

from common.sansio import Command, CommandDone, Tick, WakeUpAt

__all__ = ["Runtime"]

log = logging.getLogger("distributor.runtime")

Executor = Callable[[Any], "Awaitable[None] | None"]


class Runtime:
    def __init__(self, core, executors: dict[type, Executor], clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.core = core
        self.clock = clock
        self.wall_clock = wall_clock
        self._executors = dict(executors)
        self._slow = {kind for kind, run in self._executors.items() if inspect.iscoroutinefunction(run)}
        self._queue: collections.deque[list[Command]] = collections.deque()
        self._worker: asyncio.Task | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._wake_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.ticks = 0
        self.late_ticks_max = 0.0  # the largest delay seen between a deadline and its tick, seconds

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop

    def register(self, executors: dict[type, Executor]) -> None:
        """Add executors (the adapters may need the runtime before the table is complete)."""
        self._executors.update(executors)
        self._slow = {kind for kind, run in self._executors.items() if inspect.iscoroutinefunction(run)}

    # -- events in ---------------------------------------------------------------------------------
    def feed(self, event: object) -> None:
        """Hand one event to the core and carry out its answer."""
        self.execute(self.core.handle(event))

    def execute(self, commands: list[Command]) -> None:
        rest = self._run_until_slow(commands)
        if rest:
            self._queue.append(rest)
            self._ensure_worker()

    def _run_until_slow(self, commands: list[Command]) -> list[Command]:
        """Run the commands up to the first slow one; return it and the ones after it."""
        for i, command in enumerate(commands):
            kind = type(command)
            if kind is WakeUpAt:
                self._set_timer(command.at)
                continue
            if kind in self._slow:
                return commands[i:]
            self._run_now(command)
        return []

    def _run_now(self, command: Command) -> None:
        try:
            run = self._executors[type(command)]
        except KeyError:
            raise TypeError(f"no executor for {type(command).__name__}") from None
        try:
            run(command)
        except Exception:
            log.exception("could not carry out %s", type(command).__name__)

    # -- the slow lane -----------------------------------------------------------------------------------
    def _ensure_worker(self) -> None:
        if self._worker is None or self._worker.done():
            assert self._loop is not None, "attach() the runtime to its loop first"
            self._worker = self._loop.create_task(self._work(), name="core-commands")

    async def _work(self) -> None:
        while self._queue:
            commands = self._queue.popleft()
            i = 0
            while i < len(commands):
                command = commands[i]
                i += 1
                kind = type(command)
                if kind is WakeUpAt:
                    self._set_timer(command.at)
                elif kind in self._slow:
                    error = None
                    try:
                        await self._executors[kind](command)
                    except Exception as exc:
                        log.exception("could not carry out %s", kind.__name__)
                        error = f"{type(exc).__name__}: {exc}"
                    # The answer to a finished command continues it: its slow part runs next, before the
                    # rest of this list and before other answers (rules in, then the addresses).
                    commands[i:i] = self._run_until_slow(self.core.handle(CommandDone(command, self.clock(), error)))
                else:
                    self._run_now(command)

    async def settle(self, timeout: float = 10.0) -> None:
        """Wait until every slow command returned so far has run (at shutdown)."""
        deadline = self.clock() + timeout
        while self._worker is not None and not self._worker.done() and self.clock() < deadline:
            await asyncio.wait({self._worker}, timeout=max(0.0, deadline - self.clock()))

    # -- the timer ---------------------------------------------------------------------------------------
    def _set_timer(self, at: float) -> None:
        if self._wake_at == at and self._timer is not None:
            return
        if self._timer is not None:
            self._timer.cancel()
        assert self._loop is not None, "attach() the runtime to its loop first"
        self._wake_at = at
        # The loop's clock is time.monotonic, the clock the core's deadlines are on.
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = self.clock()
        if self._wake_at is not None:
            self.late_ticks_max = max(self.late_ticks_max, now - self._wake_at)
        self._wake_at = None
        self.ticks += 1
        self.feed(Tick(now, self.wall_clock()))

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
