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

Why the distributor daemon uses nice -20 and not SCHED_FIFO by default, measured in the testbed
(2 cores, kernel-assisted mode, wrk opening a connection per request, 2026-12-07): at SCHED_FIFO
the daemon preempts the packet's producers at every packet and handles them one wake-up each,
3,000-3,800 connections/s; at nice -20, 8,000-8,500/s, as at nice 0.  Under a 60 s saturation run
(wrk at full rate plus 2,000 malformed frames/s) nice -20 kept its heartbeats' worst gap at
97 ms (dead window 350 ms) with no takeover.  SCHED_FIFO stays available for a machine where
that is not enough.
"""

from __future__ import annotations

import os

__all__ = ["set_realtime", "set_nice"]

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
