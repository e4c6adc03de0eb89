"""One request's journey upstream: the dispatch loop, request shaping, the HTTP client, SSE."""
