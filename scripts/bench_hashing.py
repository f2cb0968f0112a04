"""Benchmark of SimHash codes on the CPU: the extension's fused kernel against the torch path.

What is measured and how: magicpig/bench/hashing.py (the library this script calls).

Usage: python scripts/bench_hashing.py [--tokens 4096] [--threads N] [--repeats R]
       [--session-tokens 4000 8000]   (also ``magicpig bench hashing``)
"""

from __future__ import annotations

import os

# Spinning OpenMP threads steal the cores from the threads still working (see
# bench_cpu_attention.py); must be set before torch loads libgomp.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from magicpig.demo import needle_prompt  # noqa: E402
from magicpig.bench.hashing import parse_args, run  # noqa: E402

if __name__ == "__main__":
    run(parse_args(), needle_prompt=needle_prompt)
