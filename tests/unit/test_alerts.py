"""Alerts: log file lines, mail through a real SMTP server, bounded retries when it fails."""

import asyncio
import json
import socket
import time

from aiosmtpd.controller import Controller
from aiosmtpd.handlers import Message

from distributor.alerts import Alerts, SmtpSettings


class Collect(Message):
    def __init__(self):
        super().__init__()
        self.messages = []

    def handle_message(self, message):
        self.messages.append(message)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_for(condition, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.02)


def test_state_change_goes_to_log_file_and_mail(tmp_path):
    handler = Collect()
    controller = Controller(handler, hostname="127.0.0.1", port=free_port())
    controller.start()
    try:
        async def scenario():
            smtp = SmtpSettings("127.0.0.1", controller.port, recipients=("ops@cluster.test",))
            alerts = Alerts("dist1", str(tmp_path / "alerts.log"), smtp)
            alerts.start()
            alerts.notify("web1", "warning", "dead", "no heartbeat for 9 ticks")
            await wait_for(lambda: alerts.sent == 1)
            await alerts.stop()
            return alerts

        alerts = asyncio.run(scenario())
    finally:
        controller.stop()
    (record,) = [json.loads(line) for line in (tmp_path / "alerts.log").read_text().splitlines()]
    assert (record["node"], record["from"], record["to"]) == ("web1", "warning", "dead")
    (mail,) = handler.messages
    assert "web1: warning -> dead" in mail["Subject"] and mail["To"] == "ops@cluster.test"
    assert alerts.failed == 0


def test_failing_mail_server_is_retried_a_bounded_number_of_times_without_blocking_the_loop():
    port = free_port()  # nothing listens: every attempt is refused

    async def scenario():
        alerts = Alerts("dist1", None, SmtpSettings("127.0.0.1", port, recipients=("ops@x.test",), retries=2,
                                                    retry_delay=0.05, timeout=1))
        alerts.start()
        started = time.monotonic()
        alerts.notify("web1", "up", "warning", "test")
        assert time.monotonic() - started < 0.05  # notify never waits for the mail
        ticks = 0
        while alerts.failed == 0:
            await asyncio.sleep(0.01)
            ticks += 1
        await alerts.stop()
        return alerts, ticks

    alerts, ticks = asyncio.run(scenario())
    assert (alerts.sent, alerts.retried, alerts.failed) == (0, 2, 1)
    assert ticks > 5  # the loop kept running while the mailer retried
