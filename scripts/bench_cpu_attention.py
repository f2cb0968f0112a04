"""Benchmark of the CPU store against dense torch attention at Llama-3.1-8B decode shapes.

What is measured and how: magicpig/perf/bench_cpu_attention.py (the library this script calls).

Usage: python scripts/bench_cpu_attention.py [--quick] [--lengths 16384 32768 98304]
       [--batches 1 8] [--threads N] [--repeats R] [--shared-group-queries]
"""

from __future__ import annotations

import os

# OpenMP threads that spin after a parallel region steal the only two cores from the threads
# still working (torch and the store share one libgomp); measured here, passive waiting makes
# both the dense baseline and the store 3x faster on a busy machine. Must be set before torch
# loads libgomp; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from magicpig.perf.bench_cpu_attention import parse_args, run  # noqa: E402

if __name__ == "__main__":
    run(parse_args())
