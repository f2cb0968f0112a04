"""Per-layer error of the middle-attention estimates on real decode queries of the embedded model.

What is measured and how: magicpig/eval/attention_error.py (the library this script calls).
Usage: python scripts/attention_error.py [--tokens 4000] [--kl 10,150 8,75 6,40]
"""

from __future__ import annotations

from magicpig.eval.attention_error import parse_args, run

if __name__ == "__main__":
    run(parse_args())
