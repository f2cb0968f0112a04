"""(K, L) for a budget: predicted cost against measured SimHash candidate fractions."""

from __future__ import annotations

import pytest
import torch

from magicpig.attention.reference import candidate_mask
from magicpig.runtime.calibration import calibration_cosines, choose_kl, kl_options, predicted_cost, top_recall
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


def test_options_cover_every_threshold_with_minimal_tables():
    q, k = _data(2)
    cos = calibration_cosines(q, k)
    opts = kl_options(cos, 0.03, K_range=(7, 9), min_collisions=(1, 4), max_tables=400)
    assert {(o.K, o.min_collisions) for o in opts} == {(K, m) for K in range(7, 10) for m in range(1, 5)}
    for o in opts:
        assert predicted_cost(cos, o.K, o.L, o.min_collisions) >= 0.03
        assert o.L == o.min_collisions or predicted_cost(cos, o.K, o.L - 1, o.min_collisions) < 0.03
    for K in range(7, 10):  # a higher threshold needs more tables for the same cost
        ls = [o.L for o in sorted((o for o in opts if o.K == K), key=lambda o: o.min_collisions)]
        assert ls == sorted(ls) and len(set(ls)) == len(ls)


def test_choice_reads_the_top_keys_more_reliably_than_the_most_bits_rule():
    """Among equal-cost options the chosen one has the highest recall of the top keys, and
    that holds when measured with real hash functions, not only in the formula."""
    q, k = _data(3)
    cos = calibration_cosines(q, k)
    target = 0.03
    opts = kl_options(cos, target, K_range=(6, 10), min_collisions=(1, 5), max_tables=300)
    best = choose_kl(cos, target, K_range=(6, 10), min_collisions=(1, 5), max_tables=300)
    recalls = {(o.K, o.L, o.min_collisions): top_recall(cos, o.K, o.L, o.min_collisions, target / 4) for o in opts}
    assert best.recall == pytest.approx(max(recalls.values()), abs=1e-6)
    most_bits = max((o for o in opts if o.min_collisions == 2), key=lambda o: o.K)  # the old rule
    assert best.recall > recalls[(most_bits.K, most_bits.L, 2)] + 0.02
    # Measured: fraction of each query's top keys (by cosine) that become candidates.
    top_n = max(1, round(target / 4 * k.shape[0]))
    sims = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).T
    top_idx = sims.topk(top_n, dim=-1).indices

    def measured(choice_k: int, choice_l: int, m: int) -> tuple[float, float]:
        rec, frac = [], []
        for seed in range(4):
            h = SimHash(q.shape[1], choice_k, choice_l, seed=seed)
            mask = candidate_mask(h.hash(q)[None], h.hash(k)[None, None], m)[0]  # [Nq, Nk]
            rec.append(mask.gather(-1, top_idx).float().mean().item())
            frac.append(mask.float().mean().item())
        return sum(rec) / len(rec), sum(frac) / len(frac)

    rec_best, frac_best = measured(best.K, best.L, best.min_collisions)
    rec_old, frac_old = measured(most_bits.K, most_bits.L, 2)
    assert frac_best == pytest.approx(target, rel=0.2) and frac_old == pytest.approx(target, rel=0.2)
    assert rec_best > rec_old


def test_errors():
    cos = torch.zeros(10)
    with pytest.raises(ValueError, match="target_cost"):
        choose_kl(cos, 1.5)
    with pytest.raises(ValueError, match="no K"):
        choose_kl(cos, 0.9, K_range=(16, 16), max_tables=3)
    with pytest.raises(ValueError, match="queries"):
        calibration_cosines(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="min_collisions"):
        kl_options(torch.rand(10), 0.1, min_collisions=(3, 2))
    with pytest.raises(ValueError, match="top_fraction"):
        choose_kl(torch.rand(100), 0.1, K_range=(2, 4), top_fraction=0.0)


def test_model_calibration_predicts_the_measured_cost():
    """On SmolLM2: cosines of real decode queries predict magicpig's measured candidate share."""
    from magicpig import LongContextModel
    from magicpig.eval import ruler
    from magicpig.runtime.calibration import model_cosines
    from magicpig.eval.runner import parse_method

    model = LongContextModel.from_pretrained("smollm2-135m-instruct")
    s = ruler.generate_sample("niah_single_2", 1536, 0, model.tokenizer)
    ids = model.tokenizer(s.prompt, add_special_tokens=False)["input_ids"]
    cos = model_cosines(model.loaded, ids, model.config, steps=4)
    cfg = parse_method("magicpig:K=8,L=60").config
    predicted = predicted_cost(cos, cfg.K, cfg.L, cfg.min_collisions)
    state = model.prefill([ids], progress=False)
    measured = model.generate_from(state, cfg, max_new_tokens=4)[0].stats.computation_cost
    assert 0.01 < measured < 0.2
    assert measured == pytest.approx(predicted, rel=0.15)  # agreement seen: within 3%
    # Recording used a session-local method: the registered topk class is untouched.
    from magicpig.attention.registry import make_method
    from magicpig.attention.baselines import TopKMiddle

    assert type(make_method(cfg.replace(method="topk"), 1, 3, 64)) is TopKMiddle


def test_pick_kl_command_prints_a_parseable_choice_near_the_target(capsys):
    """`magicpig eval pick-kl` on the real model: its choice parses as a method spec and its
    predicted cost is the target's."""
    import re

    from magicpig.cli import eval as cli
    from magicpig.eval.runner import parse_method

    assert cli.main(["pick-kl", "--cost", "0.05", "--length", "1024", "--steps", "2",
                     "--k-range", "6", "9", "--min-collisions", "1", "4"]) == 0
    out = capsys.readouterr().out
    found = re.search(r"chosen: (magicpig:\S+) \(predicted cost ([\d.]+)%\)", out)
    assert found, out
    cfg = parse_method(found.group(1)).config
    assert 6 <= cfg.K <= 9 and 1 <= cfg.min_collisions <= 4 and cfg.L <= 300
    assert float(found.group(2)) == pytest.approx(5.0, rel=0.1)


