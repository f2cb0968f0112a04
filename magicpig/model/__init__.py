"""Lean Llama-family model runner: loading, the forward, and prompt encoding (no runtime)."""
