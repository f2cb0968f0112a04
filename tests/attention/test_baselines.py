"""The baselines of DESIGN.md §3 against brute-force torch computations."""

from __future__ import annotations

import math

import pytest
import torch

from magicpig.attention.registry import make_method
from magicpig.attention.baselines import (
    QUEST_PAGE_SIZE,
    RETRIEVAL_EXACT_BELOW,
    budget_keys,
    quest_page_bounds,
)
from magicpig.config import MagicPIGConfig

HKV, HQ, D = 2, 6, 16


def _method(name: str, budget: float = 0.1, seed: int = 0):
    cfg = MagicPIGConfig(method=name, budget=budget, seed=seed)
    return make_method(cfg, layer=3, num_kv_heads=HKV, head_dim=D)


def _filled(name: str, n: int, budget: float = 0.1, gen_seed: int = 0, chunks: int = 1):
    g = torch.Generator().manual_seed(gen_seed)
    k = torch.randn(HKV, n, D, generator=g)
    v = torch.randn(HKV, n, D, generator=g)
    m = _method(name, budget)
    sid = m.add_sequence()
    for part in range(chunks):  # appends in several pieces must equal one append
        lo, hi = part * n // chunks, (part + 1) * n // chunks
        m.append(sid, k[:, lo:hi], v[:, lo:hi])
    q = torch.randn(1, HQ, D, generator=g)
    return m, sid, q, k, v


def _brute(q, k, v, mask):
    """softmax over the masked keys, per query head, in float64: out [Hq, d], lse [Hq]."""
    kv_of = torch.arange(HQ) // (HQ // HKV)
    s = torch.einsum("hd,hnd->hn", q[0].double(), k[kv_of].double()) / math.sqrt(D)
    s = s.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(s, -1)
    out = torch.einsum("hn,hnd->hd", torch.softmax(s, -1), v[kv_of].double())
    return out, lse


def _raw_scores(q, k):
    kv_of = torch.arange(HQ) // (HQ // HKV)
    return torch.einsum("hd,hnd->hn", q[0], k[kv_of])


def test_budget_keys_rounding_and_floor_of_one():
    assert budget_keys(0, 0.5) == 0
    assert budget_keys(10, 0.01) == 1  # rounds to 0 -> still one key
    assert budget_keys(1000, 0.02) == 20
    assert budget_keys(1000, 0.0205) == 21  # 20.5 rounds half up
    assert budget_keys(7, 1.0) == 7


