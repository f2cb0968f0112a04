"""Lean Llama-family model runner: loading, forward, and the user-facing LongContextModel."""

from magicpig.model.long_context import LongContextModel

__all__ = ["LongContextModel"]
