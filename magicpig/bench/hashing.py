"""Benchmark of SimHash codes on the CPU: the extension's fused kernel against the torch path.

Hashing the middle keys at prefill (every key x K*L hyperplanes, per layer and KV head) is
most of a magicpig session's setup on a CPU-only machine. One run measures, side by side on
the same inputs: the fused C++ kernel (``magicpig.lsh.hash_codes`` on the CPU), the torch
reference it replaced (``hash_codes_torch``: matmul, sign, pack), and the bare torch matmul
``x @ projection`` alone (what any unfused path pays before packing), with their ratios. The
codes of the two paths are compared too (bits that differ have a projection within rounding
of 0).

With ``--session-tokens N ...`` it also times a whole magicpig session setup on the embedded
model (hashing the middle keys of a needle prompt of N tokens plus building the CPU store's
tables: what opening ``decode_session`` costs after a prefill), with the fused kernel and with
the torch hashing, side by side.

Usage: python scripts/bench_hashing.py [--tokens 4096] [--threads N] [--repeats R]
       [--session-tokens 4000 8000]   (also ``magicpig bench hashing``)

The library side of ``scripts/bench_hashing.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
The session setup's prompt comes from the caller (``needle_prompt``: ``magicpig.demo``'s, which
sits above this layer).
"""

from __future__ import annotations

import argparse
from typing import Callable, Optional, Sequence

import torch

import magicpig.lsh as lsh
from magicpig.lsh import hash_codes, hash_codes_torch, layer_projection
from magicpig.perf.bench_cpu_attention import median_seconds

NeedlePrompt = Callable[..., tuple[str, str]]  # (tokenizer, num_tokens, ...) -> (prompt, answer)

# (model, KV heads, head dim, K, L)
CASES = [
    ("SmolLM2-135M", 3, 64, 10, 150),
    ("SmolLM2-135M", 3, 64, 10, 400),
    ("Llama-3.1-8B", 8, 128, 10, 150),
]


def run_case(name: str, heads: int, d: int, K: int, L: int, tokens: int, repeats: int) -> None:
    gen = torch.Generator().manual_seed(0)
    proj = layer_projection(0, 1, heads, d, K, L)
    for label, x in (("keys", torch.randn(heads, tokens, d, generator=gen)),
                     ("decode", torch.randn(1, heads, 4, d, generator=gen))):
        fused = median_seconds(lambda: hash_codes(x, proj, K), repeats)
        torch_path = median_seconds(lambda: hash_codes_torch(x, proj, K), repeats)
        matmul = median_seconds(lambda: torch.matmul(x, proj), repeats)
        a, b = hash_codes(x, proj, K), hash_codes_torch(x, proj, K)
        shifts = torch.arange(K)
        differ = (((a ^ b).unsqueeze(-1) >> shifts) & 1).sum().item()
        shape = f"{tokens} keys x {heads} heads" if label == "keys" else f"1 x {heads} x 4 queries"
        print(
            f"{name:<13} d={d:<3} K={K:<2} L={L:<4} {shape:<22} | fused {fused * 1e3:8.2f} ms | "
            f"torch {torch_path * 1e3:8.2f} ms ({torch_path / fused:5.1f}x) | "
            f"matmul only {matmul * 1e3:8.2f} ms ({matmul / fused:5.1f}x) | bits differ {differ}"
        )


def session_setup(tokens: int, repeats: int, needle_prompt: NeedlePrompt) -> None:
    """Seconds to open a magicpig decode session from one prefill, fused vs torch hashing;
    the prompt is ``needle_prompt(tokenizer, tokens)``'s."""
    from magicpig import LongContextModel, MagicPIGConfig

    model = LongContextModel.from_pretrained("smollm2-135m-instruct", device="cpu", dtype=torch.float32)
    prompt, _ = needle_prompt(model.tokenizer, tokens)
    ids = model.encode(prompt)[0][0]
    state = model.prefill([ids], progress=False)
    extension = lsh._C
    for K, L, m in ((10, 150, 2), (10, 400, 4)):
        config = MagicPIGConfig(K=K, L=L, min_collisions=m)
        seconds = {}
        for name, ext in (("fused", extension), ("torch", None)):
            lsh._C = ext  # hash_codes takes the torch path when the extension is absent
            try:
                seconds[name] = median_seconds(lambda: model.decode_session(state, config, 4).close(), repeats)
            finally:
                lsh._C = extension
        print(f"session setup, {len(ids)} tokens, K={K} L={L} m={m}: fused {seconds['fused']:.2f} s | "
              f"torch hashing {seconds['torch']:.2f} s ({seconds['torch'] / seconds['fused']:.1f}x)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=4096, help="keys hashed per KV head (a prefill chunk)")
    parser.add_argument("--threads", type=int, default=None, help="torch / kernel threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--session-tokens", type=int, nargs="*", default=[],
                        help="also time a magicpig session setup on the embedded model at these prompt lengths")
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace, needle_prompt: Optional[NeedlePrompt] = None) -> None:
    """The benchmark of :func:`parse_args`' ``args`` (prints its lines). ``needle_prompt``
    (``magicpig.demo.needle_prompt``) builds the prompts of --session-tokens."""
    if args.session_tokens and needle_prompt is None:
        raise ValueError("--session-tokens needs a needle_prompt (magicpig.demo.needle_prompt) to build its prompts")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    from magicpig import _C

    print(f"threads {torch.get_num_threads()}, SIMD {_C.cpu_info()['simd']}; ratios are torch time / fused time")
    for case in CASES:
        run_case(*case, tokens=args.tokens, repeats=args.repeats)
    for tokens in args.session_tokens:
        session_setup(tokens, max(1, min(args.repeats, 3)), needle_prompt)


def main(argv: Optional[Sequence[str]] = None, needle_prompt: Optional[NeedlePrompt] = None) -> None:
    run(parse_args(argv), needle_prompt)
