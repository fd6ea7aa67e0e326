"""The guard lets this host's own traffic through: what arrives on lo, before any refusal."""

from __future__ import annotations

from distributor.rules import GuardSpec, render_guard

SPEC = GuardSpec(("198.51.100.11", "198.51.100.2"), ("198.51.100.11", "198.51.100.2"), (8405, 8406), "int0")


def test_loopback_returns_first_so_the_host_reaches_its_own_cluster_address():
    lines = render_guard(0, SPEC)[("raw", "DGRD0-IN")]
    assert lines[0] == "-A DGRD0-IN -i lo -j RETURN"
    # Without it, distributorctl on the distributor itself met the spoofed-source and cluster-address
    # drops for 198.51.100.2 -> 198.51.100.2 (it arrives on lo, not int0).
    first_drop = next(i for i, line in enumerate(lines) if line.endswith("-j DROP"))
    assert first_drop > 0 and all("-j RETURN" in line for line in lines[:first_drop])
    assert '-A DGRD0-IN -s 198.51.100.2/32 -m comment --comment "dist-guard:spoofed_source" -j DROP' in lines
