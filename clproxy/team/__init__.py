"""Team mode: client keys, limits, usage ledger and cost (issue 14)."""
