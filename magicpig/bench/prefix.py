"""Document QA with and without prefix caching (``magicpig bench prefix``).

The workload long-context serving is made of: D documents of 2k-6k tokens, each asked Q
different questions whose answers are in it (RULER's multi-key needle in a haystack: Q keys
with a 7-digit number each, hidden at random depths of an essay; question i asks for key i's
number). The questions arrive interleaved (document 0's first question, document 1's first, ...,
document 0's second, ...), all at once or as a Poisson process. Each prompt is the chat
template around the instructions, the document and the question, so the Q prompts of one
document share everything up to the question.

Side by side, in one run, for each method (dense, magicpig) and arrival pattern: the engine
with prefix caching, the engine without it, and ``generate(list)`` as it was before caching
(one engine sized for the prompts, one whole prompt per step, no cache: the static baseline).
Reported: mean and P99 TTFT, mean TPOT, output tokens/s over the makespan, the cache's hit rate
(prompt tokens served from it / looked up), peak device bytes (dense blocks in use and the
running requests' sink+window slots) and peak CPU-store bytes (the stores' own count, shared
blocks once), and accuracy (the needle's number in the answer). ``--json PATH`` writes it all.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import statistics
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from magicpig.perf.metrics import RequestTimes

INSTRUCTIONS = ("Some special magic numbers are hidden within the following text. Make sure to memorize them. "
                "I will quiz you about the numbers afterwards.\n")
QUESTION = "\nWhat is the special magic number for {key} mentioned in the provided text?"
ANSWER_PREFIX = " The special magic number for {key} mentioned in the provided text is"


@dataclass
class QA:
    """One request: its document, prompt ids and the number it must answer."""

    doc: int
    prompt_ids: list[int]
    answer: str


@dataclass
class Outcome:
    """One configuration's run: per request its times and text; peaks over the run."""

    times: list[RequestTimes]
    texts: list[str]
    peak_device_bytes: int = 0
    peak_cpu_bytes: int = 0
    cache: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------------------- workload
def document(rng: random.Random, words: list[str], num_words: int, keys: list[str], values: list[str]) -> str:
    """An essay of ``num_words`` words with one needle per key at random sentence depths."""
    from magicpig.eval.ruler import NEEDLE, _insert_at_depths

    sentences = [s for s in re.split(r"(?<=[.!?])\s+", " ".join(words[:num_words])) if s]
    needles = [NEEDLE.format(type_needle_v="numbers", key=k, value=v) for k, v in zip(keys, values)]
    depths = sorted(rng.sample(range(5, 95), len(needles)))
    return " ".join(_insert_at_depths(sentences, needles, depths))


def qa_prompt(tokenizer: Any, context: str, key: str) -> list[int]:
    from magicpig.eval.ruler import render_prompt

    text = render_prompt(tokenizer, INSTRUCTIONS + context + QUESTION.format(key=key), ANSWER_PREFIX.format(key=key))
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def make_workload(tokenizer: Any, docs: int, questions: int, min_tokens: int, max_tokens: int,
                  seed: int) -> list[QA]:
    """D x Q requests, interleaved by question round; document d sized to a length drawn
    uniformly in [min_tokens, max_tokens] (about 0.75 words a token)."""
    from magicpig.eval.ruler import essay_words, random_value

    rng = random.Random(seed)
    words = list(essay_words())
    per_doc: list[list[QA]] = []
    for d in range(docs):
        target = rng.randint(min_tokens, max_tokens)
        keys = [random_value(rng, "words") for _ in range(questions)]
        values = [random_value(rng, "numbers") for _ in range(questions)]
        start = rng.randrange(0, max(1, len(words) - 2 * target))
        context = document(rng, words[start:], int(target * 0.72), keys, values)
        per_doc.append([QA(d, qa_prompt(tokenizer, context, k), v) for k, v in zip(keys, values)])
    return [per_doc[d][q] for q in range(questions) for d in range(docs)]


def arrivals(n: int, rate: Optional[float], seed: int) -> list[float]:
    """All at t = 0 (``rate`` None), or Poisson at ``rate`` requests/s from t = 0."""
    if rate is None:
        return [0.0] * n
    rng, t, out = random.Random(seed + 1), 0.0, []
    for _ in range(n):
        out.append(t)
        t += rng.expovariate(rate)
    return out


