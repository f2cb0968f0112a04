"""The attention methods by name: ``MagicPIGConfig(method=name)`` -> a :class:`MiddleAttention`.

This module imports the methods; they import only :mod:`magicpig.attention.base`, so the
registry is no import circle (DESIGN.md §5): a method module never needs this one.
"""

from __future__ import annotations

from typing import Callable

from magicpig.attention.base import MiddleAttention
from magicpig.attention.baselines import (
    DenseMiddle,
    OracleSamplingMiddle,
    QuestMiddle,
    RetrievalMiddle,
    StreamingMiddle,
    TopKMiddle,
)
from magicpig.attention.sampled import SampledMiddle
from magicpig.config import MagicPIGConfig

_METHODS: dict[str, Callable[..., MiddleAttention]] = {
    "dense": DenseMiddle,
    "magicpig": SampledMiddle,
    "topk": TopKMiddle,
    "quest": QuestMiddle,
    "oracle_sampling": OracleSamplingMiddle,
    "streaming": StreamingMiddle,
    "retrieval": RetrievalMiddle,
}


def register_method(name: str) -> Callable[[type], type]:
    """Class decorator: make a MiddleAttention available as ``MagicPIGConfig(method=name)``."""

    def deco(cls: type) -> type:
        _METHODS[name] = cls
        return cls

    return deco


def make_method(
    config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int
) -> MiddleAttention:
    """Build the middle attention named by ``config.method`` for one layer."""
    if config.method not in _METHODS:
        raise ValueError(
            f"method={config.method!r} has no implementation; available: {sorted(_METHODS)}"
        )
    return _METHODS[config.method](config, layer, num_kv_heads, head_dim)
