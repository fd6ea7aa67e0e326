"""Per-node heartbeat counters and node states (pure).

Placeholder until node health lands: every configured node is healthy, so
the balancer sees all of them as candidates.
"""
