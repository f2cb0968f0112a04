"""Continuous batching (the Engine) against today's static batches on a mixed offline workload.

One run, the embedded model (or --model), for each method (dense, and magicpig K=10, L=400,
min_collisions=4: the accurate setting for SmolLM2, docs/RESULTS.md), side by side:
  * workload: --requests prompts of --min-prompt..--max-prompt tokens and output caps of
    --min-output..--max-output tokens, both drawn uniformly with --seed; greedy decoding, so a
    request may stop early at EOS (actual tokens are counted). Two arrival patterns: all at
    once (t = 0), and Poisson arrivals at --rate requests/s (first at t = 0).
  * engine: one Engine(model, config, max_num_seqs=M) per pattern; each request is added at
    its arrival time (the clock is checked between steps; an idle engine sleeps until the next
    arrival). TTFT = first RequestOutput - arrival; TPOT = (E2E - TTFT) / (tokens - 1).
  * static (what a user without the engine does): fixed batches of M in arrival order; a batch
    starts when its last member has arrived and the previous batch has finished, runs
    model.prefill(batch) then model.generate_from(state, config, max_new_tokens=max cap of
    the batch), so every row decodes until the batch's longest one is done; each row's tokens
    are cut at its own cap for counting. Per-step times are recorded inside generate_from
    (a timing wrapper on its decode session): a row's first token exists when the session is
    open (it is the argmax of the prefill's logits), its k-th token at the end of step k-1.
    A static batch does nothing while it waits for members, so its work does not depend on
    when it starts: the batches are measured once per method and both arrival schedules are
    laid over those measured durations (no idle sleeping).
Prints output tokens/s, mean/P99 TTFT and TPOT of both paths, engine/static throughput, and
where the time went (prefill, session setup, decode; static rows decoded past their end).

    python scripts/bench_engine.py [--quick] [--requests 16] [--max-num-seqs 8] [--rate 0.1]
        [--methods dense magicpig] [--json PATH]
"""

from __future__ import annotations

import os

# Same reason as bench_cpu_attention.py: spinning OpenMP threads steal the two cores.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402

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
    from magicpig import Engine, SamplingParams

    n = len(work.ids)
    first, finish = [math.nan] * n, [math.nan] * n
    token_ids: list[list[int]] = [[] for _ in range(n)]
    order = sorted(range(n), key=lambda i: (arrivals[i], i))
    engine = Engine(model, config, max_num_seqs=max_num_seqs)
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
            outs = engine.step()
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
class _TimedSession:
    """A decode session that records when each step's logits are ready."""

    def __init__(self, session: Any, log: list[float]):
        self._session, self._log = session, log

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        logits = self._session.step(tokens)
        if logits.device.type == "cuda":
            torch.cuda.synchronize(logits.device)
        self._log.append(time.perf_counter())
        return logits

    def __getattr__(self, name: str) -> Any:
        return getattr(self._session, name)


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


def measure_static(model: Any, config: Any, work: Workload, max_num_seqs: int) -> list[StaticBatch]:
    from magicpig.llm import LongContextModel

    n = len(work.ids)
    batches = []
    for lo in range(0, n, max_num_seqs):
        members = list(range(lo, min(n, lo + max_num_seqs)))
        cap = max(work.caps[i] for i in members)
        log: list[float] = []
        t0 = time.perf_counter()
        state = model.prefill([work.ids[i] for i in members], progress=False)
        t1 = time.perf_counter()
        model.decode_session = lambda *a, **k: _TimedSession(LongContextModel.decode_session(model, *a, **k), log)
        try:
            events = model.generate_from(state, config, max_new_tokens=cap, stream=True)
        finally:
            del model.decode_session  # back to the class's method
        t2 = time.perf_counter()  # session open: the first tokens are the prefill logits' argmax
        while True:
            try:
                next(events)
            except StopIteration as done:
                results = done.value
                break
        t3 = time.perf_counter()
        del state
        times = [t2 - t0] + [t - t0 for t in log]
        counted = [min(len(r.token_ids), work.caps[i]) for r, i in zip(results, members)]
        if max(len(r.token_ids) for r in results) > 1 and len(log) < max(len(r.token_ids) for r in results) - 1:
            raise RuntimeError("generate_from no longer steps through model.decode_session: cannot time its steps")
        batches.append(StaticBatch(
            members, t3 - t0, t2 - t0, [times[:c] for c in counted],
            [r.token_ids[:c] for r, c in zip(results, counted)],
            t1 - t0, t2 - t1, t3 - t2, len(log) * len(members), sum(c - 1 for c in counted),
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    parser.add_argument("--quick", action="store_true",
                        help="smoke preset: " + ", ".join(f"{k.replace('_', '-')} {v}" for k, v in QUICK.items()))
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--min-prompt", type=int, default=1024)
    parser.add_argument("--max-prompt", type=int, default=7168)
    parser.add_argument("--min-output", type=int, default=16)
    parser.add_argument("--max-output", type=int, default=256)
    parser.add_argument("--rate", type=float, default=0.1, help="Poisson arrivals, requests/s (0: skip that pattern)")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="engine's max_num_seqs and the static batch size")
    parser.add_argument("--methods", nargs="+", default=["dense", "magicpig"])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", default=None, metavar="PATH", help="write the figures per method to PATH")
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_output <= args.max_output:
        parser.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-output <= --max-output")
    if args.requests < 1 or args.max_num_seqs < 1 or args.rate < 0:
        parser.error("need --requests >= 1, --max-num-seqs >= 1, --rate >= 0")
    methods = parse_methods(args.methods)
    if args.threads:
        torch.set_num_threads(args.threads)

    from magicpig import LongContextModel

    model = LongContextModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    if args.max_prompt + args.max_output > model.args.max_context:
        parser.error(f"--max-prompt + --max-output must be <= the model's context ({model.args.max_context})")
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


if __name__ == "__main__":
    main()
