"""magicpig: a heterogeneous CPU-GPU runtime for long-context generation with LSH-sampled attention."""

from magicpig.config import MagicPIGConfig

__all__ = ["MagicPIGConfig", "LongContextModel"]
__version__ = "0.1.0"


def __getattr__(name: str):
    # The model pulls in transformers; keep `import magicpig` light for the store and tests.
    if name == "LongContextModel":
        from magicpig.model import LongContextModel

        return LongContextModel
    raise AttributeError(f"module 'magicpig' has no attribute {name!r}")
