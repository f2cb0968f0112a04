"""Lean Llama-family model runner: loading, forward, and the user-facing LongContextModel."""

__all__ = ["LongContextModel"]


def __getattr__(name: str):
    # Lazy: magicpig.runtime imports magicpig.model.llama, and LongContextModel imports the
    # runtime, so an eager import here would be circular.
    if name == "LongContextModel":
        from magicpig.model.long_context import LongContextModel

        return LongContextModel
    raise AttributeError(f"module 'magicpig.model' has no attribute {name!r}")
