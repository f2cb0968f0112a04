"""The simulator against the real engine, step by step (issue 13 point 6; docs/SCHEDULING.md).

What is measured and how: magicpig/perf/sim_check.py (the library this script calls).

    python scripts/check_simulator.py --rates 0.1 0.2 0.4 --policy chunked --json check.json
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from magicpig.core.argtypes import POSITIVE_FLOAT, POSITIVE_INT, OneLineParser
from magicpig.perf.sim_check import run


def build_parser() -> OneLineParser:
    p = OneLineParser(prog="check_simulator.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--rates", type=POSITIVE_FLOAT, nargs="+", default=[0.1, 0.2, 0.4], help="requests/s")
    p.add_argument("--num-requests", type=POSITIVE_INT, default=10)
    p.add_argument("--prompt-tokens", type=POSITIVE_INT, nargs=2, default=[600, 1600], metavar=("MIN", "MAX"))
    p.add_argument("--output-tokens", type=POSITIVE_INT, nargs=2, default=[16, 48], metavar=("MIN", "MAX"))
    p.add_argument("--policy", default="chunked", choices=["fcfs", "chunked", "prefill_first"],
                   help="a one-batch policy (the split policies need lanes the profile prices per share)")
    p.add_argument("--token-budget", type=POSITIVE_INT, default=512, help="chunked / prefill_first budget")
    p.add_argument("--method", default="dense", choices=["dense", "magicpig"])
    p.add_argument("--whole-prompts", action="store_true", help="no chunked prefill, in both")
    p.add_argument("--max-num-seqs", type=POSITIVE_INT, default=8)
    p.add_argument("--max-prefill-tokens", type=POSITIVE_INT, default=8192)
    p.add_argument("--profile", default="cpu_2core_smollm2", help="cost-model profile of this machine")
    p.add_argument("--device-memory-gb", type=POSITIVE_FLOAT, default=6.0)
    p.add_argument("--host-memory-gb", type=POSITIVE_FLOAT, default=12.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="write every figure here")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    return run(build_parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
