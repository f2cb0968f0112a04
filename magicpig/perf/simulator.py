"""``magicpig simulate``: a discrete-event simulation of serving (DESIGN.md §4 "Simulator",
issue 13). It drives the scheduler's own :class:`~magicpig.core.scheduler.Scheduler`
and its ledger (:class:`~magicpig.core.kv_budget.KVBudget`), unchanged, on the engine's own
:class:`~magicpig.core.request.Request`, with step times from the cost model (:mod:`magicpig.perf.cost_model`), so policies
and methods can be compared at GPU scale on a CPU-only machine. Pure Python + numpy: no torch
(matplotlib is imported only to draw ``--plot``).

The simulation
--------------
Time is simulated seconds; the scheduler's clock is that time. Each iteration: requests whose
arrival has come are queued (``Scheduler.add``); the scheduler plans a step (granting memory
from its ledger), the simulator prices and runs it (playing the runner: a chunk's tokens become
computed, a decode feeds one), emits tokens at the times they appear, finishes requests
(``Scheduler.update_from_output``) and advances the clock. When nothing is runnable it jumps to
the next arrival. Preemption is the scheduler's (it drops a request's progress and re-queues
it; the ledger takes its blocks back at once). As in the engine, a
re-prefill after a preemption emits no token (its last generated token is fed by the next
decode), and generated tokens already streamed keep their times.

Step timing (all at full share 1.0 unless said; every cost-model call includes its own
per-step overhead):

* mixed policies (``prefill_share`` None: fcfs / chunked / prefill_first) run the prefill
  chunks and the decodes one after the other on the whole device: step = sum over chunks of
  ``prefill_time(chunk tokens, context before, 1.0, method)`` + ``decode_time(decode contexts,
  method, 1.0)``. This approximates a fused mixed batch (which would read the weights once and
  pay one overhead) by its parts; every token of the step (decode tokens and first tokens)
  appears at the step's end.
* split policies (``prefill_share`` p: static / nexus) run the two lanes concurrently on their
  shares: t_p = sum of the chunks' prefill times at share p, t_d = the decode step at share
  1 - p (share 1.0 for the lane that runs alone). The step lasts max(t_p, t_d). A chunk's
  first token appears at t_p. When t_p > t_d the decode lane runs floor(t_p / t_d)
  iterations inside the step (each decode request emits that many tokens, capped at what it
  has left, spaced t_d apart; t_d is priced at the step's starting contexts; an iteration
  after the first runs only while the block pool has room for it). This approximates Nexus's
  asynchronous lanes within one ``schedule`` call: the decode lane does not wait for a long
  prefill chunk, but the scheduler only re-plans when the step ends.

A decode request's context is ``num_computed_tokens`` (the tokens whose K/V are cached; this
step feeds its last token). A request's first token ends its last prefill chunk; it decodes from
the next step on. No request stops early: each generates exactly its output length.

Memory (DESIGN.md §4): device bytes = ``device_memory_gb`` GiB minus the model's weights
(every layer, LM head and an untied embedding table); ``dense`` keeps K/V of all layers in
blocks of ``block_size`` tokens; ``magicpig`` keeps the cost model's ``dense_layers`` in blocks
and gives each of ``max_num_seqs`` sequences a sinks + 2 x window slot on the sparse layers
(the ledger's ``device_cache_bytes``), the rest of the budget becoming blocks; its middle K/V go
to the CPU store, budgeted at ``host_memory_gb`` GiB, at the store's own bytes per token
(:func:`magicpig.store.sizes.store_bytes_per_token_head`: K/V in the cache dtype, L bucket ids,
a byte of high code bits per table when K > 12, a norm; per KV head per sparse layer).

Workloads (:data:`WORKLOADS`, DESIGN.md §7, Nexus): lengths are lognormal with the stated mean
and sigma of the log (mu = ln(mean) - sigma^2 / 2, so the unclipped mean is the target),
rounded, prompts clipped to [1, max_context - 1] and outputs to [1, max_context - prompt].
The sigmas are choices, not fits: long_data prompt sigma 0.8 / output 0.6; arxiv 0.5 / 0.5;
ShareGPT 1.0 / 1.0 (heavy-tailed chat). ``mixed`` draws each request from ShareGPT with
probability 0.6, else long_data. Arrivals: a gamma process (``workloads.arrival_times``: first at
0, mean gap 1 / rate, burstiness 1 = Poisson). Lengths and arrivals use separate random
streams, so the same seed gives the same requests at every rate (only the gaps scale).

Metrics (:func:`compute_metrics`): :mod:`magicpig.perf.metrics`, the load generator's own, in
vLLM's vocabulary: TTFT, TPOT, ITL (the gaps between a request's consecutive tokens, pooled),
E2EL; mean / median / std / p95 / p99 in milliseconds. Duration = last finish - first arrival;
throughputs per second of it. Goodput: requests/s that are good, a request being good when
TTFT <= ``slo_ttft_s`` and its TPOT <= ``slo_tbt_s`` (TPOT 0 for a one-token request, as vLLM).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import deque
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from magicpig.config import check_float, check_int
from magicpig.core.argtypes import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, OneLineParser
from magicpig.perf.cost_model import METHODS, CostModel
from magicpig.perf.profile import load_profile
from magicpig.perf.shape import ModelShape
from magicpig.core.kv_budget import KVBudget, KVLayout, blocks_in_budget, cpu_bytes_per_token, device_cache_bytes
from magicpig.core.policies import POLICIES, PolicyConfig, PrefillChunk, SchedulePlan
from magicpig.core.request import Request
from magicpig.core.sampling_params import SamplingParams
from magicpig.core.scheduler import Scheduler
from magicpig.perf.metrics import RequestTimes, serving_metrics
from magicpig.perf.workloads import (  # noqa: F401 - the simulator's workload vocabulary
    CHARS_PER_TOKEN, DEFAULT_MAX_CONTEXT, WORKLOADS, LengthDist, TraceItem, draw_lengths, load_trace, paced,
    synthetic_trace,
)
from magicpig.store.sizes import store_bytes_per_token_head

GIB = 1 << 30
DEFAULT_RATES = (2.0, 4.0, 6.0)
DEFAULT_NUM_REQUESTS = 100


# ----------------------------------------------------------------------------- requests
@dataclass(eq=False)  # identity equality: the scheduler finds requests with ``in`` / ``remove``
class SimRequest(Request):
    """A simulated request: the engine's own :class:`Request` (the scheduler and the ledger
    read it as they read a real one; its prompt is a length, not ids) and the simulator's
    bookkeeping: output length, token times (seconds), finishes."""

    prompt_len: int = 0
    output_len: int = 0
    token_times: list[float] = field(default_factory=list)
    finishes: int = 0  # times it was finished (1 when all is well)

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt_len

    @property
    def generated(self) -> int:
        return len(self.output_ids)

    @property
    def preemptions(self) -> int:
        return self.num_preemptions

    @property
    def done(self) -> bool:
        return self.generated >= self.output_len


# ----------------------------------------------------------------------------- memory
@dataclass(frozen=True)
class MemoryLayout:
    """How the budgets divide (bytes): weights; per-sequence sinks+window slot; one dense
    block (block_size tokens; block_size 0: no dense layer, no blocks); total_blocks; the CPU
    store's bytes per token and total."""

    weight_bytes: int
    slot_bytes: int
    block_size: int
    block_bytes: int
    total_blocks: int
    cpu_bytes_per_token: int
    cpu_bytes_total: int


