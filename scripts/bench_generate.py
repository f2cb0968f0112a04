"""Prefill and decode speed of this runner (dense and magicpig) against transformers' generate.

What is measured and how: magicpig/bench/generate.py (the library this script calls).

    python scripts/bench_generate.py [--tokens 8000] [--new-tokens 32] [--batch 1] [--rounds 1]
        [--model PATH] [--json PATH] [--e2e-tokens 2500 --e2e-new-tokens 32 --repeats 3]
"""

from __future__ import annotations

from magicpig.demo import needle_prompt
from magicpig.bench.generate import parse_args, run

if __name__ == "__main__":
    run(parse_args(), needle_prompt=needle_prompt)