# --------------------------------------------------------------------------- the runs
def run_engine(engine: Any, work: list[QA], times: list[float], max_new_tokens: int) -> Outcome:
    """Submit each request at its arrival time and step until all are done."""
    from magicpig.core.sampling_params import SamplingParams

    kv = engine.scheduler.kv
    n = len(work)
    record = Outcome([RequestTimes(t) for t in times], [""] * n)
    index, nxt, t0 = {}, 0, time.perf_counter()
    order = sorted(range(n), key=lambda i: (times[i], i))
    while nxt < n or engine.has_unfinished():
        now = time.perf_counter() - t0
        while nxt < n and times[order[nxt]] <= now:
            i = order[nxt]
            index[engine.submit(work[i].prompt_ids, SamplingParams(max_new_tokens=max_new_tokens))] = i
            nxt += 1
        if not engine.has_unfinished():
            time.sleep(max(0.0, times[order[nxt]] - (time.perf_counter() - t0)))
            continue
        outputs = engine.step().outputs
        t = time.perf_counter() - t0
        for out in outputs:
            i = index[out.request_id]
            record.times[i].token_times_s += [t] * len(out.new_token_ids)
            record.texts[i] += out.new_text
        device = kv.allocator.num_used * kv.layout.block_bytes + engine.num_running() * kv.layout.slot_bytes
        record.peak_device_bytes = max(record.peak_device_bytes, device)
        record.peak_cpu_bytes = max(record.peak_cpu_bytes, engine.cpu_store_bytes())
    record.cache = engine.cache_usage()
    return record


def run_static(model: Any, config: Any, work: list[QA], max_new_tokens: int) -> Outcome:
    """``generate(list)`` without the cache, all prompts given at t = 0 (the static baseline)."""
    caching, model.prefix_caching = model.prefix_caching, False
    t0 = time.perf_counter()
    record = Outcome([RequestTimes(0.0) for _ in work], [""] * len(work))
    try:
        stream = model.generate([w.prompt_ids for w in work], max_new_tokens=max_new_tokens, config=config,
                                stream=True)
        for i, piece in stream:
            record.times[i].token_times_s.append(time.perf_counter() - t0)
            record.texts[i] += piece
    finally:
        model.prefix_caching = caching
    return record


def summarize(out: Outcome, work: list[QA], times: list[float]) -> dict[str, Any]:
    """The figures of one run (seconds; TTFT from each request's arrival)."""
    ttft = [r.ttft_s for r in out.times if r.ttft_s is not None]
    tpot = [r.tpot_s for r in out.times if r.tpot_s is not None]
    tokens = sum(r.output_tokens for r in out.times)
    makespan = max(r.token_times_s[-1] for r in out.times if r.token_times_s) - min(times)
    ttft_sorted = sorted(ttft)
    correct = [w.answer in text for w, text in zip(work, out.texts)]
    cache = out.cache
    return {
        "ttft_mean_s": statistics.fmean(ttft), "ttft_p99_s": ttft_sorted[min(len(ttft) - 1, int(0.99 * len(ttft)))],
        "tpot_mean_s": statistics.fmean(tpot) if tpot else None, "output_tokens": tokens,
        "makespan_s": makespan, "output_tokens_per_s": tokens / makespan,
        "hit_rate": cache["hit_tokens"] / cache["query_tokens"] if cache.get("query_tokens") else 0.0,
        "peak_device_bytes": out.peak_device_bytes, "peak_cpu_store_bytes": out.peak_cpu_bytes,
        "accuracy": sum(correct) / len(correct), "correct": correct,
    }


# ----------------------------------------------------------------------------- driver
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="magicpig bench prefix", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="model name or path (default: the embedded SmolLM2)")
    p.add_argument("--docs", type=int, default=2, help="documents D (default 2)")
    p.add_argument("--questions", type=int, default=4, help="questions Q per document (default 4)")
    p.add_argument("--min-tokens", type=int, default=2000, help="shortest document, tokens (default 2000)")
    p.add_argument("--max-tokens", type=int, default=6000, help="longest document, tokens (default 6000)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="answer tokens per request (default 16)")
    p.add_argument("--max-num-seqs", type=int, default=8, help="engine's running requests (default 8)")
    p.add_argument("--max-prefill-tokens", type=int, default=2048,
                   help="engine's prefill tokens per step (default 2048: on a CPU a bigger batch of prompts "
                        "prefills no faster, it only delays every first token)")
    p.add_argument("--rate", type=float, default=0.1, help="Poisson arrivals, requests/s (default 0.1)")
    p.add_argument("--methods", nargs="+", default=["dense", "magicpig"], choices=["dense", "magicpig"])
    p.add_argument("--arrivals", nargs="+", default=["all", "poisson"], choices=["all", "poisson"])
    p.add_argument("--no-static", dest="static", action="store_false", help="skip the generate(list) baseline")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, metavar="PATH", help="write the report here")
    return p.parse_args(argv)