def weight_bytes(shape: ModelShape) -> int:
    """Bytes of the weights on the device: layers, LM head and an untied embedding table."""
    return shape.weight_bytes() + shape.vocab * shape.hidden * shape.bytes_per_param


def memory_layout(cost: CostModel, method: str, max_num_seqs: int, block_size: int = 256,
                  device_memory_gb: float = 80.0, host_memory_gb: float = 512.0) -> MemoryLayout:
    """The device block pool and CPU-store budget of ``method`` (module docstring); budgets
    in GiB. ValueError when the device cannot hold the weights, the slots and one block. The
    arithmetic is the ledger's (:mod:`magicpig.core.kv_budget`) and the store's own bytes per
    token (:mod:`magicpig.store.sizes`), as the engine sizes itself."""
    s = cost.shape
    dense = s.layers if method == "dense" else cost.dense_layers
    sparse = s.layers - dense
    per_token_layer = s.kv_bytes_per_token(1)
    slot, block_bytes = device_cache_bytes(s.layers, dense, per_token_layer, cost.sink_tokens, cost.window_tokens,
                                           block_size)
    device = int(device_memory_gb * GIB) - weight_bytes(s)
    try:
        blocks = blocks_in_budget(device, max_num_seqs, slot, block_bytes)
    except ValueError:
        raise ValueError(f"device_memory_gb={device_memory_gb}: too small for the weights ({weight_bytes(s)} "
                         f"bytes), {max_num_seqs} slots of {slot} bytes and one {block_bytes}-byte block ({method})") \
            from None
    kv_dtype = {2: "bf16", 4: "fp32"}[s.bytes_per_kv_elem]
    per_head = store_bytes_per_token_head(cost.hash_bits, cost.tables, s.head_dim, kv_dtype)
    cpu_per_token = cpu_bytes_per_token(sparse, s.kv_heads, per_head)
    return MemoryLayout(weight_bytes(s), slot, block_size if dense else 0, block_bytes, blocks,
                        cpu_per_token, int(host_memory_gb * GIB) if sparse else 0)


