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
