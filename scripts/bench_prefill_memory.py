"""Peak memory of one prompt's prefill: the full prefill (every layer's K/V kept until decode
starts, today's evaluation path) against the engine's layer-by-layer prefill that hands each
layer to its cache as soon as the layer is done (dense layers' K/V + one layer's working set).

What is measured and how: magicpig/bench/prefill_memory.py (the library this script calls).

    python scripts/bench_prefill_memory.py [--tokens 7000] [--device cpu] [--json PATH]
"""

from __future__ import annotations

import sys

from magicpig.bench.prefill_memory import parse_args, run

if __name__ == "__main__":
    sys.exit(run(parse_args()))
