"""The BIRD the daemon runs dies with the daemon, however the daemon dies (no root).

A stand-in for BIRD (a shell script that sleeps) is started by :class:`BirdProcess` inside a
throwaway parent process, which is then SIGKILLed: the kernel must end the child
(``PR_SET_PDEATHSIG``), or a real BIRD would keep announcing a dead distributor's VIP.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from distributor.announcer import RouteTable

PARENT = textwrap.dedent("""
    import asyncio, sys
    from distributor.announcer import BirdProcess

    async def main():
        bird = BirdProcess(sys.argv[1], "/dev/null", "/dev/null")
        bird.start()
        print(bird.process.pid, flush=True)
        await asyncio.sleep(60)

    asyncio.run(main())
""")


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_bird_is_ended_by_the_kernel_when_the_daemon_is_killed(tmp_path: Path):
    fake = tmp_path / "bird"
    fake.write_text("#!/bin/sh\nexec sleep 60\n")
    fake.chmod(0o755)
    parent = subprocess.Popen([sys.executable, "-c", PARENT, str(fake)], stdout=subprocess.PIPE, text=True,
                              cwd=Path(__file__).resolve().parents[2])
    child = 0
    try:
        child = int(parent.stdout.readline())
        assert alive(child)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        deadline = time.monotonic() + 5
        while alive(child) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not alive(child), "BIRD outlived the daemon: its VIP would stay announced"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait(10)
        if child and alive(child):
            os.kill(child, signal.SIGKILL)  # the stand-in this test started, when the test failed


def test_withdrawing_a_route_that_is_not_there_is_not_an_error():
    calls = []

    class Quiet(RouteTable):
        def _ip(self, argv, check=True):
            calls.append(argv)
            return subprocess.CompletedProcess(argv, 2, "", "Error: FIB table does not exist.\n")

    Quiet(100).withdraw("203.0.113.1")
    assert calls == [["route", "del", "203.0.113.1/32", "table", "100"]]