def test_dense_equals_brute_force_and_reads_everything():
    m, sid, q, k, v = _filled("dense", 100, chunks=3)
    out, lse, read = m.attend([sid], q)
    ref_out, ref_lse = _brute(q, k, v, torch.ones(HQ, 100, dtype=torch.bool))
    torch.testing.assert_close(out[0].double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert read.dtype == torch.int32 and read.tolist() == [[100] * HQ]
    assert m.length(sid) == 100


def test_topk_chooses_the_exact_top_keys():
    n, budget = 200, 0.05
    m, sid, q, k, v = _filled("topk", n, budget)
    out, lse, read = m.attend([sid], q)
    count = budget_keys(n, budget)
    scores = _raw_scores(q, k)
    mask = torch.zeros(HQ, n, dtype=torch.bool)
    for h in range(HQ):  # brute force: sort and keep the best `count` per head
        mask[h, scores[h].argsort(descending=True)[:count]] = True
    ref_out, ref_lse = _brute(q, k, v, mask)
    torch.testing.assert_close(out[0].double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert read.tolist() == [[count] * HQ]


def test_quest_bounds_are_true_upper_bounds_and_tight_for_single_token_pages():
    g = torch.Generator().manual_seed(1)
    keys = torch.randn(3, 53, D, generator=g)  # 53 = 3 full pages + a short one
    q = torch.randn(3, D, generator=g)
    bounds = quest_page_bounds(q, keys)
    assert bounds.shape == (3, 4)
    dots = torch.einsum("hd,hnd->hn", q, keys)
    for p in range(4):
        page_max = dots[:, p * QUEST_PAGE_SIZE:(p + 1) * QUEST_PAGE_SIZE].amax(-1)
        assert torch.all(bounds[:, p] >= page_max - 1e-5)
    # With one token per page the bound is exactly q . k.
    torch.testing.assert_close(quest_page_bounds(q, keys, page_size=1), dots, atol=1e-5, rtol=1e-5)


def test_quest_reads_the_pages_with_the_largest_bounds():
    n, budget = 160, 0.2  # 32 keys -> 2 pages of 16
    m, sid, q, k, v = _filled("quest", n, budget)
    out, lse, read = m.attend([sid], q)
    kv_of = torch.arange(HQ) // (HQ // HKV)
    bounds = quest_page_bounds(q[0], k[kv_of])
    mask = torch.zeros(HQ, n, dtype=torch.bool)
    for h in range(HQ):
        for p in bounds[h].argsort(descending=True)[:2].tolist():
            mask[h, p * 16:(p + 1) * 16] = True
    ref_out, ref_lse = _brute(q, k, v, mask)
    torch.testing.assert_close(out[0].double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)
    assert read.tolist() == [[32] * HQ]


def test_quest_finds_a_planted_key():
    # One key aligned with the query in a sea of small keys: its page must be chosen.
    g = torch.Generator().manual_seed(2)
    n = 320
    k = 0.1 * torch.randn(HKV, n, D, generator=g)
    q = torch.randn(1, HQ, D, generator=g)
    k[0, 201] = 5 * q[0, 0]
    m = _method("quest", budget=0.05)
    sid = m.add_sequence()
    m.append(sid, k, torch.randn(HKV, n, D, generator=g))
    mask = m._choose(sid, q[0], torch.arange(HQ) // (HQ // HKV))
    assert mask[0, 201] and mask[0, 192:208].all()


def test_streaming_reads_nothing():
    m, sid, q, k, v = _filled("streaming", 50)
    out, lse, read = m.attend([sid], q)
    assert torch.isneginf(lse).all() and (out == 0).all() and (read == 0).all()
    assert m.length(sid) == 50 and m.nbytes() == 0


@pytest.mark.parametrize("name", ["dense", "topk", "quest", "oracle_sampling", "retrieval", "streaming"])
def test_empty_middle_gives_minus_inf(name):
    m = _method(name)
    sid = m.add_sequence()
    q = torch.randn(1, HQ, D)
    out, lse, read = m.attend([sid], q)
    assert torch.isneginf(lse).all() and (out == 0).all() and (read == 0).all()


@pytest.mark.parametrize("name", ["dense", "topk", "quest", "retrieval"])
def test_batch_of_sequences_with_different_lengths(name):
    # Attending two sequences at once equals attending each alone.
    g = torch.Generator().manual_seed(3)
    m = _method(name, budget=0.1)
    ids, qs = [], torch.randn(2, HQ, D, generator=g)
    for n in (40, 90):
        sid = m.add_sequence()
        m.append(sid, torch.randn(HKV, n, D, generator=g), torch.randn(HKV, n, D, generator=g))
        ids.append(sid)
    out, lse, read = m.attend(ids, qs)
    for b, sid in enumerate(ids):
        o1, l1, r1 = m.attend([sid], qs[b:b + 1])
        torch.testing.assert_close(out[b], o1[0])
        torch.testing.assert_close(lse[b], l1[0])
        assert read[b].tolist() == r1[0].tolist()


def test_oracle_sampling_converges_as_budget_grows():
    n = 400
    g = torch.Generator().manual_seed(4)
    k = 2 * torch.randn(HKV, n, D, generator=g)
    v = torch.randn(HKV, n, D, generator=g)
    q = torch.randn(1, HQ, D, generator=g)
    ref_out, ref_lse = _brute(q, k, v, torch.ones(HQ, n, dtype=torch.bool))
    errors = []
    for budget in (0.01, 0.1, 1.0):
        m = _method("oracle_sampling", budget)
        sid = m.add_sequence()
        m.append(sid, k, v)
        err = 0.0
        for _ in range(20):  # average over draws
            out, lse, read = m.attend([sid], q)
            err += (out[0].double() - ref_out).norm().item() / 20
            torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)
            assert (read <= budget_keys(n, budget)).all() and (read >= 1).all()
        errors.append(err)
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.35 * errors[0]


def test_oracle_sampling_is_unbiased():
    n = 30
    # 30 draws per call x 400 calls: the mean's error per channel is ~0.01, the tolerance 0.05.
    m, sid, q, k, v = _filled("oracle_sampling", n, budget=1.0)
    ref_out, _ = _brute(q, k, v, torch.ones(HQ, n, dtype=torch.bool))
    mean = sum(m.attend([sid], q)[0][0].double() for _ in range(400)) / 400
    torch.testing.assert_close(mean, ref_out, atol=0.05, rtol=0)


def test_retrieval_recall_on_easy_data():
    # Low-dimensional Gaussian keys: the approximate search must find the true top keys.
    n = RETRIEVAL_EXACT_BELOW + 1000
    g = torch.Generator().manual_seed(5)
    k = torch.randn(HKV, n, D, generator=g)
    v = torch.randn(HKV, n, D, generator=g)
    q = torch.randn(1, HQ, D, generator=g)
    budget = 0.02
    m = _method("retrieval", budget)
    sid = m.add_sequence()
    m.append(sid, k[:, : n // 2], v[:, : n // 2])
    m.append(sid, k[:, n // 2:], v[:, n // 2:])
    out, lse, read = m.attend([sid], q)
    count = budget_keys(n, budget)
    mask = m._choose(sid, q[0], torch.arange(HQ) // (HQ // HKV))
    exact = _raw_scores(q, k).topk(count, dim=-1).indices
    recall = sum(mask[h, exact[h]].float().mean().item() for h in range(HQ)) / HQ
    assert recall > 0.95
    assert (read == count).all()
    ref_out, ref_lse = _brute(q, k, v, mask)
    torch.testing.assert_close(lse[0].double(), ref_lse, atol=1e-5, rtol=1e-5)
    # Keys appended after a search extend the index.
    m.append(sid, k[:, :10], v[:, :10])
    assert m.attend([sid], q)[2].max().item() == budget_keys(n + 10, budget)


def test_bad_shapes_raise_clear_errors():
    m = _method("topk")
    sid = m.add_sequence()
    with pytest.raises(ValueError, match="keys"):
        m.append(sid, torch.randn(3, 5, D), torch.randn(3, 5, D))
    with pytest.raises(ValueError, match="queries"):
        m.attend([sid], torch.randn(1, HQ, D + 1))
    with pytest.raises(KeyError, match="seq_id"):
        m.attend([sid + 7], torch.randn(1, HQ, D))
