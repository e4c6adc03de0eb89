"""Outbound calls to the translation providers (OpenAI, Gemini) and the fallback through them."""