def kv_budget(layout: MemoryLayout, max_num_seqs: int) -> KVBudget:
    """The ledger over a layout: the engine's own bookkeeping, with no tensors behind it."""
    return KVBudget(KVLayout(layout.block_size, layout.total_blocks, max_num_seqs,
                             layout.cpu_bytes_total, layout.cpu_bytes_per_token, layout.slot_bytes,
                             layout.block_bytes))


# ----------------------------------------------------------------------------- results
@dataclass
class SimResult:
    """One simulated run: the requests (token times in simulated seconds), the run's duration
    (seconds), steps, preemptions, peak running sequences, peak blocks in use, the layout and
    :func:`compute_metrics`' dict."""

    policy: str
    method: str
    requests: list[SimRequest]
    duration_s: float
    steps: int
    preemptions: int
    peak_running: int
    peak_blocks_used: int
    layout: MemoryLayout
    metrics: dict[str, Any]


def compute_metrics(requests: Sequence[SimRequest], slo_ttft_s: float, slo_tbt_s: float) -> dict[str, Any]:
    """The run's metrics (:func:`magicpig.perf.metrics.serving_metrics`, the load generator's
    own): latencies in ms, throughputs per second of the run (last finish - first arrival);
    a request is good when its TTFT <= ``slo_ttft_s`` and its TPOT <= ``slo_tbt_s``."""
    done = [r for r in requests if r.finish_time is not None]
    start = min((r.arrival for r in requests), default=0.0)
    duration = max((r.finish_time for r in done), default=start) - start
    timed = [RequestTimes(r.arrival, r.token_times) for r in done]
    m = serving_metrics(timed, duration, {"ttft": slo_ttft_s * 1e3, "tpot": slo_tbt_s * 1e3},
                        [r.num_prompt_tokens for r in done])
    m.update({"num_requests": len(requests), "goodput": m["request_goodput"], "slo_ttft_s": slo_ttft_s,
              "slo_tbt_s": slo_tbt_s})
    return m


# ----------------------------------------------------------------------------- the simulation
def mixed_step_seconds(cost: CostModel, method: str, chunks: Sequence[tuple[int, int]],
                       decode_contexts: Sequence[int]) -> float:
    """Seconds of one mixed-policy step on the whole device (module docstring): the prefill
    chunks, each (tokens, start), then the decode batch, contexts in tokens cached."""
    prefill = sum(cost.prefill_time(n, start, 1.0, method) for n, start in chunks)
    return prefill + cost.decode_time(list(decode_contexts), method, 1.0)


