"""The hybrid estimator (MagicPIGConfig.exact_keys): an exact head of the highest-scoring keys
merged by log-sum-exp with the importance-weighted sample of the rest.

The torch reference is checked against dense attention (every key in the head) and for an
unbiased tail by a statistical test over independent hash projections; the C++ and numba
stores are checked against the reference on random and adversarial inputs (ties, GQA groups
split in sub-groups, a 64k block boundary, appends left in the unsorted tail).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_store import BACKENDS, TORCH_DTYPE, assert_matches, make_tokens

from magicpig.attention.reference import (
    candidate_mask,
    dense_attention,
    hybrid_attention,
    sampled_attention,
    top_candidates,
)
from magicpig.config import MagicPIGConfig
from magicpig.lsh import LOG_U_FLOOR, SimHash, log_collision_probability
from magicpig.store import CPUStore


# -- the torch reference ---------------------------------------------------------------------------
def test_every_key_in_the_head_is_dense_attention():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 32, generator=gen) * 4  # peaked
    k, v = torch.randn(2, 3, 500, 32, generator=gen), torch.randn(2, 3, 500, 32, generator=gen)
    mask = torch.rand(2, 6, 500, generator=gen) < 0.05  # a sparse, unrelated candidate set
    everything = torch.ones_like(mask)
    out, lse = hybrid_attention(q, k, v, mask, everything, K=6, L=20, min_collisions=2)
    want_out, want_lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, want_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)


def test_head_covering_the_candidates_is_exact_attention_over_them():
    gen = torch.Generator().manual_seed(1)
    q = torch.randn(1, 4, 16, generator=gen)
    k, v = torch.randn(1, 2, 300, 16, generator=gen), torch.randn(1, 2, 300, 16, generator=gen)
    mask = torch.rand(1, 4, 300, generator=gen) < 0.1
    head = top_candidates(q, k, mask, 300)
    assert torch.equal(head, mask)
    out, lse = hybrid_attention(q, k, v, mask, head, K=4, L=8, min_collisions=1)
    want = dense_attention(q, k, v, mask=mask)
    torch.testing.assert_close(out, want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want[1], rtol=1e-5, atol=1e-5)


def test_top_candidates_picks_the_best_scores_among_candidates_ties_to_the_earlier_key():
    q = torch.tensor([[[1.0, 0.0]]])
    k = torch.tensor([[[[3.0, 0.0], [5.0, 1.0], [5.0, -1.0], [9.0, 0.0], [4.0, 0.0], [5.0, 0.0]]]])
    mask = torch.tensor([[[True, True, True, False, True, True]]])  # key 3 scores best but is not a candidate
    head = top_candidates(q, k, mask, 2)
    # scores 3, 5, 5, -, 4, 5: the three 5s tie; the two earliest win
    assert head[0, 0].tolist() == [False, True, True, False, False, False]
    assert top_candidates(q, k, mask, 0).sum() == 0
    with pytest.raises(ValueError, match="count=-1"):
        top_candidates(q, k, mask, -1)


def _tail_sums(q, k, v, head, K, L, m, seeds):
    """Per hash draw: (numerator [d], denominator) of the tail estimate and of a biased variant
    that drops the importance weights, from hybrid_attention minus the exact head."""
    s = (q[0, 0] @ k[0, 0].T) / math.sqrt(q.shape[-1])
    head_num = (torch.exp(s) * head[0, 0]) @ v[0, 0]
    head_den = (torch.exp(s) * head[0, 0]).sum()
    weighted, unweighted = [], []
    for seed in seeds:
        sh = SimHash(q.shape[-1], K, L, seed=seed)
        mask = candidate_mask(sh.hash(q), sh.hash(k), m)
        out, lse = hybrid_attention(q, k, v, mask, head, K, L, m)
        total = torch.exp(lse[0, 0])
        weighted.append(torch.cat([out[0, 0] * total - head_num, (total - head_den)[None]]))
        tail = mask & ~head
        out_u, lse_u = dense_attention(q, k, v, mask=tail)  # weights 1 on the tail: biased low
        t_u = torch.exp(lse_u[0, 0]) if torch.isfinite(lse_u[0, 0]) else torch.tensor(0.0)
        unweighted.append(torch.cat([out_u[0, 0] * t_u, t_u[None]]))
    return torch.stack(weighted).double(), torch.stack(unweighted).double()


def test_tail_estimate_is_unbiased_for_a_head_fixed_before_hashing():
    gen = torch.Generator().manual_seed(3)
    d, n, K, L, m = 16, 40, 3, 6, 2
    k = torch.randn(1, 1, n, d, generator=gen)
    v = torch.randn(1, 1, n, d, generator=gen)
    q = (k[0, 0, :4].mean(0) + 0.3 * torch.randn(d, generator=gen)).view(1, 1, d)
    # every key's sampling probability well above the weight floor, so 1/u is exact
    cos = torch.nn.functional.cosine_similarity(q[0, 0][None], k[0, 0], dim=-1)
    assert log_collision_probability(cos.double(), K, L, m).min() > LOG_U_FLOOR + 10
    scores = (q[0, 0] @ k[0, 0].T) / math.sqrt(d)
    head = torch.zeros(1, 1, n, dtype=torch.bool)
    head[0, 0, scores.topk(4).indices] = True  # deterministic: exact top-4 over all keys
    tail = ~head[0, 0]
    truth = torch.cat([(torch.exp(scores) * tail) @ v[0, 0], (torch.exp(scores) * tail).sum()[None]]).double()
    weighted, unweighted = _tail_sums(q, k, v, head, K, L, m, seeds=range(1500))
    se = weighted.std(0) / math.sqrt(weighted.shape[0])
    z = (weighted.mean(0) - truth).abs() / se
    assert z.max() < 5, f"tail estimate off by {z.max():.1f} standard errors"
    # the test can fail: the same draws without the 1/u weights miss the denominator by far
    z_biased = (unweighted.mean(0)[-1] - truth[-1]).abs() / (unweighted[:, -1].std() / math.sqrt(len(unweighted)))
    assert z_biased > 10


# -- the stores against the reference -------------------------------------------------------------
def hybrid_reference(q, qc, k, v, kc, K, L, m, exact, kv_dtype):
    kr = k.to(TORCH_DTYPE[kv_dtype]).float()[None]
    vr = v.to(TORCH_DTYPE[kv_dtype]).float()[None]
    mask = candidate_mask(qc, kc[None], m)
    out, lse = hybrid_attention(q, kr, vr, mask, top_candidates(q, kr, mask, exact), K, L, m)
    return out, lse, mask.sum(-1).to(torch.int32)


def hybrid_case(backend, exact, *, H=2, G=2, d=32, K=6, L=24, m=2, n=800, chunks=1, kv_dtype="fp32", seed=0,
                integer=False):
    """One sequence appended in `chunks` pieces; queries near a key; store vs reference."""
    gen = torch.Generator().manual_seed(seed)
    sh = SimHash(d, K, L, seed=seed + 1)
    if integer:  # small integers: exact dot products, many exactly tied scores
        k = torch.randint(-1, 2, (H, n, d), generator=gen).float()
        v = torch.randn(H, n, d, generator=gen)
    else:
        k, v = make_tokens(gen, H, n, d)
    kc = sh.hash(k)
    store = CPUStore(H, d, K, L, m, kv_dtype=kv_dtype, backend=backend, exact_keys=exact)
    sid = store.add_sequence()
    bounds = np.linspace(0, n, chunks + 1).astype(int)
    for a, b in zip(bounds[:-1], bounds[1:]):
        store.append(sid, k[:, a:b], v[:, a:b], kc[:, a:b])
    picks = torch.randint(0, n, (H * G,), generator=gen)
    q = k[torch.arange(H * G) // G, picks][None] * (1 if integer else 2)
    if not integer:
        q = q + torch.randn(1, H * G, d, generator=gen)
    qc = sh.hash(q)
    got = store.attend([sid], q, qc)
    want = hybrid_reference(q, qc, k, v, kc, K, L, m, exact, kv_dtype)
    assert_matches(got, want)
    return got, (q, qc, k, v, kc)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("exact", [1, 8, 1024])
def test_store_matches_reference_gqa_bf16(backend, exact):
    got, (q, qc, k, v, kc) = hybrid_case(backend, exact, H=2, G=4, d=64, K=6, L=30, m=2, n=1500,
                                         kv_dtype="bf16", seed=exact)
    if exact == 1:
        return  # the one key closest to a query has u ~ 1: its weight barely changes
    # the field is not ignored: plain sampling over the same candidates gives other outputs
    kr, vr = k.bfloat16().float()[None], v.bfloat16().float()[None]
    plain, _ = sampled_attention(q, kr, vr, candidate_mask(qc, kc[None], 2), 6, 30, 2)
    assert (got[0] - plain).abs().max() > 1e-3


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_matches_reference_with_split_groups_and_a_tail(backend):
    # G = 10 query heads per KV head: two sub-groups (kMaxGroup = 8); 7 appends leave a tail
    hybrid_case(backend, 3, H=1, G=10, d=32, K=5, L=20, m=2, n=700, chunks=7, seed=4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_breaks_ties_as_the_reference(backend):
    # integer keys: many candidates share the head's last score exactly; the earlier key wins
    got, (q, qc, k, v, kc) = hybrid_case(backend, 20, H=1, G=2, d=16, K=3, L=6, m=1, n=600, seed=7, integer=True)
    mask = candidate_mask(qc, kc[None], 1)
    ranked = (q @ k[0].T).masked_fill(~mask, float("-inf")).sort(-1, descending=True).values
    assert bool((ranked[..., 19] == ranked[..., 20]).all()), "no tie at the head's edge: the case tests nothing"


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_ranks_the_head_across_64k_blocks(backend):
    hybrid_case(backend, 6, H=1, G=2, d=16, K=4, L=12, m=3, n=65535 + 2000, chunks=2, seed=21)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_with_head_over_all_candidates_is_dense_over_them(backend):
    got, (q, qc, k, v, kc) = hybrid_case(backend, 1024, H=2, G=2, d=32, K=4, L=16, m=2, n=400, seed=9)
    mask = candidate_mask(qc, kc[None], 2)
    assert int(mask.sum(-1).max()) <= 1024
    out, lse = dense_attention(q, k[None], v[None], mask=mask)
    torch.testing.assert_close(got[0], out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], lse, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_store_nan_query_does_not_crash_and_other_rows_are_right(backend):
    gen = torch.Generator().manual_seed(2)
    H, G, d, K, L, m, n = 1, 2, 16, 4, 12, 2, 300
    sh = SimHash(d, K, L, seed=3)
    k, v = make_tokens(gen, H, n, d)
    store = CPUStore(H, d, K, L, m, kv_dtype="fp32", backend=backend, exact_keys=4)
    sids = [store.add_sequence(), store.add_sequence()]
    for sid in sids:
        store.append(sid, k, v, sh.hash(k))
    q = k[0, :2][None].repeat(2, 1, 1) * 2
    qc = sh.hash(q)
    q[0, 0, 0] = float("nan")  # only the trusted path lets a non-finite query through
    out, lse, nc = store.attend_trusted(np.array(sids, np.int64), q.numpy(), qc.numpy())
    want = hybrid_reference(q[1:], qc[1:], k, v, sh.hash(k), K, L, m, 4, "fp32")
    assert_matches((out[1:], lse[1:], nc[1:]), want)


@pytest.mark.parametrize("value", [-1, 1025])
def test_bad_exact_keys_is_a_clear_error(value):
    with pytest.raises(ValueError, match="exact_keys"):
        CPUStore(1, 16, 4, 8, 2, exact_keys=value)
    with pytest.raises(ValueError, match="exact_keys"):
        MagicPIGConfig(exact_keys=value)
    with pytest.raises(TypeError, match="exact_keys"):
        MagicPIGConfig(exact_keys=2.5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_head_key_carrying_all_the_weight_is_not_cancelled_away(backend):
    # Found by the fuzz: one candidate at cos = -1 (u at the weight floor), so its weighted term
    # exp(s)/u is e^69 times its exact term. Subtracting the first to add the second lost
    # everything (NaN); the store must give exactly the reference's single-key attention.
    K, L, m = 1, 8, 1
    k = torch.tensor([[[304.6993]]])
    v = torch.tensor([[[-2.0074]]])
    q = torch.tensor([[[-1.3566]]])
    kc = torch.tensor([[[1, 1, 0, 0, 1, 0, 1, 0]]], dtype=torch.int32)
    qc = torch.tensor([[[1, 1, 0, 1, 0, 0, 0, 0]]], dtype=torch.int32)
    store = CPUStore(1, 1, K, L, m, kv_dtype="fp32", backend=backend, exact_keys=3)
    sid = store.add_sequence()
    store.append(sid, k, v, kc)
    got = store.attend([sid], q, qc)
    assert torch.isfinite(got[0]).all() and torch.isfinite(got[1]).all()
    assert_matches(got, hybrid_reference(q, qc, k, v, kc, K, L, m, 3, "fp32"))
    torch.testing.assert_close(got[0], v[None, :, 0])  # one key: its value, whatever its weight
