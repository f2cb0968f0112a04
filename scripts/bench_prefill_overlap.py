"""TTFT of the runner's prefill with the CPU tables built inline or on the stores' workers while
the next layer prefills (issue 14 point 2; ``ModelRunner(overlap_appends=...)``).

What is measured and how: magicpig/perf/bench_prefill_overlap.py (the library this script calls).

    python scripts/bench_prefill_overlap.py [--tokens 7000] [--repeats 3] [--json PATH]
    magicpig bench prefill-overlap ...
"""

from __future__ import annotations

import sys

from magicpig.perf.bench_prefill_overlap import parse_args, run

if __name__ == "__main__":
    sys.exit(run(parse_args()))
