"""The simulator against the real engine (``scripts/check_simulator.py``), step by step (issue 13 point 6; docs/SCHEDULING.md).

One trace (token-id prompts, gamma arrivals) is served by the real :class:`Engine` in this
process, in real time (a request joins the queue at the first step boundary after its arrival,
as in ``magicpig serve``, whose HTTP path adds nothing measurable: docs/SCHEDULING.md), and by
:func:`magicpig.perf.simulator.simulate` with the same scheduler, policy, budgets and arrivals
and with each request's output length set to what the engine generated (greedy decoding may stop
at an end-of-sequence token; the simulator cannot know that).

Two comparisons per request rate:

* **end to end**: mean TTFT (first token - arrival) and mean TBT (gaps between a request's
  tokens, pooled over requests: vLLM's ITL) of the engine against the simulator's;
* **step replay**: every step the engine ran, priced by the cost model exactly as the simulator
  prices a step of that composition (the sum of the chunks' ``prefill_time`` and the decode
  batch's ``decode_time``, whole device). Its error, by kind of step (decodes only, prefill
  only, both), is the cost model's own; what the end-to-end error has beyond it comes from the
  two timelines drifting apart (which prompt lands in which step).

    python scripts/check_simulator.py --rates 0.1 0.2 0.4 --policy chunked --json check.json

Times are wall-clock on this machine: run it on a quiet machine (nothing else on the cores).
"""

from __future__ import annotations

import json
import random
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

from magicpig.config import MagicPIGConfig
from magicpig.core.sampling_params import SamplingParams
from magicpig.engine.engine import Engine
from magicpig.runtime.calibration import resolve_lsh
from magicpig.model.loaded import load_model
from magicpig.perf.metrics import RequestTimes, latency_stats
from magicpig.perf.workloads import arrival_times
from magicpig.perf.cost_model import CostModel
from magicpig.perf.profile import load_profile
from magicpig.core.policies import PolicyConfig
from magicpig.perf.simulator import TraceItem, mixed_step_seconds, simulate

GIB = 1 << 30


@dataclass
class StepRecord:
    """One engine step: when it ran (seconds from the start), the decode batch's contexts
    (tokens cached, as the cost model reads them) and the prefill chunks (tokens, start)."""

    start: float
    seconds: float
    decode_contexts: list[int]
    chunks: list[tuple[int, int]]

    @property
    def kind(self) -> str:
        return "mixed" if self.decode_contexts and self.chunks else "decode" if self.decode_contexts else "prefill"


@dataclass
class Served:
    """One request as the engine served it: arrival (seconds from the start) and token times."""

    arrival: float
    prompt_tokens: int
    token_times: list[float] = field(default_factory=list)


# --------------------------------------------------------------------------- the trace
def make_trace(num_requests: int, rate: float, prompt_range: tuple[int, int], output_range: tuple[int, int],
               vocab: int, seed: int) -> list[tuple[float, list[int], int]]:
    """(arrival s, prompt token ids, max new tokens) per request: uniform lengths, random ids
    (the same requests at every rate: only the gaps scale)."""
    rng = random.Random(seed)
    arrivals = arrival_times(num_requests, rate, 1.0, seed)
    out = []
    for a in arrivals:
        n = rng.randint(*prompt_range)
        out.append((a, [rng.randrange(100, vocab) for _ in range(n)], rng.randint(*output_range)))
    return out


# --------------------------------------------------------------------------- the engine
def run_engine(engine: Engine, trace: Sequence[tuple[float, list[int], int]]) -> tuple[list[Served], list[StepRecord]]:
    """Serve the trace in real time; every request's token times and every step's record (what
    the engine says it ran: its step records)."""
    served: dict[str, Served] = {}
    steps: list[StepRecord] = []
    pending = list(trace)
    t0 = time.perf_counter()
    while pending or engine.has_unfinished():
        now = time.perf_counter() - t0
        while pending and pending[0][0] <= now:
            arrival, ids, max_new = pending.pop(0)
            rid = engine.add_request(ids, SamplingParams(max_new_tokens=max_new))
            served[rid] = Served(arrival, len(ids))
        if not engine.has_unfinished():
            time.sleep(max(0.0, pending[0][0] - now))
            continue
        start = time.perf_counter()
        record = engine.step()
        end = time.perf_counter()
        if record.ran:
            steps.append(StepRecord(start - t0, end - start, record.decode_contexts,
                                    [(n, s) for _, s, n in record.chunks]))
        for out in record.outputs:
            served[out.request_id].token_times += [end - t0] * len(out.new_token_ids)
    return list(served.values()), steps


# --------------------------------------------------------------------------- the figures
def latency_means(requests: Sequence[Any]) -> dict[str, float]:
    """Mean TTFT and mean pooled ITL in ms (magicpig.perf.metrics, the load generator's and the
    simulator's own) of requests with ``arrival`` and ``token_times`` (seconds)."""
    stats = latency_stats([RequestTimes(r.arrival, r.token_times) for r in requests if r.token_times])
    return {"mean_ttft_ms": stats["mean_ttft_ms"], "mean_itl_ms": stats["mean_itl_ms"] or 0.0}


