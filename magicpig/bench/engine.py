"""Continuous batching (the Engine) against static batches on a mixed offline workload
(``scripts/bench_engine.py``, ``magicpig bench engine``).

One run, the embedded model (or --model), for each method (dense, and magicpig K=10, L=400,
min_collisions=4: the accurate setting for SmolLM2, docs/RESULTS.md), side by side:
  * workload: prompts and output caps drawn uniformly with a seed; greedy decoding, so a
    request may stop early at EOS (actual tokens are counted). Two arrival patterns: all at
    once (t = 0), and Poisson arrivals at a rate (first at t = 0).
  * engine: one Engine per pattern; each request is added at its arrival time (the clock is
    checked between steps; an idle engine sleeps until the next arrival). TTFT = first
    RequestOutput - arrival; TPOT = (E2E - TTFT) / (tokens - 1).
  * static (what a user without the engine does, the baseline): fixed batches in arrival
    order; a batch starts when its last member has arrived and the previous batch has
    finished: one prefill of the batch, then every row decoded greedily through a bare
    decode session until the batch's longest row is done (:func:`_static_decode`). A row's
    first token exists when the session is open, its k-th token at the end of step k-1. A
    static batch does nothing while it waits for members, so its work does not depend on
    when it starts: the batches are measured once per method and both arrival schedules are
    laid over those measured durations (no idle sleeping).
"""

from __future__ import annotations

import argparse
import gc
import math
import random
import statistics
import time
from dataclasses import dataclass, field
from typing import Any

import torch

# Deterministic filler: sentences of a plain story, shuffled per request (no downloads).
SENTENCES = [
    "The harbour town woke slowly under a grey sky, and the fishing boats rocked against the pier.",
    "Mara carried her father's old brass compass in a pocket sewn into the lining of her coat.",
    "Every morning the baker opened his shutters at six and the smell of bread filled the square.",
    "The lighthouse keeper kept a logbook in which he wrote the weather, the ships and his dreams.",
    "A letter arrived from the capital, sealed with green wax and addressed in a hurried hand.",
    "Nobody in the village remembered when the clock on the church tower had last told the right time.",
    "Tomas repaired nets on the beach and sang songs whose words he had long since forgotten.",
    "The road to the mountains was washed out every spring, and every summer it was built again.",
    "In the library the shelves leaned so far that the librarian tied them to the wall with rope.",
    "The children ran along the sea wall, counting the gulls and daring each other to jump.",
    "At night the wind carried the sound of bells from an island that appeared on no map.",
    "Mara's aunt kept bees behind the house and spoke to them about the family's troubles.",
    "The merchant ship Aurora was three weeks late, and the harbour master began to worry.",
    "Rain fell for nine days, and on the tenth the river rose over the stones of the old bridge.",
    "The schoolteacher drew the coastline on the blackboard from memory, every cove and rock.",
    "A stranger in a long blue coat took a room at the inn and paid for a month in silver coins.",
    "The market sold apples, salted fish, wool, lamp oil and rumours, and rumours were the cheapest.",
    "When the fog came in, the foghorn moaned every thirty seconds until the sun burned it away.",
    "Old Peder claimed he had once seen a whale as large as the church swim past the headland.",
    "Mara studied the compass and noticed that its needle did not point north but toward the island.",
    "The mayor called a meeting in the town hall, and for once everybody came and nobody argued.",
    "Snow was rare on the coast, but that winter it covered the roofs for almost a week.",
    "The stranger asked many questions about the lighthouse and wrote the answers in a small notebook.",
    "Tomas said the island could only be reached at the lowest tide of the year, and only by rowing.",
    "The baker's daughter wanted to become a sailor and practised knots at the kitchen table.",
    "Lanterns were hung along the pier for the autumn festival, and musicians came from the valley.",
    "The harbour master found an old chart in a drawer, its edges burned and its legend in code.",
    "Mara and Tomas borrowed a rowing boat and waited on the beach for the tide to turn.",
    "The water was so clear that they could see the sand ripples and the shadows of fish below.",
    "Halfway across, the compass needle began to spin, and the fog closed around them like wool.",
    "On the island they found a garden of stone walls, wild roses and a well without a bottom.",
    "The stranger was already there, sitting on a rock and reading aloud from the green-sealed letter.",
]
INSTRUCTION = ("\n\nWrite a long new chapter that continues the story above, with dialogue, "
               "descriptions of the places and many details.")
