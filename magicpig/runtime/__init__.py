"""Prefill, decode sessions with per-layer attention routing, and the generation loop."""
