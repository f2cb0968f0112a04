"""Decode step at Llama-3.1-8B layer shapes: dense, magicpig with the CPU store called serially,
and magicpig with the ping-pong overlap, measured side by side in one run (issue 14 point 1).

What is measured and how: magicpig/perf/bench_decode.py (the library this script calls).

    python scripts/bench_decode.py [--contexts 16384 32768 98304] [--batches 1 4 8] [--repeats 5]
        [--warmup 2] [--layers 4] [--device-threads N] [--store-threads N] [--json PATH]
    magicpig bench decode ...  (the same)
"""

from __future__ import annotations

import os

# Same reason as bench_cpu_attention.py: spinning OpenMP threads steal cores from the other lane.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from magicpig.perf.bench_decode import parse_args, run  # noqa: E402

if __name__ == "__main__":
    run(parse_args())
