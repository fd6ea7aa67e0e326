"""Scheduling for the processes whose timers must not wait behind load (adapter).

Contract: :func:`set_realtime` moves the calling thread to SCHED_FIFO at ``priority`` (1-99;
0 leaves the scheduling alone); :func:`set_nice` keeps the normal policy at a nice value
(-20..19; 0 leaves it alone).  Both set SCHED_RESET_ON_FORK, so threads and processes started
later (worker threads, iptables) run at the normal policy and nice 0 again.  Each returns None on
success or the reason it could not (no CAP_SYS_NICE, an RLIMIT_RTPRIO or RLIMIT_NICE too low): the
caller logs it and runs on as it was.

Why: on a saturated machine a CFS task can wait hundreds of milliseconds for a CPU (measured in
the testbed at a load average of 10 on two cores: 407 ms between a deadline of the core and its
tick, long enough for the backup to take over).  keepalived offers the same for VRRP
(``vrrp_rt_priority``).  The kernel's real-time throttling (``sched_rt_runtime_us``, 95 % by
default) keeps a runaway real-time task from starving the machine.

What SCHED_FIFO costs, and how the daemon pays less, measured in the testbed (2 cores,
kernel-assisted mode, wrk opening a connection per request, 2026-12-07): at SCHED_FIFO the daemon
preempts the packets' producers at every packet and handles them one wake-up each, 3,000-4,300
connections/s; at nice -20 (the normal policy) 8,100/s, but under saturation its heartbeats reached
a 349 ms gap (dead window 350 ms) in kernel mode and nodes' heartbeats fell late.  So the daemon
stays at SCHED_FIFO and its queue coalesces instead (``distributor.datapath.COALESCE_BELOW``):
7,500-7,900/s, and a worst heartbeat gap of 101 ms under saturation.  ``nice`` is for a machine
where real-time scheduling is not wanted.
"""

from __future__ import annotations

import os

__all__ = ["set_realtime", "set_nice", "realtime_scheduling"]

_RESET_ON_FORK = getattr(os, "SCHED_RESET_ON_FORK", 0x40000000)


def set_realtime(priority: int) -> str | None:
    if not priority:
        return None
    if not 1 <= priority <= 99:
        return f"real-time priority {priority} is not valid; expected 1 to 99, or 0 for none"
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO | _RESET_ON_FORK, os.sched_param(priority))
    except PermissionError:
        return (f"cannot use SCHED_FIFO priority {priority}: needs CAP_SYS_NICE (or an RLIMIT_RTPRIO of at "
                f"least {priority})")
    except OSError as exc:
        return f"cannot use SCHED_FIFO priority {priority}: {exc.strerror}"
    return None


def set_nice(nice: int) -> str | None:
    if not nice:
        return None
    if not -20 <= nice <= 19:
        return f"nice value {nice} is not valid; expected -20 to 19, or 0 to leave it alone"
    try:
        # The normal policy with reset-on-fork first: a child of a thread at a negative nice then starts at 0.
        os.sched_setscheduler(0, os.SCHED_OTHER | _RESET_ON_FORK, os.sched_param(0))
        os.setpriority(os.PRIO_PROCESS, 0, nice)  # PRIO_PROCESS 0 is the calling thread on Linux
    except PermissionError:
        return f"cannot run at nice {nice}: needs CAP_SYS_NICE (or an RLIMIT_NICE of at least {20 - nice})"
    except OSError as exc:
        return f"cannot run at nice {nice}: {exc.strerror}"
    return None


def realtime_scheduling() -> bool:
    """Whether the calling thread runs at a real-time policy (SCHED_FIFO or SCHED_RR)."""
    return os.sched_getscheduler(0) & ~_RESET_ON_FORK in (os.SCHED_FIFO, os.SCHED_RR)