# -- a model's default (K, L, m) ------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm():
    from magicpig.model.loaded import load_model

    return load_model("smollm2-135m-instruct", device="cpu")


def test_calibration_prompt_fits_and_holds_the_facts(smollm):
    from magicpig.runtime.calibration import calibration_prompt

    for n in (300, 1024):
        ids = calibration_prompt(smollm.tokenizer, n)
        assert n - 40 <= len(ids) <= n  # filled to within a sentence or so, never over
        text = smollm.tokenizer.decode(ids)
        assert text.count("The special number of the") == 4 and "What is the special number of the" in text
    assert calibration_prompt(smollm.tokenizer, 500) == calibration_prompt(smollm.tokenizer, 500)  # seeded


def test_default_lsh_calibrates_once_then_reads_the_cache(smollm, tmp_path, monkeypatch, capsys):
    from magicpig import MagicPIGConfig
    from magicpig.runtime import calibration

    monkeypatch.setenv("MAGICPIG_CACHE", str(tmp_path))
    config = MagicPIGConfig()
    first = calibration.default_lsh(smollm, config)
    assert first.how == "calibrated" and "choosing K, L, min_collisions" in capsys.readouterr().err
    # what ranked_options puts first on these settings' search, at the default cost
    assert calibration.SEARCH["K_range"][0] <= first.K <= calibration.SEARCH["K_range"][1]
    assert first.L <= calibration.SEARCH["max_tables"] and 2 <= first.min_collisions <= 10
    assert calibration.DEFAULT_COST <= first.predicted_cost < 1.2 * calibration.DEFAULT_COST
    assert first.index_bytes == 2 * first.L + (first.L if first.K > 12 else 0) + 4
    # the second time nothing is measured
    monkeypatch.setattr(calibration, "model_cosines", lambda *a, **k: pytest.fail("calibrated again"))
    again = calibration.default_lsh(smollm, config)
    assert again.how == "cached" and (again.K, again.L, again.min_collisions) == (first.K, first.L, first.min_collisions)
    # other settings of the middle are another entry; a damaged file is measured again
    with pytest.raises(BaseException, match="calibrated again"):
        calibration.default_lsh(smollm, config.replace(window_tokens=32))
    for path in (tmp_path / "calibration").glob("*.json"):
        path.write_text("{not json")
    with pytest.raises(BaseException, match="calibrated again"):
        calibration.default_lsh(smollm, config)


def test_a_given_threshold_is_kept(smollm, tmp_path, monkeypatch):
    from magicpig import MagicPIGConfig
    from magicpig.runtime.calibration import resolve_lsh

    monkeypatch.setenv("MAGICPIG_CACHE", str(tmp_path))
    config, choice = resolve_lsh(smollm, MagicPIGConfig(min_collisions=3))
    assert config.min_collisions == 3 == choice.min_collisions and config.lsh_resolved
    given = MagicPIGConfig(K=9, L=90)
    assert resolve_lsh(smollm, given) == (given, None)  # set by the user: untouched
    dense = MagicPIGConfig(method="dense")
    assert resolve_lsh(smollm, dense) == (dense, None)  # nothing sampled, nothing to choose


def test_a_model_too_short_to_calibrate_gets_the_paper_setting(smollm, monkeypatch):
    import dataclasses

    from magicpig import MagicPIGConfig
    from magicpig.config import PAPER_LSH
    from magicpig.runtime import calibration

    short = dataclasses.replace(smollm, model=type("M", (), {"args": dataclasses.replace(smollm.args, max_positions=300),
                                                             "embed_weight": smollm.model.embed_weight})())
    monkeypatch.setattr(calibration, "model_cosines", lambda *a, **k: pytest.fail("measured"))
    choice = calibration.default_lsh(short, MagicPIGConfig())
    assert (choice.K, choice.L, choice.min_collisions) == PAPER_LSH and choice.how == "paper"
    assert "too few positions" in choice.describe()


def test_long_context_model_and_engine_resolve_an_unset_config(tmp_path, monkeypatch):
    from magicpig import Engine, LongContextModel, MagicPIGConfig, calibrate

    model = LongContextModel.from_pretrained("smollm2-135m-instruct")
    choice = model.lsh_choice
    assert model.config.lsh_resolved and choice is not None
    assert (model.config.K, model.config.L, model.config.min_collisions) == (choice.K, choice.L, choice.min_collisions)
    given = LongContextModel(model.loaded, MagicPIGConfig(K=8, L=60))
    assert (given.config.K, given.config.L, given.config.min_collisions) == (8, 60, 2) and given.lsh_choice is None
    # a per-call config that leaves K, L unset gets the model's choice
    session_config = given._config(MagicPIGConfig(window_tokens=32))
    assert (session_config.K, session_config.L) != (None, None) and session_config.window_tokens == 32
    # the engine never chooses on its own (issue 25): calibrate() is the explicit step
    with pytest.raises(ValueError, match="calibrate"):
        Engine(model.loaded, MagicPIGConfig(), max_num_seqs=1)
    engine = Engine(model.loaded, calibrate(model.loaded, MagicPIGConfig()), max_num_seqs=1)
    assert engine.config.lsh_resolved and engine.config.K == choice.K
    engine.close()
    with pytest.raises(ValueError, match="K and L are unset"):
        from magicpig.attention.registry import make_method

        make_method(MagicPIGConfig(), 1, 3, 64)
