"""TTFT of the runner's prefill with the CPU tables built inline or on the stores' workers while
the next layer prefills (issue 14 point 2; ``ModelRunner(overlap_appends=...)``).

One prompt of --tokens random token ids on the embedded model (magicpig, the default config),
prefilled by ``ModelRunner.prefill`` (the engine's path: each layer's K/V go to their caches as
soon as the layer is done; for a sparse layer: centre, hash, append to the CPU store and build
its bucket tables). Both variants alternate for --repeats rounds (the order swapped each round);
printed: median TTFT of each, the ratio, and the time the inline variant spends in the store
appends (the most the overlap can hide). On a CPU device the workers share the cores that
compute the next layer, so the overlap can only win where appends are a large part of a layer.

    python scripts/bench_prefill_overlap.py [--tokens 7000] [--repeats 3] [--json PATH]
    magicpig bench prefill-overlap ...

The library side of ``scripts/bench_prefill_overlap.py`` (:func:`parse_args`, :func:`run`, :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from magicpig.config import MagicPIGConfig
from magicpig.core.argtypes import POSITIVE_INT, OneLineParser
from magicpig.core.kv_budget import blocks_for
from magicpig.model.loaded import load_model
from magicpig.runtime.calibration import resolve_lsh
from magicpig.runtime.standalone import StandaloneRunner


def timed_prefill(runner: StandaloneRunner, ids: list[int]) -> tuple[float, float, torch.Tensor]:
    """(TTFT seconds, seconds inside the stores' append calls on this thread, logits [vocab])."""
    appends = [0.0]
    methods = [sp.method for sp in runner.runner.sparse.values()]
    originals = [m.append for m in methods]

    def timed(original):
        def append(*args, **kwargs):
            t0 = time.perf_counter()
            original(*args, **kwargs)
            appends[0] += time.perf_counter() - t0
        return append

    for m, original in zip(methods, originals):
        m.append = timed(original)  # the inline variant's appends (the overlapped one calls append_async)
    try:
        t0 = time.perf_counter()
        seq, logits = runner.prefill(ids)
        ttft = time.perf_counter() - t0
    finally:
        for m in methods:
            del m.append
    runner.release(seq)
    return ttft, appends[0], logits


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="bench_prefill_overlap.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=POSITIVE_INT, default=7000)
    p.add_argument("--repeats", type=POSITIVE_INT, default=3)
    p.add_argument("--json", metavar="PATH")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Both variants of :func:`parse_args`' ``args``, alternated; prints the medians (and
    writes --json). Returns the exit status."""
    loaded = load_model(None, device="cpu")
    ids = [random.Random(0).randrange(100, loaded.args.vocab_size) for _ in range(args.tokens)]
    config, _ = resolve_lsh(loaded, MagicPIGConfig())  # K, L as the runtime chooses them for the model
    blocks = blocks_for(args.tokens, 256)
    runners = {name: StandaloneRunner(loaded.model, config, 1, blocks, overlap_appends=flag)
               for name, flag in (("inline", False), ("overlap", True))}
    times: dict[str, list[float]] = {name: [] for name in runners}
    append_s: list[float] = []
    logits = {}
    for rnd in range(args.repeats + 1):  # round 0 warms up
        for name in (("inline", "overlap") if rnd % 2 == 0 else ("overlap", "inline")):
            ttft, appends, logits[name] = timed_prefill(runners[name], ids)
            if rnd:
                times[name].append(ttft)
                if name == "inline":
                    append_s.append(appends)
    same = torch.equal(logits["inline"], logits["overlap"])
    med = {name: statistics.median(t) for name, t in times.items()}
    print(f"{args.tokens} tokens, {Path(loaded.source).name}, {torch.get_num_threads()} torch threads, medians of {args.repeats}:")
    print(f"  TTFT inline {med['inline']:.2f} s (of which store appends {statistics.median(append_s):.2f} s), "
          f"overlapped {med['overlap']:.2f} s: overlapped / inline = {med['overlap'] / med['inline']:.3f}; "
          f"same logits: {same}")
    for r in runners.values():
        r.close()
    if args.json:
        Path(args.json).write_text(json.dumps({"tokens": args.tokens, "ttft_s": times, "append_s": append_s,
                                               "median_ttft_s": med, "same_logits": same}, indent=1) + "\n")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(parse_args(argv))
