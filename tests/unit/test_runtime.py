"""The runtime adapter: commands carried out in order, slow ones one at a time, timers as ticks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import pytest

from common.sansio import Command, CommandDone, Tick, WakeUpAt
from distributor.runtime import Runtime


@dataclass(frozen=True)
class Quick(Command):
    name: str


@dataclass(frozen=True)
class Slow(Command):
    name: str
    fail: bool = False


class Recorder:
    """A core that answers scripted events and records what it is told."""

    def __init__(self):
        self.seen: list = []
        self.answers: dict = {}

    def handle(self, event):
        self.seen.append(event)
        return self.answers.get(event, [])


def test_commands_after_a_slow_one_wait_for_it_but_later_answers_do_not():
    async def scenario():
        core = Recorder()
        done: list[str] = []

        async def slow(command):
            await asyncio.sleep(0.02)
            done.append(command.name)
            if command.fail:
                raise OSError("netlink said no")

        runtime = Runtime(core, {Quick: lambda c: done.append(c.name), Slow: slow})
        runtime.attach(asyncio.get_running_loop())
        runtime.execute([Quick("a"), Slow("rules"), Quick("after-rules"), Slow("addresses", fail=True), Quick("announce")])
        runtime.execute([Quick("heartbeat")])  # a later answer: not behind netlink
        assert done == ["a", "heartbeat"]
        await runtime.settle()
        assert done == ["a", "heartbeat", "rules", "after-rules", "addresses", "announce"]
        finished = [e for e in core.seen if isinstance(e, CommandDone)]
        assert [(e.command.name, e.error) for e in finished] == [("rules", None),
                                                                   ("addresses", "OSError: netlink said no")]

    asyncio.run(scenario())


def test_a_wakeup_becomes_a_tick_and_a_later_request_replaces_it():
    async def scenario():
        core = Recorder()
        runtime = Runtime(core, {}, clock=time.monotonic)
        runtime.attach(asyncio.get_running_loop())
        start = time.monotonic()
        runtime.execute([WakeUpAt(start + 10.0)])
        runtime.execute([WakeUpAt(start + 0.02)])
        deadline = time.monotonic() + 2.0
        while not core.seen and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        (tick,) = core.seen
        assert isinstance(tick, Tick) and tick.now >= start + 0.02 and tick.now < start + 1.0
        runtime.close()

    asyncio.run(scenario())


def test_a_command_without_an_executor_is_a_wiring_bug():
    runtime = Runtime(Recorder(), {})
    with pytest.raises(TypeError, match="no executor for Quick"):
        runtime.execute([Quick("x")])


def test_what_answers_a_finished_slow_command_runs_before_slow_commands_queued_meanwhile():
    class Continuing(Recorder):
        def handle(self, event):
            self.seen.append(event)
            if isinstance(event, CommandDone) and event.command.name == "rules":
                return [Slow("claim"), Quick("announce")]
            return []

    async def scenario():
        core = Continuing()
        done: list[str] = []

        async def slow(command):
            await asyncio.sleep(0.02)
            done.append(command.name)

        runtime = Runtime(core, {Quick: lambda c: done.append(c.name), Slow: slow})
        runtime.attach(asyncio.get_running_loop())
        runtime.execute([Slow("rules"), Slow("sync-nodes")])
        runtime.execute([Slow("save-state")])  # another answer's slow command, queued while the rules go in
        await runtime.settle()
        # The takeover's order holds: its addresses follow its rules at once; the rest waits its turn.
        assert done == ["rules", "claim", "announce", "sync-nodes", "save-state"]

    asyncio.run(scenario())
