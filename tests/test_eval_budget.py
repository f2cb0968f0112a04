"""(K, L) for a budget: predicted cost against measured SimHash candidate fractions."""

from __future__ import annotations

import pytest
import torch

from magicpig.attention.reference import candidate_mask
from magicpig.eval.budget import calibration_cosines, choose_kl, kl_options, predicted_cost
from magicpig.lsh import SimHash


def _data(seed: int = 0, d: int = 64):
    g = torch.Generator().manual_seed(seed)
    keys = torch.randn(3000, d, generator=g)
    queries = torch.randn(12, d, generator=g) + 0.6 * keys[:12]  # some keys close to queries
    return queries, keys - keys.mean(0)


@pytest.mark.parametrize("target", [0.02, 0.05])
def test_predicted_cost_matches_measured_candidate_fraction(target):
    q, k = _data()
    cos = calibration_cosines(q, k)
    choice = choose_kl(cos, target, K_range=(6, 10), max_tables=160)
    assert choice.predicted_cost == pytest.approx(target, rel=0.15)
    measured = []
    for seed in range(6):  # average over independent hash functions
        h = SimHash(q.shape[1], choice.K, choice.L, seed=seed)
        measured.append(candidate_mask(h.hash(q)[None], h.hash(k)[None, None], 2).float().mean().item())
    mean = sum(measured) / len(measured)
    assert mean == pytest.approx(choice.predicted_cost, rel=0.1)


def test_options_are_minimal_and_monotone():
    q, k = _data(1)
    cos = calibration_cosines(q, k)
    opts = kl_options(cos, 0.03, K_range=(6, 10))
    assert [o.K for o in opts] == list(range(6, 11))
    for o in opts:
        assert predicted_cost(cos, o.K, o.L) >= 0.03
        assert o.L == 2 or predicted_cost(cos, o.K, o.L - 1) < 0.03  # smallest L
    assert all(a.L < b.L for a, b in zip(opts, opts[1:]))  # more bits need more tables
    assert choose_kl(cos, 0.03, K_range=(6, 10), max_tables=60).L <= 60


def test_errors():
    cos = torch.zeros(10)
    with pytest.raises(ValueError, match="target_cost"):
        choose_kl(cos, 1.5)
    with pytest.raises(ValueError, match="no K"):
        choose_kl(cos, 0.9, K_range=(16, 16), max_tables=3)
    with pytest.raises(ValueError, match="queries"):
        calibration_cosines(torch.zeros(2, 3), torch.zeros(2, 4))


def test_model_calibration_predicts_the_measured_cost():
    """On SmolLM2: cosines of real decode queries predict magicpig's measured candidate share."""
    from magicpig import LongContextModel
    from magicpig.eval import ruler
    from magicpig.eval.budget import model_cosines
    from magicpig.eval.runner import parse_method

    model = LongContextModel.from_pretrained("smollm2-135m-instruct")
    s = ruler.generate_sample("niah_single_2", 1536, 0, model.tokenizer)
    ids = model.tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
    cos = model_cosines(model, ids, steps=4)
    cfg = parse_method("magicpig:K=8,L=60").config
    predicted = predicted_cost(cos, cfg.K, cfg.L, cfg.min_collisions)
    state = model.prefill([ids], progress=False)
    measured = model.generate_from(state, cfg, max_new_tokens=4)[0].stats.computation_cost
    assert 0.01 < measured < 0.2
    assert measured == pytest.approx(predicted, rel=0.15)  # agreement seen: within 3%
    # The default topk method is restored after recording.
    from magicpig.attention.base import make_method
    from magicpig.attention.baselines import TopKMiddle

    assert type(make_method(cfg.replace(method="topk"), 1, 3, 64)) is TopKMiddle
