"""The cluster web-server distributor: one virtual IP, many web nodes.

Pure cores: :mod:`.core`, :mod:`.reroute`, :mod:`.balancer`, :mod:`.conntable`,
:mod:`.heartbeat`, :mod:`.checksum`.  Adapters: :mod:`.datapath` (NFQUEUE),
:mod:`.rules` (iptables), :mod:`.conntrack`, :mod:`.udp`, :mod:`.runtime`,
:mod:`.alerts`, :mod:`.metrics`.  Programs: :mod:`.config`, :mod:`.daemon`.
See docs/architecture.md.
"""

__version__ = "0.1.0"
