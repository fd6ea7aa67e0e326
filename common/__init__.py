"""Code every program shares: datagram formats, the state-machine helper, sans-io event and command
types, TOML reading helpers; for the administration, request signing, the managed-path rule and
signed task bundles (the node's broker and the distributor's client both use them).

This package imports nothing else of the project, so the distributor daemon, the failover code
(``backup``) and the node agent (``node``) can all import it without a cycle.  See
docs/architecture.md for the layers: pure cores, adapters, programs.
"""
