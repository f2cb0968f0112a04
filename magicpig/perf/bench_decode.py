"""Decode step at Llama-3.1-8B layer shapes: dense, magicpig with the CPU store called serially,
and magicpig with the ping-pong overlap, measured side by side in one run (issue 14 point 1).

Model: Llama-3.1-8B layer shapes (32 query / 8 KV heads, d=128, hidden 4096, MLP 14336), random
weights (normal * 0.02, RMSNorm weights 1), bf16, --layers layers (default 4), layer 0 dense and
the rest sparse. The layers share one set of weight tensors unless --distinct-layer-weights: a
step still reads every layer's 436 MB from memory (no cache holds it), and the 1.3 GB saved are
needed for 96k x batch 8 on a 24 GB machine. The vocabulary is smaller than Llama's 128256 (default --vocab 16384, embeddings
tied): the LM head then keeps about the share of the weight bytes it has in the 32-layer model
(~7%) instead of dominating a 4-layer one. RoPE: the default formula with theta 500000 (Llama
3.1's low-frequency scaling is left out; it changes no shape or cost).

Caches are filled without a prefill (too slow at 96k): ``ModelRunner.add_prefilled`` gets, per
sequence and layer, random post-RoPE-like K/V: pre-RoPE keys from 16 clusters per KV head (centre
N(0, 1), noise 0.5), per-channel scales exp(0.5 N(0, 1)) and a shared offset 2 N(0, 1) per head
(so the runtime's centring by the mean middle key matters), then rotated by the model's own RoPE
at their positions (the offset survives in the slow channels, as in real keys); values N(0, 1).
Sequence i's K/V depend only on (--seed, i, layer), so sequence 0 is the same at every batch.
MagicPIGConfig: the paper's K=10, L=150, min_collisions=2, sinks 4, window 64, kv_dtype bf16,
dense_layers (0,), cpu_threads = --store-threads.

The three methods, per (context, batch), on one runner per method holding --batches' largest
batch (smaller batches decode its first sequences; every batch starts from the filled state):
  * dense: method="dense", every layer exact over its paged K/V.
  * magicpig_serial: the sparse layers' CPU store runs on its worker thread, and the device lane
    waits for each attend as soon as it has started it (no overlap; same split, same work).
  * magicpig_overlap: the same runner and store; the device lane only waits when it needs the
    result, so with two micro-batches (batch >= 2) the store attends one micro-batch's layer
    while the device lane computes the other's (ModelRunner._run_layers). Batch 1 has a single
    micro-batch: no ping-pong, only the window attention overlaps the store.
Both magicpig variants use the store lane's hook (``runtime.cores``: :class:`StoreLane`, whose
:class:`LaneSampledMiddle` is a SampledMiddle whose attend runs on the lane's worker) and a
runner that splits the batch as on a GPU (``ping_pong=True``).
Without them the runtime attends synchronously on a CPU-only machine and decodes one batch
(SampledMiddle.attend_trusted, ModelRunner.ping_pong): there is no separate device to overlap
with, and two micro-batches would read every weight twice.
Dense runs on the device lane's cores only, as on a GPU machine, where dense decode does not use
the host's cores and magicpig's store does.

Cores: the device lane (the main thread: model ops, hashing of queries, window attention) is
pinned to --device-threads cores with that many torch threads; the store's worker thread to the
next --store-threads cores, with that many OpenMP threads. Defaults: half of the cores this
process may use each (1 and 1 on 2 cores). Setup (filling) may use every core when the device
lane has one thread (its OpenMP helpers are then idle while measuring).

Per step (times are medians over --repeats timed steps after --warmup steps, per method):
  * t_step: wall time of ``ModelRunner.decode`` (embedding to logits) for the batch;
    tokens/s = batch / t_step.
  * t_cpu: the store's own time: the sum over the step's sparse layers and micro-batches of
    the worker's wall time inside CPUStore.attend (checks + native sampled attention).
  * t_wait: time the device lane spent blocked waiting for the store.
  * t_device (from the serial variant): t_step - t_wait, i.e. the device lane's busy time.
  * overlap efficiency = (t_device + t_cpu - t_step_overlap) / min(t_device, t_cpu), with t_device
    and t_cpu of the serial variant (each lane alone, no contention) and t_step of the
    overlapped one: the share of the time that could be hidden which was hidden (1: perfect,
    0: none; contention between the lanes for memory bandwidth counts against it).
Also per case: the overlapped variant's own t_cpu and t_wait (hidden fraction: 1 - t_wait / t_cpu
of those same steps, not sensitive to step-to-step noise of the device lane), the fraction of
middle keys the store read (sampled), the store's bytes, and checks of the first step's logits
(same state and tokens): serial vs overlapped (the same computation), magicpig vs dense.

Memory: one runner exists at a time (magicpig, then dense, per context); a batch whose runner
would not fit in MemAvailable by a conservative estimate is reported as skipped (not run) unless
--no-memory-check. 96k x 8 needs about 20 GiB by that estimate (the store ~16 GB of it).

Timed steps never spill the window into the store (at most 2 + 2 (warmup + repeats) <= 64 steps
from the filled state); a real decode spills 64 tokens every 64 steps.

    python scripts/bench_decode.py [--contexts 16384 32768 98304] [--batches 1 4 8] [--repeats 5]
        [--warmup 2] [--layers 4] [--device-threads N] [--store-threads N] [--json PATH]
    magicpig bench decode ...  (the same)

The library side of ``scripts/bench_decode.py``: :func:`build_parser`, :func:`parse_args`,
:func:`run` and :func:`main` (both, in one call). The cores, the store's lane and its hook are
:mod:`magicpig.runtime.cores`' (:func:`assign_cores`, :class:`StoreLane`, :class:`LaneSampledMiddle`).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import time
from dataclasses import dataclass, field
from collections.abc import Sequence
from typing import Any, Optional

import torch

from magicpig.config import MagicPIGConfig
from magicpig.core.argtypes import NONNEGATIVE_INT, POSITIVE_INT, OneLineParser
from magicpig.core.kv_budget import blocks_for
from magicpig.core.request import SequenceKV
from magicpig.model.llama import LlamaModel, ModelArgs, rotate_half
from magicpig.runtime.cores import Cores, StoreLane, assign_cores, kept_placement
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, dense_layer_set
from magicpig.runtime.standalone import StandaloneRunner
from magicpig.store.cpu_store import LOW_BITS, STORE_BLOCK_TOKENS, store_bytes_per_token_head

HIDDEN, MLP, HQ, HKV, D = 4096, 14336, 32, 8, 128  # Llama-3.1-8B
ROPE_THETA = 500000.0
CLUSTERS = 16
GEN_CHUNK = 8192  # tokens generated at a time (bounds the float32 temporaries)
METHODS = ("dense", "magicpig_serial", "magicpig_overlap")


# ------------------------------------------------------------------------------ model
def model_args(num_layers: int, vocab: int) -> ModelArgs:
    """Llama-3.1-8B layer shapes with ``num_layers`` layers and a ``vocab``-token tied vocabulary."""
    return ModelArgs(model_type="llama", vocab_size=vocab, hidden_size=HIDDEN, intermediate_size=MLP,
                     num_layers=num_layers, num_heads=HQ, num_kv_heads=HKV, head_dim=D, rms_eps=1e-5,
                     max_positions=131072, qk_norm=False, tie_embeddings=True, rope_type="default",
                     sliding_window=None)


def random_model(num_layers: int, vocab: int, seed: int, shared_layers: bool = True) -> LlamaModel:
    """A bf16 LlamaModel on the CPU with weights normal * 0.02 (norm weights 1). shared_layers:
    every layer uses layer 0's tensors (aliased, not copied). A decode step still reads each
    layer's weights from memory (436 MB a layer, far above any cache), so the times are those
    of distinct weights, and 1.3 GB stay free for the 96k x 8 case on a 24 GB machine."""
    args = model_args(num_layers, vocab)
    gen = torch.Generator().manual_seed(seed)

    def w(rows: int, cols: int) -> torch.Tensor:
        return torch.empty(rows, cols, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=gen)

    ones = torch.ones(HIDDEN, dtype=torch.bfloat16)
    state = {"embed_tokens.weight": w(vocab, HIDDEN), "norm.weight": ones}
    layer: dict[str, torch.Tensor] = {}
    for i in range(num_layers):
        if not layer or not shared_layers:
            layer = {
                "input_layernorm.weight": ones, "post_attention_layernorm.weight": ones,
                "self_attn.q_proj.weight": w(HQ * D, HIDDEN), "self_attn.k_proj.weight": w(HKV * D, HIDDEN),
                "self_attn.v_proj.weight": w(HKV * D, HIDDEN), "self_attn.o_proj.weight": w(HIDDEN, HQ * D),
                "mlp.gate_proj.weight": w(MLP, HIDDEN), "mlp.up_proj.weight": w(MLP, HIDDEN),
                "mlp.down_proj.weight": w(HIDDEN, MLP),
            }
        state.update({f"layers.{i}.{name}": t for name, t in layer.items()})
    inv_freq = 1.0 / (ROPE_THETA ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    model = LlamaModel(args, state, inv_freq, 1.0, torch.device("cpu"), torch.bfloat16)
    if shared_layers:  # LlamaModel fused QKV and gate/up per layer: keep layer 0's fused copies only
        model.layers = [model.layers[0]] * num_layers
    return model


def resident_weight_bytes(model: LlamaModel) -> int:
    """Bytes of the model's distinct weight tensors (shared layers counted once)."""
    tensors = {id(t): t for lw in model.layers for t in vars(lw).values() if t is not None}
    tensors.update({id(t): t for t in (model.embed_weight, model.final_norm, model.lm_head)})
    return sum(t.numel() * t.element_size() for t in tensors.values())


