"""`magicpig demo`: needle in a haystack on the embedded model, dense vs magicpig decode.

Builds a long prompt with one fact hidden in filler, prefills it once (exact), then decodes the
answer twice from that same state: with exact attention everywhere, and with MagicPIG (sinks +
window on the device, the centred middle in the CPU store, LSH-sampled attention).
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from typing import Any

FILLER = (
    "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
)
QUESTION = "What is the special magic number mentioned in the text above? Answer with the number only."


def needle_prompt(tokenizer: Any, num_tokens: int, depth: float = 0.5, seed: int = 0) -> tuple[str, str]:
    """(prompt, answer): about ``num_tokens`` chat-formatted tokens of filler with the sentence
    "The special magic number is N." at relative ``depth`` in [0, 1], then the question."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth!r}: expected a float in [0, 1]")
    rng = random.Random(seed)
    answer = str(rng.randint(100000, 999999))
    needle = f" The special magic number is {answer}. "
    per_filler = len(tokenizer(FILLER, add_special_tokens=False)["input_ids"])
    overhead = len(tokenizer(needle + QUESTION, add_special_tokens=False)["input_ids"]) + 40
    repeats = max(1, (num_tokens - overhead) // per_filler)

    def build(repeats: int) -> str:
        cut = int(round(depth * repeats))
        return f"{FILLER * cut}{needle}{FILLER * (repeats - cut)}\n\n{QUESTION}"

    # One correction for how filler tokenizes when repeated and for the chat template.
    got = _chat_length(tokenizer, build(repeats))
    repeats = max(1, repeats + (num_tokens - got) // per_filler)
    return build(repeats), answer


def _chat_length(tokenizer: Any, text: str) -> int:
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(tokenizer(text)["input_ids"])


def _fmt_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def load_model(args: argparse.Namespace) -> Any:
    """The model of ``args`` (after :func:`magicpig.cli.demo.check_args`), with timing on stdout."""
    from magicpig import LongContextModel

    t0 = time.perf_counter()
    print(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...", flush=True)
    model = LongContextModel.from_pretrained(args.model_dir, device=args.device)
    print(f"  loaded in {time.perf_counter() - t0:.1f} s on {model.device} ({model.model.dtype})", flush=True)
    return model


def run_demo(args: argparse.Namespace, model: Any, sparse: Any) -> int:
    """Prefill the needle prompt once, then decode it dense and with ``sparse`` (a MagicPIGConfig)."""
    from magicpig import MagicPIGConfig

    from magicpig.runtime.calibration import resolve_lsh

    # K, L chosen for the model (and this demo's sinks and window) unless given; None if given.
    sparse, choice = resolve_lsh(model.loaded, sparse)
    t0 = time.perf_counter()
    prompt, answer = needle_prompt(model.tokenizer, args.tokens, args.depth, args.seed)
    ids, _ = model.encode(prompt)
    n = len(ids[0])
    if n + args.max_new_tokens > model.args.max_context:
        print(f"magicpig demo: {n} tokens exceed the model's {model.args.max_context} positions", file=sys.stderr)
        return 2
    print(f"needle-in-a-haystack prompt: {n} tokens, needle at depth {args.depth:.2f} (answer {answer})", flush=True)
    t = time.perf_counter()
    state = model.prefill(ids, progress=True)
    prefill_s = time.perf_counter() - t
    print(f"prefill (exact, once): {prefill_s:.1f} s, {n / prefill_s:.0f} tok/s", flush=True)
    configs = [
        ("dense", MagicPIGConfig(method="dense")),
        ("magicpig", sparse),
    ]
    rows = []
    for name, cfg in configs:
        print(f"decoding with {name} ...", flush=True)
        result = model.generate_from(state, cfg, max_new_tokens=args.max_new_tokens)[0]
        rows.append((name, cfg, result))
    print()
    for name, _, r in rows:
        print(f"{name + ' answer:':<17} {r.text.strip()!r}")
    print()
    print(f"{'method':<9} {'correct':>8} {'cost':>7} {'decode tok/s':>13} {'device KV':>11} {'CPU store':>11}")
    for name, _, r in rows:
        print(f"{name:<9} {str(answer in r.text):>8} {r.stats.computation_cost:>7.3f} "
              f"{r.stats.decode_tokens_per_second:>13.1f} {_fmt_bytes(r.stats.device_bytes):>11} "
              f"{_fmt_bytes(r.stats.cpu_bytes):>11}")
    mp = rows[1][1]
    dense_layers = mp.resolve_dense_layers(model.args.num_layers)
    print()
    chosen = choice.describe() if choice is not None else f"K={mp.K}, L={mp.L}, min_collisions={mp.min_collisions} (given)"
    print(f"magicpig: {chosen}")
    print(f"layers {list(dense_layers)} dense, the other "
          f"{model.args.num_layers - len(dense_layers)} keep {mp.sink_tokens} sink + {mp.window_tokens}+ "
          f"window tokens on the device and the rest in the CPU store ({mp.kv_dtype} K/V + hash tables).")
    print("cost = mean fraction of the offloaded middle keys read per decode step "
          f"(dense reads all); device = {model.device}" + (" (here the same RAM as the CPU store)" if model.device.type == "cpu" else ""))
    print(f"total {time.perf_counter() - t0:.1f} s after loading")
    return 0


if __name__ == "__main__":
    sys.exit(main())