class _Simulation:
    """The event loop of :func:`simulate` (one run). The state is the scheduler's and its
    ledger's (the engine's own bookkeeping) and the requests'; the simulator plays the runner:
    a chunk's tokens become computed, a decode feeds one token."""

    def __init__(self, requests: list[SimRequest], cost: CostModel, scheduler_args: dict, method: str,
                 layout: MemoryLayout, max_steps: int):
        self.now = 0.0
        self.cost, self.method, self.layout, self.max_steps = cost, method, layout, max_steps
        self.kv = kv_budget(layout, scheduler_args["max_num_seqs"])
        self.sched = Scheduler(self.kv, cost=cost, clock=lambda: self.now, **scheduler_args)
        self.pending = deque(sorted(requests, key=lambda r: r.arrival))
        self.steps = self.preemptions = self.peak_running = self.peak_blocks = 0

    def _note_memory(self) -> None:
        self.peak_blocks = max(self.peak_blocks, self.kv.allocator.num_used)

    # -- events ---------------------------------------------------------------------------
    def _emit(self, r: SimRequest, t: float) -> None:
        """One token of ``r`` at time ``t`` (seconds); finishes it at its output length."""
        r.output_ids.append(0)
        r.token_times.append(t)
        if r.done:
            r.finish_time, r.finishes = t, r.finishes + 1
            self.sched.update_from_output([r])

    def _decode_one(self, r: SimRequest, t: float) -> None:
        r.kv.length += 1  # the runner's part: its last token's K/V are now held
        self._emit(r, t)

    def _chunk_done(self, c: PrefillChunk, t: float) -> None:
        c.request.kv.length += c.num_tokens
        if c.last and c.request.generated == 0:  # a re-prefill after preemption emits nothing
            self._emit(c.request, t)

    def _chunks_time(self, chunks: list[PrefillChunk], share: float) -> float:
        return sum(self.cost.prefill_time(c.num_tokens, c.start, share, self.method) for c in chunks)

    def _decode_time(self, decodes: list[SimRequest], share: float) -> float:
        return self.cost.decode_time([r.num_computed_tokens for r in decodes], self.method, share)

    # -- steps ----------------------------------------------------------------------------
    def mixed_step(self, plan: SchedulePlan) -> None:
        """Chunks and decodes one after the other on the whole device; tokens at the end."""
        end = self.now + mixed_step_seconds(self.cost, self.method, [(c.num_tokens, c.start) for c in plan.chunks],
                                            [r.num_computed_tokens for r in plan.decodes])
        for r in plan.decodes:
            self._decode_one(r, end)
        for c in plan.chunks:
            self._chunk_done(c, end)
        self.now = end

    def split_step(self, plan: SchedulePlan) -> None:
        """The two lanes side by side on shares p and 1 - p (module docstring)."""
        p = plan.prefill_share
        t_p = self._chunks_time(plan.chunks, p) if plan.chunks else 0.0
        t_d = self._decode_time(plan.decodes, 1.0 - p if plan.chunks else 1.0) if plan.decodes else 0.0
        iters = math.floor(t_p / t_d) if t_d > 0 and t_p > t_d else 1
        self._decode_iterations(plan, t_d, iters)
        for c in plan.chunks:
            self._chunk_done(c, self.now + t_p)
        self.now += max(t_p, t_d)

    def _decode_iterations(self, plan: SchedulePlan, t_d: float, iters: int) -> None:
        """``iters`` decode iterations t_d apart; after the first (whose blocks the scheduler
        granted), each runs only while the ledger has the blocks its new tokens need."""
        active = list(plan.decodes)
        for i in range(1, iters + 1):
            if i > 1:
                active = [r for r in active if not r.done]
                need = sum(self.kv.growth(r.kv, r.num_computed_tokens + 1) for r in active)
                if not active or need > self.kv.free_blocks:
                    return
                for r in active:
                    self.kv.grow(r.kv, r.num_computed_tokens + 1)
            for r in active:
                self._decode_one(r, self.now + i * t_d)

    # -- the loop -------------------------------------------------------------------------
    def _queue_arrivals(self) -> None:
        while self.pending and self.pending[0].arrival <= self.now:
            self.sched.add(self.pending.popleft())

    def _idle(self, plan: SchedulePlan, stalls: int) -> int:
        """Nothing ran: retry after a preemption, else jump to the next arrival."""
        if plan.preempted and stalls < 3:
            return stalls + 1
        if not self.pending:
            raise RuntimeError(f"t={self.now:.6f}s: the scheduler runs nothing with {len(self.sched.waiting)} "
                               f"waiting and {len(self.sched.running)} running requests and no arrival to come "
                               f"(policy {self.sched.policy.name}); free blocks {self.kv.free_blocks}, "
                               f"CPU bytes {self.kv.cpu_bytes_free}")
        self.now = max(self.now, self.pending[0].arrival)
        return 0

    def run(self) -> None:
        stalls = 0
        while self.pending or self.sched.has_unfinished():
            self._queue_arrivals()
            if not self.sched.has_unfinished():
                self.now = max(self.now, self.pending[0].arrival)
                continue
            plan = self.sched.schedule()
            self.preemptions += len(plan.preempted)
            self._note_memory()
            self.peak_running = max(self.peak_running, len(self.sched.running))
            if not (plan.chunks or plan.decodes):
                stalls = self._idle(plan, stalls)
                continue
            stalls, self.steps = 0, self.steps + 1
            if self.steps > self.max_steps:
                raise RuntimeError(f"more than max_steps={self.max_steps} steps; raise it or shorten the trace")
            (self.mixed_step if plan.prefill_share is None else self.split_step)(plan)
            self._note_memory()


