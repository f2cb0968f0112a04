"""What the exact head (MagicPIGConfig.exact_keys) costs the CPU store's attend.

What is measured and how: magicpig/perf/bench_exact_keys.py (the library this script calls).

    magicpig bench exact-keys --lengths 32768 --batches 1 4 --exact 0 16 64 --carry --json out.json
"""

from __future__ import annotations

from magicpig.perf.bench_exact_keys import parse_args, run

if __name__ == "__main__":
    run(parse_args())
