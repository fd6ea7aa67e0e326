"""Real-time scheduling for the processes whose timers must not wait behind load (adapter).

Contract: :func:`set_realtime` moves the calling thread to SCHED_FIFO at ``priority`` (1-99;
0 leaves the scheduling alone) with SCHED_RESET_ON_FORK, so threads and processes started later
(worker threads, iptables) run at the normal policy again.  It returns None on success or the
reason it could not (no CAP_SYS_NICE, an RLIMIT_RTPRIO below the priority): the caller logs it and
runs on at the normal policy.

Why: on a saturated machine a CFS task can wait hundreds of milliseconds for a CPU (measured in
the testbed at a load average of 10 on two cores: 407 ms between a deadline of the core and its
tick, long enough for the backup to take over).  keepalived offers the same for VRRP
(``vrrp_rt_priority``).  The kernel's real-time throttling (``sched_rt_runtime_us``, 95 % by
default) keeps a runaway real-time task from starving the machine.
"""

from __future__ import annotations

import os

__all__ = ["set_realtime"]

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
