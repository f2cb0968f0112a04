"""Teacher-forced agreement of sparse methods with dense attention on RULER answers.

What is measured and how: magicpig/eval/answer_nll.py (the library this script calls). Usage:

    python scripts/answer_nll.py --tasks niah_single_2 niah_single_3 --samples 3 \\
        --methods topk:0.035 magicpig:K=10,L=150 magicpig:K=10,L=400,min_collisions=4
"""

from __future__ import annotations

from magicpig.eval.answer_nll import parse_args, run

if __name__ == "__main__":
    run(parse_args())
