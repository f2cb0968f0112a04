"""The document-QA workload of ``magicpig bench prefix`` (magicpig/bench/prefix.py): what the
prefix-caching figures are measured on. The runs themselves are the benchmark's."""

from __future__ import annotations

import pytest

from magicpig.bench.prefix import arrivals, make_workload
from magicpig.model.loading import embedded_model_dir, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(embedded_model_dir())


def test_questions_about_one_document_share_it_and_arrive_interleaved(tokenizer):
    work = make_workload(tokenizer, docs=3, questions=4, min_tokens=500, max_tokens=900, seed=1)
    assert [w.doc for w in work] == [0, 1, 2] * 4  # round by round
    for d in range(3):
        mine = [w for w in work if w.doc == d]
        assert len({w.answer for w in mine}) == 4  # four different needles
        common = min(next((i for i, (a, b) in enumerate(zip(x.prompt_ids, mine[0].prompt_ids)) if a != b),
                          len(x.prompt_ids)) for x in mine[1:])
        assert common > 0.85 * min(len(w.prompt_ids) for w in mine)  # only the question differs
        assert all(500 * 0.8 <= len(w.prompt_ids) <= 900 * 1.2 for w in mine)
        text = tokenizer.decode(mine[0].prompt_ids)
        assert all(w.answer in text for w in mine)  # every answer is in the document
    other = [w for w in work if w.doc == 1][0].prompt_ids
    assert other[:200] != work[0].prompt_ids[:200] or other[200:400] != work[0].prompt_ids[200:400]
    assert make_workload(tokenizer, 3, 4, 500, 900, 1)[5].prompt_ids == work[5].prompt_ids  # seeded


def test_arrivals_all_at_once_or_poisson():
    assert arrivals(5, None, 0) == [0.0] * 5
    times = arrivals(400, 2.0, 0)
    gaps = [b - a for a, b in zip(times, times[1:])]
    assert times[0] == 0 and all(g > 0 for g in gaps) and 0.4 < sum(gaps) / len(gaps) < 0.6