QUICK = dict(requests=6, min_prompt=200, max_prompt=500, min_output=8, max_output=24, max_num_seqs=3, rate=1.0)


@dataclass
class Workload:
    ids: list[list[int]]  # prompt token ids per request
    caps: list[int]  # max_new_tokens per request


@dataclass
class Run:
    """One path over one arrival pattern; times in seconds from the first arrival."""

    first: list[float]
    finish: list[float]
    tokens: list[int]  # counted output tokens (cut at each request's cap)
    token_ids: list[list[int]]
    breakdown: dict[str, float] = field(default_factory=dict)


# ------------------------------------------------------------------ workload
def chat_wrap(tokenizer: Any) -> tuple[list[int], list[int]]:
    """Token ids before and after the user's content in the chat template."""
    mark = "\x00MARK\x00"
    text = INSTRUCTION + mark
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": mark + INSTRUCTION}], tokenize=False,
                                             add_generation_prompt=True)
    head, tail = text.split(mark)
    return (tokenizer(head, add_special_tokens=False)["input_ids"],
            tokenizer(tail, add_special_tokens=False)["input_ids"])


def make_workload(tokenizer: Any, args: argparse.Namespace) -> Workload:
    rng = random.Random(args.seed)
    head, tail = chat_wrap(tokenizer)
    pieces = [tokenizer(" " + s, add_special_tokens=False)["input_ids"] for s in SENTENCES]
    ids, caps = [], []
    for _ in range(args.requests):
        n = rng.randint(args.min_prompt, args.max_prompt)
        body: list[int] = []
        need = max(1, n - len(head) - len(tail))
        while len(body) < need:
            order = list(range(len(pieces)))
            rng.shuffle(order)
            for i in order:
                body += pieces[i]
        ids.append(head + body[:need] + tail)
        caps.append(rng.randint(args.min_output, args.max_output))
    return Workload(ids, caps)


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    if rate is None:
        return [0.0] * n
    rng = random.Random(seed + 1)
    t, out = 0.0, [0.0]
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        out.append(t)
    return out


# -------------------------------------------------------------------- engine
def run_engine(model: Any, config: Any, work: Workload, arrivals: list[float], max_num_seqs: int) -> Run:
    from magicpig.core.sampling_params import SamplingParams
    from magicpig.engine.engine import Engine

    n = len(work.ids)
    first, finish = [math.nan] * n, [math.nan] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    order = sorted(range(n), key=lambda i: (arrivals[i], i))
    engine = Engine(model.loaded, model.resolve_lsh(config), max_num_seqs=max_num_seqs)
    prefill_s = idle_s = 0.0
    steps = 0
    try:
        nxt = 0
        t0 = time.perf_counter()
        while nxt < n or engine.has_unfinished():
            now = time.perf_counter() - t0
            while nxt < n and arrivals[order[nxt]] <= now:
                i = order[nxt]
                engine.add_request(work.ids[i], SamplingParams(max_new_tokens=work.caps[i]), request_id=f"r{i}")
                nxt += 1
            if not engine.has_unfinished():
                wait = arrivals[order[nxt]] - (time.perf_counter() - t0)
                if wait > 0:
                    time.sleep(wait)
                    idle_s += wait
                continue
            outs = engine.step().outputs
            steps += 1
            t = time.perf_counter() - t0
            for out in outs:
                i = int(out.request_id[1:])
                if math.isnan(first[i]):
                    first[i] = t
                token_ids[i] += out.new_token_ids
                if out.finished:
                    finish[i] = t
                    prefill_s += out.stats.prefill_seconds
    finally:
        engine.close()
    makespan = max(finish)
    return Run(first, finish, [len(t) for t in token_ids], token_ids,
               {"prefill_s": prefill_s, "other_s": makespan - prefill_s - idle_s, "idle_s": idle_s,
                "steps": steps})


