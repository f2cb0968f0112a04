"""Issue 13 point 7: MagicPIG's CPU-resident middle K/V against all K/V on the GPU, simulated.

What is measured and how: magicpig/perf/crossover.py (the library this script calls).

    python scripts/study_crossover.py --json study.json --plot docs/study_crossover.png
    python scripts/study_crossover.py --quick
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from magicpig.perf.crossover import run


def main(argv: Optional[Sequence[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--json", metavar="PATH", help="write the study's results here")
    ap.add_argument("--plot", metavar="PATH.png", help="bar charts of (a) and heat maps of (b) here")
    ap.add_argument("--quick", action="store_true", help="a smaller grid and fewer requests (~2 min)")
    ap.add_argument("--num-requests", type=int, help="requests per run (default 48; --quick 24)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--from-json", metavar="PATH", help="print and plot a saved --json result instead of running")
    return run(ap.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