def configs() -> dict[str, Any]:
    from magicpig import MagicPIGConfig

    # magicpig: the accurate setting for SmolLM2 (docs/RESULTS.md), as bench engine uses.
    return {"dense": MagicPIGConfig(method="dense"), "magicpig": MagicPIGConfig(K=10, L=400, min_collisions=4)}


def bench(args: argparse.Namespace) -> dict[str, Any]:
    """Every configuration of ``args``, printed as it finishes; returns the report."""
    from magicpig import LongContextModel
    from magicpig.engine.engine import Engine

    model = LongContextModel.from_pretrained(args.model)
    work = make_workload(model.tokenizer, args.docs, args.questions, args.min_tokens, args.max_tokens, args.seed)
    report: dict[str, Any] = {"args": vars(args), "prompt_tokens": [len(w.prompt_ids) for w in work], "runs": {}}
    print(f"{len(work)} requests: {args.docs} documents x {args.questions} questions, prompts of "
          f"{min(report['prompt_tokens'])}-{max(report['prompt_tokens'])} tokens")
    for method in args.methods:
        config = model.resolve_lsh(configs()[method])
        for pattern in args.arrivals:
            times = arrivals(len(work), args.rate if pattern == "poisson" else None, args.seed)
            for caching in (True, False):  # side by side on the same warm process
                engine = Engine(model.loaded, config, max_num_seqs=args.max_num_seqs, prefix_caching=caching,
                                max_prefill_tokens=args.max_prefill_tokens)
                try:
                    row = summarize(run_engine(engine, work, times, args.max_new_tokens), work, times)
                finally:
                    engine.close()
                name = f"{method}/{pattern}/{'cached' if caching else 'uncached'}"
                report["runs"][name] = row
                print_row(name, row)
            ratios(report, method, pattern)
        if args.static:
            row = summarize(run_static(model, config, work, args.max_new_tokens), work, [0.0] * len(work))
            report["runs"][f"{method}/static"] = row
            print_row(f"{method}/static", row)
            if "all" in args.arrivals:
                cached = report["runs"][f"{method}/all/cached"]
                report.setdefault("ratios", {})[f"{method}/cached_vs_static_tokens_per_s"] = \
                    cached["output_tokens_per_s"] / row["output_tokens_per_s"]
                print(f"  {method}: engine with caching / static generate(list): "
                      f"{cached['output_tokens_per_s'] / row['output_tokens_per_s']:.2f}x output tokens/s")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=1)
    return report


def ratios(report: dict[str, Any], method: str, pattern: str) -> None:
    on, off = report["runs"][f"{method}/{pattern}/cached"], report["runs"][f"{method}/{pattern}/uncached"]
    r = {"ttft_mean": off["ttft_mean_s"] / on["ttft_mean_s"],
         "tokens_per_s": on["output_tokens_per_s"] / off["output_tokens_per_s"],
         "peak_cpu_store_bytes": on["peak_cpu_store_bytes"] / max(1, off["peak_cpu_store_bytes"]),
         "accuracy_delta": on["accuracy"] - off["accuracy"]}
    report.setdefault("ratios", {})[f"{method}/{pattern}"] = r
    print(f"  {method}/{pattern}: caching gives {r['ttft_mean']:.2f}x lower mean TTFT, {r['tokens_per_s']:.2f}x "
          f"tokens/s, {r['peak_cpu_store_bytes']:.2f}x peak CPU-store bytes, accuracy {r['accuracy_delta']:+.2f}")


def print_row(name: str, row: dict[str, Any]) -> None:
    tpot = f"{row['tpot_mean_s'] * 1e3:7.1f}" if row["tpot_mean_s"] is not None else "      -"
    print(f"{name:28s} TTFT mean {row['ttft_mean_s']:7.2f} s p99 {row['ttft_p99_s']:7.2f} s  TPOT {tpot} ms  "
          f"{row['output_tokens_per_s']:6.2f} tok/s  hit {row['hit_rate']:.2f}  device {row['peak_device_bytes'] / 2**20:7.1f} MiB  "
          f"store {row['peak_cpu_store_bytes'] / 2**20:7.1f} MiB  accuracy {row['accuracy']:.2f}", flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    bench(parse_args(argv))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
