"""The systemd units in deploy/systemd parse, run the real console scripts, and match the docs.

``systemd-analyze verify`` (when this machine has it) reads each unit with the ExecStart paths
pointed at this environment's scripts; it exits 0 on an unknown or malformed key and only says so,
so any such line fails the test.  The rest is read here: the keys the daemon's behaviour needs
(notify, watchdog, reload by SIGHUP, the capabilities the daemon checks for) and the paths the
example configs use.
"""

from __future__ import annotations

import importlib
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from distributor.config import load
from distributor.daemon import _CAPABILITIES

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "deploy" / "systemd"
INSTALLED_BIN = "/opt/distributor/bin"  # where the units expect the project's virtual environment
SCRIPTS = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]


def parse_unit(text: str) -> dict[str, dict[str, list[str]]]:
    """Sections -> key -> every value (systemd allows a key more than once), continuation lines joined."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    pending = ""
    for raw in text.splitlines():
        line = pending + raw.strip()
        pending = ""
        if not line or line[0] in "#;":
            continue
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"a key before any section: {line!r}"
        key, sep, value = line.partition("=")
        assert sep, f"not KEY=VALUE: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def unit(name: str) -> dict[str, dict[str, list[str]]]:
    return parse_unit((UNITS / name).read_text())


def one(section: dict[str, list[str]], key: str) -> str:
    values = section[key]
    assert len(values) == 1, (key, values)
    return values[0]


@pytest.mark.parametrize("name, script", [("distributor.service", "distributor"), ("node-agent.service", "node-agent")])
def test_exec_lines_name_the_real_console_scripts(name, script):
    service = unit(name)["Service"]
    for key in ("ExecStartPre", "ExecStart"):
        program, *args = one(service, key).split()
        assert program == f"{INSTALLED_BIN}/{script}", program
        module, function = SCRIPTS[script].split(":")
        assert callable(getattr(importlib.import_module(module), function))
        assert args[0] == "--config" and args[1].startswith("/etc/distributor/")
    assert one(service, "ExecStartPre").endswith("--check")


def test_the_distributor_unit_is_a_notify_service_with_watchdog_reload_and_its_capabilities():
    service = unit("distributor.service")["Service"]
    assert one(service, "Type") == "notify" and one(service, "NotifyAccess") == "main"
    assert float(one(service, "WatchdogSec")) > 0
    assert one(service, "ExecReload") == "/bin/kill -HUP $MAINPID"
    assert one(service, "User") not in ("root", "0")
    caps = set(one(service, "AmbientCapabilities").split())
    assert caps == set(one(service, "CapabilityBoundingSet").split()) == {"CAP_NET_ADMIN", "CAP_NET_RAW", "CAP_SYS_NICE"}
    assert set(_CAPABILITIES) <= caps  # what the daemon refuses to start without
    for key, value in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("ProtectHome", "yes"),
                       ("PrivateTmp", "yes")):
        assert one(service, key) == value, key
    # Hardening that would break it stays off (the comments say why).
    assert "ProtectKernelTunables" not in service and "RestrictRealtime" not in service
    assert "AF_NETLINK" in one(service, "RestrictAddressFamilies") and "AF_PACKET" in one(service, "RestrictAddressFamilies")


def test_the_unit_writes_where_the_example_config_keeps_state_and_alerts():
    service = unit("distributor.service")["Service"]
    config = load(ROOT / "docs" / "distributor.example.toml")
    state = one(service, "StateDirectory")
    logs = one(service, "LogsDirectory")
    assert Path(config.state_file).parent == Path("/var/lib") / state
    assert Path(config.alert_log).parent == Path("/var/log") / logs
    start = one(service, "ExecStart").split()
    assert start[-1] == "/etc/distributor/distributor.toml"


def test_the_sysusers_file_makes_the_distributor_user():
    lines = [line.split() for line in (UNITS / "distributor.sysusers").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    user = one(unit("distributor.service")["Service"], "User")
    assert any(fields[0] == "u" and fields[1] == user for fields in lines)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    here = Path(sys.executable).parent
    missing = [s for s in ("distributor", "node-agent") if not (here / s).exists()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not installed next to {sys.executable} (pip install -e .)")
    for name in ("distributor.service", "node-agent.service"):
        (tmp_path / name).write_text((UNITS / name).read_text().replace(INSTALLED_BIN, str(here)))
    result = subprocess.run(["systemd-analyze", "verify", *(str(tmp_path / n) for n in
                                                             ("distributor.service", "node-agent.service"))],
                            capture_output=True, text=True, timeout=30)
    complaints = [line for line in (result.stdout + result.stderr).splitlines()
                  if re.search(r"Unknown|Failed|ignoring|not executable|Invalid|deprecated", line, re.I)]
    assert result.returncode == 0 and not complaints, result.stdout + result.stderr
