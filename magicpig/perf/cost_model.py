"""Step latency of the prefill and decode lanes as a function of their share of the device
(DESIGN.md §4 "Scheduler" and "Simulator", issue 13). Pure Python: no torch, no numpy.

Model
-----
A lane's share ``x`` is its fraction of the device's compute units (SMs on a GPU, cores on a
CPU), in (0, 1]. Each group of layers that runs as its own kernels (the dense-attention layers,
the sparse layers, the LM head) costs a roofline term

    t(x) = max(FLOPs / (F * s_c(x)),  bytes / (B * s_m(x)))            [seconds]

with F, B the achievable FLOP/s and bytes/s of the whole device and s_c, s_m its compute and
memory saturation curves (:class:`Saturation`, s(1) = 1): throughput grows with the share and
flattens past a saturation share. A step adds a fixed per-step overhead. A decode step also
adds ``sequence_overhead_s`` per sequence of the batch (:class:`DeviceProfile`): seconds a
sequence costs outside the roofline (on a CPU: its own attention calls, the inefficiency of
matmuls with more rows, per-sequence Python work). It is added once per step, outside the lanes'
roofline terms and not scaled by the share: what it stands for is mostly serial (Python,
per-call dispatch), and the profiler fits it from dense decode at batch 1 and 4 at every share
alike. It is 0 in the GPU profiles (a profile JSON without the key loads with 0).

MagicPIG decode adds the CPU store's attend time C of the batch (its own profile,
:class:`StoreProfile`: a per-call cost, a cost per K/V row read, a cost per bucket entry walked,
plus the host<->device hand-off), overlapped with the sparse layers' device time D by the
runtime's ping-pong of two micro-batches (runtime/runner.py ``_run_layers``): per layer, half A's
CPU attend runs while the device finishes half B's previous layer and starts its next. That is
a two-machine flow shop of 2 x (sparse layers) identical jobs, whose makespan is

    max(D, C) + min(D, C) / (2 * sparse_layers)

(the busier side never idles; only the first job's device part, or the last job's CPU part, of
the other side is exposed). A cruder max + min/2 would treat the whole step as one job; the
runtime hands off per layer, so only one layer-half is exposed. With one sequence (one
micro-batch) or when the "device" is the host CPU (attention/sampled.py attends synchronously
there, and the runner does not split the batch: ``ModelRunner.ping_pong``), nothing overlaps:
D + C. Two micro-batches read every layer's weights twice; the model charges that.

Shipped GPU profile (``profiles/h100_llama31_8b.json``, :func:`build_gpu_profile`)
-----------------------------------------------------------------------------------
Assumptions (also in the JSON's "notes"):

* H100 SXM: 989e12 dense bf16 FLOP/s peak, 70% achievable (large cuBLAS / flash-attention
  GEMMs); HBM3 3.35e12 bytes/s, 85% achievable (decode GEMV / paged-attention reads). H200:
  same compute, 4.8e12 bytes/s. 132 SMs, green-context granularity 8 SMs (DESIGN.md §7).
  H800 = H100 for one GPU (same SMs and HBM; it differs in NVLink and FP64 only).
* Per-step overhead 0.3 ms (CUDA-graph launch, sampling, host sync).
* Memory saturation: fitted (below). Compute saturation: linear in SMs (``x0=None``): tensor-core
  throughput is per SM and a prefill chunk's GEMMs have enough tiles to fill any share; no
  public per-SM prefill figure exists to fit. Refit both with :func:`fit_saturation` from
  ``scripts/gpu_check.sh`` measurements when a GPU is available.
* Host: 2 x 56-core Xeon Platinum 8480+ (DGX H100), 16 channels DDR5-4800 = 614e9 bytes/s peak,
  300e9 achievable by the store's random 512-byte row gathers. Row cost = 2*head_dim*2 bytes
  (bf16 K and V) / 300e9; bucket entry walk 2 ns of core time per entry over 112 cores; 50 us
  per attend call (OpenMP fork/join, tasks, merge); append 1,412 bytes per token per KV head
  (K, V, L=150 int32 codes read, uint16 ids written) / 300e9.
* Link: PCIe Gen5 x16, 40e9 bytes/s achievable, 10 us per transfer (copy + event wait).

Fit against SGLang's H800 decode step (DESIGN.md §7: 42.7 ms at 8 SMs, 17.8 at 32, 15.1 at 64,
14.3 at 132). SGLang's model and batch are not stated; the reference batch is Llama-3.1-8B,
dense decode of 32 equal sequences whose length is solved so the modelled 132-SM step is
14.3 ms (5,924 tokens), so every point compares in absolute time. The memory saturation share
x0 is fitted by least squares on log time over the four points (shape fixed at 1: freeing it
moves the worst error from -1.5% to -1.2%, not worth a second parameter fitted to four points):

    memory saturation x0 = 0.1518 (about 20 SMs), shape 1; compute: linear
    SMs      8       32      64      132
    SGLang   42.7    17.8    15.1    14.3  ms
    model    42.77   17.83   14.88   14.30 ms
    error    +0.2%   +0.2%   -1.5%   -0.0%  (bound asserted by the tests: SGLANG_ERROR_BOUND = 5%)

What the scheduler should know
------------------------------
* ``sampled_fraction`` is the fraction of middle keys each query head samples (the runtime's
  per-sequence cost, ``SequenceKV.cost_sum / cost_steps``); pass the engine's running mean.
  Rows read per KV head = middle * (1 - (1 - f)^G) for G query heads per KV head (independent
  choices; correlated heads overlap more, so this errs slow).
* The store's time does not depend on the share: ``decode_cpu_time`` is a floor under the
  magicpig step; when it exceeds the target no share helps (``meets_target`` False).
* On this H100 profile magicpig's *device* time grows with context at 1/16 of dense's rate (2 of
  32 layers stay dense), so decode needs few SMs; its *step* still grows at ~70% of dense's
  (test: 8k -> 96k, 8 sequences), because the host reads ~8% of the rows per KV head at ~1/10
  of HBM bandwidth. Magicpig's gain here is SMs and memory capacity, not step time.
* Lanes are modelled alone: green contexts do not partition memory bandwidth, so a prefill
  lane running beside decode slows it somewhat; keep slack in the TBT target.
* On a "cpu" profile the store's time is as measured at its own thread count; its contention
  with the lanes' cores is not modelled.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

from magicpig.config import PAPER_LSH, MagicPIGConfig, check_float, check_int

METHODS = ("dense", "magicpig")
KINDS = ("gpu", "cpu")
SCHEMA_VERSION = 1
PROFILE_DIR = Path(__file__).resolve().parent / "profiles"

# SGLang's measured H800 decode step (DESIGN.md §7): (SMs, seconds).
SGLANG_H800_DECODE = ((8, 42.7e-3), (32, 17.8e-3), (64, 15.1e-3), (132, 14.3e-3))
SGLANG_ERROR_BOUND = 0.05  # the shipped GPU profile must match every point within 5%
REFERENCE_BATCH = 32  # sequences in the reference decode batch of the GPU fit

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


# ----------------------------------------------------------------------------- model shape
@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that set its FLOPs and bytes.

    layers, hidden, heads (query), kv_heads, head_dim, intermediate (MLP width), vocab;
    bytes_per_param (weights) and bytes_per_kv_elem (K/V cache), in bytes.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    bytes_per_kv_elem: int = 2
    name: str = "model"

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            object.__setattr__(self, f, check_int(f"ModelShape.{f}", getattr(self, f), 1))
        for f in ("bytes_per_param", "bytes_per_kv_elem"):
            object.__setattr__(self, f, check_int(f"ModelShape.{f}", getattr(self, f), 1, 8))
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelShape.heads={self.heads}: expected a multiple of kv_heads={self.kv_heads}")
        if not isinstance(self.name, str):
            raise TypeError(f"ModelShape.name={self.name!r}: expected a string")

    @classmethod
    def llama31_8b(cls) -> "ModelShape":
        """Llama-3.1-8B in bf16 (32 layers, 32 query / 8 KV heads of 128, MLP 14336)."""
        return cls(32, 4096, 32, 8, 128, 14336, 128256, 2, 2, "Llama-3.1-8B")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "ModelShape":
        """From this class's own keys or a Hugging Face config dict (``config.to_dict()``:
        num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim,
        intermediate_size, vocab_size, torch_dtype), so the runtime can fill it without this
        module importing transformers. Own keys win where both are present."""
        if "layers" in d:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})  # type: ignore[arg-type]
        heads = d["num_attention_heads"]
        dtype = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", "")
        width = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 2)
        return cls(
            layers=d["num_hidden_layers"], hidden=d["hidden_size"], heads=heads,  # type: ignore[arg-type]
            kv_heads=d.get("num_key_value_heads") or heads,  # type: ignore[arg-type]
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,  # type: ignore[operator]
            intermediate=d["intermediate_size"], vocab=d["vocab_size"],  # type: ignore[arg-type]
            bytes_per_param=width, bytes_per_kv_elem=width,
            name=str(d.get("name_or_path") or d.get("_name_or_path") or d.get("model_type") or "model"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads

    def layer_params(self) -> int:
        """Weights of one decoder layer: Q, K, V, O projections and the gated MLP (norms are
        negligible)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def layer_weight_bytes(self) -> int:
        """Bytes of one layer's weights, read once per forward pass of a micro-batch."""
        return self.layer_params() * self.bytes_per_param

    def head_weight_bytes(self) -> int:
        """Bytes of the LM head, read once per step (the embedding is a gather of B rows)."""
        return self.vocab * self.hidden * self.bytes_per_param

    def weight_bytes(self) -> int:
        """Bytes of weights one forward pass reads: every layer plus the LM head."""
        return self.layers * self.layer_weight_bytes() + self.head_weight_bytes()

    def linear_flops_per_token(self, layers: Optional[int] = None) -> float:
        """FLOPs of the layers' matmuls for one token (2 per multiply-add), LM head excluded."""
        return 2.0 * self.layer_params() * (self.layers if layers is None else layers)

    def head_flops_per_token(self) -> float:
        """FLOPs of the LM head for one token."""
        return 2.0 * self.vocab * self.hidden

    def attention_flops(self, query_tokens: int, context_before: int, layers: Optional[int] = None) -> float:
        """FLOPs of exact causal attention (QK^T and PV, 4 per query-key pair per head dim) of
        ``query_tokens`` new tokens over ``context_before`` cached ones plus themselves."""
        pairs = query_tokens * context_before + query_tokens * (query_tokens + 1) / 2.0
        return 4.0 * self.heads * self.head_dim * pairs * (self.layers if layers is None else layers)

    def kv_bytes_per_token(self, layers: Optional[int] = None) -> int:
        """Bytes of K and V of one token (all KV heads) over ``layers`` layers (default all)."""
        per_layer = 2 * self.kv_heads * self.head_dim * self.bytes_per_kv_elem
        return per_layer * (self.layers if layers is None else layers)


