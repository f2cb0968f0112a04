"""How many of a step's top keys the LSH candidates miss, and how many a head carried over from
the previous step would bring back (issue 15: where a better estimator than top-k could come from).

Decodes RULER prompts with exact attention on the embedded model while recording, in every
sparse layer, each query head's query and the centred middle keys. Per (layer, query head,
decode step t >= 1) it takes T_t, the ``--top`` keys of highest q.k, and reports the share of
T_t (and of T_t's softmax mass within the middle) that is found by:

- ``candidates``: the LSH candidates of the default setting (K, L, m of ``LongContextModel.config``);
- ``+ carried head``: the candidates plus the last step's head (its best-scoring keys among those it read);
- ``+ head and next``: plus the keys right after that head's keys (where a copying head looks next);

and the keys each variant reads, as a share of the middle.
All on the torch reference path. Usage:
python scripts/head_recall.py [--tasks niah_multiquery ...] [--length 4096] [--samples 2] [--steps 12] [--top 16]

The library side of ``scripts/head_recall.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
"""

from __future__ import annotations

import argparse
import json
from typing import Optional, Sequence

import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.attention import baselines
from magicpig.attention.reference import candidate_mask
from magicpig.eval import ruler
from magicpig.lsh import hash_codes, layer_projection


def record_steps(model: LongContextModel, prompt: str, steps: int) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
    """{layer: [(q [Hq, d], centred middle keys [Hkv, n, d]) per decode step]} of a greedy, exact decode."""
    records: dict[int, list] = {}

    class _Recorder(baselines.DenseMiddle):
        def _attend_one(self, seq_id, q, kv_of):
            records.setdefault(self.layer, []).append((q.detach().clone(), self._keys[seq_id].clone()))
            return super()._attend_one(seq_id, q, kv_of)

    cfg = model.config.replace(method="topk", budget=1.0)
    state = model.prefill([prompt], progress=False)
    with model.decode_session(state, cfg, max_new_tokens=steps, method_factory=_Recorder) as session:
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            tokens = session.step(tokens).argmax(-1)
    return records


def layer_counts(layer: int, steps: list, cfg: MagicPIGConfig, top: int) -> dict[str, float]:
    """Summed counts over the steps t >= 1 and query heads of one layer (see the module doc).

    The carried heads are the practical ones: the ``top`` best-scoring keys among those read
    on the last step (candidates and carried keys), not the exact top of all keys."""
    hq, d = steps[0][0].shape
    hkv = steps[0][1].shape[0]
    proj = layer_projection(cfg.seed, layer, hkv, d, cfg.K, cfg.L)
    sums: dict[str, float] = {}
    carried: dict[str, tuple[torch.Tensor, torch.Tensor] | None] = {"prev": None, "next": None}  # (ids, read)
    for t, (q, keys) in enumerate(steps):
        n = keys.shape[1]
        scores = torch.einsum("hd,hnd->hn", q, keys[torch.arange(hq) // (hq // hkv)]) / d ** 0.5  # [Hq, n]
        cand = candidate_mask(hash_codes(q.view(1, hkv, -1, d), proj, cfg.K).view(1, hq, cfg.L),
                              hash_codes(keys[None], proj, cfg.K), cfg.min_collisions)[0]  # [Hq, n]
        read = {"lsh": cand}
        for name, head in carried.items():
            extra = torch.zeros_like(cand)
            if head is not None:  # only keys that were read (a row may have read fewer than `top`)
                ids, valid = head
                extra |= torch.zeros_like(cand).scatter_(-1, ids, valid)
                if name == "next":
                    extra |= torch.zeros_like(cand).scatter_(-1, (ids + 1).clamp(max=n - 1), valid)
            read[name] = cand | extra
            best = scores.masked_fill(~read[name], float("-inf")).topk(min(top, n), -1)
            carried[name] = (best.indices, torch.isfinite(best.values))
        if t > 0:
            _add_step(sums, scores, read, min(top, n))
    return sums


def _add_step(sums: dict, scores: torch.Tensor, read: dict[str, torch.Tensor], top: int) -> None:
    """Counts of one step: scores [Hq, n]; read[name] [Hq, n] the keys each variant reads."""
    weights = torch.softmax(scores, -1)
    in_top = torch.zeros_like(read["lsh"]).scatter_(-1, scores.topk(top, -1).indices, True)
    add = {"pairs": in_top.sum(), "middle": torch.tensor(float(scores.numel())),
           "mass": (weights * in_top).sum()}
    for name, found in read.items():
        add[name] = (in_top & found).sum()
        add["mass_" + name] = (weights * (in_top & found)).sum()
        add["read_" + name] = found.sum()
    for key, value in add.items():
        sums[key] = sums.get(key, 0.0) + float(value)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tasks", nargs="+", default=["niah_multiquery", "niah_multivalue", "niah_single_3", "fwe"])
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--samples", type=int, default=2)
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--top", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the figures here")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> dict:
    """The study of :func:`parse_args`' ``args``: prints the figures (and writes --json); returns them."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = LongContextModel.from_pretrained(config=MagicPIGConfig())
    cfg = model.config
    totals: dict[str, float] = {}
    for task in args.tasks:
        for i in range(args.samples):
            s = ruler.generate_sample(task, args.length, i, model.tokenizer, max_total=int(model.model.args.max_context))
            for layer, steps in record_steps(model, s.prompt, args.steps).items():
                for key, value in layer_counts(layer, steps, cfg, args.top).items():
                    totals[key] = totals.get(key, 0.0) + value
    return report(totals, cfg, args)


def report(t: dict[str, float], cfg: MagicPIGConfig, args: argparse.Namespace) -> dict:
    figures = {
        "setting": f"K={cfg.K} L={cfg.L} m={cfg.min_collisions}", "top": args.top,
        "top_mass_share": t["mass"] * args.top / t["pairs"],
        "top_found": {k: t[k] / t["pairs"] for k in ("lsh", "prev", "next")},
        "top_mass_found": {k: t["mass_" + k] / t["mass"] for k in ("lsh", "prev", "next")},
        "read_share": {k: t["read_" + k] / t["middle"] for k in ("lsh", "prev", "next")},
    }
    print(f"{figures['setting']}, top {args.top} keys per query head, {args.length} tokens: they hold "
          f"{100 * figures['top_mass_share']:.1f}% of the middle's attention")
    print(f"{'keys read':16s} {'top keys found':>15s} {'their mass':>11s} {'share of the middle':>20s}")
    for k, name in (("lsh", "candidates"), ("prev", "+ carried head"), ("next", "+ head and next")):
        print(f"{name:16s} {100 * figures['top_found'][k]:14.1f}% {100 * figures['top_mass_found'][k]:10.1f}% "
              f"{100 * figures['read_share'][k]:19.2f}%")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=2)
    return figures


def main(argv: Optional[Sequence[str]] = None) -> dict:
    return run(parse_args(argv))
