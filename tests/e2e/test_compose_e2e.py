"""The compose testbed on a real container engine: the namespace testbed's checks, in containers.

Builds the image from docker-compose.yml's Dockerfile (wheels made on the host, the local base
image on podman), starts the cluster with the engine's compose (podman-compose here, Docker
Compose v2 where a Docker engine answers), and checks what a user of it would see: new
connections spread round-robin over the three nodes, a 1 MiB download intact, and the primary's
container killed under wrk with no failed request and dist2 holding the VIP.  Both data paths.
Project names start with ``c`` (this suite's prefix), so nothing else on the machine is touched.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from testbed import content, wrk
from testbed.compose_cluster import ComposeCluster, ComposeError, base_image_name, detect_engine
from testbed.runner import takeover_durations, wait_until

ROOT = Path(__file__).resolve().parents[2]
MODES = ["rewrite", "kernel"]
NODES = ("web1", "web2", "web3")


def _prepare_engine() -> str:
    """The engine to test on, installing podman's side when there is no Docker engine; skips when none can run."""
    try:
        return detect_engine("docker")
    except ComposeError:
        pass
    install = subprocess.run(["bash", str(ROOT / "scripts" / "install-compose.sh")], capture_output=True, text=True,
                             timeout=1800)
    if install.returncode != 0:
        pytest.skip(f"the compose test needs podman, and scripts/install-compose.sh failed "
                    f"({install.returncode}):\n{(install.stdout + install.stderr)[-2000:]}")
    probe = subprocess.run(["podman", "run", "--rm", "--network", "none", base_image_name(), "true"],
                           capture_output=True, text=True, timeout=120,
                           env={**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF", str(ROOT / "testbed/image/containers.conf"))})
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run a container here: {probe.stderr.strip()[-1000:]}")
    return "podman"


@pytest.fixture(scope="module")
def engine() -> str:
    name = _prepare_engine()
    ComposeCluster("cbuild", name).build(log=lambda message: print(f"compose test: {message}"))
    return name


@pytest.fixture(scope="module", params=MODES)
def cluster(engine, request):
    bed = ComposeCluster(f"cbed{request.param[0]}", engine, request.param)
    try:
        bed.up()
        yield bed
    finally:
        bed.down()
    assert not bed.containers(), f"containers of {bed.project} left after down: {bed.containers()}"


def _node_states(cluster) -> tuple[dict[str, str], float]:
    """The active distributor's view of the nodes: {node: state}, and its count of state changes so far."""
    samples = cluster.metrics("dist1")
    states = {dict(labels)["node"]: dict(labels)["state"] for (name, labels), value in samples.items()
              if name == "distributor_node_state" and value == 1}
    changes = sum(value for (name, _), value in samples.items() if name == "distributor_node_transitions_total")
    return states, changes


def test_round_robin_spreads_new_connections_over_the_three_nodes(cluster):
    # A node whose heartbeat is late is rightly skipped for new connections (health gating), which
    # skews the spread on a loaded machine; a round in which any node changed state is measured again.
    rounds = []
    for _ in range(3):
        wait_until(lambda: _node_states(cluster)[0] == {node: "up" for node in NODES}, 20, "every node up")
        before = _node_states(cluster)[1]
        out = cluster.exec("client", ["python3", "-m", "testbed.traffic", "--requests", "300", "--concurrency", "6",
                                      "--download", "/64k.bin"]).stdout
        changes = _node_states(cluster)[1] - before
        rounds.append(f"{changes:.0f} node state change(s) during:\n{out}")
        if changes == 0:
            break
    else:
        pytest.fail("nodes changed health state during every round:\n" + "\n".join(rounds))
    served = {node: int(count) for node, count in re.findall(r"^\s+(web\d+)\s+(\d+)\s", out, re.M)}
    assert set(served) == set(NODES), out
    mean = sum(served.values()) / len(NODES)
    for node, count in served.items():
        assert abs(count - mean) <= 0.02 * mean + 12, f"{node} served {count}, mean {mean:.0f}:\n{out}"
    assert re.search(r"^\s+failed\s+0\b", out, re.M), out


def test_a_1_mib_download_through_the_vip_arrives_intact(cluster):
    download = subprocess.run(cluster.exec_argv("client", ["curl", "-sS", "-D", "/dev/stderr", "-m", "30",
                                                           f"http://{cluster.vip}/1m.bin"]),
                              capture_output=True, env=cluster.env, timeout=60)
    assert download.returncode == 0, download.stderr.decode(errors="replace")
    assert len(download.stdout) == content.FILES["/1m.bin"]
    assert hashlib.sha256(download.stdout).hexdigest() == content.sha256("/1m.bin")
    assert re.search(rb"^x-node: web\d", download.stderr, re.M | re.I), download.stderr


def test_killing_the_primary_container_under_wrk_fails_no_request(cluster):
    assert cluster.wait_settled() == ("dist1", "dist2")
    load = cluster.popen("client", wrk.command(f"http://{cluster.vip}/1k.bin", duration=6, connections=16, timeout=5),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        def open_connections() -> float:
            return sum(value for (name, _), value in cluster.metrics("dist1").items()
                       if name == "distributor_backend_connections_open")

        wait_until(lambda: open_connections() >= 16, 10, "wrk's 16 connections through dist1")
        killed = time.monotonic()
        cluster.kill("dist1")
    finally:
        output = load.communicate(timeout=60)[0]
    result = wrk.parse(output)
    assert result.requests > 1000, output
    # On failure, what dist2 logged while it took over (the message is built only then).
    assert result.errors == 0, f"{output}\n--- dist2's log ---\n{cluster.logs('dist2', 60)}"
    wait_until(lambda: cluster.role("dist2") == "active", max(1.0, 10 - (time.monotonic() - killed)), "dist2 to take over")
    assert cluster.owns_vip("dist2")
    assert not cluster.running("dist1")
    durations = takeover_durations(cluster.metrics("dist2"))  # dist2's first takeover: the sums are its phases
    first = durations["decided"][1] + durations["first_forward"][1]  # from dist1's last heartbeat
    assert first < 0.35 + 1.5, first  # the dead window plus a SYN retransmission, as in test_failover_e2e
