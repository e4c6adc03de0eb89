"""Observability: logs, metrics, traces, redaction."""
