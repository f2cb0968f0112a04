"""What the exact head (MagicPIGConfig.exact_keys) costs the CPU store's attend.

Llama-3.1-8B shapes (32 query / 8 KV heads, d=128, K=10, L=150, m=2, bf16 K/V), one store per
setting holding the same sequences; the settings' attends are interleaved round by round on the
same queries, so machine drift hits them alike. Prints the median seconds per attend and the
ratio to plain sampling (exact_keys=0), and the keys read, which the head does not change.

    magicpig bench exact-keys --lengths 32768 --batches 1 4 --exact 0 16 64 --json out.json
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `magicpig bench` runs this file by path
from bench_cpu_attention import HKV, HQ, K, L, M, D, make_queries, make_sequence  # noqa: E402

from magicpig.config import NONNEGATIVE_INT, POSITIVE_INT, OneLineParser  # noqa: E402
from magicpig.lsh import hash_codes, layer_projection  # noqa: E402
from magicpig.store import CPUStore  # noqa: E402


def build_stores(exact: list[int], n: int, batch: int, threads: int | None, gen: torch.Generator):
    """One store per exact_keys value, each holding the same `batch` sequences of n tokens;
    queries [batch, HQ, D] and their codes."""
    projection = layer_projection(0, 1, HKV, D, K, L)
    stores = {e: CPUStore(HKV, D, K, L, M, kv_dtype="bf16", num_threads=threads, exact_keys=e) for e in exact}
    ids = {e: [] for e in exact}
    queries = []
    for _ in range(batch):
        k, v, codes = make_sequence(gen, n, projection)
        for e, store in stores.items():
            sid = store.add_sequence()
            store.append(sid, k, v, codes)
            ids[e].append(sid)
        queries.append(make_queries(gen, k))
    q = torch.stack(queries)
    grouped = q.view(batch, HKV, HQ // HKV, D)
    qc = hash_codes(grouped, projection, K).reshape(batch, HQ, L)
    return stores, ids, q, qc


def run_case(exact: list[int], n: int, batch: int, threads: int | None, repeats: int, gen: torch.Generator) -> dict:
    stores, ids, q, qc = build_stores(exact, n, batch, threads, gen)
    seconds = {e: [] for e in exact}
    read = {}
    for _ in range(repeats):
        for e, store in stores.items():
            t0 = time.perf_counter()
            _, _, ncand = store.attend(ids[e], q, qc)
            seconds[e].append(time.perf_counter() - t0)
            read[e] = float(ncand.float().mean()) / n
    base = statistics.median(seconds[exact[0]])
    return {
        "context": n, "batch": batch,
        "settings": [{"exact_keys": e, "median_s": statistics.median(seconds[e]),
                      "ratio_to_first": statistics.median(seconds[e]) / base, "keys_read": read[e]} for e in exact],
    }


def main(argv: list[str] | None = None) -> None:
    parser = OneLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=POSITIVE_INT, nargs="+", default=[32768])
    parser.add_argument("--batches", type=POSITIVE_INT, nargs="+", default=[1, 4])
    parser.add_argument("--exact", type=NONNEGATIVE_INT, nargs="+", default=[0, 16, 64],
                        help="exact_keys values; ratios are to the first")
    parser.add_argument("--threads", type=POSITIVE_INT, default=None, help="store threads (default: all cores)")
    parser.add_argument("--repeats", type=POSITIVE_INT, default=9)
    parser.add_argument("--json", metavar="PATH", help="write the figures here")
    args = parser.parse_args(argv)
    gen = torch.Generator().manual_seed(0)
    cases = [run_case(args.exact, n, b, args.threads, args.repeats, gen) for n in args.lengths for b in args.batches]
    print(f"{'context':>8} {'batch':>5} {'exact_keys':>10} {'ms/attend':>10} {'ratio':>6} {'keys read':>9}")
    for case in cases:
        for s in case["settings"]:
            print(f"{case['context']:>8} {case['batch']:>5} {s['exact_keys']:>10} {1e3 * s['median_s']:>10.2f} "
                  f"{s['ratio_to_first']:>6.3f} {100 * s['keys_read']:>8.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"cases": cases, "repeats": args.repeats, "threads": args.threads}, f, indent=1)


if __name__ == "__main__":
    main()
