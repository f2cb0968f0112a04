"""The simulator against the real engine, step by step (issue 13 point 6; docs/SCHEDULING.md).

One trace (token-id prompts, gamma arrivals) is served by the real :class:`Engine` in this
process, in real time (a request joins the queue at the first step boundary after its arrival,
as in ``magicpig serve``, whose HTTP path adds nothing measurable: docs/SCHEDULING.md), and by
:func:`magicpig.perf.simulator.simulate` with the same scheduler, policy, budgets and arrivals
and with each request's output length set to what the engine generated (greedy decoding may stop
at an end-of-sequence token; the simulator cannot know that).

Two comparisons per request rate:

* **end to end**: mean TTFT (first token - arrival) and mean TBT (gaps between a request's
  tokens, pooled over requests: vLLM's ITL) of the engine against the simulator's;
* **step replay**: every step the engine ran, priced by the cost model exactly as the simulator
  prices a step of that composition (the sum of the chunks' ``prefill_time`` and the decode
  batch's ``decode_time``, whole device). Its error, by kind of step (decodes only, prefill
  only, both), is the cost model's own; what the end-to-end error has beyond it comes from the
  two timelines drifting apart (which prompt lands in which step).

    python scripts/check_simulator.py --rates 0.1 0.2 0.4 --policy chunked --json check.json

Times are wall-clock on this machine: run it on a quiet machine (nothing else on the cores).
"""

from __future__ import annotations

import sys
from typing import Optional, Sequence

from magicpig.config import POSITIVE_FLOAT, POSITIVE_INT, OneLineParser
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
