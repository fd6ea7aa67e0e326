"""The cluster-testbed tool: compose-like verbs, and cleanup of what a killed run left."""

from __future__ import annotations

import subprocess
import sys

import pytest

from testbed import netns
from testbed.runner import Testbed, wait_until

CLI = [sys.executable, "-m", "testbed.cli"]


def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run([*CLI, "-p", "tcli", *args], capture_output=True, text=True, timeout=120)
    if check:
        assert result.returncode == 0, result.stderr
    return result


def namespaces(project: str) -> list[str]:
    return [n for n in netns.names() if n.startswith(f"{project}-")]


@pytest.fixture
def cleanup():
    yield
    Testbed("tcli").down()
    Testbed("tstale").down()


def test_verbs_up_ps_exec_kill_start_logs_down(cleanup):
    assert "VIP http://203.0.113.1/ answers" in cli("up", "--nodes", "2").stdout
    assert sorted(namespaces("tcli")) == ["tcli-client", "tcli-dist1", "tcli-dist2", "tcli-sw", "tcli-web1", "tcli-web2"]
    ps = cli("ps").stdout
    assert "web2" in ps and "nginx" in ps and "running" in ps and "203.0.113.1/32" in ps

    out = cli("exec", "client", "--", "curl", "-s", "-D", "-", "-o", "/dev/null", "http://203.0.113.1/").stdout
    assert "X-Node: web" in out
    assert cli("exec", "client", "--", "sh", "-c", "exit 7", check=False).returncode == 7

    cli("kill", "web1")
    assert "exited" in [line for line in cli("ps").stdout.splitlines() if line.startswith("web1")][0]
    cli("start", "web1")
    assert "running" in [line for line in cli("ps").stdout.splitlines() if line.startswith("web1")][0]
    assert "ready" in cli("logs", "dist1").stdout

    cli("down")
    assert namespaces("tcli") == []
    assert "no testbed 'tcli' is up" in cli("ps", check=False).stderr


def test_bad_usage_is_explained(cleanup):
    result = cli("up", "--nodes", "0", check=False)
    assert result.returncode == 1 and "--nodes 0" in result.stderr
    result = subprocess.run([*CLI, "-p", "Bad-Name", "ps"], capture_output=True, text=True)
    assert result.returncode == 1 and "project name 'Bad-Name' is not valid" in result.stderr


def test_up_removes_the_leftovers_of_a_killed_run_of_the_same_project(cleanup):
    # What a SIGKILLed run leaves: namespaces of the project with processes inside, and no state file.
    subprocess.run(["ip", "netns", "add", "tstale-web1"], check=True)
    subprocess.run(["ip", "netns", "add", "tstale-sw"], check=True)
    orphan = subprocess.Popen(["ip", "netns", "exec", "tstale-web1", "sleep", "300"])
    unrelated = "tstalex-web1"  # another project's namespace with a similar name is not touched
    subprocess.run(["ip", "netns", "add", unrelated], check=True)
    try:
        wait_until(lambda: orphan.pid in netns.pids("tstale-web1"), 5, "the orphan to enter its namespace")
        bed = Testbed("tstale")
        bed.up()
        assert orphan.wait(timeout=10) is not None
        assert netns.exists(unrelated)
        bed.down()
        assert namespaces("tstale") == []
    finally:
        if orphan.poll() is None:
            orphan.kill()
            orphan.wait()
        subprocess.run(["ip", "netns", "del", unrelated], check=False)
