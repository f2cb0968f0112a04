"""Teacher-forced agreement of sparse methods with dense attention on RULER answers.

For each sample: prefill once, let dense attention answer greedily, then feed that same answer
to every method and measure, per answer token, how much less likely the method makes dense's
token (NLL increase, nats) and whether its argmax differs. Far less noisy than end-to-end
scores on a small model whose own margins are thin: one flipped digit costs a whole RULER
answer, here it costs one token. Usage:

    python scripts/answer_nll.py --tasks niah_single_2 niah_single_3 --samples 3 \\
        --methods topk:0.035 magicpig:K=10,L=150 magicpig:K=10,L=400,min_collisions=4

The library side of ``scripts/answer_nll.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
"""

from __future__ import annotations

import argparse
from collections import defaultdict
from typing import Optional, Sequence

import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.eval import ruler
from magicpig.eval.runner import parse_method


def answer_logprobs(model: LongContextModel, state, config: MagicPIGConfig, tokens: list[int]) -> tuple[list[float], list[bool], float]:
    """(log p of each forced token, whether the argmax differs from it, computation cost)."""
    logprobs, misses = [], []
    with model.decode_session(state, config, max_new_tokens=len(tokens) + 1) as session:
        logits = state.last_logits.float()
        for tok in tokens:
            lp = logits.log_softmax(-1)[0]
            logprobs.append(lp[tok].item())
            misses.append(lp.argmax().item() != tok)
            logits = session.step(torch.tensor([tok]))
        return logprobs, misses, session.computation_cost()[0]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["niah_single_2", "niah_single_3", "niah_multiquery"])
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--answer-tokens", type=int, default=10, help="dense answer tokens forced")
    parser.add_argument("--methods", nargs="+", default=["topk:0.035", "quest:0.035", "magicpig"])
    parser.add_argument("--threads", type=int, default=None)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, list[float]]:
    """The study of :func:`parse_args`' ``args``: prints a Markdown table; returns per method
    label [NLL increase summed, argmax misses, tokens, cost summed, samples]."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LongContextModel.from_pretrained()
    methods = [parse_method(m) for m in args.methods]
    dense = MagicPIGConfig(method="dense")
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0, 0, 0.0, 0])  # nll+, miss, tokens, cost, n
    for task in args.tasks:
        for index in range(args.samples):
            sample = ruler.generate_sample(task, args.length, index, model.tokenizer, max_total=model.args.max_context)
            ids = model.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
            state = model.prefill([ids], chat=False, progress=False)
            answer = model.generate_from(state, dense, max_new_tokens=args.answer_tokens)[0].token_ids
            ref, _, _ = answer_logprobs(model, state, dense, answer)
            for m in methods:
                lps, misses, cost = answer_logprobs(model, state, m.config, answer)
                t = totals[m.label]
                t[0] += sum(r - x for r, x in zip(ref, lps))
                t[1] += sum(misses)
                t[2] += len(answer)
                t[3] += cost
                t[4] += 1
        print(f"{task}: done", flush=True)
    print(f"\n{len(args.tasks)} tasks x {args.samples} samples at {args.length} tokens, dense's first "
          f"{args.answer_tokens} answer tokens forced\n")
    print("| method | NLL increase (nats/token) | argmax differs | cost (% keys read) |\n|---|---:|---:|---:|")
    for label, (nll, miss, n, cost, k) in totals.items():
        print(f"| {label} | {nll / n:.4f} | {miss}/{n} | {100 * cost / k:.2f} |")
    return dict(totals)


def main(argv: Optional[Sequence[str]] = None) -> dict[str, list[float]]:
    return run(parse_args(argv))
