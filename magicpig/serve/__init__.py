"""Serving: requests, the scheduler (pure policy), the engine (continuous batching)."""
