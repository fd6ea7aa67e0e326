"""Fixtures for end-to-end tests in the namespace testbed (root only)."""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from testbed.runner import Options, Testbed

NEEDS = ("ip", "iptables-restore", "nginx", "wrk", "curl")


def pytest_collection_modifyitems(config, items):
    missing = [tool for tool in NEEDS if shutil.which(tool) is None]
    reason = None
    if os.geteuid() != 0:
        reason = "end-to-end tests need root (network namespaces, iptables, NFQUEUE)"
    elif missing:
        reason = f"end-to-end tests need {', '.join(missing)}: run scripts/install.sh"
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="module")
def make_testbed():
    """Build testbeds for a module; every one is torn down, also when a test fails."""
    beds: list[Testbed] = []

    def make(project: str, **options) -> Testbed:
        bed = Testbed(project, Options(**options))
        beds.append(bed)
        bed.up()
        return bed

    yield make
    for bed in beds:
        bed.down()


MODES = ["rewrite", "kernel"]

# A scenario run through the VIP (service "http") and through the VIP6 (service "http6") of a dual-stack
# testbed (Options(ipv6=True), the default): ``@pytest.mark.parametrize("family", FAMILIES)``.
FAMILIES = [pytest.param(socket.AF_INET, id="ipv4"), pytest.param(socket.AF_INET6, id="ipv6")]


def service_of(family: int) -> str:
    """The testbed's service on the VIP of ``family``."""
    return "http6" if family == socket.AF_INET6 else "http"


def open_samples(bed: Testbed, host: str = "dist1", service: str = "http") -> dict[str, float]:
    """Per-backend open connections of one service ("http": the VIP's; "http6": the VIP6's) from the
    distributor's metrics."""
    return {
        dict(labels)["node"]: value
        for (name, labels), value in bed.metrics(host).items()
        if name == "distributor_backend_connections_open" and dict(labels)["service"] == service
    }


def counter(bed: Testbed, reason: str, host: str = "dist1") -> float:
    return sum(
        value
        for (name, labels), value in bed.metrics(host).items()
        if name == "distributor_packets_total" and dict(labels)["reason"] == reason
    )