def predicted_step(cost: CostModel, method: str, step: StepRecord) -> float:
    """Seconds the simulator gives a step of this composition (its mixed_step's pricing)."""
    return mixed_step_seconds(cost, method, step.chunks, step.decode_contexts)


def step_replay(cost: CostModel, method: str, steps: Sequence[StepRecord]) -> dict[str, dict[str, float]]:
    """Per kind of step: count, measured and predicted seconds in all, their ratio (predicted /
    measured - 1), and the median of the per-step errors."""
    out = {}
    for kind in ("decode", "prefill", "mixed", "all"):
        sel = [s for s in steps if kind in ("all", s.kind)]
        if not sel:
            continue
        pred = [predicted_step(cost, method, s) for s in sel]
        measured = sum(s.seconds for s in sel)
        out[kind] = {"steps": len(sel), "measured_s": measured, "predicted_s": sum(pred),
                     "error": sum(pred) / measured - 1.0,
                     "median_step_error": statistics.median(p / s.seconds - 1.0 for p, s in zip(pred, sel))}
    return out


def simulate_trace(cost: CostModel, method: str, policy: PolicyConfig, served: Sequence[Served], args) -> dict:
    """The simulator on the engine's trace: its arrivals, its prompts and the output lengths
    the engine produced."""
    trace = [TraceItem(r.prompt_tokens, len(r.token_times), r.arrival) for r in served if r.token_times]
    res = simulate(trace, cost, policy, method, max_num_seqs=args.max_num_seqs,
                   max_prefill_tokens=args.max_prefill_tokens, chunked_prefill=not args.whole_prompts,
                   device_memory_gb=args.device_memory_gb, host_memory_gb=args.host_memory_gb)
    return latency_means(res.requests)


# --------------------------------------------------------------------------- the run
def check_rate(engine: Engine, cost: CostModel, policy: PolicyConfig, rate: float, args) -> dict:
    vocab = engine.loaded.args.vocab_size
    trace = make_trace(args.num_requests, rate, tuple(args.prompt_tokens), tuple(args.output_tokens), vocab, args.seed)
    served, steps = run_engine(engine, trace)
    real = latency_means(served)
    sim = simulate_trace(cost, args.method, policy, served, args)
    return {"rate": rate, "engine": real, "simulated": sim,
            "ttft_error": sim["mean_ttft_ms"] / real["mean_ttft_ms"] - 1.0,
            "itl_error": sim["mean_itl_ms"] / real["mean_itl_ms"] - 1.0,
            "replay": step_replay(cost, args.method, steps), "engine_steps": len(steps),
            "steps": [vars(s) for s in steps]}


def print_row(row: dict) -> None:
    e, s = row["engine"], row["simulated"]
    print(f"{row['rate']:>5g} | TTFT {e['mean_ttft_ms']:8.0f} {s['mean_ttft_ms']:8.0f} {row['ttft_error']:+6.0%} | "
          f"ITL {e['mean_itl_ms']:7.0f} {s['mean_itl_ms']:7.0f} {row['itl_error']:+6.0%} | " +
          "  ".join(f"{k} {v['steps']}: {v['error']:+.0%} (median {v['median_step_error']:+.0%})"
                    for k, v in row["replay"].items()), flush=True)


def run(args: Any) -> int:
    """The check for parsed arguments (``scripts/check_simulator.py``); prints a row per rate."""
    profile = load_profile(args.profile)
    model = load_model(None, device="cpu")  # float32: the width the CPU profile was measured at
    config, _ = resolve_lsh(model, MagicPIGConfig(method=args.method))  # explicit: the engine never calibrates
    cost = CostModel.for_config(profile, profile.model, config) if profile.model else None
    if cost is None:
        raise ValueError(f"--profile {args.profile}: it carries no model shape; profile this model first")
    policy = PolicyConfig(args.policy, token_budget=args.token_budget, method=args.method)
    print(f"{args.policy} policy (budget {args.token_budget}), {args.method}, {args.num_requests} requests; "
          f"{torch.get_num_threads()} torch threads; ms: engine, simulated, error | step replay error by kind")
    rows = []
    for rate in args.rates:
        engine = Engine(model, config, max_num_seqs=args.max_num_seqs, policy=policy,
                        max_prefill_tokens=args.max_prefill_tokens, chunked_prefill=not args.whole_prompts,
                        device_memory_bytes=int(args.device_memory_gb * GIB),
                        cpu_memory_bytes=int(args.host_memory_gb * GIB))
        try:
            rows.append(check_rate(engine, cost, policy, rate, args))
        finally:
            engine.close()
        print_row(rows[-1])
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1) + "\n")
        print(f"wrote {args.json}")
    return 0
