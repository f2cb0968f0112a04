"""What the exact head (MagicPIGConfig.exact_keys) costs the CPU store's attend.

Llama-3.1-8B shapes (32 query / 8 KV heads, d=128, K=10, L=150, m=2, bf16 K/V), one store per
setting holding the same sequences; the settings' attends are interleaved round by round on the
same queries, so machine drift hits them alike. Prints the median seconds per attend and the
ratio to plain sampling (exact_keys=0), and the keys read, which the head does not change.
With --carry, each exact_keys > 0 runs a second time with carry_head (the last attend's head
read again); the rounds then alternate between two query sets, so the carried head is mostly
not among the candidates: its worst case, up to exact_keys more keys read per head.

    magicpig bench exact-keys --lengths 32768 --batches 1 4 --exact 0 16 64 --carry --json out.json

The library side of ``scripts/bench_exact_keys.py`` (:func:`parse_args`, :func:`run`, :func:`main`);
the shapes and data are ``bench_cpu_attention``'s.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Optional, Sequence

import torch

from magicpig.core.argtypes import NONNEGATIVE_INT, POSITIVE_INT, OneLineParser
from magicpig.lsh import hash_codes, layer_projection
from magicpig.perf.bench_cpu_attention import HKV, HQ, K, L, M, D, make_queries, make_sequence
from magicpig.store import CPUStore


Setting = tuple[int, bool]  # (exact_keys, carry_head)


def build_stores(settings: list[Setting], n: int, batch: int, threads: int | None, gen: torch.Generator):
    """One store per setting, each holding the same `batch` sequences of n tokens; two query
    sets [batch, HQ, D] and their codes."""
    projection = layer_projection(0, 1, HKV, D, K, L)
    stores = {s: CPUStore(HKV, D, K, L, M, kv_dtype="bf16", num_threads=threads, exact_keys=s[0], carry_head=s[1])
              for s in settings}
    ids = {s: [] for s in settings}
    keys = []
    for _ in range(batch):
        k, v, codes = make_sequence(gen, n, projection)
        for s, store in stores.items():
            sid = store.add_sequence()
            store.append(sid, k, v, codes)
            ids[s].append(sid)
        keys.append(k)
    query_sets = []
    for _ in range(2):
        q = torch.stack([make_queries(gen, k) for k in keys])
        qc = hash_codes(q.view(batch, HKV, HQ // HKV, D), projection, K).reshape(batch, HQ, L)
        query_sets.append((q, qc))
    return stores, ids, query_sets


def run_case(settings: list[Setting], n: int, batch: int, threads: int | None, repeats: int,
             alternate: bool, gen: torch.Generator) -> dict:
    stores, ids, query_sets = build_stores(settings, n, batch, threads, gen)
    seconds = {s: [] for s in settings}
    read = {s: [] for s in settings}
    for r in range(repeats):
        q, qc = query_sets[r % 2 if alternate else 0]
        for s, store in stores.items():
            t0 = time.perf_counter()
            _, _, ncand = store.attend(ids[s], q, qc)
            seconds[s].append(time.perf_counter() - t0)
            read[s].append(float(ncand.float().mean()) / n)
    base = statistics.median(seconds[settings[0]])
    return {
        "context": n, "batch": batch, "alternating_queries": alternate,
        "settings": [{"exact_keys": s[0], "carry_head": s[1], "median_s": statistics.median(seconds[s]),
                      "ratio_to_first": statistics.median(seconds[s]) / base,
                      "keys_read": statistics.mean(read[s][1:] or read[s])} for s in settings],
    }


def build_parser() -> OneLineParser:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=POSITIVE_INT, nargs="+", default=[32768])
    parser.add_argument("--batches", type=POSITIVE_INT, nargs="+", default=[1, 4])
    parser.add_argument("--exact", type=NONNEGATIVE_INT, nargs="+", default=[0, 16, 64],
                        help="exact_keys values; ratios are to the first")
    parser.add_argument("--carry", action="store_true",
                        help="also each exact_keys > 0 with carry_head, on alternating query sets")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="store threads (default: all cores)")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=9)
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> list[dict]:
    """The benchmark of :func:`parse_args`' ``args``: prints the table (and writes --json);
    returns the cases."""
    settings = [(e, False) for e in args.exact] + [(e, True) for e in args.exact if args.carry and e > 0]
    gen = torch.Generator().manual_seed(0)
    cases = [run_case(settings, n, b, args.threads, args.repeats, args.carry, gen)
             for n in args.lengths for b in args.batches]
    print(f"{'context':>8} {'batch':>5} {'exact_keys':>10} {'carry':>5} {'ms/attend':>10} {'ratio':>6} {'keys read':>9}")
    for case in cases:
        for s in case["settings"]:
            print(f"{case['context']:>8} {case['batch']:>5} {s['exact_keys']:>10} {'yes' if s['carry_head'] else 'no':>5} "
                  f"{1e3 * s['median_s']:>10.2f} {s['ratio_to_first']:>6.3f} {100 * s['keys_read']:>8.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases, "repeats": args.repeats, "threads": args.threads}, f, indent=1)
    return cases


def main(argv: Optional[Sequence[str]] = None) -> list[dict]:
    return run(parse_args(argv))
