"""How many of a step's top keys the LSH candidates miss, and how many a head carried over from
the previous step would bring back (issue 15: where a better estimator than top-k could come from).

What is measured and how: magicpig/eval/head_recall.py (the library this script calls).
Usage:
python scripts/head_recall.py [--tasks niah_multiquery ...] [--length 4096] [--samples 2] [--steps 12] [--top 16]
"""

from __future__ import annotations

from magicpig.eval.head_recall import parse_args, run

if __name__ == "__main__":
    run(parse_args())