# ------------------------------------------------------------------------------ saturation
@dataclass(frozen=True)
class Saturation:
    """Relative throughput of a share x of the device: s(1) = 1, non-decreasing.

    s(x) = (1 - exp(-(x/x0)^p)) / (1 - exp(-(1/x0)^p)): close to linear below the saturation
    share x0 and flat well above it; p (``shape``) sharpens the knee. ``x0=None`` is linear
    (s(x) = x: no saturation).
    """

    x0: Optional[float] = None
    shape: float = 1.0

    def __post_init__(self) -> None:
        if self.x0 is not None:
            object.__setattr__(self, "x0", check_float("Saturation.x0", self.x0, 1e-4, 1e4))
        object.__setattr__(self, "shape", check_float("Saturation.shape", self.shape, 0.1, 10.0))

    def __call__(self, share: float) -> float:
        x = check_float("share", share, 0.0, 1.0, low_open=True)
        if self.x0 is None:
            return x
        # expm1 keeps the ratio exact when x0 is large (the curve then tends to s(x) = x).
        return math.expm1(-((x / self.x0) ** self.shape)) / math.expm1(-((1.0 / self.x0) ** self.shape))

    def to_dict(self) -> dict:
        return {"x0": self.x0, "shape": self.shape}

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "Saturation":
        return cls(d.get("x0"), d.get("shape", 1.0))  # type: ignore[arg-type]


@dataclass(frozen=True)
class SaturationFit:
    """A fitted curve, the fitted time at full share (seconds) and each point's relative error
    (modelled / measured - 1)."""

    saturation: Saturation
    full_time_s: float
    relative_errors: tuple[float, ...]


def _minimize_1d(f: Callable[[float], float], lo: float, hi: float, grid: int = 48,
                 iters: int = 60) -> tuple[float, float]:
    """Minimum of f on [lo, hi]: a grid scan (the objectives here can have a flat side) then
    golden-section search in the best cell's neighbourhood. Returns (argmin, min)."""
    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    fs = [f(x) for x in xs]
    i = min(range(grid), key=fs.__getitem__)
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid - 1)]
    best = (xs[i], fs[i])
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = f(d)
    for x, fx in ((c, fc), (d, fd)):
        if fx < best[1]:
            best = (x, fx)
    return best


