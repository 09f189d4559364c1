"""The Faust agents: ``events`` (sessions + per-partition metric windows) and ``metrics`` (snapshots)."""