# -------------------------------------------------------------------- static
@dataclass
class StaticBatch:
    members: list[int]
    seconds: float  # prefill + session open + decode
    first_at: float  # when the first tokens exist, from the batch's start
    token_at: list[list[float]]  # per member: time of each counted token, from the batch's start
    token_ids: list[list[int]]
    prefill_s: float
    setup_s: float
    decode_s: float
    row_steps: int  # rows x decode steps run
    useful_row_steps: int  # of which a row had not yet reached its cap / EOS


def _static_decode(model: Any, state: Any, config: Any, cap: int, caps: list[int],
                   t0: float) -> tuple[list[list[int]], list[float], float]:
    """The baseline being measured: one fixed batch, greedy, every row decoded until the
    batch's longest is done (no row leaves, none joins), stepped through a bare
    :class:`DecodeSession`. Returns each row's tokens (to EOS or its cap), the time of each
    step's logits from ``t0``, and when the session was open."""
    eos = model.eos_token_ids
    tokens = state.last_logits.argmax(dim=-1)
    rows = [[int(t)] for t in tokens]
    done = [r[0] in eos or c <= 1 for r, c in zip(rows, caps)]
    log: list[float] = []
    with model.decode_session(state, config, cap) as session:
        opened = time.perf_counter() - t0
        for _ in range(cap - 1):
            if all(done):
                break
            logits = session.step(tokens)
            if logits.device.type == "cuda":
                torch.cuda.synchronize(logits.device)
            log.append(time.perf_counter() - t0)
            tokens = logits.argmax(dim=-1)
            for b, row in enumerate(rows):
                if not done[b]:
                    row.append(int(tokens[b]))
                    done[b] = row[-1] in eos or len(row) >= caps[b]
    return rows, log, opened


def measure_static(model: Any, config: Any, work: Workload, max_num_seqs: int) -> list[StaticBatch]:
    """Static batches of ``max_num_seqs`` in arrival order, each measured once."""
    n = len(work.ids)
    config = model.resolve_lsh(config)
    batches = []
    for lo in range(0, n, max_num_seqs):
        members = list(range(lo, min(n, lo + max_num_seqs)))
        caps = [work.caps[i] for i in members]
        t0 = time.perf_counter()
        state = model.prefill([work.ids[i] for i in members], progress=False)
        t1 = time.perf_counter()
        rows, log, opened = _static_decode(model, state, config, max(caps), caps, t0)
        t3 = time.perf_counter()
        del state
        times = [opened] + log
        counted = [min(len(r), c) for r, c in zip(rows, caps)]
        batches.append(StaticBatch(
            members, t3 - t0, opened, [times[:c] for c in counted], [r[:c] for r, c in zip(rows, counted)],
            t1 - t0, t0 + opened - t1, t3 - t0 - opened, len(log) * len(members), sum(c - 1 for c in counted),
        ))
        gc.collect()
    return batches


def static_run(batches: list[StaticBatch], arrivals: list[float], n: int) -> Run:
    """Lay the measured batches over an arrival schedule."""
    first, finish, tokens = [math.nan] * n, [math.nan] * n, [0] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    end = 0.0
    wait = 0.0
    for b in batches:
        start = max(end, max(arrivals[i] for i in b.members))
        wait += start - end
        for j, i in enumerate(b.members):
            first[i] = start + b.first_at
            finish[i] = start + b.token_at[j][-1]
            tokens[i], token_ids[i] = len(b.token_at[j]), b.token_ids[j]
        end = start + b.seconds
    # The batch's time runs until its longest row ends, but output stops at the last counted token.
    rows, useful = sum(b.row_steps for b in batches), sum(b.useful_row_steps for b in batches)
    return Run(first, finish, tokens, token_ids, {
        "prefill_s": sum(b.prefill_s for b in batches), "setup_s": sum(b.setup_s for b in batches),
        "decode_s": sum(b.decode_s for b in batches), "idle_s": wait, "end_s": end,
        "wasted_row_steps": 1.0 - useful / rows if rows else 0.0,
    })