def fit_curve(sse: Callable[[Saturation], float], fit_shape: bool = False) -> Saturation:
    """The saturation curve minimising ``sse(curve)`` (any least-squares objective): x0 over
    [1e-3, 1e3] on a log scale, the shape p over [0.25, 4] when ``fit_shape``, else 1; the
    linear curve is a candidate too."""

    def best_x0(p: float) -> tuple[float, float]:
        return _minimize_1d(lambda u: sse(Saturation(math.exp(u), p)), math.log(1e-3), math.log(1e3))

    if fit_shape:
        log_p, _ = _minimize_1d(lambda v: best_x0(math.exp(v))[1], math.log(0.25), math.log(4.0), grid=16, iters=30)
        p = math.exp(log_p)
    else:
        p = 1.0
    u, value = best_x0(p)
    fitted = Saturation(math.exp(u), p)
    return Saturation(None) if sse(Saturation(None)) < value else fitted


def _check_points(points: Sequence[Sequence[float]], width: int, name: str) -> list[tuple[float, ...]]:
    rows = [tuple(p) for p in points]
    if not rows or any(len(r) != width for r in rows):
        raise ValueError(f"{name}: expected a non-empty sequence of {width}-tuples")
    for r in rows:
        for v in r:
            check_float(name, v, 0.0, math.inf)
    return rows


def fit_saturation(points: Sequence[tuple[float, float]], fit_shape: bool = False) -> SaturationFit:
    """Fit time(x) = T / s(x) to measured (share, seconds) points by least squares on log
    time (relative errors weigh alike at every share). T, the full-share time, has a closed
    form for each curve; the curve is found by :func:`fit_curve`. Needs two distinct shares."""
    rows = _check_points(points, 2, "points")
    shares = [check_float("points share", x, 0.0, 1.0, low_open=True) for x, _ in rows]
    logs = [math.log(check_float("points seconds", t, 0.0, math.inf, low_open=True)) for _, t in rows]
    if len(set(shares)) < 2:
        raise ValueError(f"points: expected at least two distinct shares, got {sorted(set(shares))}")

    def log_scale(sat: Saturation) -> float:
        return sum(lt + math.log(sat(x)) for x, lt in zip(shares, logs)) / len(shares)

    def sse(sat: Saturation) -> float:
        ls = log_scale(sat)
        return sum((ls - math.log(sat(x)) - lt) ** 2 for x, lt in zip(shares, logs))

    sat = fit_curve(sse, fit_shape)
    full = math.exp(log_scale(sat))
    errors = tuple(full / sat(x) / math.exp(lt) - 1.0 for x, lt in zip(shares, logs))
    return SaturationFit(sat, full, errors)


# ------------------------------------------------------------------------------ CPU store
@dataclass(frozen=True)
class StoreProfile:
    """Cost of the CPU store (csrc/store.cpp) at ``threads`` threads, in seconds.

    call_s: fixed cost of one attend call (one sparse layer, one micro-batch). row_s: per K/V
    row read (one middle key of one KV head in one layer: the store's "candidate rows read").
    entry_s: per bucket-list entry walked ("bucket-list entries walked"). append_s: per token
    per KV head per layer appended in prefill (copy, norms, bucket lists).
    """

    call_s: float
    row_s: float
    entry_s: float = 0.0
    append_s: float = 0.0
    threads: int = 1

    def __post_init__(self) -> None:
        for f in ("call_s", "row_s", "entry_s", "append_s"):
            object.__setattr__(self, f, check_float(f"StoreProfile.{f}", getattr(self, f), 0.0, 10.0))
        object.__setattr__(self, "threads", check_int("StoreProfile.threads", self.threads, 1))

    def attend_time(self, rows: float, entries: float = 0.0, calls: int = 1) -> float:
        """Seconds for ``calls`` attend calls reading ``rows`` rows and walking ``entries``
        bucket entries in all."""
        return calls * self.call_s + rows * self.row_s + entries * self.entry_s

    def to_dict(self) -> dict:
        return asdict(self)


