"""The one configuration of the runtime, validated when it is made."""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from dataclasses import dataclass
from typing import Optional

KV_DTYPES = ("bf16", "fp16", "fp32")
METHODS = ("magicpig", "dense", "topk", "quest", "oracle_sampling", "streaming", "retrieval")
CPU_BACKENDS = ("auto", "cpp", "numba")
MAX_K = 20  # codes are int32 and a table has 2^K buckets; 2^20 offsets per block is the cap
MAX_L = 1024
# Sinks and window live on the device per sparse layer; no model has more positions than this.
MAX_TOKENS = 1 << 22
MAX_SEED = 2**63 - 1
PAPER_LSH = (10, 150, 2)  # K, L, min_collisions of the paper's Llama-3.1-8B runs
MAX_EXACT_KEYS = 1024  # per query head; the stores keep each block's best candidates in a heap this big


def max_cpu_threads() -> int:
    """The most threads a CPU store may be given: 4x this machine's cores. More buys nothing and
    a huge count makes OpenMP abort the process (thread creation fails) instead of raising."""
    return 4 * (os.cpu_count() or 1)


def check_carry_head(name: str, carry_head: object, exact_keys: int) -> bool:
    """The one check of a carry_head flag (``name`` as the caller spells it): a bool, and True
    only with a head to carry (exact_keys > 0). Returns it."""
    if not isinstance(carry_head, bool):
        raise TypeError(f"{name}={carry_head!r}: expected True or False")
    if carry_head and exact_keys == 0:
        raise ValueError(f"{name}=True: expected exact_keys > 0 (the head it carries), got exact_keys=0")
    return carry_head


def check_int(name: str, value: object, low: Optional[int] = None, high: Optional[int] = None) -> int:
    """The package's one integer check; returns ``value`` as a Python int.

    Accepts Python and numpy integers (not bool). A non-integer raises TypeError, a value
    outside ``[low, high]`` ValueError; both messages name the argument and the range.
    """
    if low is not None and high is not None:
        allowed = f"an integer in [{low}, {high}]"
    elif low is not None:
        allowed = f"an integer >= {low}"
    elif high is not None:
        allowed = f"an integer <= {high}"
    else:
        allowed = "an integer"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}={value!r}: expected {allowed}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise ValueError(f"{name}={value!r}: expected {allowed}")
    return int(value)


def check_float(name: str, value: object, low: float, high: float, low_open: bool = False,
                high_open: bool = False) -> float:
    """The package's one real-number check: a finite int or float in the interval (NaN and
    infinities refused); TypeError for a non-number, ValueError out of range."""
    interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name}={value!r}: expected a number in {interval}")
    v = float(value)
    below = v <= low if low_open else v < low
    above = v >= high if high_open else v > high
    if not math.isfinite(v) or below or above:
        raise ValueError(f"{name}={value!r}: expected a finite number in {interval}")
    return v


def _check_choice(name: str, value: object, choices: tuple[str, ...]) -> None:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"MagicPIGConfig.{name}={value!r}: expected one of {choices}")


