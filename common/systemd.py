"""Being a good systemd service: notifications, the watchdog, journald priorities (adapter).

Contract: :func:`notify` sends one sd_notify state (``READY=1``, ``RELOADING=1``, ``STOPPING=1``,
``WATCHDOG=1``, ``STATUS=...``) to ``$NOTIFY_SOCKET``, and does nothing outside systemd.
:func:`watchdog_interval` is half of ``$WATCHDOG_USEC`` (the daemon's loop pings that often, so a
stuck loop is restarted), or None.  :class:`JournalFormatter` prefixes each line with its syslog
priority (``<4>`` for a warning) when stderr goes to the journal (``$JOURNAL_STREAM``), so journald
files every line at the right priority: a node coming back is not a warning.
"""

from __future__ import annotations

import logging
import os
import socket
import time

__all__ = ["notify", "watchdog_interval", "JournalFormatter", "under_journal"]

_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


def notify(state: str) -> bool:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    if state == "RELOADING=1":
        # systemd 253+ wants the time of the reload with it; older ones ignore the extra field.
        state += f"\nMONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}"
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto(state.encode(), address)
        return True
    except OSError as exc:
        logging.getLogger("systemd").warning("cannot notify systemd at %s: %s", address, exc)
        return False


def watchdog_interval() -> float | None:
    value = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not value or (pid and pid != str(os.getpid())):
        return None
    try:
        return int(value) / 2e6
    except ValueError:
        return None


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


class JournalFormatter(logging.Formatter):
    """``<priority>name: message``: journald adds the time, and reads the priority from the prefix."""

    def __init__(self) -> None:
        super().__init__("%(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _PRIORITIES.get(record.levelno, 6 if record.levelno < logging.WARNING else 3)
        return "\n".join(f"<{priority}>{line}" for line in super().format(record).splitlines())
