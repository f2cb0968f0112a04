"""Accuracy of magicpig decode against dense decode on needle retrieval (SmolLM2, 3k-6k tokens).

Slow (ten prefills of 3k-6k tokens on a 2-core CPU): run with `pytest -m slow`.
"""

from __future__ import annotations

import re

import pytest
import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.demo import needle_prompt

pytestmark = pytest.mark.slow


def _answer(text: str) -> str:
    found = re.findall(r"\d{4,}", text)
    return found[0] if found else text.strip()


def test_magicpig_answers_match_dense_on_needles():
    model = LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)
    lengths = [3000 + 333 * i for i in range(10)]
    depths = [0.1, 0.3, 0.5, 0.7, 0.9, 0.2, 0.4, 0.6, 0.8, 0.5]
    dense_cfg, mp_cfg = MagicPIGConfig(method="dense"), MagicPIGConfig()
    agree, correct_dense, correct_mp, costs = 0, 0, 0, []
    for i, (n, depth) in enumerate(zip(lengths, depths)):
        prompt, answer = needle_prompt(model.tokenizer, n, depth, seed=i)
        state = model.prefill(prompt)
        assert 2900 <= state.lengths[0] <= 6100
        dense = model.generate_from(state, dense_cfg, max_new_tokens=20)[0]
        sparse = model.generate_from(state, mp_cfg, max_new_tokens=20)[0]
        agree += _answer(dense.text) == _answer(sparse.text)
        correct_dense += answer in dense.text
        correct_mp += answer in sparse.text
        costs.append(sparse.stats.computation_cost)
        print(f"n={state.lengths[0]} depth={depth} answer={answer} dense={dense.text!r} magicpig={sparse.text!r} "
              f"cost={sparse.stats.computation_cost:.3f}")
    print(f"agree {agree}/10, dense correct {correct_dense}/10, magicpig correct {correct_mp}/10, "
          f"mean cost {sum(costs) / len(costs):.3f}")
    assert agree >= 9
    assert max(costs) < 0.2  # it really samples