# ------------------------------------------------------------------- metrics
def p99(xs: list[float]) -> float:
    xs = sorted(xs)
    if not xs:
        return math.nan
    pos = 0.99 * (len(xs) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(run: Run, arrivals: list[float]) -> dict[str, float]:
    ttft = [f - a for f, a in zip(run.first, arrivals)]
    tpot = [(e - f) / (k - 1) for f, e, k in zip(run.first, run.finish, run.tokens) if k > 1]
    seconds = max(run.finish)  # from the first arrival (t = 0) to the last token
    total = sum(run.tokens)
    return {
        "tokens": total, "seconds": seconds, "tokens_per_s": total / seconds,
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p99_s": p99(ttft),
        "tpot_mean_s": statistics.fmean(tpot) if tpot else math.nan, "tpot_p99_s": p99(tpot),
        **{k: v for k, v in run.breakdown.items()},
    }


def warm_up(model: Any, config: Any) -> None:
    """First-call allocations and thread pools, on both paths (not measured)."""
    ids = [model.encode("warm up " * 150)[0][0]] * 2
    work = Workload(ids, [4, 4])
    measure_static(model, config, work, 2)
    run_engine(model, config, work, [0.0, 0.0], 2)


def parse_methods(names: list[str]) -> list[tuple[str, Any]]:
    from magicpig import MagicPIGConfig

    known = {"dense": MagicPIGConfig(method="dense"),
             "magicpig": MagicPIGConfig(K=10, L=400, min_collisions=4)}
    for name in names:
        if name not in known:
            raise SystemExit(f"bench_engine.py: unknown method {name!r}: expected some of {sorted(known)}")
    return [(name, known[name]) for name in names]


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """The whole comparison for parsed ``args`` (see ``scripts/bench_engine.py``); prints the
    tables and returns the report (written to ``args.json`` when set)."""
    import json
    import os

    methods = parse_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)

    from magicpig import LongContextModel

    model = LongContextModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    if args.max_prompt + args.max_output > model.args.max_context:
        raise SystemExit(f"bench_engine: --max-prompt + --max-output must be <= the model's context "
                         f"({model.args.max_context})")
    work = make_workload(model.tokenizer, args)
    n = len(work.ids)
    patterns = [("all at once", "all_at_once", arrival_times(n, None, args.seed))]
    if args.rate > 0:
        patterns.append((f"Poisson {args.rate:g}/s", "poisson", arrival_times(n, args.rate, args.seed)))
    lengths = [len(p) for p in work.ids]
    print(f"model {model.source}, {n} requests: prompts {min(lengths)}-{max(lengths)} tokens (total {sum(lengths)}), "
          f"output caps {min(work.caps)}-{max(work.caps)} (total {sum(work.caps)}), max_num_seqs / static batch "
          f"{args.max_num_seqs}, greedy, {torch.get_num_threads()} torch threads, fp32; load average "
          f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores", flush=True)

    report: dict[str, Any] = {}
    t_all = time.perf_counter()
    for name, config in methods:
        print(f"\n== {name}: warm-up", flush=True)
        warm_up(model, config)
        t = time.perf_counter()
        batches = measure_static(model, config, work, args.max_num_seqs)
        loads = {"static": os.getloadavg()[0]}
        print(f"   static batches measured in {time.perf_counter() - t:.0f} s (load average {loads['static']:.2f})",
              flush=True)
        rows: dict[str, dict[str, dict[str, float]]] = {}
        same = {}
        for label, key, arr in patterns:
            t = time.perf_counter()
            eng = run_engine(model, config, work, arr, args.max_num_seqs)
            loads[f"engine_{key}"] = os.getloadavg()[0]
            print(f"   engine, {label}: {time.perf_counter() - t:.0f} s (load average {loads[f'engine_{key}']:.2f})",
                  flush=True)
            gc.collect()
            st = static_run(batches, arr, n)
            rows[key] = {"engine": summarize(eng, arr), "static": summarize(st, arr)}
            same[key] = sum(a == b for a, b in zip(eng.token_ids, st.token_ids))
        print_method(name, config, patterns, rows, same, n)
        head = rows["all_at_once"]
        report[name] = {
            "engine_tokens_per_s": head["engine"]["tokens_per_s"],
            "static_tokens_per_s": head["static"]["tokens_per_s"],
            "speedup": head["engine"]["tokens_per_s"] / head["static"]["tokens_per_s"],
            "ttft_p99_s": head["engine"]["ttft_p99_s"], "tpot_p99_s": head["engine"]["tpot_p99_s"],
            "static_ttft_p99_s": head["static"]["ttft_p99_s"], "static_tpot_p99_s": head["static"]["tpot_p99_s"],
            "config": repr(config), "load_average_after": loads,
            "patterns": {key: {**rows[key], "speedup": rows[key]["engine"]["tokens_per_s"]
                               / rows[key]["static"]["tokens_per_s"], "identical_outputs": same[key]}
                         for _, key, _ in patterns},
        }
    load = os.getloadavg()[0]
    print(f"\n(whole run {time.perf_counter() - t_all:.0f} s; load average at the end: {load:.2f} on "
          f"{os.cpu_count()} cores)")
    if args.json:
        report["_run"] = {
            "requests": n, "prompt_tokens": lengths, "output_caps": work.caps, "max_num_seqs": args.max_num_seqs,
            "rate": args.rate, "seed": args.seed, "threads": torch.get_num_threads(), "load_average_end": load,
            "arrivals": {key: arr for _, key, arr in patterns}, "model": model.source,
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return report


def print_method(name: str, config: Any, patterns: list, rows: dict, same: dict, n: int) -> None:
    print(f"\n{name}: {config!r}")
    print(f"| {'arrivals':<15} | {'path':<6} | {'tokens':>6} | {'seconds':>7} | {'tok/s':>6} | {'TTFT mean':>9} | "
          f"{'TTFT p99':>8} | {'TPOT mean':>9} | {'TPOT p99':>8} |")
    print(f"|{'-' * 17}|{'-' * 8}|{'-' * 8}|{'-' * 9}|{'-' * 8}|{'-' * 11}|{'-' * 10}|{'-' * 11}|{'-' * 10}|")
    for label, key, _ in patterns:
        for path in ("engine", "static"):
            r = rows[key][path]
            print(f"| {label:<15} | {path:<6} | {r['tokens']:>6} | {r['seconds']:>7.1f} | {r['tokens_per_s']:>6.2f} | "
                  f"{r['ttft_mean_s']:>8.1f}s | {r['ttft_p99_s']:>7.1f}s | {r['tpot_mean_s']:>8.3f}s | "
                  f"{r['tpot_p99_s']:>7.3f}s |")
    for label, key, _ in patterns:
        e, s = rows[key]["engine"], rows[key]["static"]
        print(f"{label}: engine / static throughput {e['tokens_per_s'] / s['tokens_per_s']:.2f}x; "
              f"identical outputs {same[key]}/{n}")
        print(f"   engine: prefill {e['prefill_s']:.1f} s, decode + rest {e['other_s']:.1f} s, idle "
              f"{e['idle_s']:.1f} s, {e['steps']} steps")
        print(f"   static: prefill {s['prefill_s']:.1f} s, session setup {s['setup_s']:.1f} s, decode "
              f"{s['decode_s']:.1f} s, waiting for arrivals {s['idle_s']:.1f} s; "
              f"{100 * s['wasted_row_steps']:.0f}% of decoded rows past their end")


