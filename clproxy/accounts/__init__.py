"""Accounts and their credentials: discovery, OAuth, token storage."""
