"""``magicpig profile``: measure this machine's CPU and fit a cost-model profile to it
(issue 13, the CPU half of DESIGN.md §4 "Simulator": checked against the real engine here).

What is measured (the loaded model, on the CPU, with the engine's own runner)
---------------------------------------------------------------------------
* **Prefill** (method "dense"): one whole prompt of ``n`` random tokens per step (no context
  before the chunk) for each chunk size, at each lane
  thread count ``k`` (``torch.set_num_threads(k)``; the lane's share is ``k / os.cpu_count()``).
  With method "magicpig", the same chunks with the magicpig config at the most threads,
  interleaved with the dense ones (checks the hashing and store-append part of the model; not
  used in the fit).
* **Decode**: one step of a batch of ``b`` sequences of ``c`` cached tokens, for each batch size
  and context, "dense" and (method "magicpig") "magicpig", at each thread count. The cached K/V
  are real: one prompt of the longest context is prefilled once and its per-layer K/V prefixes
  are loaded into the runners (``ModelRunner.add_prefilled``), so no step pays for another
  prefill and every context shares the same keys.
* **Store**: every attend call of the CPU stores during the timed magicpig decode steps (seconds,
  candidate rows read and bucket entries walked from the C++ store's ``last_attend_stats``), and
  the store appends while the sequences are loaded (seconds per token per KV head per layer).

Each point is the median of ``repeats`` timed steps after one untimed warm-up step per thread
count; the thread counts are interleaved within each repetition so a neighbour's load falls on
all of them alike. Torch's thread count is restored afterwards.

How the profile is fitted (using the cost model's own FLOP and byte formulas)
-----------------------------------------------------------------------------
1. For each share x: an effective FLOP/s ``F_x`` and bytes/s ``B_x``, with one per-step overhead
   ``o`` and one per-sequence decode cost ``c`` (``sequence_overhead_s``) shared by all shares,
   minimise the squared log error of ``CostModel.prefill_time`` and
   ``CostModel.decode_time(..., "dense")`` over the dense prefill (compute-bound) and dense
   decode (memory-bound) points (bounded non-linear least squares, ``magicpig.perf.fit``'s
   :func:`~magicpig.perf.fit.bounded_least_squares`, on log F_x, log B_x, log o, log c, and log a,
   the attention kernel's FLOP rate relative to the matmuls', from three or more prompt sizes:
   the attention's FLOPs grow with the square of the prompt, the matmuls' linearly). A dense
   decode step is then o + bytes / B_x + batch * c: the decode points at two or more batch sizes
   at each context separate the per-sequence cost from the bandwidth (the roofline alone reads
   the weights once per step, so it has no term that grows with the batch at a fixed context
   but the K/V). With a single batch size ``c`` is not fitted (0).
2. The compute and memory :class:`Saturation` curves over the share: :func:`fit_saturation` of
   the points ``(x, 1 / F_x)`` and ``(x, 1 / B_x)`` (one parameter, x0; the shape is 1). With
   two cores the grid is only x = 0.5 and 1.0, so the fit is exact whenever the measured
   speed-up from 1 to 2 threads lies in (1, 2); outside it (2 threads slower than 1 under a
   neighbour's load, or superlinear) the nearest curve is taken and its error is reported.
   ``peak_flops`` and ``memory_bandwidth`` are then the fitted full-share rates (efficiencies 1).
3. The store: :func:`fit_store_attend` on the attend calls (rows, entries, seconds);
   ``append_s`` as measured.
4. Every measured point (the fitted ones and the checks: magicpig decode with its measured
   sampled fraction, magicpig prefill, the source prefill) is compared with the final
   profile's :class:`CostModel`; the table goes into the profile's ``fit``.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import torch

from magicpig.cache import cache_dir
from magicpig.config import MagicPIGConfig, check_int
from magicpig.model.loaded import LoadedModel, load_model
from magicpig.core.kv_budget import blocks_for
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, ModelRunner
from magicpig.runtime.standalone import StandaloneRunner
from magicpig.runtime.calibration import resolve_lsh
from magicpig.core.argtypes import OneLineParser
from magicpig.perf.cost_model import CostModel
from magicpig.perf.fit import bounded_least_squares, fit_saturation, fit_store_attend
from magicpig.perf.profile import DeviceProfile, Saturation, StoreProfile, load_profile
from magicpig.perf.shape import ModelShape

PROG = "magicpig profile"
PROFILE_METHODS = ("magicpig", "dense")
# Decode at batches 1, 2, 4 and 8: a CPU's multi-row GEMMs are not linear in the rows (measured
# here: 3 rows slower than 4), so the per-sequence cost is fitted over the batches a server runs.
FULL = {"chunks": (256, 1024, 2048), "contexts": (1024, 4096), "batches": (1, 2, 4, 8), "repeats": 3}
QUICK = {"chunks": (128, 512), "contexts": (512, 2048), "batches": (1, 4), "repeats": 3}
SEED = 0

Progress = Optional[Callable[[str], None]]


# ------------------------------------------------------------------------------ measurements
@dataclass
class Point:
    """One measured step. kind: "prefill" | "decode"; method: "dense" | "magicpig"; threads:
    torch threads of the lane, share = threads / cores; batch: sequences in the step (1 for
    prefill); tokens: prefill chunk tokens (``context`` tokens of the prompt before it), or decode tokens cached per
    sequence (mean over the timed steps); samples: each timed step [s]; role: "fit" (used to
    fit F, B and the overhead) or "check"; sampled_fraction: magicpig decode, the runtime's
    mean fraction of middle keys each query head read (``SequenceKV.computation_cost``);
    rows_per_layer: magicpig decode, store rows read per sparse layer per step (measured)."""

    kind: str
    method: str
    threads: int
    share: float
    batch: int
    tokens: int
    samples: list[float]
    role: str = "fit"
    sampled_fraction: float = 0.0
    rows_per_layer: float = 0.0
    context: int = 0  # prefill: tokens of the same prompt before the chunk (a chunked prefill)

    @property
    def seconds(self) -> float:
        """Median of the samples [s]."""
        return statistics.median(self.samples)


@dataclass
class StoreLog:
    """What the probe saw: per attend call (rows read, bucket entries walked, seconds, tag), and
    the appends (seconds and token-heads, summed over calls)."""

    calls: list[tuple[float, float, float, tuple]] = field(default_factory=list)
    append_seconds: float = 0.0
    append_token_heads: int = 0


class _StoreProbe:
    """Times the attend and append calls of every CPU store of a runner's sparse layers through
    the stores' timing hooks (removed by ``close``). Attend calls are recorded only while
    ``tag`` is set."""

    def __init__(self, runner: ModelRunner, log: StoreLog):
        self.log, self.tag = log, None
        self.calls_per_layer = 2 if runner.ping_pong else 1  # a batch of two or more, split or not
        self.stores = [sp.method.store for sp in runner.sparse.values()
                       if hasattr(getattr(sp.method, "store", None), "set_timing_hook")]
        for store in self.stores:
            store.set_timing_hook(self._record)

    def _record(self, kind: str, seconds: float, info: dict) -> None:
        if kind == "append":
            self.log.append_seconds += seconds
            self.log.append_token_heads += int(info["tokens"]) * int(info["heads"])
        elif self.tag is not None:
            self.log.calls.append((info["rows"], info["entries"], seconds, self.tag))

    def close(self) -> None:
        for store in self.stores:
            store.set_timing_hook(None)


def _set_threads(k: int) -> None:
    torch.set_num_threads(k)


def _random_ids(gen: torch.Generator, n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,), generator=gen).tolist()


def _measure_prefill(runners: dict[str, StandaloneRunner], chunks: Sequence[int], threads: Sequence[int],
                     repeats: int, gen: torch.Generator, cores: int) -> list[Point]:
    """Prefill steps of whole prompts of each chunk size, and of a chunk of the middle size after
    the largest (a chunked prefill's later chunk, as the engine runs it): the
    "dense" runner at every thread count (fit points), any other at the most threads (check
    points), all interleaved within each repetition (medians of ``repeats`` after a warm-up)."""
    vocab = next(iter(runners.values())).runner.model.args.vocab_size
    cases = [(n, 0) for n in chunks]
    if len(chunks) >= 2:
        cases.append((sorted(chunks)[len(chunks) // 2 - 1], max(chunks)))
    prompts = {(n, c0): _random_ids(gen, c0 + n, vocab) for n, c0 in cases}
    plan = [(m, k) for k in threads for m in runners if m == "dense" or k == max(threads)]

    def once(method: str, case: tuple[int, int]) -> float:
        runner, (n, c0) = runners[method], case
        ids = prompts[case]
        if c0 == 0:
            t0 = time.perf_counter()
            seq, _ = runner.prefill(ids)
            dt = time.perf_counter() - t0
        else:
            seq = runner.admit(ids)
            runner.runner.prefill(seq, ids, c0)  # the context before, untimed
            t0 = time.perf_counter()
            runner.runner.prefill(seq, ids, n)
            dt = time.perf_counter() - t0
        runner.release(seq)
        return dt

    for m, k in plan:
        _set_threads(k)
        once(m, cases[0])
    samples: dict[tuple[str, tuple[int, int], int], list[float]] = {(m, c, k): [] for c in cases for m, k in plan}
    for _ in range(repeats):
        for case in cases:
            for m, k in plan:
                _set_threads(k)
                samples[(m, case, k)].append(once(m, case))
    return [Point("prefill", m, k, k / cores, 1, n, s, "fit" if m == "dense" else "check", context=c0)
            for (m, (n, c0), k), s in samples.items()]


def _source_kv(standalone: StandaloneRunner, tokens: int, gen: torch.Generator, threads: int,
               cores: int) -> tuple[list[torch.Tensor], list[torch.Tensor], Point]:
    """Per-layer K/V [Hkv, tokens, d] of one random prompt, prefilled once by a dense runner
    (copies), and that prefill's time as a one-sample check point."""
    _set_threads(threads)
    runner = standalone.runner
    ids = _random_ids(gen, tokens, runner.model.args.vocab_size)
    t0 = time.perf_counter()
    seq, _ = standalone.prefill(ids)
    dt = time.perf_counter() - t0
    keys, values = [], []
    for layer in range(runner.model.args.num_layers):
        k, v = runner.dense[layer].sequence(seq.blocks, tokens)
        keys.append(k.clone())
        values.append(v.clone())
    standalone.release(seq)
    return keys, values, Point("prefill", "dense", threads, threads / cores, 1, tokens, [dt], "check")


def _decode_case(runner: StandaloneRunner, method: str, kv: tuple[list[torch.Tensor], list[torch.Tensor]], batch: int,
                 context: int, threads: Sequence[int], repeats: int, probe: Optional[_StoreProbe],
                 cores: int) -> list[Point]:
    """Decode steps of ``batch`` sequences of ``context`` cached tokens at each thread count."""
    keys, values = ([t[:, :context] for t in part] for part in kv)
    steps = len(threads) * (repeats + 1)
    seqs = [runner.add_prefilled(keys, values, steps + 1) for _ in range(batch)]
    tokens = torch.arange(1, batch + 1, dtype=torch.int64)
    try:
        for k in threads:
            _set_threads(k)
            runner.decode(seqs, tokens)
        samples: dict[int, list[float]] = {k: [] for k in threads}
        lengths: dict[int, list[int]] = {k: [] for k in threads}
        for _ in range(repeats):
            for k in threads:
                _set_threads(k)
                lengths[k].append(seqs[0].length)
                if probe is not None:
                    probe.tag = (batch, context, k)
                t0 = time.perf_counter()
                runner.decode(seqs, tokens)
                samples[k].append(time.perf_counter() - t0)
                if probe is not None:
                    probe.tag = None
        fraction = statistics.fmean(s.computation_cost for s in seqs) if method == "magicpig" else 0.0
    finally:
        for s in seqs:
            runner.release(s)
    role = "fit" if method == "dense" else "check"
    return [Point("decode", method, k, k / cores, batch, round(statistics.fmean(lengths[k])), samples[k], role,
                  fraction, _rows_per_layer(probe, (batch, context, k))) for k in threads]


def _rows_per_layer(probe: Optional[_StoreProbe], tag: tuple) -> float:
    """Store rows read per sparse layer per step in the steps recorded under ``tag`` (a batch
    of two or more is attended in two calls per layer where the runner splits it)."""
    if probe is None:
        return 0.0
    rows = [c[0] for c in probe.log.calls if c[3] == tag]
    return statistics.fmean(rows) * (probe.calls_per_layer if tag[0] >= 2 else 1) if rows else 0.0


def _decode_runner(model: LoadedModel, config: MagicPIGConfig, batches: Sequence[int],
                   contexts: Sequence[int], steps: int) -> StandaloneRunner:
    """A runner with room for the largest batch at the longest context plus ``steps`` tokens."""
    per_seq = blocks_for(max(contexts) + steps + 1, DEFAULT_BLOCK_SIZE)
    return StandaloneRunner(model.model, config, max(batches), max(batches) * per_seq + 1)


def _measure_decode(model: LoadedModel, config: MagicPIGConfig, kv: tuple, batches: Sequence[int],
                    contexts: Sequence[int], threads: Sequence[int], repeats: int, cores: int,
                    log: Optional[StoreLog], progress: Progress) -> list[Point]:
    """Decode points of ``config.method`` for every (context, batch); with a ``log``, the
    stores' attend calls and appends are recorded into it."""
    runner = _decode_runner(model, config, batches, contexts, len(threads) * (repeats + 1))
    probe = _StoreProbe(runner.runner, log) if log is not None and runner.runner.sparse else None
    points: list[Point] = []
    try:
        for context in contexts:
            for batch in batches:
                _set_threads(max(threads))  # loading (hashing, appends) at full share
                points += _decode_case(runner, config.method, kv, batch, context, threads, repeats, probe, cores)
                _say(progress, f"decode {config.method:8s} batch {batch} context {context}: " + ", ".join(
                    f"{p.threads} thr {p.seconds * 1e3:.1f} ms" for p in points[-len(threads):]))
    finally:
        if probe is not None:
            probe.close()
        runner.close()
    return points


def _say(progress: Progress, text: str) -> None:
    if progress is not None:
        progress(text)


# ------------------------------------------------------------------------------ fitting
def model_shape(model: LoadedModel) -> ModelShape:
    """The cost model's shape of a loaded model, with the widths it actually computes in (the
    runtime runs float32 on the CPU whatever the checkpoint's dtype)."""
    width = torch.finfo(model.model.dtype).bits // 8
    shape = ModelShape.from_dict(model.hf_config.to_dict())
    name = Path(model.source).name if model.source else shape.name
    return replace(shape, bytes_per_param=width, bytes_per_kv_elem=width, name=name)


def _flat_profile(store: StoreProfile, cores: int) -> DeviceProfile:
    """A cpu profile with linear saturation, to be given per-share rates while fitting."""
    return DeviceProfile(
        name="fit", kind="cpu", peak_flops=1e11, compute_efficiency=1.0, memory_bandwidth=1e10,
        memory_efficiency=1.0, compute_units=cores, granularity=1, step_overhead_s=0.0,
        compute_saturation=Saturation(None), memory_saturation=Saturation(None), store=store,
        host_cores=cores, host_memory_bandwidth=1e10,
    )


def model_seconds(cost: CostModel, p: Point, share: Optional[float] = None) -> float:
    """The cost model's time of a measured point [s] (at ``share``, default the point's)."""
    x = p.share if share is None else share
    if p.kind == "prefill":
        return cost.prefill_time(p.tokens, p.context, x, p.method)
    fraction = p.sampled_fraction if p.method == "magicpig" and p.sampled_fraction > 0 else None
    return cost.decode_time([p.tokens] * p.batch, p.method, x, sampled_fraction=fraction)


def _totals(cost: CostModel, p: Point) -> tuple[float, float]:
    """(FLOPs, bytes) of a point by the cost model: its time with unbounded bandwidth at 1
    FLOP/s, and with unbounded FLOP/s at 1 byte/s (no overhead)."""
    base = cost.profile
    flops = CostModel(replace(base, peak_flops=1.0, memory_bandwidth=1e300), cost.shape)
    bytes_ = CostModel(replace(base, peak_flops=1e300, memory_bandwidth=1.0), cost.shape)
    return model_seconds(flops, p, 1.0), model_seconds(bytes_, p, 1.0)


@dataclass
class RateFit:
    """Per-share effective rates, the shared overhead, the shared per-sequence decode cost and the
    log-error objective at the end."""

    flops: dict[float, float]  # share -> FLOP/s
    bandwidth: dict[float, float]  # share -> bytes/s
    overhead_s: float  # seconds per step
    sse: float
    sequence_overhead_s: float = 0.0  # seconds per sequence per decode step
    attention_efficiency: float = 1.0  # attention FLOP rate / matmul FLOP rate (prefill)
    multi_row_efficiency: float = 1.0  # weight-read bandwidth of a multi-sequence decode step


def fit_rates(points: Sequence[Point], shape: ModelShape, cores: int,
              config: Optional[MagicPIGConfig] = None) -> RateFit:
    """Per-share FLOP/s and bytes/s, one per-step overhead [s] and one per-sequence decode cost
    [s] minimising the squared log error of the cost model over the points with role "fit"
    (:func:`magicpig.perf.fit.bounded_least_squares` in log space: log F_x, log B_x per share,
    log of the overhead; when the dense decode fit points have two or more batch sizes, log of
    the per-sequence cost, else
    that cost is 0; when the prefill fit points have three or more prompt sizes, log of the
    attention kernel's efficiency relative to the matmuls, else 1; when the decode points have
    batch 1 and two or more larger batches, log of the multi-row weight-read efficiency, else 1)."""
    fit_points = [p for p in points if p.role == "fit"]
    if not fit_points:
        raise ValueError("points: expected at least one point with role 'fit'")
    base = _cost_model(_flat_profile(StoreProfile(0.0, 0.0), cores), shape, config)
    totals = [_totals(base, p) for p in fit_points]
    shares = sorted({p.share for p in fit_points})
    start, bounds = [math.log(1e-4)], [(math.log(1e-9), math.log(0.95 * min(p.seconds for p in fit_points)))]
    decode = [p for p in fit_points if p.kind == "decode"]
    per_sequence = len({p.batch for p in decode}) >= 2
    for x in shares:
        on = [(t, p.seconds) for t, p in zip(totals, fit_points) if p.share == x]
        for rate in (max(f / s for (f, _), s in on), max(b / s for (_, b), s in on)):
            start.append(math.log(rate))
            bounds.append((math.log(rate) - math.log(1e3), math.log(rate) + math.log(1e2)))
    extra = len(start)  # the optional parameters follow: log c, then log attention efficiency
    if per_sequence:  # log c, at most the shortest decode step per sequence
        start.append(math.log(1e-4))
        bounds.append((math.log(1e-9), math.log(0.95 * min(p.seconds / p.batch for p in decode))))
    # Three or more prompt sizes separate the attention's (quadratic) FLOPs from the matmuls'.
    attention = len({p.tokens for p in fit_points if p.kind == "prefill"}) >= 3
    if attention:
        start.append(0.0)
        bounds.append((math.log(0.1), math.log(10.0)))
    # Batch 1 and two larger batches separate the multi-row GEMMs' slower weight reads (a step
    # from one row to two) from the per-sequence cost (linear in the rows).
    batches = {p.batch for p in decode}
    multi_row = 1 in batches and len(batches - {1}) >= 2
    if multi_row:
        start.append(math.log(0.5))
        bounds.append((math.log(0.05), 0.0))

    def per_seq(theta: list[float]) -> float:
        return math.exp(theta[extra]) if per_sequence else 0.0

    def attention_efficiency(theta: list[float]) -> float:
        return math.exp(theta[extra + per_sequence]) if attention else 1.0

    def multi_row_efficiency(theta: list[float]) -> float:
        return math.exp(theta[-1]) if multi_row else 1.0

    def residuals(theta: list[float]) -> list[float]:
        out = []
        for i, x in enumerate(shares):
            prof = replace(base.profile, peak_flops=math.exp(theta[1 + 2 * i]),
                           memory_bandwidth=math.exp(theta[2 + 2 * i]), step_overhead_s=math.exp(theta[0]),
                           sequence_overhead_s=per_seq(theta), attention_efficiency=attention_efficiency(theta),
                           multi_row_efficiency=multi_row_efficiency(theta))
            cost = _cost_model(prof, shape, config)
            out += [math.log(model_seconds(cost, p, 1.0) / p.seconds) for p in fit_points if p.share == x]
        return out

    theta = bounded_least_squares(residuals, start, bounds)
    return RateFit({x: math.exp(theta[1 + 2 * i]) for i, x in enumerate(shares)},
                   {x: math.exp(theta[2 + 2 * i]) for i, x in enumerate(shares)},
                   math.exp(theta[0]), sum(v * v for v in residuals(theta)), per_seq(theta),
                   attention_efficiency(theta), multi_row_efficiency(theta))


def _cost_model(profile: DeviceProfile, shape: ModelShape, config: Optional[MagicPIGConfig],
                sampled_fraction: float = 0.02) -> CostModel:
    if config is None:
        return CostModel(profile, shape, sampled_fraction=sampled_fraction)
    return CostModel.for_config(profile, shape, config, sampled_fraction=sampled_fraction)


def fit_curve_over_shares(rates: dict[float, float]) -> tuple[Saturation, float, list[float], str]:
    """(saturation, full-share rate, relative time errors per share, how) of per-share rates:
    :func:`fit_saturation` of (share, 1 / rate); with one share, linear through it."""
    shares = sorted(rates)
    if len(shares) == 1:
        x = shares[0]
        return Saturation(None), rates[x] / x, [0.0], f"one share ({x:g}): not fitted, linear assumed"
    fitted = fit_saturation([(x, 1.0 / rates[x]) for x in shares])
    exact = len(shares) == 2 and max(abs(e) for e in fitted.relative_errors) < 1e-6
    how = "one-parameter fit on two shares: exact" if exact else f"least squares over {len(shares)} shares"
    return fitted.saturation, 1.0 / fitted.full_time_s, list(fitted.relative_errors), how


def fit_store(log: StoreLog, threads: int) -> tuple[StoreProfile, dict]:
    """The store profile of the recorded attend calls and appends, and a summary of its fit
    (per (batch, context) case: calls, median rows and seconds per call, modelled seconds)."""
    append_s = log.append_seconds / log.append_token_heads if log.append_token_heads else 0.0
    if not log.calls:
        return StoreProfile(0.0, 0.0, 0.0, append_s, threads), {"calls": 0}
    store = fit_store_attend([(r, e, s) for r, e, s, _ in log.calls], threads, append_s)
    errors = sorted(abs(store.attend_time(r, e) / s - 1.0) for r, e, s, _ in log.calls)
    cases = []
    for tag in dict.fromkeys(t[:2] for *_, t in log.calls):
        calls = [c for c in log.calls if c[3][:2] == tag]
        rows, entries = statistics.median(c[0] for c in calls), statistics.median(c[1] for c in calls)
        seconds = statistics.median(c[2] for c in calls)
        model = statistics.median(store.attend_time(c[0], c[1]) for c in calls)
        cases.append({"batch": tag[0], "context": tag[1], "calls": len(calls), "rows": rows, "entries": entries,
                      "seconds": seconds, "model_s": model, "error": model / seconds - 1.0})
    summary = {"calls": len(log.calls), "append_token_heads": log.append_token_heads,
               "append_seconds": log.append_seconds, "median_abs_error_per_call": statistics.median(errors),
               "p90_abs_error_per_call": errors[int(0.9 * (len(errors) - 1))], "cases": cases}
    return store, summary


def point_table(cost: CostModel, points: Sequence[Point]) -> list[dict]:
    """Each point as a dict (its fields, median seconds, the model's seconds and the relative
    error model / measured - 1)."""
    rows = []
    for p in points:
        model = model_seconds(cost, p)
        row = {k: v for k, v in asdict(p).items() if k != "samples"}
        row.update(seconds=p.seconds, samples=[round(s, 6) for s in p.samples], model_s=model,
                   error=model / p.seconds - 1.0)
        rows.append(row)
    return rows


def error_summary(table: Sequence[dict]) -> dict:
    """Median and largest absolute relative error, by role."""
    out = {}
    for role in ("fit", "check"):
        errs = sorted(abs(r["error"]) for r in table if r["role"] == role)
        if errs:
            out[role] = {"points": len(errs), "median_abs": statistics.median(errs), "max_abs": errs[-1]}
    return out


def format_table(table: Sequence[dict]) -> str:
    """The measured-vs-modelled table, one line per point (times in ms)."""
    lines = [f"{'kind':7} {'method':8} {'thr':>3} {'share':>5} {'batch':>5} {'tokens':>6} {'after':>5} "
             f"{'measured':>9} {'model':>9} {'error':>7}  role"]
    for r in table:
        lines.append(f"{r['kind']:7} {r['method']:8} {r['threads']:>3} {r['share']:>5.2f} {r['batch']:>5} "
                     f"{r['tokens']:>6} {r.get('context', 0):>5} {r['seconds'] * 1e3:>9.1f} {r['model_s'] * 1e3:>9.1f} "
                     f"{r['error']:>+7.1%}  {r['role']}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ the profile
@dataclass(frozen=True)
class Settings:
    """What one profiling run measures: lane thread counts, prefill chunk sizes [tokens],
    decode contexts [tokens cached per sequence] and batch sizes [sequences], timed
    repetitions per point, and the methods ("magicpig": dense and magicpig; "dense": dense
    only, no store)."""

    threads: tuple[int, ...]
    chunks: tuple[int, ...]
    contexts: tuple[int, ...]
    batches: tuple[int, ...]
    repeats: int
    method: str


def _ints(name: str, values: Optional[Sequence[int]], default: Sequence[int], low: int, high: int) -> tuple[int, ...]:
    values = default if values is None else values
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{name}={values!r}: expected a sequence of integers")
    out = tuple(sorted({check_int(name, v, low, high) for v in values}))
    if not out:
        raise ValueError(f"{name}={values!r}: expected at least one value")
    return out


def make_settings(threads: Sequence[int] = (1, 2), contexts: Optional[Sequence[int]] = None, quick: bool = False,
                  chunks: Optional[Sequence[int]] = None, batches: Optional[Sequence[int]] = None,
                  repeats: Optional[int] = None, method: str = "magicpig",
                  cores: Optional[int] = None) -> Settings:
    """Checked settings (defaults: ``FULL``, or ``QUICK`` when ``quick``); ValueError/TypeError
    naming the argument. Thread counts must lie in [1, cores]."""
    base = QUICK if quick else FULL
    cores = cores or os.cpu_count() or 1
    if method not in PROFILE_METHODS:
        raise ValueError(f"method={method!r}: expected one of {PROFILE_METHODS}")
    reps = check_int("repeats", base["repeats"] if repeats is None else repeats, 1, 100)
    return Settings(
        threads=_ints("threads", threads, (1, 2), 1, cores),
        chunks=_ints("chunks", chunks, base["chunks"], 1, 1 << 22),
        contexts=_ints("contexts", contexts, base["contexts"], 1, 1 << 22),
        batches=_ints("batches", batches, base["batches"], 1, 256),
        repeats=reps, method=method,
    )


def _as_loaded(model: Union[str, os.PathLike, LoadedModel, None]) -> LoadedModel:
    if isinstance(model, LoadedModel):
        if model.model.device.type != "cpu":
            raise ValueError(f"model: on {model.model.device}; the CPU profiler needs a model loaded on the CPU")
        return model
    return load_model(model, device="cpu")


def _measure_all(model: LoadedModel, config: MagicPIGConfig, s: Settings, cores: int,
                 progress: Progress) -> tuple[list[Point], Optional[StoreLog], int]:
    """Every measurement of a run: (points, the store log or None, store threads)."""
    gen = torch.Generator().manual_seed(SEED)
    dense, sampled = config.replace(method="dense"), config.replace(method="magicpig")
    blocks = blocks_for(max(max(s.chunks), max(s.contexts)), DEFAULT_BLOCK_SIZE) + 1
    runners = {"dense": StandaloneRunner(model.model, dense, 1, blocks)}
    if s.method == "magicpig":
        runners["magicpig"] = StandaloneRunner(model.model, sampled, 1, blocks)
    threads = _store_threads(runners.get("magicpig"), config, cores)
    try:
        points = _measure_prefill(runners, s.chunks, s.threads, s.repeats, gen, cores)
    finally:
        if "magicpig" in runners:
            runners.pop("magicpig").close()
    _say(progress, "prefill: " + ", ".join(f"{p.method} {p.tokens} tok after {p.context} {p.threads} thr "
                                           f"{p.seconds * 1e3:.0f} ms"
                                           for p in points))
    keys, values, source = _source_kv(runners.pop("dense"), max(s.contexts), gen, max(s.threads), cores)
    points.append(source)
    points += _measure_decode(model, dense, (keys, values), s.batches, s.contexts, s.threads, s.repeats, cores,
                              None, progress)
    if s.method == "dense":
        return points, None, threads
    log = StoreLog()
    points += _measure_decode(model, sampled, (keys, values), s.batches, s.contexts, s.threads, s.repeats, cores,
                              log, progress)
    return points, log, threads


def _store_threads(standalone: Optional[StandaloneRunner], config: MagicPIGConfig, cores: int) -> int:
    """The OpenMP threads of the runner's CPU stores (the config's, or the cores)."""
    sparse = {} if standalone is None else standalone.runner.sparse
    stores = [sp.method.store for sp in sparse.values() if hasattr(sp.method, "store")]
    impl = getattr(stores[0], "_impl", None) if stores else None
    if impl is not None and hasattr(impl, "threads"):
        return int(impl.threads())
    return config.cpu_threads or cores


def _check_positions(s: Settings, positions: int) -> None:
    """ValueError when a prompt or a decode context (plus the steps fed) exceeds the model's
    positions."""
    if max(s.chunks) > positions:
        raise ValueError(f"chunks={list(s.chunks)}: expected at most the model's {positions} positions")
    steps = len(s.threads) * (s.repeats + 1)
    if max(s.contexts) + steps > positions:
        raise ValueError(f"contexts={list(s.contexts)}: plus {steps} decode steps exceeds the model's {positions} "
                         "positions")


def profile_name(model: LoadedModel, cores: int) -> str:
    """"cpu_<cores>core_<model family>", e.g. cpu_2core_smollm2."""
    family = (Path(model.source).name or "model").split("-")[0].lower()
    return f"cpu_{cores}core_{family}"


def profile_cpu(model: Union[str, os.PathLike, LoadedModel, None] = None, config: Optional[MagicPIGConfig] = None,
                threads: Sequence[int] = (1, 2), contexts: Optional[Sequence[int]] = None, quick: bool = False, *,
                chunks: Optional[Sequence[int]] = None, batches: Optional[Sequence[int]] = None,
                repeats: Optional[int] = None, method: str = "magicpig", name: Optional[str] = None,
                progress: Progress = None) -> DeviceProfile:
    """Measure this machine's CPU running ``model`` (a name, path or CPU :class:`LoadedModel`;
    default the embedded SmolLM2-135M-Instruct) and fit a ``kind="cpu"`` :class:`DeviceProfile`
    (module docstring). threads: lane thread counts (shares threads / os.cpu_count());
    contexts: decode contexts [tokens]; chunks: prefill prompt sizes [tokens]; batches: decode
    batch sizes; repeats: timed steps per point (defaults ``FULL`` or ``QUICK``). config: the
    MagicPIG settings (K, L, sinks, window, dense layers, store threads); its method is
    ignored: ``method`` chooses what is measured. progress: called with a line per stage.
    The raw measurements and the fit errors are in the profile's ``fit``."""
    config = MagicPIGConfig() if config is None else config
    if not isinstance(config, MagicPIGConfig):
        raise TypeError(f"config={config!r}: expected a MagicPIGConfig or None")
    cores = os.cpu_count() or 1
    s = make_settings(threads, contexts, quick, chunks, batches, repeats, method, cores)
    loaded = _as_loaded(model)
    _check_positions(s, loaded.args.max_context)
    config.check_model(loaded.args.num_layers, loaded.args.max_context)
    config, _ = resolve_lsh(loaded, config.replace(method="magicpig"))  # K, L as the runtime would choose
    saved, load_before, t0 = torch.get_num_threads(), os.getloadavg(), time.perf_counter()
    try:
        points, log, store_threads = _measure_all(loaded, config, s, cores, progress)
    finally:
        torch.set_num_threads(saved)
    timing = {"measure_s": time.perf_counter() - t0, "load_average_before": list(load_before),
              "load_average_after": list(os.getloadavg())}
    return build_profile(model_shape(loaded), config, points, log, store_threads, cores, s,
                         name or profile_name(loaded, cores), timing)


def decode_errors_by_batch(table: Sequence[dict]) -> dict[str, dict[int, float]]:
    """Median relative error (model / measured - 1) of the decode points, by method and batch
    size: a trend with the batch shows per-sequence costs the roofline does not have."""
    out: dict[str, dict[int, float]] = {}
    for method in ("dense", "magicpig"):
        rows = [r for r in table if r["kind"] == "decode" and r["method"] == method]
        for b in sorted({r["batch"] for r in rows}):
            out.setdefault(method, {})[b] = statistics.median(r["error"] for r in rows if r["batch"] == b)
    return out


def _diagnostic_notes(table: Sequence[dict], overhead_s: float) -> tuple[str, ...]:
    """Notes on where the fitted model misses, from the table."""
    by_batch = decode_errors_by_batch(table)
    text = "; ".join(f"{m} " + ", ".join(f"batch {b}: {e:+.0%}" for b, e in errs.items())
                     for m, errs in by_batch.items())
    notes = [f"Decode error (model / measured - 1, median) by batch size: {text}. The roofline reads the weights "
             "once per step; on the CPU each sequence also costs its own attention calls (and GEMMs with more "
             "rows run slower than GEMV): sequence_overhead_s, fitted to the dense decode points, stands for that "
             "cost, so a trend left with the batch is what one constant per sequence does not capture."]
    if overhead_s < 1e-6:
        notes.append("The per-step overhead went to its lower bound (1e-9 s): the fitted points leave no room for "
                     "a fixed per-step cost (see the decode errors by batch size).")
    return tuple(notes)


def _notes(s: Settings, cores: int, how_c: str, how_m: str, store_threads: int) -> tuple[str, ...]:
    shares = ", ".join(f"{k / cores:g}" for k in s.threads)
    return (
        f"Measured on this machine ({cores} cores, {platform.processor() or platform.machine()}) by "
        f"magicpig.perf.profiler: medians of {s.repeats} timed steps after a warm-up; thread counts interleaved.",
        f"Lane shares = torch threads / {cores} cores: {shares}. With {cores} cores the share grid is only {shares}; "
        f"compute saturation: {how_c}; memory saturation: {how_m}.",
        "peak_flops and memory_bandwidth are the fitted effective full-share rates of the runtime's float32 CPU "
        "kernels through the cost model's own FLOP and byte counts (efficiencies 1): not hardware peaks.",
        "step_overhead_s is one overhead per step fitted jointly to dense prefill and dense decode; "
        "sequence_overhead_s is one cost per sequence per decode step (all shares alike) fitted jointly with "
        f"the bandwidths to the dense decode points at batches {', '.join(map(str, s.batches))}; "
        "host_memory_bandwidth is the fitted full-share bytes/s.",
        f"Store: fit_store_attend on every attend call of the timed magicpig decode steps ({store_threads} store "
        "threads; the store's contention with the lane's cores is not modelled); append_s measured while the "
        "decode sequences were loaded.",
        "Prefill was measured as whole prompts and as a later chunk of a chunked prefill (the points with "
        "context > 0, where the table has them); attention_efficiency (the attention kernel's FLOP rate relative "
        "to the matmuls') is fitted jointly from three or more prompt sizes and prices the context before a chunk.",
        "The model shape has the runtime's CPU widths (float32: 4 bytes per weight and K/V element); price the "
        "served model with this profile's 'model', not the checkpoint's bf16 config.",
        "Other processes may have shared the cores while measuring: see fit.load_average_*; re-run "
        "'magicpig profile' on an idle machine for a cleaner profile.",
    )


def build_profile(shape: ModelShape, config: MagicPIGConfig, points: list[Point], log: Optional[StoreLog],
                  store_threads: int, cores: int, s: Settings, name: str,
                  timing: Optional[dict] = None,
                  store_fit: Optional[tuple[StoreProfile, dict]] = None) -> DeviceProfile:
    """Fit a cpu :class:`DeviceProfile` to measured points and store calls (module docstring,
    steps 1-4); ``fit`` holds the per-point table and the errors. ``store_fit``: the store's
    profile and its fit summary, already fitted (:func:`refit`), instead of a ``log``."""
    rates = fit_rates(points, shape, cores, config)
    sat_c, flops, err_c, how_c = fit_curve_over_shares(rates.flops)
    sat_m, bandwidth, err_m, how_m = fit_curve_over_shares(rates.bandwidth)
    if store_fit is not None:
        store, store_fit = store_fit
    elif log is not None:
        store, store_fit = fit_store(log, store_threads)
    else:
        store, store_fit = StoreProfile(0.0, 0.0, threads=store_threads), {"calls": 0, "note": "method dense"}
    profile = DeviceProfile(
        name=name, kind="cpu", peak_flops=flops, compute_efficiency=1.0, memory_bandwidth=bandwidth,
        memory_efficiency=1.0, compute_units=cores, granularity=1, step_overhead_s=rates.overhead_s,
        sequence_overhead_s=rates.sequence_overhead_s, attention_efficiency=rates.attention_efficiency,
        multi_row_efficiency=rates.multi_row_efficiency,
        compute_saturation=sat_c, memory_saturation=sat_m, store=store, host_cores=cores,
        host_memory_bandwidth=bandwidth, link_bandwidth=0.0, link_latency_s=0.0, model=shape,
    )
    table = _check_table(profile, shape, config, points)
    fit = {
        "source": "magicpig.perf.profiler.profile_cpu", "settings": asdict(s),
        "config": {"K": config.K, "L": config.L, "min_collisions": config.min_collisions,
                   "sink_tokens": config.sink_tokens, "window_tokens": config.window_tokens,
                   "dense_layers": list(config.resolve_dense_layers(shape.layers)), "kv_dtype": config.kv_dtype},
        "per_share": [{"share": x, "flops_per_s": rates.flops[x], "bytes_per_s": rates.bandwidth[x]}
                      for x in sorted(rates.flops)],
        "compute_saturation": {"how": how_c, "relative_errors": err_c},
        "memory_saturation": {"how": how_m, "relative_errors": err_m},
        "objective": "least squares on log time over the 'fit' points (dense prefill, dense decode); "
                     "free: F and B per share, the step overhead, the per-sequence decode cost and the "
                     "attention kernel's efficiency relative to the matmuls, the multi-row weight-read efficiency",
        "sequence_overhead_s": rates.sequence_overhead_s, "attention_efficiency": rates.attention_efficiency,
        "multi_row_efficiency": rates.multi_row_efficiency,
        "objective_sse": rates.sse, "store": store_fit, "errors": error_summary(table),
        "decode_errors_by_batch": decode_errors_by_batch(table), "points": table, **(timing or {}),
    }
    notes = _notes(s, cores, how_c, how_m, store_threads) + _diagnostic_notes(table, rates.overhead_s)
    return replace(profile, fit=fit, notes=notes)


def refit(profile: DeviceProfile) -> DeviceProfile:
    """A measured cpu profile fitted again, from its own points (``fit["points"]``, samples
    kept), by this version's cost model: for a profile measured before the model gained a term.
    The store's fit and the load averages are kept; nothing is measured."""
    f = profile.fit
    if profile.kind != "cpu" or "points" not in f or "config" not in f or profile.model is None:
        raise ValueError(f"profile {profile.name!r}: expected a cpu profile written by 'magicpig profile'")
    c = f["config"]
    config = MagicPIGConfig(K=c["K"], L=c["L"], min_collisions=c["min_collisions"], sink_tokens=c["sink_tokens"],
                            window_tokens=c["window_tokens"], dense_layers=tuple(c["dense_layers"]),
                            kv_dtype=c["kv_dtype"])
    points = [Point(r["kind"], r["method"], r["threads"], r["share"], r["batch"], r["tokens"], r["samples"],
                    r["role"], r["sampled_fraction"], r.get("rows_per_layer", 0.0), r.get("context", 0))
              for r in f["points"]]
    st = f["settings"]
    settings = Settings(tuple(st["threads"]), tuple(st["chunks"]), tuple(st["contexts"]), tuple(st["batches"]),
                        st["repeats"], st["method"])
    kept = {k: v for k, v in f.items() if k.startswith("load_average") or k == "measure_s"}
    new = build_profile(profile.model, config, points, None, profile.store.threads, profile.compute_units, settings,
                        profile.name, kept or None, store_fit=(profile.store, f.get("store", {})))
    return replace(new, notes=new.notes + ("Refitted by 'magicpig profile --refit' from the points measured by an "
                                           "earlier run (samples and the store's fit as measured).",))


def _check_table(profile: DeviceProfile, shape: ModelShape, config: MagicPIGConfig,
                 points: list[Point]) -> list[dict]:
    """:func:`point_table` through the final profile; magicpig decode rows also get the store
    rows per sparse layer per step as the cost model counts them from the sampled fraction
    (``rows_per_layer_model``; ``rows_per_layer`` is the store's own count)."""
    cost = _cost_model(profile, shape, config)
    table = point_table(cost, points)
    counter = _cost_model(replace(profile, store=StoreProfile(0.0, 1.0)), shape, config)
    sparse = shape.layers - counter.dense_layers
    for p, row in zip(points, table):
        if p.method == "magicpig" and p.kind == "decode" and sparse:
            f = p.sampled_fraction if p.sampled_fraction > 0 else None
            row["rows_per_layer_model"] = counter.decode_cpu_time([p.tokens] * p.batch, f) / sparse
    return table


# ------------------------------------------------------------------------------ command
def build_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog=PROG, description="Measure this machine's CPU running the model and write a cost-model "
                                       "profile (kind 'cpu') fitted to it.")
    p.add_argument("--model", default=None, help="model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="profile JSON to write (default: <user cache>/profiles/<name>.json)")
    p.add_argument("--name", default=None, help="profile name (default: cpu_<cores>core_<model family>)")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2], metavar="K",
                   help="lane thread counts; share = K / cores (default: 1 2)")
    p.add_argument("--quick", action="store_true",
                   help=f"smaller sizes: prefill {QUICK['chunks']}, decode contexts {QUICK['contexts']}")
    p.add_argument("--method", default="magicpig", choices=PROFILE_METHODS,
                   help="magicpig: dense and magicpig decode and the CPU store (default); dense: dense only")
    p.add_argument("--chunks", type=int, nargs="+", default=None, metavar="N", help="prefill prompt sizes [tokens]")
    p.add_argument("--contexts", type=int, nargs="+", default=None, metavar="N", help="decode contexts [tokens]")
    p.add_argument("--batches", type=int, nargs="+", default=None, metavar="B", help="decode batch sizes")
    p.add_argument("--repeats", type=int, default=None, help="timed steps per point (default 3)")
    p.add_argument("--refit", metavar="PROFILE", default=None,
                   help="measure nothing: fit this measured profile (name or JSON path) again with this version's "
                        "cost model, from its own points")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``magicpig profile``: measures, prints the measured-vs-modelled table and
    the path of the profile written; 0 on success. Argument mistakes exit 2 with one line
    naming the option."""
    parser = build_parser()
    args = parser.parse_args(None if argv is None else list(argv))
    options = {"threads": "--threads", "chunks": "--chunks", "contexts": "--contexts", "batches": "--batches",
               "repeats": "--repeats", "method": "--method"}
    try:
        make_settings(args.threads, args.contexts, args.quick, args.chunks, args.batches, args.repeats, args.method)
    except (ValueError, TypeError) as err:
        text = str(err)
        option = next((o for k, o in options.items() if text.startswith(k)), "argument")
        parser.error(f"{option}: {text}")
    out = Path(args.out) if args.out else None
    if out is not None:
        _check_out(parser, out)
    if args.refit:
        return _refit_main(parser, args.refit, out)
    progress = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.perf_counter()
    profile = profile_cpu(args.model, None, args.threads, args.contexts, args.quick, chunks=args.chunks,
                          batches=args.batches, repeats=args.repeats, method=args.method, name=args.name,
                          progress=progress)
    return _save_and_report(profile, out, f"profile written: {{}} ({time.perf_counter() - t0:.0f} s)")


def _refit_main(parser: argparse.ArgumentParser, source: str, out: Optional[Path]) -> int:
    """``magicpig profile --refit PROFILE``: fit a measured profile again (no measuring)."""
    try:
        profile = refit(load_profile(source))
    except ValueError as err:
        parser.error(f"--refit {source}: {err}")
    return _save_and_report(profile, out, f"profile refitted from {source}, written: {{}}")


def _save_and_report(profile: DeviceProfile, out: Optional[Path], last_line: str) -> int:
    """Write the profile (default: the user cache), print its table, summary and ``last_line``
    (``{}``: the path written)."""
    out = out or cache_dir() / "profiles" / f"{profile.name}.json"
    profile.save(out)
    print(format_table(profile.fit["points"]))
    print(summary_lines(profile))
    print(last_line.format(out))
    return 0


def _check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """Exit 2 naming --out when the profile could not be written there (checked before the
    measurements, not after them)."""
    if out.is_dir():
        parser.error(f"--out {out}: is a folder; expected a .json file path")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        parser.error(f"--out {out}: cannot make its folder ({err.strerror or err})")
    if not os.access(out.parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        parser.error(f"--out {out}: not writable")


def summary_lines(profile: DeviceProfile) -> str:
    """The fitted parameters and the error summary, in words."""
    f, st = profile.fit, profile.store
    lines = [
        f"{profile.name}: {profile.flops / 1e9:.1f} GFLOP/s, {profile.bandwidth / 1e9:.2f} GB/s at full share; "
        f"overhead {profile.step_overhead_s * 1e3:.2f} ms/step, "
        f"{profile.sequence_overhead_s * 1e3:.2f} ms/sequence/decode step; attention "
        f"{profile.attention_efficiency:.2f}x the matmuls' FLOP rate; multi-row decode reads the weights at "
        f"{profile.multi_row_efficiency:.2f}x the single-row bandwidth",
        f"compute saturation x0={profile.compute_saturation.x0} ({f['compute_saturation']['how']}); "
        f"memory saturation x0={profile.memory_saturation.x0} ({f['memory_saturation']['how']})",
        f"store ({st.threads} threads): {st.call_s * 1e6:.1f} us/call, {st.row_s * 1e9:.2f} ns/row, "
        f"{st.entry_s * 1e9:.3f} ns/entry, append {st.append_s * 1e9:.1f} ns/token/KV head",
    ]
    for role, e in f.get("errors", {}).items():
        lines.append(f"{role}: {e['points']} points, median |error| {e['median_abs']:.1%}, max {e['max_abs']:.1%}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