@dataclass(frozen=True)
class MagicPIGConfig:
    """How attention is computed during decode (DESIGN.md §2).

    K: bits per hash table (1-20). L: number of tables (1-1024). min_collisions: a key is a
    candidate when it collides with the query in at least this many tables (1..L). Leave K and
    L unset (None) and the model chooses them, and min_collisions unless set, by a short
    calibration on its own queries, cached per model (:mod:`magicpig.runtime.calibration`;
    ``LongContextModel.config`` shows the choice). Set K and L together; with both set, an
    unset min_collisions is 2, the paper's.
    sink_tokens / window_tokens: the first S and the last W tokens, attended exactly on the
    device. dense_layers: layers that always run exact attention; None means the first and the
    middle layer (see :meth:`resolve_dense_layers`). seed: seeds the hash projections per
    (layer, KV head). kv_dtype: how the CPU store holds K/V. cpu_threads: OpenMP threads of the
    CPU store (None = all cores). method: "magicpig" (LSH sampling), "dense" (exact), or a
    baseline of DESIGN.md §3. budget: fraction of middle keys read by the budgeted baselines
    (topk, quest, oracle_sampling, retrieval). cpu_backend: "cpp", "numba" or "auto" (C++ when
    the extension is built). exact_keys: per query head, the candidates with the highest
    scores q.k/sqrt(d) that magicpig attends exactly (weight 1) instead of importance-weighted
    (weight 1/u); the rest of the sample keeps its weights, and the two merge by log-sum-exp.
    0 (the default) is plain sampling. It reads no extra key: the head comes from the candidates.
    carry_head (needs exact_keys > 0): the head is chosen among the candidates and the keys of
    the last decode step's head (per sequence, layer and query head), which are read even when
    this step's hashes miss them (at most exact_keys more keys read; counted in the cost).
    Attention moves little from one step to the next, so this finds keys the tables missed.
    """

    K: Optional[int] = None
    L: Optional[int] = None
    min_collisions: Optional[int] = None
    sink_tokens: int = 4
    window_tokens: int = 64
    dense_layers: Optional[tuple[int, ...]] = None
    seed: int = 0
    kv_dtype: str = "bf16"
    cpu_threads: Optional[int] = None
    method: str = "magicpig"
    budget: float = 0.02
    cpu_backend: str = "auto"
    exact_keys: int = 0
    carry_head: bool = False

    def __post_init__(self) -> None:
        self._check_lsh()
        ints = {
            "sink_tokens": (0, MAX_TOKENS),
            "window_tokens": (1, MAX_TOKENS), "seed": (0, MAX_SEED), "exact_keys": (0, MAX_EXACT_KEYS),
        }
        for name, (low, high) in ints.items():
            self._set(name, check_int(f"MagicPIGConfig.{name}", getattr(self, name), low, high))
        check_carry_head("MagicPIGConfig.carry_head", self.carry_head, self.exact_keys)
        if self.cpu_threads is not None:
            self._set("cpu_threads", check_int("MagicPIGConfig.cpu_threads", self.cpu_threads, 1, max_cpu_threads()))
        _check_choice("kv_dtype", self.kv_dtype, KV_DTYPES)
        _check_choice("method", self.method, METHODS)
        _check_choice("cpu_backend", self.cpu_backend, CPU_BACKENDS)
        self._set("budget", check_float("MagicPIGConfig.budget", self.budget, 0.0, 1.0, low_open=True))
        if self.dense_layers is not None:
            layers = tuple(self.dense_layers) if isinstance(self.dense_layers, (list, tuple)) else None
            if layers is None or any(
                isinstance(i, bool) or not isinstance(i, numbers.Integral) or i < 0 for i in layers
            ):
                raise ValueError(
                    f"MagicPIGConfig.dense_layers={self.dense_layers!r}: expected None or a "
                    "sequence of non-negative layer indices"
                )
            self._set("dense_layers", tuple(sorted({int(i) for i in layers})))

    def _check_lsh(self) -> None:
        """K and L both set or both None; min_collisions in [1, L] (2 when K, L set and it is not)."""
        if self.K is not None:
            self._set("K", check_int("MagicPIGConfig.K", self.K, 1, MAX_K))
        if self.L is not None:
            self._set("L", check_int("MagicPIGConfig.L", self.L, 1, MAX_L))
        if (self.K is None) != (self.L is None):
            raise ValueError(
                f"MagicPIGConfig: K={self.K!r}, L={self.L!r}: expected both set or both None "
                "(None: chosen for the model)"
            )
        if self.K is not None and self.min_collisions is None:
            self._set("min_collisions", 2)
        if self.min_collisions is not None:
            self._set("min_collisions", check_int("MagicPIGConfig.min_collisions", self.min_collisions, 1,
                                                  MAX_L if self.L is None else self.L))

    @property
    def lsh_resolved(self) -> bool:
        """Whether K, L and min_collisions are known (set, or chosen for a model)."""
        return self.K is not None

    def _set(self, name: str, value: object) -> None:
        object.__setattr__(self, name, value)  # frozen: normalise (np.int64 -> int) once, here

    def check_model(self, num_layers: int, max_positions: int) -> None:
        """Raise ValueError where this config cannot run on a model of ``num_layers`` layers and
        ``max_positions`` positions (dense layers that do not exist, sinks + window longer than
        the model can attend)."""
        self.resolve_dense_layers(num_layers)
        if self.sink_tokens + self.window_tokens > max_positions:
            raise ValueError(
                f"MagicPIGConfig.sink_tokens={self.sink_tokens} + window_tokens={self.window_tokens} "
                f"exceed the model's {max_positions} positions (expected a sum <= {max_positions})"
            )

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


def resolve_config(
    value: object, default: "MagicPIGConfig | None" = None, num_layers: int | None = None,
    max_positions: int | None = None,
) -> MagicPIGConfig:
    """``value`` (None: ``default``, else a fresh MagicPIGConfig) as a config, checked against
    a model when its layers and positions are given; TypeError for anything else."""
    config = (default or MagicPIGConfig()) if value is None else value
    if not isinstance(config, MagicPIGConfig):
        raise TypeError(f"config={value!r}: expected a MagicPIGConfig or None")
    if num_layers is not None and max_positions is not None:
        config.check_model(num_layers, max_positions)
    return config