def solve_linear(a: list[list[float]], b: list[float]) -> Optional[list[float]]:
    """Gaussian elimination with partial pivoting; None when singular."""
    n = len(b)
    m = [row[:] + [b[i]] for i, row in enumerate(a)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        if abs(m[p][c]) < 1e-300:
            return None
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            k = m[r][c] / m[c][c]
            for j in range(c, n + 1):
                m[r][j] -= k * m[c][j]
    x = [0.0] * n
    for c in range(n - 1, -1, -1):
        x[c] = (m[c][n] - sum(m[c][j] * x[j] for j in range(c + 1, n))) / m[c][c]
    return x


def _nonneg_least_squares(x: list[list[float]], y: list[float]) -> list[float]:
    """Least squares y ~ x @ w with w >= 0, by trying every subset of columns (there are at
    most three) and keeping the best feasible one. Rows are weighted by 1/y so that small and
    large calls count by their relative error."""
    ncol = len(x[0])
    best: tuple[float, list[float]] = (math.inf, [0.0] * ncol)
    for mask in range(1, 1 << ncol):
        cols = [j for j in range(ncol) if mask >> j & 1]
        rows = [[r[j] / max(t, 1e-300) for j in cols] for r, t in zip(x, y)]
        ata = [[sum(r[i] * r[j] for r in rows) for j in range(len(cols))] for i in range(len(cols))]
        atb = [sum(r[i] for r in rows) for i in range(len(cols))]
        w = solve_linear(ata, atb)
        if w is None or any(v < 0 for v in w):
            continue
        full = [0.0] * ncol
        for j, v in zip(cols, w):
            full[j] = v
        err = sum((sum(a * b for a, b in zip(r, full)) / t - 1.0) ** 2 for r, t in zip(x, y))
        if err < best[0]:
            best = (err, full)
    return best[1]


def fit_store_attend(points: Sequence[Sequence[float]], threads: int, append_s: float = 0.0) -> StoreProfile:
    """Fit a :class:`StoreProfile` to measured attend calls: ``(rows, seconds)`` or
    ``(rows, entries, seconds)`` per call (rows and entries from ``Store.last_attend_stats``),
    by non-negative least squares on relative error. ``append_s`` is carried as given."""
    width = len(tuple(points[0])) if len(points) else 2
    if width not in (2, 3):
        raise ValueError(f"points: expected (rows, seconds) or (rows, entries, seconds) tuples, got width {width}")
    rows = _check_points(points, width, "points")
    x = [[1.0, r[0]] + ([r[1]] if width == 3 else []) for r in rows]
    y = [check_float("points seconds", r[-1], 0.0, math.inf, low_open=True) for r in rows]
    w = _nonneg_least_squares(x, y)
    entry_s = w[2] if width == 3 else 0.0
    return StoreProfile(call_s=w[0], row_s=w[1], entry_s=entry_s, append_s=append_s, threads=threads)


# ------------------------------------------------------------------------------ profiles
@dataclass(frozen=True)
class DeviceProfile:
    """A device, its host and its CPU store, as the cost model sees them.

    kind: "gpu" (a separate device: store attends overlap device work) or "cpu" (the device is
    the host: nothing overlaps). peak_flops (FLOP/s) and memory_bandwidth (bytes/s) are the
    specification; the efficiencies are the achievable fractions. compute_units: SMs or cores;
    granularity: the smallest step of a lane's units (8 SMs on Hopper, 1 core).
    step_overhead_s: fixed seconds per lane step. sequence_overhead_s: seconds per sequence per
    decode step (added to the step, not scaled by the share; 0 when the JSON lacks it).
    attention_efficiency: the attention kernel's FLOP rate relative to the matmuls' (a prefill's
    attention FLOPs cost ``flops / attention_efficiency`` at the matmul rate; fitted on a CPU,
    where the flash kernel and the GEMMs differ; 1 when the JSON lacks it).
    multi_row_efficiency: the fraction of the bandwidth a decode step of two or more sequences
    reads the weights at, relative to one sequence's (a CPU's multi-row GEMM streams the weights
    far less efficiently than its single-row GEMV: measured here, 2 rows cost as much as 4;
    1 on a GPU and when the JSON lacks it).
    link_bandwidth (bytes/s, 0 when kind is
    "cpu") and link_latency_s (seconds per transfer): host<->device copies. model: the model
    the profile was fitted for, if any; fit: how it was fitted (informational); notes: the
    assumptions, in words.
    """

    name: str
    kind: str
    peak_flops: float
    compute_efficiency: float
    memory_bandwidth: float
    memory_efficiency: float
    compute_units: int
    granularity: int
    step_overhead_s: float
    compute_saturation: Saturation
    memory_saturation: Saturation
    store: StoreProfile
    host_cores: int
    host_memory_bandwidth: float
    link_bandwidth: float = 0.0
    link_latency_s: float = 0.0
    model: Optional[ModelShape] = None
    fit: dict = field(default_factory=dict, hash=False)
    notes: tuple[str, ...] = ()
    sequence_overhead_s: float = 0.0
    attention_efficiency: float = 1.0
    multi_row_efficiency: float = 1.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"DeviceProfile.kind={self.kind!r}: expected one of {KINDS}")
        pos = {"peak_flops": math.inf, "memory_bandwidth": math.inf, "host_memory_bandwidth": math.inf,
               "compute_efficiency": 1.0, "memory_efficiency": 1.0, "attention_efficiency": 100.0,
               "multi_row_efficiency": 1.0}
        for f, high in pos.items():
            object.__setattr__(self, f, check_float(f"DeviceProfile.{f}", getattr(self, f), 0.0, high, low_open=True))
        for f in ("step_overhead_s", "sequence_overhead_s", "link_bandwidth", "link_latency_s"):
            object.__setattr__(self, f, check_float(f"DeviceProfile.{f}", getattr(self, f), 0.0, math.inf))
        units = check_int("DeviceProfile.compute_units", self.compute_units, 1)
        object.__setattr__(self, "compute_units", units)
        object.__setattr__(self, "granularity", check_int("DeviceProfile.granularity", self.granularity, 1, units))
        object.__setattr__(self, "host_cores", check_int("DeviceProfile.host_cores", self.host_cores, 1))
        if self.kind == "gpu" and self.link_bandwidth <= 0:
            raise ValueError(
                f"DeviceProfile.link_bandwidth={self.link_bandwidth!r}: a gpu profile needs a positive link bandwidth"
            )
        object.__setattr__(self, "notes", tuple(str(n) for n in self.notes))

    @property
    def flops(self) -> float:
        """Achievable FLOP/s of the whole device."""
        return self.peak_flops * self.compute_efficiency

    @property
    def bandwidth(self) -> float:
        """Achievable bytes/s of the whole device."""
        return self.memory_bandwidth * self.memory_efficiency

    def unit_grid(self) -> list[int]:
        """The unit counts a lane can get, ascending: multiples of the granularity, and all."""
        grid = list(range(self.granularity, self.compute_units + 1, self.granularity))
        return grid if grid[-1] == self.compute_units else grid + [self.compute_units]

    def share_of(self, units: int) -> float:
        """The share of ``units`` compute units (e.g. the SM count a green context granted)."""
        return check_int("units", units, 1, self.compute_units) / self.compute_units

    def to_dict(self) -> dict:
        """The JSON document (schema in :func:`profile_schema`)."""
        return {
            "schema": SCHEMA_VERSION, "name": self.name, "kind": self.kind,
            "device": {
                "peak_flops": self.peak_flops, "compute_efficiency": self.compute_efficiency,
                "memory_bandwidth": self.memory_bandwidth, "memory_efficiency": self.memory_efficiency,
                "compute_units": self.compute_units, "granularity": self.granularity,
                "step_overhead_s": self.step_overhead_s, "sequence_overhead_s": self.sequence_overhead_s,
                "attention_efficiency": self.attention_efficiency,
                "multi_row_efficiency": self.multi_row_efficiency,
                "compute_saturation": self.compute_saturation.to_dict(),
                "memory_saturation": self.memory_saturation.to_dict(),
            },
            "host": {
                "cores": self.host_cores, "memory_bandwidth": self.host_memory_bandwidth,
                "link_bandwidth": self.link_bandwidth, "link_latency_s": self.link_latency_s,
                "store": self.store.to_dict(),
            },
            "model": None if self.model is None else self.model.to_dict(),
            "fit": self.fit, "notes": list(self.notes),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "DeviceProfile":
        """The inverse of :meth:`to_dict`; ValueError naming what is missing or wrong."""
        if not isinstance(d, Mapping) or d.get("schema") != SCHEMA_VERSION:
            got = d.get("schema") if isinstance(d, Mapping) else d
            raise ValueError(f"profile schema={got!r}: expected a JSON object with schema {SCHEMA_VERSION}")
        try:
            return cls._from_checked(d)
        except (KeyError, AttributeError) as err:
            raise ValueError(f"profile {d.get('name')!r}: missing or malformed entry {err}") from None

    @classmethod
    def _from_checked(cls, d: Mapping[str, object]) -> "DeviceProfile":
        dev, host, model = d["device"], d["host"], d.get("model")
        if not isinstance(dev, Mapping) or not isinstance(host, Mapping):
            raise ValueError(f"profile {d.get('name')!r}: 'device' and 'host' must be JSON objects")
        return cls(
            name=d["name"], kind=d["kind"],  # type: ignore[arg-type]
            peak_flops=dev["peak_flops"], compute_efficiency=dev["compute_efficiency"],
            memory_bandwidth=dev["memory_bandwidth"], memory_efficiency=dev["memory_efficiency"],
            compute_units=dev["compute_units"], granularity=dev["granularity"],
            step_overhead_s=dev["step_overhead_s"], sequence_overhead_s=dev.get("sequence_overhead_s", 0.0),
            attention_efficiency=dev.get("attention_efficiency", 1.0),
            multi_row_efficiency=dev.get("multi_row_efficiency", 1.0),
            compute_saturation=Saturation.from_dict(dev["compute_saturation"]),
            memory_saturation=Saturation.from_dict(dev["memory_saturation"]),
            store=StoreProfile(**host["store"]), host_cores=host["cores"],
            host_memory_bandwidth=host["memory_bandwidth"], link_bandwidth=host["link_bandwidth"],
            link_latency_s=host["link_latency_s"],
            model=None if model is None else ModelShape.from_dict(model),  # type: ignore[arg-type]
            fit=dict(d.get("fit") or {}), notes=tuple(d.get("notes") or ()),  # type: ignore[arg-type]
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "DeviceProfile":
        return cls.from_dict(json.loads(text))

    def save(self, path: Union[str, Path]) -> None:
        """Write :meth:`to_json` to ``path`` (its folder is made if missing)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.to_json())


def profile_schema() -> str:
    """The profile JSON layout, for documentation (units in brackets)."""
    return """{
  "schema": 1, "name": str, "kind": "gpu" | "cpu",
  "device": {"peak_flops": [FLOP/s], "compute_efficiency": (0,1], "memory_bandwidth": [bytes/s],
             "memory_efficiency": (0,1], "compute_units": int, "granularity": int,
             "step_overhead_s": [s], "sequence_overhead_s": [s per sequence per decode step, default 0],
             "attention_efficiency": [attention FLOP rate / matmul FLOP rate, default 1],
             "multi_row_efficiency": (0,1] [weight-read bandwidth of a multi-sequence decode step, default 1],
             "compute_saturation": {"x0": share | null, "shape": p},
             "memory_saturation": {"x0": share | null, "shape": p}},
  "host": {"cores": int, "memory_bandwidth": [bytes/s], "link_bandwidth": [bytes/s, 0 = none],
           "link_latency_s": [s per transfer],
           "store": {"call_s": [s/call], "row_s": [s/row], "entry_s": [s/entry],
                     "append_s": [s/token/KV head/layer], "threads": int}},
  "model": null | ModelShape fields, "fit": {...informational...}, "notes": [str]
}"""


def shipped_profiles() -> list[str]:
    """Names of the profiles shipped in ``magicpig/perf/profiles/``."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.json"))


