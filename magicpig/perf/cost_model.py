"""Step latency of the prefill and decode lanes as a function of their share of the device
(DESIGN.md §4 "Scheduler" and "Simulator", issue 13). Pure Python: no torch, no numpy.
The model's sizes are :class:`~magicpig.perf.shape.ModelShape`; the device, its host and its
store are a :class:`~magicpig.perf.profile.DeviceProfile` (JSON, shipped profiles); the fits are
:mod:`magicpig.perf.fit`; the shipped GPU profile and its assumptions are :mod:`magicpig.perf.gpus`.

Model
-----
A lane's share ``x`` is its fraction of the device's compute units (SMs on a GPU, cores on a
CPU), in (0, 1]. Each group of layers that runs as its own kernels (the dense-attention layers,
the sparse layers, the LM head) costs a roofline term

    t(x) = max(FLOPs / (F * s_c(x)),  bytes / (B * s_m(x)))            [seconds]

with F, B the achievable FLOP/s and bytes/s of the whole device and s_c, s_m its compute and
memory saturation curves (:class:`~magicpig.perf.profile.Saturation`, s(1) = 1): throughput
grows with the share and flattens past a saturation share. A step adds a fixed per-step
overhead. A decode step also adds ``sequence_overhead_s`` per sequence of the batch
(:class:`~magicpig.perf.profile.DeviceProfile`): seconds a sequence costs outside the
roofline (on a CPU: its own attention calls, the inefficiency of matmuls with more rows,
per-sequence Python work). It is added once per step, outside the lanes'
roofline terms and not scaled by the share: what it stands for is mostly serial (Python,
per-call dispatch), and the profiler fits it from dense decode at batch 1 and 4 at every share
alike. It is 0 in the GPU profiles (a profile JSON without the key loads with 0).

MagicPIG decode adds the CPU store's attend time C of the batch (its own profile,
:class:`~magicpig.perf.profile.StoreProfile`: a per-call cost, a cost per K/V row read, a cost
per bucket entry walked, plus the host<->device hand-off), overlapped with the sparse layers' device time D by the
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

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from magicpig.config import PAPER_LSH, MagicPIGConfig, check_float, check_int
from magicpig.perf.profile import DeviceProfile
from magicpig.perf.shape import ModelShape

METHODS = ("dense", "magicpig")


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
