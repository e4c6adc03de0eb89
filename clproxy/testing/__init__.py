"""Shipped fakes for tests and benchmarks: Anthropic, its OAuth server, OpenAI and Gemini, on loopback."""
