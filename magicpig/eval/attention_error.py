"""Per-layer error of the middle-attention estimates on real decode queries of the embedded model.

Prefills a needle prompt, takes the queries of the first decode step, and for each sparse layer
compares sinks + window merged with (a) the magicpig estimator and (b) exact top-k at the same
number of keys against exact attention: mean over heads of |o - o_exact| / |o_exact|. All on
the torch reference path (magicpig.attention.reference), so it isolates the estimator from the
runtime. Usage: python scripts/attention_error.py [--tokens 4000] [--kl 10,150 8,75 6,40]

The library side of ``scripts/attention_error.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
"""

from __future__ import annotations

import argparse
from typing import Optional, Sequence

import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.config import PAPER_LSH
from magicpig.attention.reference import candidate_mask, dense_attention, merge_by_lse, sampled_attention
from magicpig.demo import needle_prompt
from magicpig.lsh import hash_codes, layer_projection


def first_step_qkv(model: LongContextModel, text: str):
    """The prefill state and {layer: (q, k_new, v_new)} of the first decode step."""
    state = model.prefill([text], progress=False)
    captured = {}
    forward = model.model.attention_input

    def capture(layer, x, cos, sin):
        q, k, v = forward(layer, x, cos, sin)
        captured[layer] = (q.clone(), k.clone(), v.clone())
        return q, k, v

    model.model.attention_input = capture
    try:
        with model.decode_session(state, MagicPIGConfig(method="dense"), max_new_tokens=2) as session:
            session.step(state.last_logits.argmax(-1))
    finally:
        model.model.attention_input = forward
    return state, captured


def layer_errors(q, k, v, layer: int, cfg: MagicPIGConfig, K: int, L: int) -> tuple[float, float, float]:
    """(magicpig error, top-k error, sampled fraction) of one layer; q [1, Hq, d], k/v [1, Hkv, n, d]."""
    S, W = cfg.sink_tokens, cfg.window_tokens
    hkv, n, d = k.shape[1], k.shape[2], k.shape[3]
    exact, _ = dense_attention(q, k, v)
    kc = k - k[:, :, S : n - W].mean(2, keepdim=True)
    dev = torch.cat([torch.arange(S), torch.arange(n - W, n)])
    o_dev, l_dev = dense_attention(q, kc[:, :, dev], v[:, :, dev])
    km, vm = kc[:, :, S : n - W], v[:, :, S : n - W]
    proj = layer_projection(cfg.seed, layer, hkv, d, K, L)
    q_codes = hash_codes(q.view(1, hkv, -1, d), proj, K).view(1, q.shape[1], L)
    mask = candidate_mask(q_codes, hash_codes(km, proj, K), cfg.min_collisions)
    o_m, l_m = sampled_attention(q, km, vm, mask, K, L, cfg.min_collisions)
    frac = mask.float().mean().item()
    scores = torch.einsum("bhgd,bhnd->bhgn", q.view(1, hkv, -1, d), km).reshape(1, q.shape[1], -1)
    top = torch.zeros_like(mask).scatter_(-1, scores.topk(max(1, round(frac * km.shape[2])), -1).indices, True)
    o_t, l_t = dense_attention(q, km, vm, mask=top)

    def rel(o: torch.Tensor) -> float:
        return ((o - exact).norm(dim=-1) / exact.norm(dim=-1)).mean().item()

    return rel(merge_by_lse(o_dev, l_dev, o_m, l_m)[0]), rel(merge_by_lse(o_dev, l_dev, o_t, l_t)[0]), frac


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4000)
    parser.add_argument("--kl", nargs="+", default=["10,150", "8,75", "6,40"])
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """The study of :func:`parse_args`' ``args`` on the embedded model; prints a Markdown table."""
    model = LongContextModel.from_pretrained()
    text, _ = needle_prompt(model.tokenizer, args.tokens, 0.5, 1)
    state, qkv = first_step_qkv(model, text)
    # sinks, window, seed, min_collisions (the paper's 2) of the default config; K, L per --kl
    cfg = MagicPIGConfig(K=PAPER_LSH[0], L=PAPER_LSH[1], min_collisions=PAPER_LSH[2])
    sparse = [i for i in range(model.model.args.num_layers) if i not in cfg.resolve_dense_layers(model.model.args.num_layers)]
    print(f"prompt {state.lengths[0]} tokens; sparse layers {len(sparse)}; mean relative error of the attention output")
    print("| K, L | sampled | magicpig error | top-k error (same keys read) |\n|---|---:|---:|---:|")
    for kl in args.kl:
        K, L = (int(x) for x in kl.split(","))
        rows = []
        for layer in sparse:
            q, k_new, v_new = qkv[layer]
            k = torch.cat([state.keys[0][layer], k_new[0].reshape(k_new.shape[1], 1, -1)], 1)[None].float()
            v = torch.cat([state.values[0][layer], v_new[0].reshape(v_new.shape[1], 1, -1)], 1)[None].float()
            rows.append(layer_errors(q.float(), k, v, layer, cfg, K, L))
        mean = [sum(r[i] for r in rows) / len(rows) for i in range(3)]
        print(f"| {K}, {L} | {mean[2]:.2%} | {mean[0]:.4f} | {mean[1]:.4f} |")


def main(argv: Optional[Sequence[str]] = None) -> None:
    run(parse_args(argv))
