"""Prefill and decode speed of this runner (dense and magicpig) against transformers' generate.

One run, one prompt (a needle-in-a-haystack prompt of --tokens tokens), the same fp32 weights:
  * ours: exact chunked prefill once; then --new-tokens greedy decode steps from that state,
    with method="dense" and with method="magicpig";
  * transformers: model.generate(max_new_tokens=1+N, min_new_tokens=1+N), timed from inside by
    a logits processor: prefill = until the first logits, decode tok/s = N / (last - first).
Prints tokens/s and the ratios (goal: dense decode >= 1.5x transformers at 8k; magicpig decode
faster than dense). ``--e2e-tokens N``: also ``LongContextModel.generate`` of one N-token prompt
with --e2e-new-tokens new tokens, dense and magicpig alternated for --repeats rounds, setup
(prefill, hashing, table builds) included: the medians and their ratio.

``--batch B`` decodes B sequences of --tokens tokens together (needles at different depths
and numbers); the dense and magicpig decode sessions alternate for --rounds rounds (medians).

    python scripts/bench_generate.py [--tokens 8000] [--new-tokens 32] [--batch 1] [--rounds 1]
        [--model PATH] [--json PATH] [--e2e-tokens 2500 --e2e-new-tokens 32 --repeats 3]

The library side of ``scripts/bench_generate.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
The prompts come from the caller's ``needle_prompt`` (``magicpig.demo``'s, which sits above this
layer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import torch

NeedlePrompt = Callable[..., tuple[str, str]]  # (tokenizer, num_tokens, depth=, seed=) -> (prompt, answer)


def _decode_rate(model, state, config, steps: int) -> tuple[float, float, float]:
    """(decode tokens/s, computation cost, session setup seconds) of ``steps`` greedy steps
    from ``state``. Setup is opening the session: for magicpig, hashing the middle keys and
    building the CPU store's tables from the prefill."""
    t_open = time.perf_counter()
    with model.decode_session(state, config, steps) as session:
        setup = time.perf_counter() - t_open
        tokens = state.last_logits.argmax(-1)
        tokens = session.step(tokens).argmax(-1)  # warm-up step (first-call allocations)
        t0 = time.perf_counter()
        for _ in range(steps):
            tokens = session.step(tokens).argmax(-1)
        seconds = time.perf_counter() - t0
        cost = sum(session.computation_cost()) / len(tokens)
    return steps * len(tokens) / seconds, cost, setup


def _decode_rates(model, state, steps: int, rounds: int) -> dict[str, tuple[float, float, float]]:
    """Per method (dense, magicpig): the medians over ``rounds`` of (decode tokens/s, cost,
    setup s), the two methods alternated round by round so that drift in the machine's speed
    falls on both."""
    from magicpig import MagicPIGConfig

    configs = {"dense": MagicPIGConfig(method="dense"), "magicpig": MagicPIGConfig()}
    runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in configs}
    for rnd in range(rounds):
        for name in (list(configs) if rnd % 2 == 0 else list(configs)[::-1]):
            runs[name].append(_decode_rate(model, state, configs[name], steps))
    return {name: tuple(statistics.median(r[i] for r in rs) for i in range(3)) for name, rs in runs.items()}


def _hf_rates(source: str, ids: list[int], steps: int) -> tuple[float, float]:
    """(prefill tokens/s, decode tokens/s) of transformers' generate, timed from inside it: a
    logits processor records when each step's logits are ready."""
    from transformers import AutoModelForCausalLM, LogitsProcessor, LogitsProcessorList

    class Clock(LogitsProcessor):
        def __init__(self) -> None:
            self.times: list[float] = []

        def __call__(self, input_ids, scores):
            self.times.append(time.perf_counter())
            return scores

    hf = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32).eval()
    x = torch.tensor([ids])
    kwargs = dict(do_sample=False, pad_token_id=hf.config.eos_token_id)
    with torch.inference_mode():
        hf.generate(x[:, :64], max_new_tokens=2, **kwargs)  # warm-up
        clock = Clock()
        t0 = time.perf_counter()
        hf.generate(x, max_new_tokens=1 + steps, min_new_tokens=1 + steps,
                    logits_processor=LogitsProcessorList([clock]), **kwargs)
    t = clock.times
    return len(ids) / (t[0] - t0), (len(t) - 1) / (t[-1] - t[0])


