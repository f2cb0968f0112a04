"""The answer-by-answer comparison under summary.md: counts and the exact sign test."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from magicpig.eval.paired import paired_counts, paired_markdown, sign_test_p


@pytest.mark.parametrize("up, down, p", [
    (0, 0, 1.0),
    (5, 0, 2 / 32),            # n=5: only (5,0) and (0,5) are as uneven
    (0, 5, 2 / 32),
    (3, 1, 2 * (1 + 4) / 16),  # n=4: (4,0), (3,1) and their mirrors
    (1, 1, 1.0),               # 2 * (1 + 2) / 4 > 1, capped
    (8, 2, 2 * (1 + 10 + 45) / 1024),
])
def test_sign_test_matches_hand_computed_values(up, down, p):
    assert sign_test_p(up, down) == pytest.approx(p)


@given(st.integers(0, 60), st.integers(0, 60))
def test_sign_test_is_symmetric_and_more_uneven_is_smaller(up, down):
    p = sign_test_p(up, down)
    assert 0 < p <= 1 and p == sign_test_p(down, up)
    if up >= down > 0:  # one answer moved from down to up: further from an even split
        assert sign_test_p(up + 1, down - 1) < p or p == sign_test_p(up + 1, down - 1) == 1.0
    assert math.isclose(sign_test_p(up, up), 1.0)


@pytest.mark.parametrize("up, down", [(-1, 0), (0, 1.5), (True, 0), ("3", 1)])
def test_sign_test_refuses_what_is_not_a_count(up, down):
    with pytest.raises(ValueError, match="expected a count"):
        sign_test_p(up, down)


def _rec(task, index, method, text, score, length=4096):
    return dict(benchmark="ruler", task=task, length=length, index=index, method=method, prediction=text,
                score=score, cost=0.03)


def test_paired_counts_pair_answers_by_prompt():
    recs = [
        _rec("a", 0, "dense", "42", 1.0), _rec("a", 0, "m", "42", 1.0),   # identical
        _rec("a", 1, "dense", "7", 1.0), _rec("a", 1, "m", "8", 0.0),     # down
        _rec("b", 0, "dense", "x", 0.0), _rec("b", 0, "m", "y", 1.0),     # up
        _rec("b", 1, "dense", "p", 0.5), _rec("b", 1, "m", "q", 0.5),     # differs, same score
        _rec("b", 2, "m", "z", 1.0),                                      # no dense answer: not paired
        _rec("a", 0, "dense", "1", 1.0, length=8192), _rec("a", 0, "m", "2", 0.0, length=8192),
    ]
    rows = {(r["length"], r["method"]): r for r in paired_counts(recs, "dense")}
    assert set(rows) == {(4096, "m"), (8192, "m")}
    c = rows[(4096, "m")]
    assert (c["pairs"], c["identical"], c["up"], c["down"]) == (4, 1, 1, 1)
    assert c["p"] == 1.0
    c = rows[(8192, "m")]
    assert (c["pairs"], c["identical"], c["up"], c["down"]) == (1, 0, 0, 1)
    md = paired_markdown(recs, ["dense", "m"])
    assert "### ruler @ 4096 tokens, answer by answer against dense" in md
    assert "| m | 4 | 1 | 1 | 1 | 1.00 |" in md and "| m | 1 | 0 | 0 | 1 | 1.00 |" in md
    assert paired_markdown(recs, []) == "" and paired_markdown(recs, ["nobody"]) == ""