# --------------------------------------------------------------------------- K/V data
def layer_kv(model: LlamaModel, n: int, seq_index: int, layer: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random post-RoPE-like keys and values [Hkv, n, d] (model dtype) of one sequence and layer
    (see the module docstring); a function of (seed, seq_index, layer) only."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + seq_index * 1009 + layer)
    offset = 2.0 * torch.randn(HKV, 1, D, generator=gen)
    scale = torch.exp(0.5 * torch.randn(HKV, 1, D, generator=gen))
    centres = torch.randn(HKV, CLUSTERS, D, generator=gen)
    keys = torch.empty(HKV, n, D, dtype=model.dtype)
    values = torch.empty_like(keys)
    for s in range(0, n, GEN_CHUNK):
        e = min(n, s + GEN_CHUNK)
        which = torch.randint(0, CLUSTERS, (HKV, e - s, 1), generator=gen).expand(-1, -1, D)
        pre = (centres.gather(1, which) + 0.5 * torch.randn(HKV, e - s, D, generator=gen)) * scale + offset
        cos, sin = model.rope(torch.arange(s, e), e - 1)  # [t, 1, d]
        cos, sin = cos[:, 0].float(), sin[:, 0].float()  # [t, d], broadcast over the heads
        keys[:, s:e] = pre * cos + rotate_half(pre) * sin
        values[:, s:e] = torch.randn(HKV, e - s, D, generator=gen)
    return keys, values


class LazyLayers(Sequence):
    """keys or values of one sequence, per layer, made when indexed (the last layer cached):
    ``ModelRunner.add_prefilled`` reads them layer by layer, so one sequence's layers are never
    all in memory at once (1.6 GB at 96k). part: 0 keys, 1 values."""

    def __init__(self, source: "_LayerSource", part: int):
        self._source, self._part = source, part

    def __len__(self) -> int:
        return self._source.num_layers

    def __getitem__(self, layer: int) -> torch.Tensor:  # type: ignore[override]
        return self._source.get(layer)[self._part]


class _LayerSource:
    def __init__(self, model: LlamaModel, n: int, seq_index: int, seed: int):
        self.model, self.n, self.seq_index, self.seed = model, n, seq_index, seed
        self.num_layers = model.args.num_layers
        self._layer, self._kv = -1, None

    def get(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer != self._layer:
            self._kv = None  # free the previous layer before making the next
            self._kv = layer_kv(self.model, self.n, self.seq_index, layer, self.seed)
            self._layer = layer
        return self._kv


# ---------------------------------------------------------------------------- runners
def bench_config(method: str, store_threads: int) -> MagicPIGConfig:
    """The paper's setting (K=10, L=150, m=2), layer 0 dense, bf16 store with ``store_threads``."""
    return MagicPIGConfig(K=10, L=150, min_collisions=2, sink_tokens=4, window_tokens=64, dense_layers=(0,),
                          kv_dtype="bf16", cpu_threads=store_threads, method=method)


def store_bytes_estimate(config: MagicPIGConfig, num_kv_heads: int, head_dim: int, middle: int) -> int:
    """Bytes the CPU store holds for one sequence's ``middle`` tokens in one layer: the store's
    bytes per token (``store_bytes_per_token_head``: K/V rows, bucket ids per table, a norm)
    + 10%, plus each block of ``STORE_BLOCK_TOKENS`` tokens' bucket offsets (uint16
    [L][2^min(K, LOW_BITS)  + 1] per KV head). The 10%: blocks grow geometrically under the
    runtime's 4096-token appends (measured at 96k: 868 B per token and KV head against 816)."""
    per_token = num_kv_heads * store_bytes_per_token_head(config.K, config.L, head_dim, config.kv_dtype, config.method)
    blocks = -(-middle // STORE_BLOCK_TOKENS)
    offsets = blocks * num_kv_heads * config.L * ((1 << min(config.K, LOW_BITS)) + 1) * 2
    return int(1.1 * middle * per_token) + offsets


def estimate_bytes(model: LlamaModel, config: MagicPIGConfig, context: int, batch: int, steps: int) -> int:
    """Bytes a runner of ``batch`` sequences of ``context`` tokens holds (dense-layer blocks,
    :func:`store_bytes_estimate` per sparse layer), plus filling's largest temporaries (one
    layer's bf16 K/V, its float32 middle for the mean, the centred keys)."""
    a = model.args
    kv_token = 2 * a.num_kv_heads * a.head_dim * 2
    dense = len(dense_layer_set(config, a.num_layers))
    tokens = blocks_for(context + steps + 1, DEFAULT_BLOCK_SIZE) * DEFAULT_BLOCK_SIZE
    held = batch * tokens * kv_token * dense
    middle = max(0, context - config.sink_tokens - config.window_tokens)
    if middle and dense < a.num_layers:
        held += batch * (a.num_layers - dense) * store_bytes_estimate(config, a.num_kv_heads, a.head_dim, middle)
    return held + context * a.num_kv_heads * a.head_dim * (2 * 2 + 4 + 2)


def available_bytes() -> Optional[int]:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def build_runner(model: LlamaModel, config: MagicPIGConfig, batch: int, context: int, steps: int,
                 lane: Optional[StoreLane]) -> StandaloneRunner:
    """A runner (with its own ledger) for ``batch`` sequences that grow to context + steps + 1
    tokens; with a lane, its sparse layers attend on it."""
    num_blocks = batch * blocks_for(context + steps + 1, DEFAULT_BLOCK_SIZE)
    factory = None if lane is None else lane.method_factory()
    # The lane stands for a GPU machine's host cores, so the runner splits as on a GPU (a CPU
    # device alone runs one batch with the store inline: ModelRunner.ping_pong).
    return StandaloneRunner(model, config, max_num_seqs=batch, num_blocks=num_blocks, method_factory=factory,
                            ping_pong=lane is not None)


def fill(runner: StandaloneRunner, model: LlamaModel, context: int, batch: int, steps: int,
         seed: int) -> list[SequenceKV]:
    """``batch`` sequences of ``context`` tokens of random K/V (:func:`layer_kv`), no prefill,
    each granted room for ``steps + 1`` more tokens."""
    seqs = []
    for i in range(batch):
        source = _LayerSource(model, context, i, seed)
        seqs.append(runner.add_prefilled(LazyLayers(source, 0), LazyLayers(source, 1), steps + 1))
    return seqs


Snapshot = list[tuple[int, int, int, float, int]]


def snapshot(seqs: list[SequenceKV]) -> Snapshot:
    return [(s.length, s.fill, s.middle, s.cost_sum, s.cost_steps) for s in seqs]


def restore(seqs: list[SequenceKV], snap: Snapshot) -> None:
    """Back to a snapshot's state. Exact while no window spilled since: a decode step only
    writes the new token's K/V at position ``length`` (dense blocks) / ``fill`` (the slot), and
    nothing reads past those, so the next step overwrites it; the CPU store is untouched."""
    for seq, (length, fill_, middle, cost_sum, cost_steps) in zip(seqs, snap):
        if seq.middle != middle:
            raise RuntimeError("a window spilled into the store since the snapshot: cannot go back")
        seq.length, seq.fill, seq.cost_sum, seq.cost_steps = length, fill_, cost_sum, cost_steps


# ---------------------------------------------------------------------------- measuring
@dataclass
class Step:
    """One timed decode step: wall seconds, store seconds, device-lane seconds blocked."""

    step_s: float
    store_s: float = 0.0
    wait_s: float = 0.0
    calls: int = 0


def run_step(runner: StandaloneRunner, seqs: list[SequenceKV], tokens: torch.Tensor,
             lane: Optional[StoreLane]) -> tuple[Step, torch.Tensor]:
    """One decode step of ``seqs`` on int64 ``tokens`` [B]; returns its times and float32 logits [B, vocab]."""
    if lane is not None:
        lane.reset()
    t0 = time.perf_counter()
    logits = runner.decode(seqs, tokens)
    step = Step(time.perf_counter() - t0)
    if lane is not None:
        step.store_s, step.wait_s, step.calls = lane.store_s, lane.wait_s, lane.calls
    return step, logits


@dataclass
class MagicpigRun:
    steps: dict[str, list[Step]]  # "serial" / "overlap": the timed steps
    logits: dict[str, torch.Tensor]  # first step from the filled state, per mode
    sampled: float  # mean fraction of middle keys read per (sparse layer, head, step)


def measure_magicpig(runner: StandaloneRunner, seqs: list[SequenceKV], lane: StoreLane, tokens: torch.Tensor,
                     warmup: int, repeats: int) -> MagicpigRun:
    """Both magicpig variants on the same sequences: first one step of each from the filled
    state (their logits), then warm-up and timed steps alternating serial / overlap (the order
    swapped every round, so that drift and cache effects fall on both). tokens: int64
    [steps, >= B]. Leaves the sequences as they were."""
    b = len(seqs)
    start = snapshot(seqs)
    logits = {}
    for mode in ("serial", "overlap"):
        restore(seqs, start)
        lane.mode = mode
        logits[mode] = run_step(runner, seqs, tokens[0, :b], lane)[1]
    steps: dict[str, list[Step]] = {"serial": [], "overlap": []}
    k = 1
    for i in range(warmup + repeats):
        for mode in (("serial", "overlap") if i % 2 == 0 else ("overlap", "serial")):
            lane.mode = mode
            step, _ = run_step(runner, seqs, tokens[k, :b], lane)
            k += 1
            if i >= warmup:
                steps[mode].append(step)
    sampled = statistics.fmean(s.computation_cost for s in seqs)
    restore(seqs, start)
    return MagicpigRun(steps, logits, sampled)


def measure_dense(runner: StandaloneRunner, seqs: list[SequenceKV], tokens: torch.Tensor, warmup: int,
                  repeats: int) -> tuple[list[Step], torch.Tensor]:
    """Dense: one step from the filled state (its logits), warm-up, timed steps. Leaves the
    sequences as they were."""
    b = len(seqs)
    start = snapshot(seqs)
    logits = run_step(runner, seqs, tokens[0, :b], None)[1]
    steps = []
    for i in range(warmup + repeats):
        step, _ = run_step(runner, seqs, tokens[1 + i, :b], None)
        if i >= warmup:
            steps.append(step)
    restore(seqs, start)
    return steps, logits


# ----------------------------------------------------------------------------- results
def _median_ms(values: list[float]) -> float:
    return 1e3 * statistics.median(values)


@dataclass
class MethodStats:
    """Medians over the timed steps of one method (ms), and tokens/s = batch / step."""

    step_ms: float
    store_ms: float
    wait_ms: float
    tokens_per_s: float
    all_step_ms: list[float]

    @classmethod
    def of(cls, steps: list[Step], batch: int) -> "MethodStats":
        step = _median_ms([s.step_s for s in steps])
        return cls(step, _median_ms([s.store_s for s in steps]), _median_ms([s.wait_s for s in steps]),
                   batch / (step / 1e3), [1e3 * s.step_s for s in steps])


@dataclass
class CaseResult:
    """One (context, batch): the three methods' figures; ``logits`` (not in the JSON): float32
    [B, vocab] of each method's first step from the filled state."""

    context: int
    batch: int
    micro_batches: int
    methods: dict[str, MethodStats]
    t_device_ms: float
    t_cpu_ms: float
    sampled_fraction: float
    store_bytes_per_seq: float
    logits: dict[str, torch.Tensor] = field(repr=False)

    @property
    def t_step_ms(self) -> float:
        return self.methods["magicpig_overlap"].step_ms

    @property
    def overlap_efficiency(self) -> float:
        hidden = self.t_device_ms + self.t_cpu_ms - self.t_step_ms
        return hidden / min(self.t_device_ms, self.t_cpu_ms)

    @property
    def hidden_fraction(self) -> float:
        """In the overlapped steps: the share of the store's time the device lane did not wait
        for (1 - t_wait / t_cpu of the same steps; the wait includes the hand-off)."""
        m = self.methods["magicpig_overlap"]
        return 1.0 - m.wait_ms / m.store_ms if m.store_ms > 0 else float("nan")

    def speedup(self, other: str) -> float:
        """tokens/s of magicpig_overlap over those of ``other``."""
        return self.methods["magicpig_overlap"].tokens_per_s / self.methods[other].tokens_per_s

    def logit_checks(self) -> dict[str, float]:
        ls, lo, ld = (self.logits[m] for m in ("magicpig_serial", "magicpig_overlap", "dense"))
        return {"serial_vs_overlap_max_abs": float((ls - lo).abs().max()),
                "magicpig_vs_dense_rel": float(torch.linalg.vector_norm(lo - ld) / torch.linalg.vector_norm(ld))}

    def record(self) -> dict[str, Any]:
        m = self.methods
        return {
            "context": self.context, "batch": self.batch, "micro_batches": self.micro_batches,
            "ping_pong": self.micro_batches == 2,
            "tokens_per_s": {k: v.tokens_per_s for k, v in m.items()},
            "step_ms": {k: v.step_ms for k, v in m.items()},
            "t_device_ms": self.t_device_ms, "t_cpu_ms": self.t_cpu_ms, "t_step_ms": self.t_step_ms,
            "overlap_efficiency": self.overlap_efficiency,
            "serial_t_wait_ms": m["magicpig_serial"].wait_ms,
            "overlap_t_cpu_ms": m["magicpig_overlap"].store_ms, "overlap_t_wait_ms": m["magicpig_overlap"].wait_ms,
            "overlap_hidden_fraction": self.hidden_fraction,
            "speedup_overlap_vs_dense": self.speedup("dense"),
            "speedup_overlap_vs_serial": self.speedup("magicpig_serial"),
            "sampled_fraction": self.sampled_fraction, "store_bytes_per_seq": self.store_bytes_per_seq,
            "logits": self.logit_checks(), "all_step_ms": {k: v.all_step_ms for k, v in m.items()},
        }


def case_result(context: int, batch: int, mp: MagicpigRun, dense: tuple[list[Step], torch.Tensor],
                store_bytes_per_seq: float, sparse_layers: int) -> CaseResult:
    serial = mp.steps["serial"]
    methods = {"dense": MethodStats.of(dense[0], batch), "magicpig_serial": MethodStats.of(serial, batch),
               "magicpig_overlap": MethodStats.of(mp.steps["overlap"], batch)}
    # store calls per step = sparse layers x micro-batches
    micro = round(serial[0].calls / sparse_layers) if sparse_layers else 1
    logits = {"dense": dense[1], "magicpig_serial": mp.logits["serial"], "magicpig_overlap": mp.logits["overlap"]}
    return CaseResult(context, batch, micro, methods, _median_ms([s.step_s - s.wait_s for s in serial]),
                      _median_ms([s.store_s for s in serial]), mp.sampled, store_bytes_per_seq, logits)


# ------------------------------------------------------------------------- one context
@dataclass
class Plan:
    """What every context shares: the model, cores, lane, tokens [steps, max batch], options."""

    model: LlamaModel
    cores: Cores
    lane: StoreLane
    warmup: int
    repeats: int
    seed: int
    max_batch: int
    memory_check: bool = True
    tokens: torch.Tensor = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # int64 [steps, max batch]: sequence i's token at step k is the same at every batch
        gen = torch.Generator().manual_seed(self.seed + 1)
        self.tokens = torch.randint(0, self.model.args.vocab_size, (self.steps, self.max_batch), generator=gen)

    @property
    def steps(self) -> int:
        """Most decode steps from the filled state (magicpig: two first steps, then both variants)."""
        return 2 + 2 * (self.warmup + self.repeats)


def fitting_batches(plan: Plan, context: int, batches: list[int]) -> tuple[list[int], list[dict[str, Any]]]:
    """The batches whose runners fit in the memory available now (each method's runner exists
    alone), and a record for each one left out (none without ``plan.memory_check``)."""
    avail = available_bytes() if plan.memory_check else None
    fit, skipped = [], []
    for b in batches:
        need = max(estimate_bytes(plan.model, bench_config(m, plan.cores.store_threads), context, b, plan.steps)
                   for m in ("dense", "magicpig"))
        if avail is None or need <= 0.95 * avail:
            fit.append(b)
        else:
            reason = f"needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            print(f"  context {context} batch {b}: SKIPPED ({reason})", flush=True)
            skipped.append({"context": context, "batch": b, "skipped": reason})
    return fit, skipped


def run_context(plan: Plan, context: int, batches: list[int]) -> tuple[list[CaseResult], list[dict[str, Any]]]:
    """Every batch of one context: a magicpig runner (both variants), then a dense one, each
    filled once for the largest batch and freed before the next."""
    fit, skipped = fitting_batches(plan, context, batches)
    if not fit:
        return [], skipped
    big, threads = max(fit), plan.cores.store_threads
    mp: dict[int, MagicpigRun] = {}
    runner, seqs, setup_s = _filled(plan, bench_config("magicpig", threads), context, big, plan.lane)
    store_bytes = statistics.fmean(runner.runner.cpu_bytes(s) for s in seqs)
    sparse_layers = len(runner.runner.sparse)
    print(f"  context {context}: magicpig runner of {big} sequences filled in {setup_s:.0f} s "
          f"(store {store_bytes / 2**20:.0f} MiB per sequence)", flush=True)
    for b in fit:
        mp[b] = measure_magicpig(runner, seqs[:b], plan.lane, plan.tokens, plan.warmup, plan.repeats)
    _free(runner, seqs)
    runner, seqs, setup_s = _filled(plan, bench_config("dense", threads), context, big, None)
    print(f"  context {context}: dense runner of {big} sequences filled in {setup_s:.0f} s", flush=True)
    results = []
    for b in fit:
        dense = measure_dense(runner, seqs[:b], plan.tokens, plan.warmup, plan.repeats)
        results.append(case_result(context, b, mp[b], dense, store_bytes, sparse_layers))
        _print_progress(results[-1])
    _free(runner, seqs)
    return results, skipped


def _filled(plan: Plan, config: MagicPIGConfig, context: int, batch: int,
            lane: Optional[StoreLane]) -> tuple[StandaloneRunner, list[SequenceKV], float]:
    plan.cores.setup_phase()
    t0 = time.perf_counter()
    runner = build_runner(plan.model, config, batch, context, plan.steps, lane)
    seqs = fill(runner, plan.model, context, batch, plan.steps, plan.seed)
    setup_s = time.perf_counter() - t0
    plan.cores.device_phase()
    return runner, seqs, setup_s


def _free(runner: StandaloneRunner, seqs: list[SequenceKV]) -> None:
    for seq in seqs:
        runner.release(seq)
    runner.close()
    gc.collect()


def _print_progress(r: CaseResult) -> None:
    m = r.methods
    print(f"  context {r.context} batch {r.batch}: dense {m['dense'].step_ms:.1f} ms, serial "
          f"{m['magicpig_serial'].step_ms:.1f} ms, overlap {m['magicpig_overlap'].step_ms:.1f} ms, t_device "
          f"{r.t_device_ms:.1f} ms, t_cpu {r.t_cpu_ms:.1f} ms, efficiency {r.overlap_efficiency:.2f}", flush=True)


# ------------------------------------------------------------------------------ report
def goals(results: list[CaseResult]) -> dict[str, Optional[bool]]:
    """The issue's goals over the measured cases (None: no case to judge)."""
    eff = [r.overlap_efficiency >= 0.7 for r in results if r.batch >= 4 and r.micro_batches == 2]
    fast = [r.speedup("dense") > 1.0 for r in results if r.context >= 32768]
    return {"overlap_efficiency_ge_0.7_at_batch_ge_4": all(eff) if eff else None,
            "overlap_faster_than_dense_at_32k_and_96k": all(fast) if fast else None}


def print_table(results: list[CaseResult]) -> None:
    head = (f"{'context':>7} {'B':>2} {'mb':>2} | {'dense':>8} {'serial':>8} {'overlap':>8} | {'t_dev':>7} "
            f"{'t_cpu':>7} {'eff':>5} {'hid':>5} | {'tok/s dense':>11} {'serial':>7} {'overlap':>7} | {'ovl/dense':>9} "
            f"{'ovl/ser':>7} | {'sampled':>7} {'|dl|':>7} {'vs dense':>8}")
    print("\n" + head + "\n" + "-" * len(head))
    for r in results:
        m, c = r.methods, r.logit_checks()
        print(f"{r.context:>7} {r.batch:>2} {r.micro_batches:>2} | {m['dense'].step_ms:>8.1f} "
              f"{m['magicpig_serial'].step_ms:>8.1f} {m['magicpig_overlap'].step_ms:>8.1f} | {r.t_device_ms:>7.1f} "
              f"{r.t_cpu_ms:>7.1f} {r.overlap_efficiency:>5.2f} {r.hidden_fraction:>5.2f} | "
              f"{m['dense'].tokens_per_s:>11.2f} "
              f"{m['magicpig_serial'].tokens_per_s:>7.2f} {m['magicpig_overlap'].tokens_per_s:>7.2f} | "
              f"{r.speedup('dense'):>8.2f}x {r.speedup('magicpig_serial'):>6.2f}x | {100 * r.sampled_fraction:>6.2f}% "
              f"{c['serial_vs_overlap_max_abs']:>7.1e} {c['magicpig_vs_dense_rel']:>8.3f}")
    print("\nms per decode step (medians). mb: micro-batches (2: ping-pong; batch 1 has none). t_dev: the "
          "device lane's busy time in the serial variant (step - time blocked on the store); t_cpu: the store's "
          "time inside CPUStore.attend per step (serial variant); eff: overlap efficiency (t_dev + t_cpu - "
          "overlap step) / min(t_dev, t_cpu); hid: in the overlapped steps themselves, 1 - (time the device lane "
          "waited for the store) / (the store's time). ovl/dense, ovl/ser: tokens/s of the overlapped variant "
          "over dense / serial. sampled: middle keys read per (layer, head). |dl|: max |logits serial - "
          "overlapped| of the first step; vs dense: ||logits magicpig - dense|| / ||dense|| (same state and "
          "tokens).")
    for name, ok in goals(results).items():
        print(f"goal {name}: {'not measured' if ok is None else 'met' if ok else 'NOT met'}")


def write_json(path: str, results: list[CaseResult], skipped: list[dict[str, Any]],
               setup: dict[str, Any]) -> None:
    report = {"benchmark": "decode", "setup": setup, "cases": [r.record() for r in results],
              "skipped": skipped, "goals": goals(results)}
    with open(path, "w") as f:
        json.dump(report, f, indent=2)
    print(f"wrote {path}")


# -------------------------------------------------------------------------------- main
def build_parser() -> OneLineParser:
    p = OneLineParser(prog="bench_decode.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=POSITIVE_INT, nargs="+", default=[16384, 32768, 98304],
                   help="context lengths (tokens already in the cache; default 16384 32768 98304)")
    p.add_argument("--batches", type=POSITIVE_INT, nargs="+", default=[1, 4, 8], help="batch sizes (default 1 4 8)")
    p.add_argument("--repeats", type=POSITIVE_INT, default=5, help="timed steps per method (default 5; medians)")
    p.add_argument("--warmup", type=NONNEGATIVE_INT, default=2, help="untimed steps per method first (default 2)")
    p.add_argument("--layers", type=POSITIVE_INT, default=4, help="decoder layers, layer 0 dense (default 4)")
    p.add_argument("--vocab", type=POSITIVE_INT, default=16384, help="vocabulary (tied embeddings; default 16384)")
    p.add_argument("--device-threads", type=POSITIVE_INT, default=None,
                   help="cores and torch threads of the device lane (default: half of this process's cores)")
    p.add_argument("--store-threads", type=POSITIVE_INT, default=None,
                   help="cores and OpenMP threads of the CPU store (default: the other cores)")
    p.add_argument("--distinct-layer-weights", action="store_true",
                   help="give every layer its own random weights (default: the layers share one set, which "
                        "saves 0.44 GB a layer and reads the same bytes per step)")
    p.add_argument("--no-memory-check", action="store_true",
                   help="run every case even where the estimate of its memory (conservative: the store's "
                        "allocation with 10%% slack) exceeds what is available (default: such cases are skipped)")
    p.add_argument("--seed", type=NONNEGATIVE_INT, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the figures to PATH")
    return p


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    """The benchmark's arguments, checked (a mistake: one line on stderr, exit status 2)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    window = MagicPIGConfig().window_tokens
    if 2 + 2 * (args.warmup + args.repeats) > window:
        parser.error(f"--warmup + --repeats must be <= {(window - 2) // 2} (the timed steps must not spill the "
                     f"{window}-token window into the store)")
    if args.layers < 2:
        parser.error("--layers must be >= 2 (layer 0 is dense, the others sparse)")
    args.cores = assign_cores(args.device_threads, args.store_threads)
    try:
        bench_config("magicpig", args.cores.store_threads)
    except ValueError as err:
        parser.error(f"--store-threads: {err}")
    return args


def run(args: argparse.Namespace) -> list[CaseResult]:
    """Run the benchmark of :func:`parse_args`' ``args``; returns the measured cases (with their
    first-step logits). The calling thread gets its cores and torch thread count back."""
    with kept_placement():
        lane = StoreLane(args.cores.store)
        try:
            return _run(args, args.cores, lane)
        finally:
            lane.close()


def main(argv: Optional[list[str]] = None) -> list[CaseResult]:
    """Parse ``argv`` and run the benchmark; returns the measured cases (with their first-step logits)."""
    return run(parse_args(argv))


def _run(args: Any, cores: Cores, lane: StoreLane) -> list[CaseResult]:
    cores.setup_phase()
    t0 = time.perf_counter()
    model = random_model(args.layers, args.vocab, args.seed, shared_layers=not args.distinct_layer_weights)
    build_s = time.perf_counter() - t0
    pinned = cores.device_phase() and lane.pinned
    plan = Plan(model, cores, lane, args.warmup, args.repeats, args.seed, max(args.batches),
                memory_check=not args.no_memory_check)
    config = bench_config("magicpig", cores.store_threads)
    _print_header(args, model, config, cores, pinned, build_s)
    results: list[CaseResult] = []
    skipped: list[dict[str, Any]] = []
    t_all = time.perf_counter()
    for context in args.contexts:
        done, left = run_context(plan, context, sorted(set(args.batches)))
        results += done
        skipped += left
    print_table(results)
    load = os.getloadavg()[0]
    print(f"(whole run {time.perf_counter() - t_all:.0f} s; load average at the end {load:.2f})")
    if args.json:
        setup = {"layers": args.layers, "vocab": args.vocab, "layers_share_weights": not args.distinct_layer_weights,
                 "hidden": HIDDEN, "mlp": MLP, "num_heads": HQ, "num_kv_heads": HKV, "head_dim": D, "dtype": "bf16",
                 "config": repr(config), "device_cores": cores.device, "store_cores": cores.store,
                 "device_threads": cores.device_threads, "store_threads": cores.store_threads,
                 "cores_shared": cores.shared, "pinned": pinned, "warmup": args.warmup, "repeats": args.repeats,
                 "seed": args.seed, "load_average_end": load}
        write_json(args.json, results, skipped, setup)
    return results


def _print_header(args: Any, model: LlamaModel, config: MagicPIGConfig, cores: Cores, pinned: bool,
                  build_s: float) -> None:
    layers = "distinct" if args.distinct_layer_weights else "share one set"
    print(f"model: {args.layers} layers of Llama-3.1-8B shapes (Hq={HQ}, Hkv={HKV}, d={D}, hidden {HIDDEN}, "
          f"MLP {MLP}), random bf16 weights: {model.weight_bytes() / 2**30:.2f} GiB read per step, "
          f"{resident_weight_bytes(model) / 2**30:.2f} GiB held (layers {layers}); vocab {args.vocab} tied; "
          f"built in {build_s:.0f} s; layer 0 dense")
    print(f"config: {config!r}\ncores: {cores.describe(pinned)}")
    print(f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; load average {os.getloadavg()[0]:.2f} on "
          f"{os.cpu_count()} cores; memory available {(available_bytes() or 0) / 2**30:.1f} GiB; steps per "
          f"method: {args.warmup} warm-up + {args.repeats} timed", flush=True)