def _requests(trace: Sequence[TraceItem], layout: MemoryLayout, max_num_seqs: int) -> list[SimRequest]:
    """Fresh requests for a trace; ValueError for one that could never fit the budgets (the
    ledger's own check, as the engine's ``add_request``)."""
    ledger = kv_budget(layout, max_num_seqs)
    out = []
    for i, it in enumerate(trace):
        if it.arrival_s is None:
            raise ValueError(f"trace[{i}]: no arrival_s (pace the trace with paced())")
        n = check_int(f"trace[{i}].prompt_tokens", it.prompt_tokens, 1)
        out_len = check_int(f"trace[{i}].output_tokens", it.output_tokens, 1)
        r = SimRequest(f"sim-{i}", [], SamplingParams(max_new_tokens=out_len), arrival=float(it.arrival_s),
                       prompt_len=n, output_len=out_len)
        why = ledger.never_fits(r)
        if why is not None:
            raise ValueError(f"trace[{i}]: {why}")
        out.append(r)
    return out


def simulate(trace: Sequence[TraceItem], cost_model: CostModel, policy: Union[PolicyConfig, str], method: str,
             max_num_seqs: int = 256, *, max_prefill_tokens: int = 8192, chunked_prefill: bool = True,
             block_size: int = 256, device_memory_gb: float = 80.0, host_memory_gb: float = 512.0,
             slo_ttft_s: float = 2.0, slo_tbt_s: float = 0.1, max_steps: int = 10_000_000) -> SimResult:
    """Simulate serving ``trace`` (items with arrivals, seconds) with ``policy`` and ``method``
    ("dense" or "magicpig") on ``cost_model``'s device. A policy given by name prices nexus
    decode shares as ``method``. ``chunked_prefill`` False prefills whole prompts (as
    ``Engine(chunked_prefill=False)``). Memory budgets in GiB; SLOs in seconds. See the module docstring."""
    if method not in METHODS:
        raise ValueError(f"method={method!r}: expected one of {METHODS}")
    pol = PolicyConfig(policy, method=method) if isinstance(policy, str) else policy
    check_int("max_num_seqs", max_num_seqs, 1)
    check_int("block_size", block_size, 1)
    check_float("slo_ttft_s", slo_ttft_s, 0.0, math.inf, high_open=True)
    check_float("slo_tbt_s", slo_tbt_s, 0.0, math.inf, high_open=True)
    layout = memory_layout(cost_model, method, max_num_seqs, block_size, device_memory_gb, host_memory_gb)
    requests = _requests(trace, layout, max_num_seqs)
    args = {"max_num_seqs": max_num_seqs, "max_prefill_tokens": check_int("max_prefill_tokens", max_prefill_tokens, 1),
            "policy": pol, "chunked_prefill": bool(chunked_prefill)}
    sim = _Simulation(requests, cost_model, args, method, layout, check_int("max_steps", max_steps, 1))
    sim.run()
    metrics = compute_metrics(requests, slo_ttft_s, slo_tbt_s)
    metrics.update({"steps": sim.steps, "preemptions": sim.preemptions, "peak_running": sim.peak_running,
                    "peak_blocks_used": sim.peak_blocks, "total_blocks": layout.total_blocks})
    return SimResult(pol.name, method, requests, metrics["duration_s"], sim.steps, sim.preemptions,
                     sim.peak_running, sim.peak_blocks, layout, metrics)


