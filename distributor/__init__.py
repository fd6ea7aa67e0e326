"""The cluster web-server distributor: one virtual IP, many web nodes.

Pure core: :mod:`.balancer`, :mod:`.conntable`, :mod:`.reroute`,
:mod:`.heartbeat`.  Adapters: :mod:`.datapath` (iptables, NFQUEUE),
:mod:`.metrics`, :mod:`.daemon`.
"""

__version__ = "0.1.0"
