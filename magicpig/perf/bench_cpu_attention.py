"""Benchmark of the CPU store against dense torch attention at Llama-3.1-8B decode shapes.

One run measures, side by side: the store's attend time per layer-step (all 32 query heads of
one layer for the whole batch), the fastest dense torch attention over the same full KV in bf16
and fp32 (grouped matmul per KV head), their ratios, the mean sampled fraction, the bytes the
store touched and its effective bandwidth against this machine's copy bandwidth (measured in
the same run), the append throughput (token-heads/s from unsorted hash codes; also the
bucket-list build alone), and the bytes held per token per KV head against the bf16 KV alone.

Usage: python scripts/bench_cpu_attention.py [--quick] [--lengths 16384 32768 98304]
       [--batches 1 8] [--threads N] [--repeats R] [--shared-group-queries]

The library side of ``scripts/bench_cpu_attention.py`` (:func:`parse_args`, :func:`run`,
:func:`main`), and the shapes, data and timing helpers the other store benchmarks share
(``bench_exact_keys``, ``bench_hashing``). OMP_WAIT_POLICY=PASSIVE is set by the script before
torch loads (spinning OpenMP threads steal the cores from the threads still working).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from magicpig.lsh import hash_codes, layer_projection
from magicpig.store import CPUStore

HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B
K, L, M = 10, 150, 2


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up (first-touch, thread pools)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(mbytes: int, repeats: int) -> float:
    """Bytes read + written per second by a large torch copy (both threads)."""
    src = torch.ones(mbytes * 2**20 // 4)
    dst = torch.empty_like(src)
    sec = median_seconds(lambda: dst.copy_(src), repeats)
    return 2 * src.numel() * 4 / sec


def make_sequence(gen: torch.Generator, n: int, projection: torch.Tensor):
    """Keys with per-channel scales and a shared offset, centred as the runtime does; values;
    codes (unsorted, straight from hashing)."""
    scales = torch.exp(0.5 * torch.randn(HKV, 1, D, generator=gen))
    offset = 2.0 * torch.randn(HKV, 1, D, generator=gen)
    k = torch.randn(HKV, n, D, generator=gen) * scales + offset
    k = k - k.mean(dim=1, keepdim=True)
    v = torch.randn(HKV, n, D, generator=gen)
    # [HKV, n, L], in chunks: hashing materialises [HKV, chunk, K*L] floats
    codes = torch.cat([hash_codes(k[:, i : i + 8192], projection, K) for i in range(0, n, 8192)], dim=1)
    return k.bfloat16(), v.bfloat16(), codes


def make_queries(gen: torch.Generator, k: torch.Tensor, near: int = 4, shared: bool = False) -> torch.Tensor:
    """[HQ, D]: each query head near `near` random keys of its KV head (a peaked attention);
    with `shared`, the query heads of a GQA group are near the same keys (different noise)."""
    n = k.shape[1]
    G = HQ // HKV
    idx = torch.randint(0, n, (HQ, near), generator=gen)
    if shared:
        idx = idx[::G].repeat_interleave(G, 0)
    heads = torch.arange(HQ) // G
    q = k[heads[:, None], idx].float().mean(1) * 2.0
    return q + 0.3 * torch.randn(HQ, D, generator=gen) * q.std()


def dense_variants(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> list[Callable[[], torch.Tensor]]:
    """Dense attention of q [B, HQ, D] over k, v [B, HKV, n, D] (their dtype), GQA as grouped
    matmuls per KV head: two ways of writing it; the benchmark keeps the fastest."""
    B, n = k.shape[0], k.shape[2]
    G = HQ // HKV
    scale = 1.0 / math.sqrt(D)
    qg = (q.view(B, HKV, G, D) * scale).to(k.dtype)

    def matmul_kq() -> torch.Tensor:
        s = torch.matmul(k, qg.transpose(-1, -2))  # [B, HKV, n, G]
        p = torch.softmax(s.float(), dim=2).to(v.dtype)
        return torch.matmul(p.transpose(-1, -2), v)  # [B, HKV, G, D]

    def matmul_qk() -> torch.Tensor:
        s = torch.matmul(qg, k.transpose(-1, -2))  # [B, HKV, G, n]
        p = torch.softmax(s.float(), dim=-1).to(v.dtype)
        return torch.matmul(p, v)

    return [matmul_kq, matmul_qk]


def best_dense_seconds(q, k, v, repeats) -> float:
    return min(median_seconds(fn, repeats) for fn in dense_variants(q, k, v))


@dataclass
class Row:
    n: int
    batch: int
    store_ms: float
    dense_bf16_ms: float
    dense_fp32_ms: float
    sampled: float
    union: float
    touched_mb: float
    bandwidth: float
    append_rate: float
    index_rate: float
    bytes_per_token_head: float


def run_case(n: int, batch: int, threads: int | None, repeats: int, gen: torch.Generator, shared: bool) -> Row:
    projection = layer_projection(0, 1, HKV, D, K, L)  # [HKV, D, K*L]
    store = CPUStore(HKV, D, K, L, M, kv_dtype="bf16", num_threads=threads, backend="cpp")
    ids, queries = [], []
    dense_bf16 = dense_fp32 = 0.0
    append_s = index_s = 0.0
    for _ in range(batch):
        k, v, codes = make_sequence(gen, n, projection)
        sid = store.add_sequence()
        t0 = time.perf_counter()
        store.append(sid, k, v, codes)
        append_s += time.perf_counter() - t0
        index_s += store._impl.last_append_seconds()[1]
        q = make_queries(gen, k, shared=shared)
        ids.append(sid)
        queries.append(q)
        # Dense over this row's own KV: a batch of distinct sequences costs the sum of its rows
        # (each reads its own KV once); keeping one row's fp32 copy at a time bounds memory.
        dense_bf16 += best_dense_seconds(q[None], k[None], v[None], repeats)
        dense_fp32 += best_dense_seconds(q[None], k[None].float(), v[None].float(), repeats)
        del k, v, codes
    q = torch.stack(queries)
    # query head h hashes with the projection of KV head h // G
    qc = hash_codes(q[:, :, None], projection.repeat_interleave(HQ // HKV, 0), K)[:, :, 0]
    store_s = median_seconds(lambda: store.attend(ids, q, qc), repeats)
    _, _, ncand = store.attend(ids, q, qc)
    entries, rows, tail, tasks = store._impl.last_attend_stats()
    row_bytes = D * 2
    touched = entries * 2 + tasks * (HQ // HKV) * L * 8 + rows * (2 * row_bytes + 4) + tail * L * 4
    held = store.nbytes() / (batch * n * HKV)
    return Row(
        n=n,
        batch=batch,
        store_ms=store_s * 1e3,
        dense_bf16_ms=dense_bf16 * 1e3,
        dense_fp32_ms=dense_fp32 * 1e3,
        sampled=float(ncand.float().mean()) / n,
        union=rows / (batch * HKV * n),
        touched_mb=touched / 1e6,
        bandwidth=touched / store_s,
        append_rate=batch * n * HKV / append_s,
        index_rate=batch * n * HKV / index_s if index_s > 0 else float("nan"),
        bytes_per_token_head=held,
    )


def print_table(rows: list[Row], copy_bw: float) -> None:
    kv = 2 * D * 2  # bf16 K + V bytes per token per KV head
    print(f"\ncopy bandwidth (read + write, torch copy): {copy_bw / 1e9:.1f} GB/s")
    header = (
        f"{'n':>6} {'B':>2} | {'store ms':>8} {'dense bf16':>10} {'dense fp32':>10} | {'x bf16':>6} {'x fp32':>6} | "
        f"{'sampled':>7} {'union':>6} | {'touched':>8} {'GB/s':>5} {'% copy':>6} | {'append':>6} {'index':>6} | "
        f"{'B/tok/head':>10} {'idx/KV':>6}"
    )
    print(header)
    print("-" * len(header))
    for r in rows:
        print(
            f"{r.n:>6} {r.batch:>2} | {r.store_ms:>8.2f} {r.dense_bf16_ms:>10.2f} {r.dense_fp32_ms:>10.2f} | "
            f"{r.dense_bf16_ms / r.store_ms:>6.1f} {r.dense_fp32_ms / r.store_ms:>6.1f} | {100 * r.sampled:>6.2f}% "
            f"{100 * r.union:>5.1f}% | {r.touched_mb:>6.1f}MB {r.bandwidth / 1e9:>5.1f} {100 * r.bandwidth / copy_bw:>5.1f}% | "
            f"{r.append_rate / 1e6:>5.2f}M {r.index_rate / 1e6:>5.2f}M | "
            f"{r.bytes_per_token_head:>10.1f} {(r.bytes_per_token_head - kv) / kv:>6.3f}"
        )
    print(
        "\nstore ms: CPUStore.attend per layer-step (all 32 heads, whole batch). dense: fastest grouped-matmul torch "
        "attention over the full KV (for B > 1 the sum of per-row calls, each over its own KV). x: dense / store. "
        "sampled: mean candidates per query head / n. union: rows read per KV head / n (the union over its 4 query "
        "heads; each row is read once per group). touched: bucket entries + offsets + candidate K/V rows + norms; "
        "GB/s: touched / store time. append: token-heads/s of CPUStore.append (K/V copy + norms + bucket lists from "
        "unsorted codes); index: bucket-list build alone (wall). B/tok/head: bytes held per token per KV head; "
        f"idx/KV: (held - bf16 K/V) / bf16 K/V ({kv} B), i.e. ids + offsets + norms over the KV."
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run: n=16k, batch 1 and 2, 3 repeats")
    parser.add_argument("--lengths", type=int, nargs="+", default=[16384, 32768, 98304])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--threads", type=int, default=None, help="store and torch threads (default: all cores)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument(
        "--shared-group-queries",
        action="store_true",
        help="the 4 query heads of a KV group are near the same keys (default: each head near its own keys)",
    )
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.lengths, args.batches, args.repeats = [16384], [1, 2], 3
    return args


def run(args: argparse.Namespace) -> list[Row]:
    """The benchmark of :func:`parse_args`' ``args``: prints the table; returns its rows."""
    if args.threads:
        torch.set_num_threads(args.threads)
    from magicpig import _C

    print(
        f"cpu_info: {_C.cpu_info()}; torch threads: {torch.get_num_threads()}; "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}"
    )
    print(
        f"shapes: Hq={HQ}, Hkv={HKV}, d={D}, bf16 KV, K={K}, L={L}, m={M}; query heads of a group near "
        f"{'the same' if args.shared_group_queries else 'their own'} keys"
    )
    copy_bw = copy_bandwidth(64 if args.quick else 512, args.repeats)
    gen = torch.Generator().manual_seed(0)
    rows = []
    for n in args.lengths:
        for batch in args.batches:
            rows.append(run_case(n, batch, args.threads, args.repeats, gen, args.shared_group_queries))
            print(f"done n={n} batch={batch}", flush=True)
    print_table(rows, copy_bw)
    return rows


def main(argv: Optional[Sequence[str]] = None) -> list[Row]:
    return run(parse_args(argv))
