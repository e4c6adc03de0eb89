"""Team mode: client keys, per-key limits, usage and cost (issue 14)."""