def load_profile(path_or_name: Union[str, Path]) -> DeviceProfile:
    """A profile from a JSON file, or a shipped one by bare name (e.g. "h100_llama31_8b")."""
    text = str(path_or_name)
    is_name = isinstance(path_or_name, str) and "/" not in text and "\\" not in text and not text.endswith(".json")
    path = PROFILE_DIR / f"{text}.json" if is_name else Path(path_or_name)
    if not path.is_file():
        raise ValueError(f"path_or_name={text!r}: no such profile file (shipped: {shipped_profiles()})")
    return DeviceProfile.from_json(path.read_text())


# ------------------------------------------------------------------------------ cost model
@dataclass(frozen=True)
class ShareChoice:
    """The decode lane's share: ``units`` of the device (``share`` = units / all), the modelled
    step ``time_s`` (seconds) there, and whether it meets the target. An empty batch needs no
    units (0, 0.0, 0.0, True)."""

    units: int
    share: float
    time_s: float
    meets_target: bool


@dataclass(frozen=True)
class _Work:
    """FLOPs and bytes of one kernel group (one micro-batch), and how often it runs per step."""

    flops: float
    bytes: float
    repeats: int = 1


@dataclass(frozen=True)
class _DecodeWork:
    """A decode batch reduced to what the step time needs (independent of the share)."""

    serial: tuple[_Work, ...]  # device work that nothing overlaps
    overlapped: tuple[_Work, ...]  # sparse layers' device work (ping-pong with the store)
    cpu_s: float  # the store's attend time plus hand-offs, seconds per step
    jobs: int  # flow-shop jobs per step (2 x sparse layers with ping-pong; 0: no overlap)
    sequences: int = 0  # sequences in the batch (each pays the profile's sequence_overhead_s)