# ----------------------------------------------------------------------------- the sweep
TABLE_COLUMNS = (  # (header, metric key, format)
    ("policy", "policy", "s"), ("method", "method", "s"), ("rate", "request_rate", "g"),
    ("req/s", "request_throughput", ".2f"), ("tok/s", "output_throughput", ".0f"), ("goodput", "goodput", ".2f"),
    ("TTFT mean", "mean_ttft_ms", ".0f"), ("TTFT p95", "p95_ttft_ms", ".0f"), ("TTFT p99", "p99_ttft_ms", ".0f"),
    ("ITL mean", "mean_itl_ms", ".1f"), ("ITL p95", "p95_itl_ms", ".1f"), ("ITL p99", "p99_itl_ms", ".1f"),
    ("E2EL p95", "p95_e2el_ms", ".0f"), ("preempt", "preemptions", "d"), ("peak run", "peak_running", "d"),
)


def sweep(traces: Sequence[tuple[Optional[float], Sequence[TraceItem]]], cost_model: CostModel,
          policies: Sequence[PolicyConfig], methods: Sequence[str], **kwargs: Any) -> list[dict[str, Any]]:
    """One row per (rate, policy, method): :func:`simulate`'s metrics plus ``policy``,
    ``method`` and ``request_rate`` (requests/s; None for a trace's own arrivals). ``traces``:
    (rate, trace) pairs; a policy's ``method`` is replaced by each simulated method."""
    rows = []
    for rate, trace in traces:
        for pol in policies:
            for method in methods:
                pm = replace(pol, method=method)
                res = simulate(trace, cost_model, pm, method, **kwargs)
                rows.append({"policy": pol.name, "method": method, "request_rate": rate, **res.metrics})
    return rows


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """The sweep as an aligned text table (latencies in ms, rates in requests/s)."""
    cells = [[h for h, _, _ in TABLE_COLUMNS]]
    for row in rows:
        cells.append(["-" if row[k] is None else (f"{row[k]:{f}}" if f != "g" else f"{row[k]:g}")
                      for _, k, f in TABLE_COLUMNS])
    widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot_sweep(rows: Sequence[dict[str, Any]], path: Union[str, Path]) -> None:
    """P95 TTFT, P95 TBT (ms) and goodput (requests/s) against the request rate, one line per
    policy + method, written to ``path`` (PNG). matplotlib is imported here only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.2))
    FigureCanvasAgg(fig)
    panels = (("p95_ttft_ms", "P95 TTFT (ms)"), ("p95_itl_ms", "P95 ITL (ms)"), ("goodput", "goodput (req/s)"))
    series = sorted({(r["policy"], r["method"]) for r in rows})
    for i, (key, label) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1)
        for pol, method in series:
            pts = sorted((r["request_rate"], r[key]) for r in rows if (r["policy"], r["method"]) == (pol, method)
                         and r["request_rate"] is not None and r[key] is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=f"{pol} / {method}")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    fig.axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(str(path), dpi=110)


# ----------------------------------------------------------------------------- the command
_POS_INT, _NONNEG_INT, _POS_FLOAT = POSITIVE_INT, NONNEGATIVE_INT, POSITIVE_FLOAT


def build_parser(prog: str = "magicpig simulate") -> argparse.ArgumentParser:
    """The options of ``magicpig simulate``."""
    p = OneLineParser(prog=prog, description="Simulate serving (the real scheduler, the cost model's step times) "
                       "over a synthetic or replayed trace; sweep request rates, policies and methods.")
    p.add_argument("--profile", default="h100_llama31_8b", help="cost-model profile: shipped name or JSON path")
    p.add_argument("--workload", choices=sorted(WORKLOADS), default="long_data", help="synthetic lengths (Nexus)")
    p.add_argument("--trace", metavar="PATH", help="replay a bench-serve JSONL trace instead of --workload")
    p.add_argument("--ignore-trace-arrivals", action="store_true", help="pace --trace by --rates even with arrival_s")
    p.add_argument("--num-requests", type=_POS_INT, help=f"requests (default {DEFAULT_NUM_REQUESTS}; trace: all)")
    p.add_argument("--rates", type=_POS_FLOAT, nargs="+", default=list(DEFAULT_RATES), metavar="R",
                   help="request rates to sweep, requests/s (default %(default)s)")
    p.add_argument("--request-rate", type=_POS_FLOAT, help="one rate (same as --rates R)")
    p.add_argument("--burstiness", type=_POS_FLOAT, default=1.0, help="gamma shape of the gaps (1 = Poisson)")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.add_argument("--policies", nargs="+", choices=POLICIES, default=["chunked", "nexus"], metavar="POLICY",
                   help=f"any of {', '.join(POLICIES)} (default chunked nexus)")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS), metavar="METHOD",
                   help=f"any of {', '.join(METHODS)} (default both)")
    p.add_argument("--max-num-seqs", type=_POS_INT, default=256)
    p.add_argument("--max-prefill-tokens", type=_POS_INT, default=8192, help="fcfs: prefill tokens per step")
    p.add_argument("--token-budget", type=_POS_INT, default=2048, help="chunked / prefill_first: tokens per step")
    p.add_argument("--chunk-tokens", type=_POS_INT, default=2048, help="static / nexus: prefill chunk tokens")
    p.add_argument("--tbt-target", type=_POS_FLOAT, help="nexus: decode step target, seconds (default --slo-tbt)")
    p.add_argument("--whole-prompts", action="store_true", help="no chunked prefill (as magicpig serve --no-chunked-prefill)")
    p.add_argument("--block-size", type=_POS_INT, default=256, help="tokens per device K/V block")
    p.add_argument("--device-memory-gb", type=_POS_FLOAT, default=80.0, help="device memory, GiB (weights included)")
    p.add_argument("--host-memory-gb", type=_POS_FLOAT, default=512.0, help="CPU-store budget, GiB")
    p.add_argument("--max-context", type=_POS_INT, default=DEFAULT_MAX_CONTEXT, help="longest request, tokens")
    p.add_argument("--slo-ttft", type=_POS_FLOAT, default=2.0, help="goodput: TTFT limit, seconds")
    p.add_argument("--slo-tbt", type=_POS_FLOAT, default=0.1, help="goodput: TPOT (mean TBT) limit, seconds")
    p.add_argument("--json", metavar="PATH", help="write the arguments and every run's metrics here")
    p.add_argument("--plot", metavar="PATH.png", help="plot P95 TTFT / P95 TBT / goodput vs rate here")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Cross-option checks; ValueError naming the option."""
    if args.max_context < 2:
        raise ValueError(f"--max-context {args.max_context}: expected an integer >= 2")
    if args.ignore_trace_arrivals and not args.trace:
        raise ValueError("--ignore-trace-arrivals is only read with --trace PATH")
    for opt, path in (("--json", args.json), ("--plot", args.plot)):
        if path and not Path(path).resolve().parent.is_dir():
            raise ValueError(f"{opt} {path}: folder {Path(path).resolve().parent} does not exist")
    if args.request_rate is not None:
        args.rates = [args.request_rate]


