"""Which account and provider answer a request: pure verdicts, the pool, the model router, quotas."""
