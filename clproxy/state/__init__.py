"""State stores: where cooldowns, stats and tokens live (memory by default, Redis when shared)."""