def _end_to_end(model, tokens: int, new_tokens: int, repeats: int, needle_prompt: NeedlePrompt) -> dict:
    """Median seconds of ``model.generate`` of one ``tokens``-token prompt (dense, magicpig),
    alternated round by round after one warm-up each."""
    from magicpig import MagicPIGConfig

    prompt, _ = needle_prompt(model.tokenizer, tokens)
    configs = {"dense": MagicPIGConfig(method="dense"), "magicpig": MagicPIGConfig()}
    times: dict[str, list[float]] = {name: [] for name in configs}
    for rnd in range(repeats + 1):
        for name in (list(configs) if rnd % 2 else list(configs)[::-1]):
            t0 = time.perf_counter()
            model.generate(prompt, max_new_tokens=new_tokens, config=configs[name])
            if rnd:
                times[name].append(time.perf_counter() - t0)
    med = {name: statistics.median(t) for name, t in times.items()}
    return {"tokens": tokens, "new_tokens": new_tokens, "seconds": times, "median_s": med,
            "magicpig_over_dense": med["magicpig"] / med["dense"]}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded smollm2-135m-instruct")
    parser.add_argument("--tokens", type=int, default=8000)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1, help="sequences decoded together")
    parser.add_argument("--rounds", type=int, default=1, help="alternated dense/magicpig decode rounds")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--skip-transformers", action="store_true")
    parser.add_argument("--bf16", action="store_true", help="also run this runner with bf16 weights")
    parser.add_argument("--e2e-tokens", type=int, default=0, help="also time generate() end to end at this length")
    parser.add_argument("--e2e-new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of the end-to-end comparison")
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("batch", "rounds", "new_tokens"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')}={getattr(args, name)}: expected an integer >= 1")
    return args


def run(args: argparse.Namespace, needle_prompt: NeedlePrompt) -> None:
    """The benchmark of :func:`parse_args`' ``args`` (prints the table, writes --json), on
    prompts of ``needle_prompt`` (``magicpig.demo.needle_prompt``)."""
    if args.threads:
        torch.set_num_threads(args.threads)

    from magicpig import LongContextModel

    model = LongContextModel.from_pretrained(args.model, device="cpu", dtype=torch.float32)
    batch_ids = [model.encode(needle_prompt(model.tokenizer, args.tokens, depth=(b + 1) / (args.batch + 1),
                                            seed=b)[0])[0][0] for b in range(args.batch)]
    ids = batch_ids[0]
    source = model.source
    n = len(ids)
    print(f"model {model.source}, batch {args.batch} x ~{n} prompt tokens, {args.new_tokens} decode steps, "
          f"{args.rounds} round(s), {torch.get_num_threads()} torch threads, fp32", flush=True)

    t0 = time.perf_counter()
    state = model.prefill(batch_ids)
    ours_prefill = sum(map(len, batch_ids)) / (time.perf_counter() - t0)
    rates = _decode_rates(model, state, args.new_tokens, args.rounds)
    (dense_rate, _, dense_setup), (mp_rate, mp_cost, mp_setup) = rates["dense"], rates["magicpig"]
    rows = [
        ("magicpig runner, dense", ours_prefill, dense_rate, dense_setup),
        (f"magicpig runner, magicpig (cost {mp_cost:.3f})", ours_prefill, mp_rate, mp_setup),
    ]
    if args.bf16:
        # Same weights held in bf16 (decode on a CPU is bound by reading the weights).
        del state, model
        model = LongContextModel.from_pretrained(args.model, device="cpu", dtype=torch.bfloat16)
        t0 = time.perf_counter()
        state = model.prefill(batch_ids)
        bf_prefill = sum(map(len, batch_ids)) / (time.perf_counter() - t0)
        bf_rates = _decode_rates(model, state, args.new_tokens, args.rounds)
        (bf_dense, _, bf_dense_setup), (bf_mp, bf_cost, bf_mp_setup) = bf_rates["dense"], bf_rates["magicpig"]
        rows += [
            ("magicpig runner bf16, dense", bf_prefill, bf_dense, bf_dense_setup),
            (f"magicpig runner bf16, magicpig (cost {bf_cost:.3f})", bf_prefill, bf_mp, bf_mp_setup),
        ]
    e2e = _end_to_end(model, args.e2e_tokens, args.e2e_new_tokens, args.repeats, needle_prompt) if args.e2e_tokens else None
    if not args.skip_transformers:
        state = model = None  # free memory before loading transformers' copy
        hf_prefill, hf_rate = _hf_rates(source, ids, args.new_tokens)
        rows.append(("transformers generate", hf_prefill, hf_rate, None))  # no separate setup
    print()
    print(f"| {'runner':<42} | {'prefill tok/s':>13} | {'session setup s':>15} | {'decode tok/s':>12} |")
    print(f"|{'-' * 44}|{'-' * 15}|{'-' * 17}|{'-' * 14}|")
    for name, p, d, setup in rows:
        setup_text = "-" if setup is None else f"{setup:.2f}"
        print(f"| {name:<42} | {p:>13.1f} | {setup_text:>15} | {d:>12.2f} |")
    print()
    if not args.skip_transformers:
        print(f"dense decode / transformers decode:   {dense_rate / hf_rate:.2f}x")
        print(f"prefill / transformers prefill:       {ours_prefill / hf_prefill:.2f}x")
    print(f"magicpig decode / dense decode:       {mp_rate / dense_rate:.2f}x")
    if e2e:
        med = e2e["median_s"]
        print(f"generate() of {e2e['tokens']} + {e2e['new_tokens']} tokens, setup included (medians of "
              f"{args.repeats}): dense {med['dense']:.2f} s, magicpig {med['magicpig']:.2f} s: "
              f"magicpig / dense = {e2e['magicpig_over_dense']:.2f}x")
    print(f"(load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores)")
    if args.json:
        doc = {"prompt_tokens": n, "batch": args.batch, "rounds": args.rounds, "new_tokens": args.new_tokens,
               "threads": torch.get_num_threads(),
               "rows": [{"runner": name, "prefill_tok_s": p, "decode_tok_s": d, "setup_s": setup}
                        for name, p, d, setup in rows],
               "magicpig_over_dense_decode": mp_rate / dense_rate, "end_to_end": e2e}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1)


def main(argv: Optional[Sequence[str]] = None, *, needle_prompt: NeedlePrompt) -> None:
    run(parse_args(argv), needle_prompt)
