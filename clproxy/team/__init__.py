"""Team mode: client keys, per-key limits, the usage ledger and cost (issue 14)."""