class CostModel:
    """Lane step latencies of one model on one device profile (see the module docstring).

    sink_tokens / window_tokens / dense_layers (a count) / hash_bits (K) / tables (L): the
    MagicPIG settings (:meth:`for_config` takes them from a MagicPIGConfig).
    sampled_fraction: the default fraction of middle keys each query head samples.
    """

    def __init__(self, profile: DeviceProfile, shape: ModelShape, *, sink_tokens: int = 4, window_tokens: int = 64,
                 dense_layers: int = 2, hash_bits: int = 10, tables: int = 150, sampled_fraction: float = 0.02) -> None:
        if not isinstance(profile, DeviceProfile) or not isinstance(shape, ModelShape):
            raise TypeError("CostModel: expected a DeviceProfile and a ModelShape")
        self.profile, self.shape = profile, shape
        self.sink_tokens = check_int("sink_tokens", sink_tokens, 0)
        self.window_tokens = check_int("window_tokens", window_tokens, 1)
        self.dense_layers = check_int("dense_layers", dense_layers, 0, shape.layers)
        self.hash_bits = check_int("hash_bits", hash_bits, 1, 20)
        self.tables = check_int("tables", tables, 1, 1024)
        self.sampled_fraction = check_float("sampled_fraction", sampled_fraction, 0.0, 1.0, low_open=True)

    @classmethod
    def for_config(cls, profile: DeviceProfile, shape: ModelShape, config: MagicPIGConfig,
                   sampled_fraction: float = 0.02) -> "CostModel":
        """A model with a MagicPIGConfig's sinks, window, dense layers, K and L. A config whose K
        and L are still to be chosen for the model is priced at the paper's (PAPER_LSH): they
        only set the hashing, a small share of a step; price the resolved config to be exact."""
        dense = len(config.resolve_dense_layers(shape.layers))
        K, L = (config.K, config.L) if config.lsh_resolved else PAPER_LSH[:2]
        return cls(profile, shape, sink_tokens=config.sink_tokens, window_tokens=config.window_tokens,
                   dense_layers=dense, hash_bits=K, tables=L, sampled_fraction=sampled_fraction)

    # -- the roofline -------------------------------------------------------------------
    def lane_time(self, flops: float, bytes_: float, share: float) -> float:
        """Seconds for one kernel group of ``flops`` FLOPs moving ``bytes_`` bytes on a share
        of the device: the slower of compute and memory, each slowed by its saturation."""
        p = self.profile
        return max(flops / (p.flops * p.compute_saturation(share)), bytes_ / (p.bandwidth * p.memory_saturation(share)))

    def _device_time(self, works: Sequence[_Work], share: float) -> float:
        return sum(w.repeats * self.lane_time(w.flops, w.bytes, share) for w in works)

    @staticmethod
    def _check_share(share: float) -> float:
        return check_float("share", share, 0.0, 1.0, low_open=True)

    def _check_method(self, method: str) -> str:
        if method not in METHODS:
            raise ValueError(f"method={method!r}: expected one of {METHODS}")
        return method

    def _combine(self, device_s: float, cpu_s: float, jobs: int) -> float:
        """Device and CPU time of the overlapped part: a two-machine flow shop of ``jobs``
        equal jobs takes max + min / jobs (only one job of the lighter side is exposed);
        without overlap (jobs 0) the two add up."""
        if jobs == 0:
            return device_s + cpu_s
        return max(device_s, cpu_s) + min(device_s, cpu_s) / jobs

    # -- prefill --------------------------------------------------------------------------
    def prefill_time(self, chunk_tokens: int, context_before: int, share: float, method: str = "dense") -> float:
        """Seconds of one prefill step: a chunk of ``chunk_tokens`` tokens after
        ``context_before`` tokens of the same prompt, on ``share`` of the device.

        Compute: the layers' matmuls for the chunk plus causal attention over context + chunk;
        memory: the weights, the context's K/V read and the chunk's written. For "magicpig"
        every sparse layer also sends the chunk's K/V and hash codes to the host and appends
        them to the store, overlapped layer by layer with the next layers' compute.
        """
        s = self.shape
        n = check_int("chunk_tokens", chunk_tokens, 1)
        c0 = check_int("context_before", context_before, 0)
        share = self._check_share(share)
        method = self._check_method(method)
        flops = n * s.linear_flops_per_token() + s.attention_flops(n, c0) / self.profile.attention_efficiency
        bytes_ = s.layers * s.layer_weight_bytes() + (c0 + n) * s.kv_bytes_per_token()
        head = _Work(s.head_flops_per_token(), s.head_weight_bytes())  # the last token's logits
        sparse = s.layers - self.dense_layers if method == "magicpig" else 0
        if sparse:
            flops += 2.0 * n * s.kv_heads * s.head_dim * self.hash_bits * self.tables * sparse
        layers_s = self.lane_time(flops, bytes_, share)
        host_s = sparse * self._offload_time(n)
        jobs = sparse if self.profile.kind == "gpu" else 0
        return self.profile.step_overhead_s + self._device_time([head], share) + self._combine(layers_s, host_s, jobs)

    def _offload_time(self, tokens: int) -> float:
        """Seconds to move one layer's K/V and key codes of ``tokens`` tokens to the host and
        append them to the store."""
        p, s = self.profile, self.shape
        token_heads = tokens * s.kv_heads
        link_bytes = token_heads * (2 * s.head_dim * s.bytes_per_kv_elem + 4 * self.tables)
        link_s = link_bytes / p.link_bandwidth + p.link_latency_s if p.link_bandwidth > 0 else 0.0
        return link_s + token_heads * p.store.append_s

    # -- decode ---------------------------------------------------------------------------
    def _fraction(self, sampled_fraction: Optional[float]) -> float:
        if sampled_fraction is None:
            return self.sampled_fraction
        return check_float("sampled_fraction", sampled_fraction, 0.0, 1.0, low_open=True)

    def _check_lens(self, context_lens: Sequence[int]) -> list[int]:
        if isinstance(context_lens, (str, bytes)) or not hasattr(context_lens, "__iter__"):
            raise TypeError(f"context_lens={context_lens!r}: expected a sequence of token counts")
        return [check_int("context_lens", c, 1) for c in context_lens]

    def _weight_read(self, rows: int) -> float:
        """Bytes-equivalent factor of reading the weights for a decode (micro-)batch of ``rows``
        sequences: 1 for one row, 1 / multi_row_efficiency for more."""
        return 1.0 if rows <= 1 else 1.0 / self.profile.multi_row_efficiency

    def _dense_layer_work(self, lens: Sequence[int], layers: int, parts: int) -> _Work:
        """``layers`` layers of exact attention over each sequence's whole context, for one of
        ``parts`` equal micro-batches (each reads all the layers' weights)."""
        s = self.shape
        flops = len(lens) * s.linear_flops_per_token(layers) + sum(s.attention_flops(1, c, layers) for c in lens)
        kv = sum(c + 1 for c in lens) * s.kv_bytes_per_token(layers)
        weights = layers * s.layer_weight_bytes() * self._weight_read(-(-len(lens) // parts))
        return _Work(flops / parts, weights + kv / parts, parts)

    def _sparse_layer_work(self, lens: Sequence[int], layers: int, parts: int) -> _Work:
        """The device side of ``layers`` sparse layers: matmuls, hashing the queries
        (projection [Hkv, d, K*L] in fp32 read per micro-batch) and exact attention over sinks
        + window."""
        s = self.shape
        near = [min(c, self.sink_tokens + self.window_tokens) for c in lens]
        kl = self.hash_bits * self.tables
        flops = len(lens) * (s.linear_flops_per_token(layers) + 2.0 * s.heads * s.head_dim * kl * layers)
        flops += sum(s.attention_flops(1, c, layers) for c in near)
        weights = layers * (s.layer_weight_bytes() * self._weight_read(-(-len(lens) // parts))
                            + 4 * s.kv_heads * s.head_dim * kl)
        kv = sum(c + 1 for c in near) * s.kv_bytes_per_token(layers)
        return _Work(flops / parts, weights + kv / parts, parts)

    def _store_time(self, lens: Sequence[int], layers: int, parts: int, fraction: float) -> float:
        """Seconds of the CPU side of ``layers`` sparse layers: the store's attend calls (rows
        read: the union of each KV head's query group's samples; bucket entries walked: L
        buckets of middle / 2^K entries per query head) and the hand-offs (q fp32 and codes
        int32 down, out fp32, lse and counts up; two transfers per call)."""
        p, s = self.profile, self.shape
        middle = sum(max(0, c - self.sink_tokens - self.window_tokens) for c in lens)
        rows = middle * s.kv_heads * (1.0 - (1.0 - fraction) ** s.group)
        entries = middle * s.heads * self.tables / 2.0**self.hash_bits
        per_layer = p.store.attend_time(rows, entries, calls=parts)
        if p.link_bandwidth > 0:
            link_bytes = len(lens) * s.heads * (8 * s.head_dim + 4 * self.tables + 8)
            per_layer += link_bytes / p.link_bandwidth + 2 * parts * p.link_latency_s
        return layers * per_layer

    def _decode_work(self, lens: Sequence[int], method: str, fraction: float) -> _DecodeWork:
        s = self.shape
        embed = len(lens) * s.hidden * s.bytes_per_param  # the B embedding rows gathered
        head = _Work(len(lens) * s.head_flops_per_token(), s.head_weight_bytes() * self._weight_read(len(lens)) + embed)
        if method == "dense":
            return _DecodeWork((head, self._dense_layer_work(lens, s.layers, 1)), (), 0.0, 0, len(lens))
        sparse = s.layers - self.dense_layers
        # On a GPU the runtime splits a batch of two or more into two micro-batches
        # (runner._split); on a CPU device it decodes one batch (ModelRunner.ping_pong).
        parts = 2 if len(lens) >= 2 and sparse and self.profile.kind == "gpu" else 1
        serial = (head, self._dense_layer_work(lens, self.dense_layers, parts)) if self.dense_layers else (head,)
        overlapped = (self._sparse_layer_work(lens, sparse, parts),) if sparse else ()
        cpu_s = self._store_time(lens, sparse, parts, fraction) if sparse else 0.0
        jobs = parts * sparse if parts == 2 and self.profile.kind == "gpu" else 0
        return _DecodeWork(serial, overlapped, cpu_s, jobs, len(lens))

    def _decode_step(self, work: _DecodeWork, share: float) -> float:
        device = self._device_time(work.serial, share)
        overlapped = self._device_time(work.overlapped, share)
        fixed = self.profile.step_overhead_s + self.profile.sequence_overhead_s * work.sequences
        return fixed + device + self._combine(overlapped, work.cpu_s, work.jobs)

    def decode_time(self, context_lens: Sequence[int], method: str, share: float,
                    sampled_fraction: Optional[float] = None) -> float:
        """Seconds of one decode step of a batch (one sequence per entry of ``context_lens``,
        the tokens already cached) with ``method`` ("dense" or "magicpig") on ``share`` of the
        device. An empty batch takes 0 s. "dense": every layer reads the weights and every
        sequence's K/V. "magicpig": the dense layers as above; the sparse layers read weights,
        the hash projection and sinks + window on the device while the CPU store attends the
        middle, overlapped by the ping-pong (module docstring). Both add the step overhead and
        the profile's ``sequence_overhead_s`` per sequence (not scaled by the share)."""
        lens = self._check_lens(context_lens)
        share = self._check_share(share)
        method = self._check_method(method)
        fraction = self._fraction(sampled_fraction)
        if not lens:
            return 0.0
        return self._decode_step(self._decode_work(lens, method, fraction), share)

    def decode_cpu_time(self, context_lens: Sequence[int], sampled_fraction: Optional[float] = None) -> float:
        """Seconds per magicpig decode step of the CPU store and hand-offs alone (independent of
        the share: a lower bound on the step for any share)."""
        lens = self._check_lens(context_lens)
        if not lens:
            return 0.0
        return self._decode_work(lens, "magicpig", self._fraction(sampled_fraction)).cpu_s

    def smallest_decode_share(self, context_lens: Sequence[int], method: str, tbt_target_s: float,
                              slack: float = 1.0, sampled_fraction: Optional[float] = None) -> ShareChoice:
        """The fewest units on the profile's grid (:meth:`DeviceProfile.unit_grid`) whose decode
        step takes at most ``tbt_target_s * slack`` seconds (slack < 1 leaves a margin). When
        none does, all units with ``meets_target=False``."""
        lens = self._check_lens(context_lens)
        method = self._check_method(method)
        target = check_float("tbt_target_s", tbt_target_s, 0.0, math.inf, low_open=True)
        budget = target * check_float("slack", slack, 0.0, 10.0, low_open=True)
        fraction = self._fraction(sampled_fraction)
        if not lens:
            return ShareChoice(0, 0.0, 0.0, True)
        work = self._decode_work(lens, method, fraction)
        p = self.profile
        # The step time never increases with the share, so the first grid point that fits is
        # the smallest; 17 points on Hopper, so a scan costs little.
        for units in p.unit_grid():
            t = self._decode_step(work, p.share_of(units))
            if t <= budget:
                return ShareChoice(units, p.share_of(units), t, True)
        return ShareChoice(p.compute_units, 1.0, t, False)


# ------------------------------------------------------------------------------ GPU profile
_GPUS = {  # spec peak dense bf16 FLOP/s, HBM bytes/s
    "h100": (989e12, 3.35e12),
    "h200": (989e12, 4.8e12),
}
_COMPUTE_EFFICIENCY = 0.70
_MEMORY_EFFICIENCY = 0.85
_HOST_BW = 300e9  # achievable by the store's random row gathers on 2 x 8480+ (614e9 peak)
_HOST_CORES = 112


def _gpu_store(shape: ModelShape, tables: int = 150) -> StoreProfile:
    """The store on the assumed host: rows and appends priced at the host bandwidth."""
    row_bytes = 2 * shape.head_dim * shape.bytes_per_kv_elem  # bf16 K and V of one key
    append_bytes = row_bytes + 4 * tables + 2 * tables  # K, V; int32 codes read; uint16 ids written
    return StoreProfile(call_s=50e-6, row_s=row_bytes / _HOST_BW, entry_s=2e-9 / _HOST_CORES,
                        append_s=append_bytes / _HOST_BW, threads=_HOST_CORES)


def _gpu_notes(gpu: str) -> tuple[str, ...]:
    peak, hbm = _GPUS[gpu]
    return (
        f"{gpu.upper()} SXM: {peak:.3g} FLOP/s dense bf16 peak x {_COMPUTE_EFFICIENCY} achievable; "
        f"HBM {hbm:.3g} B/s x {_MEMORY_EFFICIENCY} achievable.",
        "132 SMs, green-context granularity 8 SMs (DESIGN.md 7). "
        "Per-step overhead 0.3 ms (graph launch, sampling, sync).",
        "Memory saturation fitted to SGLang's H800 decode step (42.7/17.8/15.1/14.3 ms at 8/32/64/132 SMs; "
        "H800 = H100 for one GPU) through the model's own decode step of a Llama-3.1-8B dense batch of "
        f"{REFERENCE_BATCH} equal sequences whose length makes the 132-SM step 14.3 ms; see 'fit'.",
        "Compute saturation linear in SMs (tensor-core throughput is per SM); not fitted: no public per-SM "
        "prefill figure. Refit from scripts/gpu_check.sh measurements.",
        f"Host: 2 x 56-core Xeon 8480+ ({_HOST_CORES} cores), DDR5-4800 x 16 channels = 614e9 B/s peak, "
        f"{_HOST_BW:.3g} B/s achievable by the store's random 512-B row gathers.",
        "Store: row = bf16 K and V of one key (2*head_dim*2 B) at host bandwidth; bucket entry 2 ns of core "
        "time over 112 cores; 50 us per attend call; append 1,412 B per token per KV head (K, V, L=150 int32 "
        "codes read, uint16 ids written).",
        "Link: PCIe Gen5 x16, 40e9 B/s achievable, 10 us per transfer; magicpig decode is not CUDA-graphed, so "
        "each sparse layer pays two transfers per micro-batch (q and codes down, out and lse up) on the CPU side.",
        "H200: same compute and saturation shares as H100, HBM 4.8e12 B/s.",
    )


def _profile_for(gpu: str, memory_saturation: Saturation, fit: dict) -> DeviceProfile:
    peak, hbm = _GPUS[gpu]
    shape = ModelShape.llama31_8b()
    return DeviceProfile(
        name=f"{gpu}_llama31_8b", kind="gpu", peak_flops=peak, compute_efficiency=_COMPUTE_EFFICIENCY,
        memory_bandwidth=hbm, memory_efficiency=_MEMORY_EFFICIENCY, compute_units=132, granularity=8,
        step_overhead_s=0.3e-3, compute_saturation=Saturation(None), memory_saturation=memory_saturation,
        store=_gpu_store(shape), host_cores=_HOST_CORES, host_memory_bandwidth=_HOST_BW,
        link_bandwidth=40e9, link_latency_s=10e-6, model=shape, fit=fit, notes=_gpu_notes(gpu),
    )


def _reference_length(model: CostModel, full_time_s: float) -> int:
    """The context length of the reference batch whose dense step at full share takes
    ``full_time_s`` (bisection: the step grows with the length)."""
    lo, hi = 1, 1 << 22
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if model.decode_time([mid] * REFERENCE_BATCH, "dense", 1.0) < full_time_s:
            lo = mid
        else:
            hi = mid
    return lo


def sglang_comparison(model: CostModel, length: Optional[int] = None) -> list[tuple[int, float, float, float]]:
    """(SMs, SGLang seconds, modelled seconds, relative error) at each SGLang H800 point, for
    the reference batch (``length``: its context length; default the profile's fitted one)."""
    if length is None:
        length = int(model.profile.fit.get("reference_context", 0))
        length = length or _reference_length(model, SGLANG_H800_DECODE[-1][1])
    out = []
    for sms, measured in SGLANG_H800_DECODE:
        t = model.decode_time([length] * REFERENCE_BATCH, "dense", sms / model.profile.compute_units)
        out.append((sms, measured, t, t / measured - 1.0))
    return out


def build_gpu_profile(gpu: str = "h100") -> DeviceProfile:
    """The Llama-3.1-8B profile of an H100 or H200 (assumptions in the module docstring),
    its memory saturation fitted to SGLang's H800 decode figures on the H100 roofline."""
    if gpu not in _GPUS:
        raise ValueError(f"gpu={gpu!r}: expected one of {sorted(_GPUS)}")
    base = CostModel(_profile_for("h100", Saturation(None), {}), ModelShape.llama31_8b())
    length = _reference_length(base, SGLANG_H800_DECODE[-1][1])
    lens = [length] * REFERENCE_BATCH

    def sse(sat: Saturation) -> float:
        model = CostModel(replace(base.profile, memory_saturation=sat), base.shape)
        return sum(math.log(model.decode_time(lens, "dense", n / 132) / t) ** 2 for n, t in SGLANG_H800_DECODE)

    sat = fit_curve(sse)
    fitted = CostModel(replace(base.profile, memory_saturation=sat), base.shape)
    errors = [round(e, 5) for *_, e in sglang_comparison(fitted, length)]
    fit = {
        "source": "SGLang H800 decode step, DESIGN.md 7", "points_sms_s": [list(p) for p in SGLANG_H800_DECODE],
        "reference_batch": REFERENCE_BATCH, "reference_context": length, "method": "dense",
        "objective": "least squares on log time over the four points, memory x0 only (shape 1)",
        "relative_errors": errors, "error_bound": SGLANG_ERROR_BOUND,
    }
    return _profile_for(gpu, sat, fit)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """``--write-gpu-profile PATH [--gpu h100|h200]`` writes the fitted profile;
    ``--check [NAME_OR_PATH]`` prints a profile's decode curve against SGLang's points."""
    ap = argparse.ArgumentParser(prog="python -m magicpig.perf.cost_model", description=main.__doc__)
    ap.add_argument("--write-gpu-profile", metavar="PATH")
    ap.add_argument("--gpu", default="h100", choices=sorted(_GPUS))
    ap.add_argument("--check", nargs="?", const="h100_llama31_8b", metavar="NAME_OR_PATH")
    args = ap.parse_args(argv)
    if args.write_gpu_profile:
        build_gpu_profile(args.gpu).save(args.write_gpu_profile)
        print(f"wrote {args.write_gpu_profile}")
    if args.check:
        profile = load_profile(args.check)
        model = CostModel(profile, profile.model or ModelShape.llama31_8b())
        print(f"{profile.name}: memory x0={profile.memory_saturation.x0}, shape={profile.memory_saturation.shape}")
        for sms, measured, t, err in sglang_comparison(model):
            print(f"{sms:4d} SMs  SGLang {measured * 1e3:6.2f} ms  model {t * 1e3:6.2f} ms  error {err:+.1%}")
    if not (args.write_gpu_profile or args.check):
        ap.print_help()
    return 0


if __name__ == "__main__":
    sys.exit(main())
