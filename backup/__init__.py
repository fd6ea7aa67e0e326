"""The backup distributor: primary watch, takeover and state-sync (primary-backup failover).

Cores: :mod:`.roles`, :mod:`.sync`, :mod:`.failover`; adapter: :mod:`.takeover`.
"""
