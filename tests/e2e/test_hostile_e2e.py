"""The hostile suite of issue 9: faults and hostile input, end to end, in both data-path modes.

Each test is one of the issue's eleven findings, written against the issue's target (not against what
today's code does), so a test fails until its fix lands.  The tools come from :mod:`testbed.hostile`.

Bounded in time: every wait polls with a deadline, every flood, capture and load stops by itself.
The suite takes a few minutes (``HOSTILE_SATURATION_SECONDS``, default 30, sets the saturation run's
length; 300 gives the issue's five-minute figure, as does ``bench/saturation.py``).  Projects are
named ``h*``.  Every namespace, rule and process a test creates is removed, also on failure: rules
by the context managers of :mod:`testbed.hostile`, processes by pid, the testbeds by the
``make_testbed`` fixture.  A test that leaves the cluster broken does not break the next one: the
``cluster`` fixture restarts what is down and rebuilds the testbed when it cannot settle.

Testbeds (each in both modes unless said): ``hmain*`` (3 nodes, defaults) for most scenarios,
``hsmall*`` (a 2,000-entry table, a 3 s established timeout) for the flood and the idle timeout,
``hgarp`` (rewrite mode; announcements do not depend on the data path) for the periodic refresh.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from testbed import hostile, http, netns, wrk
from testbed.runner import FAILOVER_PORT, HEARTBEAT_PORT, Options, TestbedError, render_distributor_config, wait_until
from testbed.topology import INT_NET, build
from backup.roles import FailoverSettings
from tests.e2e.conftest import MODES, counter

DISTS = ("dist1", "dist2")
WEBS = ("web1", "web2", "web3")
CLIENT = "203.0.113.10"
GATEWAY = "198.51.100.1"
SATURATION_SECONDS = float(os.environ.get("HOSTILE_SATURATION_SECONDS", "30"))

# Targets of issue 9.
MAX_SILENCE_WHEN_A_NODE_STOPS = 1.5  # s without one new connection completing
FLOOD_RATE = 3000.0  # spoofed SYN/s
FLOOD_SECONDS = 6.0  # the table of 2,000 fills in under a second at this rate
FLOOD_SUCCESS = 0.99  # of legitimate requests during the flood
NORMAL_AFTER_FLOOD = 1.0  # s after the flood's end
NORMAL_LATENCY = 0.5  # s: a request of normal service (no SYN retransmission)
# SYN authentication switches on once more than its threshold (64) of connections are half-open;
# until then SYNs go on as usual (Linux's own SYN cookies also start only when its queue overflows).
# Kernel mode learns the half-open count from conntrack within ~50 ms of a burst. What may reach the
# nodes is bounded by that: the threshold plus 0.1 s of the flood.
SPOOFED_ADMITTED = 64 + int(FLOOD_RATE * 0.1)
CRASH_CLEAN = 2.0  # s after a SIGKILL of the daemon: no address, no ARP answer on its host
SYNC_LOSS = 0.3
# s from a restarted backup's readiness to active, while replays arrive.  Measured on 5ee52c8 (rewrite,
# 4 trials each, /tmp script): 0.31-0.39 s without replays, 1.29-1.66 s with the recording replayed.
RESTARTED_TAKEOVER = 0.8
HEALED_ONE_OWNER = 1.0  # s after a split heals: exactly one ARP answer, the client's entry on it
GARP_REFRESH = 2.0  # s, set in the hgarp testbed (failover.garp_refresh)
SMALL_ESTABLISHED_TIMEOUT = 3.0
RESET_WITHIN = 2.0  # s: an expired connection's next segment is answered by an RST, not left hanging
MAX_FLAP_ALERTS = 6  # alerts for a node that stalls three times (undamped: 4 per stall)


# --------------------------------------------------------------------------------------------------------
# Testbeds and the state every test starts from
# --------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", params=MODES)
def bed(make_testbed, request):
    made = make_testbed(f"hmain{request.param[0]}", nodes=3, policy="round-robin", mode=request.param)
    yield made
    made.down()  # now, not at the end of the module: the two cores carry one mode's testbeds at a time


@pytest.fixture(scope="module")
def leak_watch(bed):
    """Everything that leaves either distributor toward the outside, for the whole module run of this mode."""
    watch = hostile.LeakWatch(bed)
    yield watch
    watch.stop()


def _restore(bed) -> None:
    for host in bed.topology.hosts:
        if host.services and any(bed.service_pid(host.name, s) is None for s in host.services):
            bed.start(host.name)
    active, backup = bed.wait_settled(20)
    left = floating_addresses(bed, backup)
    if left:  # what a failed scenario 3 leaves: it must not make the next scenario's ARP a race
        print(f"hostile: removing {left} left on the backup {backup}")
        for address in left:
            device = "ext0" if address.startswith(f"{bed.vip}/") else "int0"
            bed.run(backup, ["ip", "addr", "del", address, "dev", device], check=False)
    bed.wait_vip(10)
    wait_until(lambda: all(node_state(bed, active_of(bed), w) in ("up", "slow_start") for w in WEBS), 30,
               "every node to be a candidate")


def _restore_or_rebuild(bed) -> bool:
    """Restore ``bed``; when it cannot settle (a scenario left it broken), rebuild it.  True if rebuilt."""
    try:
        _restore(bed)
        return False
    except (TestbedError, OSError, AssertionError) as exc:
        print(f"hostile: {bed.project} did not settle ({str(exc).splitlines()[0]}); rebuilding it")
        bed.up()
        _restore(bed)
        return True


@pytest.fixture
def cluster(bed, leak_watch):
    """The main testbed with both distributors settled and every node a candidate; rebuilt if it cannot get there."""
    if _restore_or_rebuild(bed):
        leak_watch.restart()
    leak_watch.ensure()
    return bed


@pytest.fixture(scope="module", params=MODES)
def small_bed(make_testbed, request):
    made = make_testbed(f"hsmall{request.param[0]}", nodes=3, policy="round-robin", capacity=2000,
                        established_timeout=SMALL_ESTABLISHED_TIMEOUT, mode=request.param)
    yield made
    made.down()


@pytest.fixture
def small(small_bed):
    _restore_or_rebuild(small_bed)  # a flood that locked clients out must not fail the next test too
    return small_bed


# --------------------------------------------------------------------------------------------------------
# Small readers
# --------------------------------------------------------------------------------------------------------

def active_of(bed) -> str:
    found = [h for h in DISTS if bed.role(h) == "active"]
    assert len(found) == 1, f"expected one active distributor, found {found}"
    return found[0]


def node_state(bed, host: str, node: str) -> str | None:
    for (name, labels), value in bed.metrics(host).items():
        labels = dict(labels)
        if name == "distributor_node_state" and labels["node"] == node and value == 1:
            return labels["state"]
    return None


def term(bed, host: str) -> float:
    return hostile.metric_sum(bed, host, "distributor_failover_term")


def rejected_total(bed, host: str) -> float:
    """Every datagram the distributor on ``host`` received and refused, both ports, every reason."""
    return (hostile.metric_sum(bed, host, "distributor_heartbeats_rejected_total")
            + hostile.metric_sum(bed, host, "distributor_failover_datagrams_rejected_total"))


def floating_addresses(bed, host: str) -> list[str]:
    out = bed.run(host, ["ip", "-4", "-o", "addr", "show"]).stdout
    return [a for a in (f"{bed.vip}/32", f"{GATEWAY}/24") if a in out]


def lan_address(bed, host: str) -> str:
    return str(bed.topology.host(host).address_on("int"))


def kill_daemon(bed, host: str) -> None:
    os.kill(bed.service_pid(host, "distributor"), signal.SIGKILL)
    wait_until(lambda: bed.service_pid(host, "distributor") is None, 10, f"the distributor on {host} to die")


def restart_daemon(bed, host: str) -> float:
    """SIGTERM and start the distributor on ``host``; returns the monotonic time it said it was ready."""
    bed.stop_service(host, "distributor")
    bed.start_service(host, "distributor")
    return time.monotonic()


def wrk_in_background(bed, seconds: float, connections: int = 16, close: bool = False) -> subprocess.Popen:
    argv = wrk.command(f"http://{bed.vip}/1k.bin", duration=seconds, connections=connections, close=close, timeout=5)
    return bed.popen("client", argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(load: subprocess.Popen, seconds: float) -> wrk.WrkResult:
    try:
        return wrk.parse(load.communicate(timeout=seconds + 30)[0])
    finally:
        if load.poll() is None:
            load.kill()
            load.wait()


# --------------------------------------------------------------------------------------------------------
# 1. A node stopped under new-connection load
# --------------------------------------------------------------------------------------------------------

def test_1_node_stopped_under_new_connection_load_handshakes_move_to_a_live_node(cluster):
    """Connections caught in their handshake with a node that stops move to a live node at their next SYN
    retransmission; new connections never stop completing for more than 1.5 s."""
    bed = cluster
    recorder = hostile.ConnectionRecorder(bed, clients=16, timeout=4.0)
    try:
        wait_until(lambda: len(recorder.outcomes) > 200, 10, "the recorder to be under way")
        # The link first: a SYN must go unanswered (not be refused by a dying host) to catch a handshake.
        bed.run("web2", ["ip", "link", "set", "eth0", "down"])
        stopped = time.time()  # requests started before this may have been in mid-request on web2: not judged
        bed.kill("web2")
        wait_until(lambda: node_state(bed, active_of(bed), "web2") in ("warning", "dead"), 5, "web2 to be excluded")
        time.sleep(5.0)  # four more SYN retransmission rounds of the clients caught at the stop
        ended = time.time()
    finally:
        recorder.stop()  # joins the clients: every request started is finished and recorded
        bed.start("web2")
    late = recorder.started_between(stopped)
    failed = [o for o in late if not o.ok]
    silence = recorder.longest_silence(stopped, ended)
    print(f"node stopped: {len(late)} requests started after, {len(failed)} failed, longest silence {silence:.2f} s")
    assert late, "no request started after the stop"
    assert not failed, (f"{len(failed)} of {len(late)} requests started after web2 stopped failed (stuck in their "
                        f"handshake with the stopped node?); first: {failed[:3]}")
    assert silence <= MAX_SILENCE_WHEN_A_NODE_STOPS, (
        f"no new connection completed for {silence:.2f} s after web2 stopped (target <= {MAX_SILENCE_WHEN_A_NODE_STOPS} s)")
    assert {o.node for o in late} <= {"web1", "web3"}


# --------------------------------------------------------------------------------------------------------
# 2. A spoofed SYN flood at a 2,000-entry table
# --------------------------------------------------------------------------------------------------------

def test_2_spoofed_syn_flood_locks_no_legitimate_client_out_and_reaches_no_node(small):
    bed = small
    matches = {"client_syn": f"-p tcp --syn -s {CLIENT}", "spoofed_syn": f"-p tcp --syn ! -s {CLIENT}"}
    with hostile.PacketCounters(bed, WEBS, matches) as counters:
        recorder = hostile.ConnectionRecorder(bed, clients=4, timeout=3.0, pause=0.02)
        try:
            wait_until(lambda: len(recorder.outcomes) > 20, 10, "the recorder to be under way")
            with hostile.start_syn_flood(bed, FLOOD_RATE, FLOOD_SECONDS) as flood:
                started = flood.wait_started()
                report = flood.result()
            ended = started + report["seconds"]
            wait_until(lambda: recorder.started_between(ended + NORMAL_AFTER_FLOOD + 2.0), 10,
                       "requests after the flood")
        finally:
            recorder.stop()  # joins the clients: every request started is finished and recorded
        counts = counters.read()
    during = recorder.started_between(started, ended)
    after = recorder.started_between(ended + NORMAL_AFTER_FLOOD)
    succeeded = sum(o.ok for o in during)
    spoofed = sum(c["spoofed_syn"] for c in counts.values())
    table = hostile.metric_sum(bed, active_of(bed), "distributor_connection_table_entries")
    print(f"flood {report}; legitimate during: {succeeded}/{len(during)}; after +{NORMAL_AFTER_FLOOD:g} s: "
          f"{sum(o.ok for o in after)}/{len(after)}; spoofed SYNs at the nodes {spoofed}; table {table:.0f}")
    assert report["rate"] >= 0.95 * FLOOD_RATE, f"the flood reached only {report}"
    assert sum(c["client_syn"] for c in counts.values()) > 0, "the node counters saw no SYN at all: they count nothing"
    assert len(during) >= 20, f"only {len(during)} legitimate requests during the flood"
    assert succeeded >= FLOOD_SUCCESS * len(during), (
        f"{succeeded} of {len(during)} legitimate requests succeeded during a {FLOOD_RATE:g} SYN/s flood "
        f"(target >= {FLOOD_SUCCESS:.0%}); failures: {[o for o in during if not o.ok][:3]}")
    assert spoofed <= SPOOFED_ADMITTED, (f"{spoofed} spoofed SYNs reached the nodes (at most {SPOOFED_ADMITTED} may, "
                                         f"before authentication switches on): {counts}")
    slow = [o for o in after if not o.ok or o.ended - o.started > NORMAL_LATENCY]
    assert after and not slow, (f"{len(slow)} of {len(after)} requests started {NORMAL_AFTER_FLOOD} s after the flood "
                                f"were not served normally (table holds {table:.0f}); first: {slow[:3]}")


# --------------------------------------------------------------------------------------------------------
# 3. A crashed daemon (the host stays up)
# --------------------------------------------------------------------------------------------------------

def test_3_sigkill_of_the_daemon_alone_leaves_no_address_and_no_arp_answer(cluster):
    bed = cluster
    active, backup = bed.wait_settled()
    dead_macs = {hostile.host_mac(bed, active, "ext0"), hostile.host_mac(bed, active, "int0")}
    owner_ext = hostile.host_mac(bed, backup, "ext0")
    os.kill(bed.service_pid(active, "distributor"), signal.SIGKILL)
    killed = time.monotonic()
    try:  # waits past the target, to say how late the addresses go when they go late
        wait_until(lambda: not floating_addresses(bed, active), CRASH_CLEAN + 3,
                   f"the floating addresses to leave {active} after its daemon was killed", interval=0.02)
    except TestbedError:
        pytest.fail(f"{CRASH_CLEAN + 3:g} s after a SIGKILL of its daemon, {active} still holds "
                    f"{floating_addresses(bed, active)}")
    gone = time.monotonic() - killed
    print(f"floating addresses gone from {active} {gone:.2f} s after the SIGKILL")
    assert gone <= CRASH_CLEAN, f"the floating addresses left {active} only {gone:.2f} s after its daemon was killed"
    vip_answers = hostile.arp_answerers(bed, "client", "eth0", bed.vip)
    gateway_answers = hostile.arp_answerers(bed, "web1", "eth0", GATEWAY)
    elapsed = time.monotonic() - killed
    assert not (vip_answers | gateway_answers) & dead_macs, (
        f"{elapsed:.1f} s after the crash, {active} still answers ARP: VIP {vip_answers}, gateway {gateway_answers}")
    wait_until(lambda: bed.role(backup) == "active", 5, f"{backup} to take over")
    assert owner_ext in hostile.arp_answerers(bed, "client", "eth0", bed.vip), "the new owner does not answer ARP"


# --------------------------------------------------------------------------------------------------------
# 4. Loss on the sync port
# --------------------------------------------------------------------------------------------------------

def test_4_thirty_percent_loss_on_the_sync_port_still_catches_the_backup_up_and_a_takeover_breaks_nothing(cluster):
    bed = cluster
    active, backup = bed.wait_settled()
    seconds = 20.0
    with hostile.udp_loss(bed, backup, FAILOVER_PORT, SYNC_LOSS):
        load = wrk_in_background(bed, seconds)
        load_started = time.monotonic()
        try:
            wait_until(lambda: hostile.metric_sum(bed, active, "distributor_connection_table_entries") >= 16, 5,
                       "wrk's connections to open")
            # A fresh backup must fetch the table through the lossy port, and its first request is lost
            # for sure (the issue's case: a backup that asks once never catches up).
            with hostile.udp_loss(bed, backup, FAILOVER_PORT, 1.0, directions=("out",)):
                restart_daemon(bed, backup)
                wait_until(lambda: hostile.metric_sum(bed, backup, "distributor_failover_datagrams_sent_total",
                                                      kind="sync_request") >= 1, 5, f"{backup}'s first sync request")
            restarted = time.monotonic()
            try:
                wait_until(lambda: bed.metrics(backup)[("distributor_sync_caught_up", ())] == 1, 8,
                           f"{backup} to catch up under {SYNC_LOSS:.0%} loss")
            except TestbedError:
                pytest.fail(f"{backup} was not caught up {time.monotonic() - restarted:.0f} s after its restart with "
                            f"{SYNC_LOSS:.0%} loss on udp {FAILOVER_PORT} (gaps "
                            f"{hostile.metric_sum(bed, backup, 'distributor_sync_gaps_total'):.0f})")
            time.sleep(1.0)  # a little more traffic replicated under loss
            victim = active_of(bed)  # 30 % loss may have moved the addresses already: kill whoever has them
            assert time.monotonic() < load_started + seconds - 3, "too late for a takeover under load: wrk is ending"
            bed.kill(victim)
            survivor = next(h for h in DISTS if h != victim)
            wait_until(lambda: bed.role(survivor) == "active", 5, f"{survivor} to take over")
        finally:
            result = finish(load, seconds)
    assert result.requests > 1000, result.output
    assert result.errors == 0, f"the takeover after catching up under loss broke connections:\n{result.output}"


# --------------------------------------------------------------------------------------------------------
# 5. Replays right after a restart
# --------------------------------------------------------------------------------------------------------

def test_5_replayed_heartbeats_are_refused_by_a_freshly_restarted_backup(cluster):
    bed = cluster
    active, backup = bed.wait_settled()
    with hostile.Capture(bed, backup, "int0", hostile.udp_filter(FAILOVER_PORT, source=lan_address(bed, active)),
                         seconds=30) as capture:
        wait_until(lambda: len(hostile.heartbeat_times(capture.frames, sender=active)) >= 40, 10,
                   f"two seconds of {active}'s heartbeats")
    recorded = [hostile.with_valid_checksums(f.data) for f in capture.frames
                if hostile.heartbeat_times([f], sender=active)]
    bed.kill(active)  # the whole host: its heartbeats stop for good
    replayed: list[float] = []
    stop = threading.Event()
    sender = netns.call_in(bed.ns("web1"), lambda: hostile.packet_sender("eth0")[0])

    def replay_loop() -> None:
        # The recording, again and again at a heartbeat's pace, from the cluster LAN, byte for byte.
        while not stop.is_set():
            for frame in recorded:
                if stop.wait(0.05):
                    return
                sender.send(frame)
                replayed.append(time.monotonic())

    replayer = threading.Thread(target=replay_loop, daemon=True)
    bed.stop_service(backup, "distributor")
    replayer.start()
    try:
        bed.start_service(backup, "distributor")
        before = rejected_total(bed, backup)
        ready = time.monotonic()
        try:
            wait_until(lambda: bed.role(backup) == "active", RESTARTED_TAKEOVER, f"{backup} to take over")
        except TestbedError:
            pytest.fail(f"{backup}, restarted while {active}'s recorded heartbeats were replayed, was not active "
                        f"{RESTARTED_TAKEOVER} s after it was ready (role {bed.role(backup)})")
        took = time.monotonic() - ready
        print(f"restarted {backup} active {took:.2f} s after ready, under replays")
        time.sleep(0.5)  # more replays reach the new active: they must be refused too
    finally:
        stop.set()
        replayer.join(timeout=5)
        sender.close()
    sent_after_ready = sum(1 for t in replayed if t > ready + 0.05)
    refused = rejected_total(bed, backup) - before
    assert sent_after_ready >= 10, f"only {sent_after_ready} replays after the restart"
    assert refused >= 0.9 * sent_after_ready, (
        f"{backup} took over {took:.2f} s after its restart but refused only {refused:.0f} of the "
        f"{sent_after_ready} replayed datagrams")


# --------------------------------------------------------------------------------------------------------
# 6. A split brain that heals; periodic announcements
# --------------------------------------------------------------------------------------------------------

def test_6_after_a_split_brain_heals_exactly_one_distributor_answers_arp_and_clients_follow_it(cluster):
    bed = cluster
    active, backup = bed.wait_settled()
    macs = {h: hostile.host_mac(bed, h, "ext0") for h in DISTS}
    assert http.get(bed.ns("client"), bed.vip, 80, "/health").status == 200  # the client holds a neighbour entry
    with hostile.partition(bed, active, FAILOVER_PORT):
        wait_until(lambda: bed.role(backup) == "active", 5, f"{backup} to take over while cut off from {active}")
        time.sleep(1.0)
        split = {h: bed.role(h) for h in DISTS}
    healed = time.monotonic()
    answers: set[str] = set()
    while time.monotonic() - healed < HEALED_ONE_OWNER:
        answers = hostile.arp_answerers(bed, "client", "eth0", bed.vip, wait=0.2, probes=1)
        if len(answers) == 1:
            break
    one_owner_after = time.monotonic() - healed
    assert len(answers) == 1, (f"{one_owner_after:.1f} s after the split healed (roles during it {split}), "
                               f"ARP for the VIP is answered by {answers or 'nobody'}")
    winner = next(h for h, mac in macs.items() if mac in answers)
    try:
        wait_until(lambda: hostile.neighbour_mac(bed, "client", bed.vip) == macs[winner],
                   max(0.1, HEALED_ONE_OWNER + 0.3 - (time.monotonic() - healed)), "the client to follow the owner")
    except TestbedError:
        pytest.fail(f"after the split healed the client's neighbour entry for the VIP is "
                    f"{hostile.neighbour_mac(bed, 'client', bed.vip)}, not {winner}'s {macs[winner]} "
                    "(the winner did not re-announce)")
    assert wait_until(lambda: sorted(map(str, (bed.role(h) for h in DISTS))) == ["active", "backup"], 5,
                      "one active and one backup")


@pytest.fixture(scope="module")
def garp_bed(make_testbed):
    made = make_testbed("hgarp", nodes=1, mode="rewrite", garp_refresh=GARP_REFRESH)
    yield made
    made.down()


def test_6_active_distributor_repeats_its_announcement_periodically(garp_bed):
    bed = garp_bed
    active, _ = bed.wait_settled()
    mac = hostile.host_mac(bed, active, "ext0")
    window = 3 * GARP_REFRESH + 1.0
    with hostile.Capture(bed, "client", "eth0", hostile.arp_filter(), seconds=window + 5) as capture:
        time.sleep(window)  # the observation window itself: what is asserted is what arrives in it
    announcements = [t for t, sender in hostile.gratuitous_arps(capture.frames, bed.vip) if sender == mac]
    bursts = [t for i, t in enumerate(announcements) if i == 0 or t - announcements[i - 1] > 0.5]
    assert len(bursts) >= 3, (f"{len(bursts)} announcement bursts from {active} in {window:.0f} s with "
                              f"failover.garp_refresh = {GARP_REFRESH:g}")
    assert hostile.largest_gap(bursts) <= 1.5 * GARP_REFRESH, bursts


# --------------------------------------------------------------------------------------------------------
# 7. An idle connection past the established timeout
# --------------------------------------------------------------------------------------------------------

def test_7_idle_connection_past_the_established_timeout_is_reset_not_left_hanging(small):
    bed = small
    active = active_of(bed)
    expired_before = hostile.metric_sum(bed, active, "distributor_connections_expired_total")
    conn, node = http.hold(bed.ns("client"), bed.vip, timeout=RESET_WITHIN + 1)
    try:
        wait_until(lambda: hostile.metric_sum(bed, active, "distributor_connections_expired_total") > expired_before,
                   SMALL_ESTABLISHED_TIMEOUT + 10, "the idle connection to expire")
        asked = time.monotonic()
        outcome = "served"
        try:
            conn.request("GET", "/1k.bin")
            response = conn.getresponse()
            response.read()
        except ConnectionResetError:
            outcome = "reset"
        except socket.timeout:
            outcome = "hang"
        except OSError as exc:
            outcome = f"error {exc!r}"
        took = time.monotonic() - asked
    finally:
        conn.close()
    if bed.options.mode == "rewrite":
        assert outcome == "reset", (f"a segment of a connection the table forgot got {outcome} after {took:.1f} s "
                                    f"(target: an RST within {RESET_WITHIN} s)")
    else:  # conntrack may still carry it: served is fine too, silence is not
        assert outcome in ("reset", "served"), f"the idle connection's next request got {outcome} after {took:.1f} s"
    assert took <= RESET_WITHIN


# --------------------------------------------------------------------------------------------------------
# 8. Node addresses leaking toward the outside
# --------------------------------------------------------------------------------------------------------

def test_8_ttl1_syn_to_the_vip_draws_nothing_that_quotes_a_node_address(cluster):
    bed = cluster
    answers = hostile.send_ttl1_syn(bed)
    leaks = [f"{hostile.lan_leak(f.data)}: {hostile.describe_frame(f.data)}" for f in answers if hostile.lan_leak(f.data)]
    assert not leaks, f"a TTL-1 SYN to the VIP drew: {leaks}"


def test_8_spoofed_cluster_sources_from_outside_are_not_sent_back_out_by_either_distributor(cluster):
    """A frame from the outside that claims a node's source address (the malformed flood sends such) must
    not be forwarded back toward the outside by the active or by the standby (ingress filtering, BCP 38)."""
    bed = cluster
    spoofed = dict(hostile.malformed_packets())["spoofed node reply"]
    client_mac = hostile.host_mac(bed, "client", "eth0")
    sent_back = {}
    for host in DISTS:
        frame = hostile.ethernet(hostile.host_mac(bed, host, "ext0"), client_mac, spoofed)
        with hostile.Capture(bed, host, "ext0", hostile.leak_filter(), seconds=10) as capture:
            sock = netns.call_in(bed.ns("client"), lambda: hostile.packet_sender("eth0")[0])
            try:
                for _ in range(5):
                    sock.send(frame)
            finally:
                sock.close()
            time.sleep(0.5)  # the observation window: a forwarded frame leaves within microseconds
        sent_back[f"{host} ({bed.role(host)})"] = sum(1 for f in capture.frames if hostile.lan_leak(f.data))
    assert not any(sent_back.values()), f"spoofed node-source frames forwarded back toward the outside: {sent_back}"


# --------------------------------------------------------------------------------------------------------
# 9. Nothing but the VIP services answers from outside
# --------------------------------------------------------------------------------------------------------

def test_9_control_ports_ignore_datagrams_from_outside(cluster):
    bed = cluster
    junk = b"hostile: not a datagram of ours"
    before = {h: rejected_total(bed, h) for h in DISTS}

    def send_from(host: str, destinations: list[tuple[str, int]]) -> None:
        sock = netns.socket_in(bed.ns(host), socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_BROADCAST, 1)
            for destination in destinations:
                for _ in range(5):
                    sock.sendto(junk, destination)
        finally:
            sock.close()

    outside = [(str(bed.topology.host(h).address_on("ext")), port) for h in DISTS for port in (HEARTBEAT_PORT, FAILOVER_PORT)]
    outside += [(bed.vip, port) for port in (HEARTBEAT_PORT, FAILOVER_PORT)]
    send_from("client", outside)
    # The same junk from the cluster LAN must be counted: it shows the counters work, and once it is
    # counted the datagrams sent from outside before it have had every chance to be counted too.
    send_from("web1", [("198.51.100.255", HEARTBEAT_PORT), ("198.51.100.255", FAILOVER_PORT)])
    inside = 10  # per distributor: 5 on each port
    wait_until(lambda: all(rejected_total(bed, h) - before[h] >= inside for h in DISTS), 5,
               "the junk from the cluster LAN to be counted")
    from_outside = {h: rejected_total(bed, h) - before[h] - inside for h in DISTS}
    assert all(v == 0 for v in from_outside.values()), (
        f"datagrams from the client reached the control sockets (rejected from outside per distributor: {from_outside})")


def test_9_with_a_route_to_the_cluster_lan_no_node_port_answers_from_outside(cluster):
    bed = cluster
    nodes = [str(bed.topology.host(w).address_on("int")) for w in WEBS]
    matches = {"probe_tcp": "-p tcp -s 203.0.113.0/24 -m tcp --sport 65100:65199",
               "icmp": "-p icmp -s 203.0.113.0/24", "udp": "-p udp -s 203.0.113.0/24"}
    gateways = [bed.vip] + [str(bed.topology.host(h).address_on("ext")) for h in DISTS]
    answered = []
    with hostile.PacketCounters(bed, WEBS, matches) as counters:
        for g, gateway in enumerate(gateways):
            with hostile.route_via(bed, "client", str(INT_NET), gateway):
                probes = {}
                with concurrent.futures.ThreadPoolExecutor(8) as pool:
                    for n, node in enumerate(nodes):
                        for p, port in enumerate((80, 22)):
                            probes[f"tcp {node}:{port} via {gateway}"] = pool.submit(
                                hostile.tcp_probe, bed, "client", node, port, 65100 + g * 10 + n * 2 + p)
                        probes[f"ping {node} via {gateway}"] = pool.submit(hostile.icmp_echo_answered, bed, "client", node)
                    udp = netns.socket_in(bed.ns("client"), socket.AF_INET, socket.SOCK_DGRAM)
                    try:
                        for node in nodes:
                            udp.sendto(b"hostile", (node, 53))
                    finally:
                        udp.close()
                for what, future in probes.items():
                    result = future.result()
                    if result not in ("no answer", False):
                        answered.append(f"{what}: {result}")
        counts = counters.read()
    reached = {w: {k: v for k, v in c.items() if v} for w, c in counts.items() if any(c.values())}
    assert not answered, f"from the client, with a route to the cluster LAN: {answered}"
    assert not reached, f"packets from outside reached node ports directly: {reached}"


# --------------------------------------------------------------------------------------------------------
# 10. Saturation: no takeover, no node state change
# --------------------------------------------------------------------------------------------------------

def test_10_saturation_causes_no_takeover_and_no_node_state_change(cluster):
    wait_until(lambda: all(node_state(cluster, active_of(cluster), w) == "up" for w in WEBS), 20,
               "every node to be up (out of slow start)")
    report = hostile.saturate(cluster, SATURATION_SECONDS)
    print(report.text())
    assert report.flood["rate"] >= 0.9 * report.flood["rate_asked"], report.text()
    assert report.keepalive.requests > 0 and report.close.requests > 0, report.text()
    assert sum(report.drops.values()) > 0, "the malformed flood drew no counted drop\n" + report.text()
    assert not report.took_over, report.text()
    assert all(v == 0 for v in report.node_transitions.values()) and not report.new_alerts, (
        f"{report.text()}\nalerts: {report.new_alerts[:10]}")
    # The worst delay of the active's heartbeats, as the backup's kernel received them, stays inside
    # the dead window the defaults choose (FailoverSettings: 0.35 s), with room for the backup's own tick.
    dead_window = FailoverSettings().dead_seconds
    assert report.dist_heartbeat_gap < dead_window - FailoverSettings().interval, (
        f"worst heartbeat gap {report.dist_heartbeat_gap * 1000:.0f} ms against a {dead_window * 1000:.0f} ms "
        f"dead window\n{report.text()}")


# --------------------------------------------------------------------------------------------------------
# 11. Unknown node replies counted; flapping damped; missing privileges named
# --------------------------------------------------------------------------------------------------------

def test_11_dropped_unknown_node_replies_are_counted_and_never_reach_the_client(cluster):
    from scapy.layers.inet import IP, TCP

    bed = cluster
    before = {h: counter(bed, "unknown_reply", host=h) for h in DISTS}
    # Client ports above its ephemeral range (1024-65000): no connection of an earlier test can own them.
    first_port = 65400
    replies = [bytes(IP(src="198.51.100.11", dst=CLIENT) / TCP(sport=80, dport=first_port + i, flags="SA", seq=7, ack=9))
               for i in range(20)]
    sock, send = netns.call_in(bed.ns("web1"), hostile.raw_ip_sender)

    def counted() -> float:
        return sum(counter(bed, "unknown_reply", host=h) - before[h] for h in DISTS)

    with hostile.Capture(bed, "client", "eth0", hostile.incoming_ip_filter(), seconds=10) as capture:
        try:
            for packet in replies:
                send(packet)
        finally:
            sock.close()
        with contextlib.suppress(TestbedError):
            wait_until(lambda: counted() >= len(replies), 3, "the dropped node replies to be counted")
    ports = {struct.pack("!H", first_port + i) for i in range(len(replies))}
    arrived = [f for f in capture.frames if len(f.data) >= 38 and f.data[23] == 6 and f.data[36:38] in ports]
    assert not arrived, f"{len(arrived)} of {len(replies)} unknown node replies reached the client"
    assert counted() == len(replies), (
        f"{counted():.0f} of {len(replies)} node replies to unknown connections were counted as dropped "
        f"(distributor_packets_total{{reason=\"unknown_reply\"}}) in {bed.options.mode} mode")


def test_11_rsts_conntrack_cannot_place_cross_user_space_once_and_the_queue_empties(cluster):
    # Kernel mode queues an RST to the VIP that conntrack calls INVALID (it may answer a SYN
    # cookie) and sends it back with NF_REPEAT; it must not be queued again on that second walk of
    # the hook (it was, for ever: a malformed flood's 2,000 frames/s filled the queue in a minute
    # and new connections fell to a crawl).  Rewrite mode drops them (unknown_flow).
    from scapy.layers.inet import IP, TCP

    bed = cluster
    rsts = [bytes(IP(src=CLIENT, dst=str(bed.vip)) / TCP(sport=65100 + i, dport=80, flags="R", seq=1000 + i))
            for i in range(300)]

    active = active_of(bed)

    def verdicts() -> float:
        return hostile.metric_sum(bed, active, "distributor_packets_total")

    before = verdicts()
    sock, send = netns.call_in(bed.ns("client"), hostile.raw_ip_sender)
    try:
        for packet in rsts:
            send(packet)
    finally:
        sock.close()
    # Looping packets would keep the queue from ever emptying.
    wait_until(lambda: verdicts() - before >= len(rsts)
               and hostile.metric_sum(bed, active, "distributor_nfqueue_waiting_packets") == 0, 5,
               "every RST decided and the queue empty")
    decided = verdicts() - before
    assert decided < len(rsts) + 30, f"{decided:.0f} verdicts for {len(rsts)} RSTs: packets went round the queue"
    reply = http.get(bed.ns("client"), str(bed.vip), 80, "/index.html", timeout=3)
    assert reply.status == 200


def test_11_intermittently_stalling_node_is_damped_to_a_few_alerts(cluster):
    bed = cluster
    active = active_of(bed)
    agent = bed.service_pid("web3", "agent")
    since = time.time()
    try:
        for _ in range(3):
            os.kill(agent, signal.SIGSTOP)
            time.sleep(3.0)  # past the dead window (2.25 s at the defaults)
            os.kill(agent, signal.SIGCONT)
            time.sleep(1.2)  # enough heartbeats to rise (3 at >= 0.2 s)
    finally:
        os.kill(agent, signal.SIGCONT)
    # The last stall's alerts are in once the node is back (or held out: a damped node may stay out).
    with contextlib.suppress(TestbedError):
        wait_until(lambda: node_state(bed, active, "web3") in ("slow_start", "up"), 5, "web3 to come back")
    alerts = [a for a in bed.alerts(active) if a["node"] == "web3" and a["time"] >= since]
    moves = [f"{a['from']}->{a['to']}" for a in alerts]
    assert alerts, "three stalls past the dead window raised no alert at all: the node never stalled?"
    assert len(alerts) <= MAX_FLAP_ALERTS, f"{len(alerts)} alerts for a node stalling three times: {moves}"


@pytest.mark.skipif(shutil.which("capsh") is None or shutil.which("unshare") is None,
                    reason="needs capsh (libcap2-bin) and unshare (util-linux)")
@pytest.mark.parametrize("drop,named", [("cap_net_admin,cap_net_raw", "CAP_NET_ADMIN"), ("cap_net_raw", "CAP_NET_RAW")],
                         ids=["no-net-admin", "no-net-raw"])
@pytest.mark.parametrize("mode", MODES)
def test_11_daemon_without_privileges_names_the_missing_capability(mode, drop, named, tmp_path):
    """dist1's testbed config, run as root without some capabilities, in a network namespace of its own
    (gone when the daemon exits) with its own ext0/int0: however far it gets, it touches nothing else."""
    topology = build(3)
    keys = tmp_path / "keys"
    keys.write_text(f"1 {'ab' * 32}\n")
    keys.chmod(0o600)
    config = tmp_path / "distributor.toml"
    config.write_text(render_distributor_config(topology, Options(mode=mode), topology.host("dist1"), keys, tmp_path))
    # A veth pair stands for the two links (this kernel has no dummy driver).
    setup = ("ip link set lo up && ip link add ext0 type veth peer name int0 && ip link set ext0 up && "
             "ip link set int0 up && ip addr add 203.0.113.2/24 dev ext0 && ip addr add 198.51.100.2/24 dev int0 && ")
    command = f"{setup} exec capsh --drop={drop} -- -c 'exec {sys.executable} -m distributor.daemon --config {config}'"
    try:
        result = subprocess.run(["unshare", "--net", "sh", "-c", command], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the daemon without {drop} did not exit within 30 s")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    assert named.lower() in output.lower(), f"without {drop} the daemon said:\n{output.strip()[-800:]}"


# --------------------------------------------------------------------------------------------------------
# 8, over the whole run: the last test of each mode's main testbed
# --------------------------------------------------------------------------------------------------------

def test_8_nothing_leaving_toward_the_outside_during_the_whole_run_carries_or_quotes_a_node_address(bed, leak_watch):
    # No `cluster` restore: what the run left does not matter here (a node damped by the flapping test
    # may be held out for a minute), only what left the distributors while it ran.
    leak_watch.ensure()
    before = len(leak_watch.frames())
    hostile.arp_answerers(bed, "client", "eth0", bed.vip)  # a control: the owner's ARP reply leaves its ext0
    try:
        wait_until(lambda: len(leak_watch.frames()) > before, 3, "the watch to see the ARP reply")
    except TestbedError:
        pytest.fail("the watch saw no ARP reply leave the distributors: it is not watching")
    findings = leak_watch.findings()
    assert not leak_watch.errors, leak_watch.errors
    assert not findings, f"{len(findings)} frames left toward the outside with a node address, e.g. {findings[:5]}"
