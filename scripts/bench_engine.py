"""Continuous batching (the Engine) against static batches on a mixed offline workload.

One run, the embedded model (or --model), for each method (dense, and magicpig K=10, L=400,
min_collisions=4: the accurate setting for SmolLM2, docs/RESULTS.md), side by side:
  * workload: --requests prompts of --min-prompt..--max-prompt tokens and output caps of
    --min-output..--max-output tokens, both drawn uniformly with --seed; greedy decoding, so a
    request may stop early at EOS (actual tokens are counted). Two arrival patterns: all at
    once (t = 0), and Poisson arrivals at --rate requests/s (first at t = 0).
  * engine: one Engine(model, config, max_num_seqs=M) per pattern; each request is added at
    its arrival time (the clock is checked between steps; an idle engine sleeps until the next
    arrival). TTFT = first RequestOutput - arrival; TPOT = (E2E - TTFT) / (tokens - 1).
  * static (what a user without the engine does, the baseline): fixed batches of M in arrival
    order, each decoded until its longest row is done (magicpig/bench/engine.py).
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

from magicpig.bench.engine import QUICK, bench  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
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
    return parser


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    if args.quick:
        parser.set_defaults(**QUICK)
        args = parser.parse_args()
    if not 1 <= args.min_prompt <= args.max_prompt or not 1 <= args.min_output <= args.max_output:
        parser.error("need 1 <= --min-prompt <= --max-prompt and 1 <= --min-output <= --max-output")
    if args.requests < 1 or args.max_num_seqs < 1 or args.rate < 0:
        parser.error("need --requests >= 1, --max-num-seqs >= 1, --rate >= 0")
    bench(args)


if __name__ == "__main__":
    main()
