"""The one configuration of the runtime, validated when it is made."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

KV_DTYPES = ("bf16", "fp16", "fp32")
METHODS = ("magicpig", "dense", "topk", "quest", "oracle_sampling", "streaming", "retrieval")
CPU_BACKENDS = ("auto", "cpp", "numba")
MAX_K = 20  # codes are int32 and a table has 2^K buckets; 2^20 offsets per block is the cap
MAX_L = 1024


def _check_int(name: str, value: object, low: int, high: Optional[int]) -> None:
    allowed = f"an integer in [{low}, {high}]" if high is not None else f"an integer >= {low}"
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"MagicPIGConfig.{name}={value!r}: expected {allowed}")
    if value < low or (high is not None and value > high):
        raise ValueError(f"MagicPIGConfig.{name}={value!r}: expected {allowed}")


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"MagicPIGConfig.{name}={value!r}: expected one of {choices}")


@dataclass(frozen=True)
class MagicPIGConfig:
    """How attention is computed during decode (DESIGN.md §2).

    K: bits per hash table (1-20). L: number of tables (1-1024). min_collisions: a key is a
    candidate when it collides with the query in at least this many tables (1..L).
    sink_tokens / window_tokens: the first S and the last W tokens, attended exactly on the
    device. dense_layers: layers that always run exact attention; None means the first and the
    middle layer (see :meth:`resolve_dense_layers`). seed: seeds the hash projections per
    (layer, KV head). kv_dtype: how the CPU store holds K/V. cpu_threads: OpenMP threads of the
    CPU store (None = all cores). method: "magicpig" (LSH sampling), "dense" (exact), or a
    baseline of DESIGN.md §3. budget: fraction of middle keys read by the budgeted baselines
    (topk, quest, oracle_sampling, retrieval). cpu_backend: "cpp", "numba" or "auto" (C++ when
    the extension is built).
    """

    K: int = 10
    L: int = 150
    min_collisions: int = 2
    sink_tokens: int = 4
    window_tokens: int = 64
    dense_layers: Optional[tuple[int, ...]] = None
    seed: int = 0
    kv_dtype: str = "bf16"
    cpu_threads: Optional[int] = None
    method: str = "magicpig"
    budget: float = 0.02
    cpu_backend: str = "auto"

    def __post_init__(self) -> None:
        _check_int("K", self.K, 1, MAX_K)
        _check_int("L", self.L, 1, MAX_L)
        _check_int("min_collisions", self.min_collisions, 1, self.L)
        _check_int("sink_tokens", self.sink_tokens, 0, None)
        _check_int("window_tokens", self.window_tokens, 1, None)
        _check_int("seed", self.seed, 0, 2**63 - 1)
        _check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        _check_choice("method", self.method, METHODS)
        _check_choice("cpu_backend", self.cpu_backend, CPU_BACKENDS)
        if self.cpu_threads is not None:
            _check_int("cpu_threads", self.cpu_threads, 1, None)
        if isinstance(self.budget, bool) or not isinstance(self.budget, (int, float)) or not (
            0.0 < self.budget <= 1.0
        ):
            raise ValueError(f"MagicPIGConfig.budget={self.budget!r}: expected a float in (0, 1]")
        if self.dense_layers is not None:
            layers = tuple(self.dense_layers) if isinstance(self.dense_layers, (list, tuple)) else None
            if layers is None or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in layers):
                raise ValueError(
                    f"MagicPIGConfig.dense_layers={self.dense_layers!r}: expected None or a "
                    "sequence of non-negative layer indices"
                )
            object.__setattr__(self, "dense_layers", tuple(sorted(set(layers))))

    def resolve_dense_layers(self, num_layers: int) -> tuple[int, ...]:
        """The layers that run exact attention in a model of ``num_layers`` layers."""
        if self.dense_layers is None:
            return tuple(sorted({0, num_layers // 2}))
        bad = [i for i in self.dense_layers if i >= num_layers]
        if bad:
            raise ValueError(
                f"MagicPIGConfig.dense_layers={self.dense_layers!r}: layer(s) {bad} do not exist "
                f"in a model of {num_layers} layers (expected indices in [0, {num_layers - 1}])"
            )
        return self.dense_layers

    def replace(self, **changes: object) -> "MagicPIGConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
