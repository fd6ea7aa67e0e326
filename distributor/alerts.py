"""Alerts on node state changes: the daemon log, an alert log file, and e-mail.

Contract
--------
:class:`Alerts` is an observer: :meth:`Alerts.notify` takes one state change
(already decided by the core) and, at once, writes it to the log and appends
one JSON line to the alert log file; the e-mail goes on a queue that a
separate asyncio task drains.  A send runs in a worker thread (smtplib is
blocking), so a slow or dead mail server never delays the event loop and so
never the data path.  Alerts that pile up while a send is under way go out
together in the next mail.  A failed send is retried ``retries`` times with
doubling delays, then dropped; sent, retried and failed mails are counted.
"""

from __future__ import annotations

import asyncio
import json
import logging
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from pathlib import Path

log = logging.getLogger("distributor.alerts")


@dataclass(frozen=True)
class SmtpSettings:
    host: str
    port: int = 25
    sender: str = "distributor@localhost"
    recipients: tuple[str, ...] = ()
    starttls: bool = False
    username: str = ""
    password: str = ""
    timeout: float = 10.0
    retries: int = 3
    retry_delay: float = 1.0


@dataclass(frozen=True)
class Alert:
    at: float  # wall clock
    distributor: str
    subject: str  # e.g. "web1"
    old: str
    new: str
    reason: str

    def line(self) -> str:
        return f"{self.subject}: {self.old} -> {self.new} ({self.reason})"


class Alerts:
    def __init__(self, distributor: str, log_file: str | None, smtp: SmtpSettings | None):
        self.distributor = distributor
        self.log_file = Path(log_file) if log_file else None
        self.smtp = smtp
        self.sent = 0
        self.failed = 0
        self.retried = 0
        self.file_errors = 0
        self._queue: asyncio.Queue[Alert] = asyncio.Queue()
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.smtp is not None and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._mailer(), name="alert-mailer")

    async def stop(self, flush_timeout: float = 5.0) -> None:
        """Give queued mails a short chance to go out, then stop the mailer."""
        if self._task is None:
            return
        deadline = time.monotonic() + flush_timeout
        while not self._queue.empty() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        self._task.cancel()
        try:
            await self._task
        except asyncio.CancelledError:
            pass
        self._task = None

    def notify(self, subject: str, old: str, new: str, reason: str, level: int = logging.WARNING) -> None:
        """One state change; ``level`` (as the core judged it) sets the log line's priority."""
        alert = Alert(time.time(), self.distributor, subject, old, new, reason)
        log.log(level, "%s", alert.line())
        if self.log_file is not None:
            record = {"time": alert.at, "distributor": alert.distributor, "node": subject, "from": old, "to": new,
                      "reason": reason}
            try:
                with self.log_file.open("a") as f:
                    f.write(json.dumps(record) + "\n")
            except OSError as exc:
                self.file_errors += 1
                log.error("cannot write alert log %s: %s", self.log_file, exc)
        if self.smtp is not None:
            self._queue.put_nowait(alert)

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    async def _mailer(self) -> None:
        assert self.smtp is not None
        while True:
            batch = [await self._queue.get()]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            message = self._compose(batch)
            delay = self.smtp.retry_delay
            for attempt in range(self.smtp.retries + 1):
                try:
                    await asyncio.to_thread(_send, self.smtp, message)
                    self.sent += 1
                    break
                except (OSError, smtplib.SMTPException, ssl.SSLError) as exc:
                    if attempt == self.smtp.retries:
                        self.failed += 1
                        log.error("alert mail to %s failed after %d attempts, dropped: %s", self.smtp.host,
                                  attempt + 1, exc)
                        break
                    self.retried += 1
                    log.warning("alert mail to %s failed (%s); retry %d of %d in %.1f s", self.smtp.host, exc,
                                attempt + 1, self.smtp.retries, delay)
                    await asyncio.sleep(delay)
                    delay *= 2

    def _compose(self, batch: list[Alert]) -> EmailMessage:
        assert self.smtp is not None
        message = EmailMessage()
        first = batch[0]
        more = f" (+{len(batch) - 1} more)" if len(batch) > 1 else ""
        message["Subject"] = f"[distributor {self.distributor}] {first.line()}{more}"
        message["From"] = self.smtp.sender
        message["To"] = ", ".join(self.smtp.recipients)
        lines = [time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(a.at)) + f"  {a.line()}" for a in batch]
        message.set_content(f"Distributor {self.distributor} reports:\n\n" + "\n".join(lines) + "\n")
        return message


def _send(smtp: SmtpSettings, message: EmailMessage) -> None:
    with smtplib.SMTP(smtp.host, smtp.port, timeout=smtp.timeout) as client:
        if smtp.starttls:
            client.starttls(context=ssl.create_default_context())
        if smtp.username:
            client.login(smtp.username, smtp.password)
        client.send_message(message)
