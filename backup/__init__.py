"""The backup distributor: primary watch, takeover and state-sync receiver (primary-backup failover)."""