def _cost_model(profile: str) -> CostModel:
    try:
        prof = load_profile(profile)
    except ValueError as err:
        raise ValueError(f"--profile {profile!r}: {err}") from None
    return CostModel(prof, prof.model or ModelShape.llama31_8b())


def _traces(args: argparse.Namespace) -> tuple[list[tuple[Optional[float], list[TraceItem]]], str]:
    """(rate, trace) pairs to simulate and a line saying where arrivals come from."""
    if not args.trace:
        n = args.num_requests or DEFAULT_NUM_REQUESTS
        pace = f"gamma, burstiness {args.burstiness:g}"
        return [(r, synthetic_trace(args.workload, n, r, args.burstiness, args.seed, args.max_context))
                for r in args.rates], f"{args.workload} x {n}, {pace}"
    items = load_trace(args.trace)[: args.num_requests]
    if not args.ignore_trace_arrivals and all(it.arrival_s is not None for it in items):
        return [(None, items)], f"{args.trace} x {len(items)}, its own arrival_s"
    return [(r, paced(items, r, args.burstiness, args.seed, True)) for r in args.rates], \
        f"{args.trace} x {len(items)}, gamma, burstiness {args.burstiness:g}"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``magicpig simulate``: prints the sweep's table; 0 on success.
    Argument mistakes exit 2 (argparse) or raise ValueError naming the option.

    ``--json`` writes {"prog", "args", "profile", "model", "arrivals", "layouts" (method ->
    MemoryLayout fields, bytes), "runs": [one dict per (rate, policy, method): policy, method,
    request_rate (req/s, null for a trace's own arrivals), num_requests, completed, duration_s,
    total_input_tokens, total_output_tokens, request_throughput (req/s), output_throughput
    (tokens/s), good_requests, goodput (req/s), good_fraction, slo_ttft_s, slo_tbt_s,
    {mean,p95,p99}_{ttft,tbt,tpot,e2e}_ms, steps, preemptions, peak_running,
    peak_blocks_used, total_blocks]}."""
    args = build_parser().parse_args(None if argv is None else list(argv))
    _check_args(args)
    cost = _cost_model(args.profile)
    traces, source = _traces(args)
    tbt = args.tbt_target if args.tbt_target is not None else args.slo_tbt
    policies = [PolicyConfig(name, token_budget=args.token_budget, chunk_tokens=args.chunk_tokens, tbt_target_s=tbt)
                for name in dict.fromkeys(args.policies)]
    methods = list(dict.fromkeys(args.methods))
    kw = dict(max_num_seqs=args.max_num_seqs, max_prefill_tokens=args.max_prefill_tokens,
              chunked_prefill=not args.whole_prompts, block_size=args.block_size,
              device_memory_gb=args.device_memory_gb, host_memory_gb=args.host_memory_gb,
              slo_ttft_s=args.slo_ttft, slo_tbt_s=args.slo_tbt)
    rows = sweep(traces, cost, policies, methods, **kw)
    print(f"{cost.profile.name}, {cost.shape.name}; requests: {source}; latencies in ms, rates in req/s; "
          f"goodput: TTFT <= {args.slo_ttft:g} s and TPOT <= {args.slo_tbt:g} s")
    print(format_table(rows))
    if args.json:
        layouts = {m: asdict(memory_layout(cost, m, args.max_num_seqs, args.block_size, args.device_memory_gb,
                                           args.host_memory_gb)) for m in methods}
        doc = {"prog": "magicpig simulate", "args": vars(args), "profile": cost.profile.name, "model": cost.shape.name,
               "arrivals": source, "layouts": layouts, "runs": rows}
        Path(args.json).write_text(json.dumps(doc, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    if args.plot:
        plot_sweep(rows, args.plot)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
