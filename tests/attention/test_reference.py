import math

import pytest
import torch

from magicpig.attention.reference import (
    candidate_mask,
    dense_attention,
    merge_by_lse,
    sampled_attention,
)
from magicpig.lsh import collision_probability, hash_codes, layer_projection


def _qkv(B=2, Hq=6, Hkv=2, n=50, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, d, generator=g)
    k = torch.randn(B, Hkv, n, d, generator=g)
    v = torch.randn(B, Hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _naive_attention(q, k, v):
    B, Hq, d = q.shape
    group = Hq // k.shape[1]
    out = torch.empty(B, Hq, d, dtype=torch.float64)
    lse = torch.empty(B, Hq, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            s = k[b, h // group].double() @ q[b, h].double() / math.sqrt(d)
            lse[b, h] = torch.logsumexp(s, 0)
            out[b, h] = torch.softmax(s, 0) @ v[b, h // group].double()
    return out, lse


def test_dense_attention_matches_a_naive_loop_with_gqa():
    q, k, v = _qkv()
    out, lse = dense_attention(q, k, v)
    ref_out, ref_lse = _naive_attention(q, k, v)
    assert out.dtype == torch.float32 and lse.shape == (2, 6)
    torch.testing.assert_close(out.double(), ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("parts", [2, 3, 5])
def test_merging_any_partition_equals_dense(parts):
    q, k, v = _qkv(n=97, seed=parts)
    full_out, full_lse = dense_attention(q, k, v)
    g = torch.Generator().manual_seed(parts)
    label = torch.randint(0, parts, (2, 6, 97), generator=g)
    label[0, 0] = 0  # one head where every part but the first is empty
    out = torch.zeros_like(full_out)
    lse = torch.full_like(full_lse, float("-inf"))
    for p in range(parts):
        o, s = dense_attention(q, k, v, mask=label == p)
        out, lse = merge_by_lse(out, lse, o, s)
    torch.testing.assert_close(out, full_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, full_lse, atol=1e-5, rtol=1e-5)


def test_merge_with_an_empty_side_and_with_two_empty_sides():
    o = torch.randn(3, 8)
    s = torch.randn(3)
    empty = torch.full((3,), float("-inf"))
    out, lse = merge_by_lse(o, s, torch.zeros(3, 8), empty)
    assert torch.equal(out, o) and torch.equal(lse, s)
    out, lse = merge_by_lse(torch.zeros(3, 8), empty, torch.zeros(3, 8), empty)
    assert torch.equal(out, torch.zeros(3, 8)) and torch.all(lse == float("-inf"))
    with pytest.raises(ValueError, match="merge_by_lse"):
        merge_by_lse(o, s, o[:, :4], s)


def test_no_middle_keys_and_empty_masks_give_zero_and_minus_inf():
    q, k, v = _qkv(n=0)
    out, lse = dense_attention(q, k, v)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))
    q, k, v = _qkv(n=10)
    none = torch.zeros(2, 6, 10, dtype=torch.bool)
    out, lse = sampled_attention(q, k, v, none, 4, 8, 2)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


def test_one_key_and_identical_keys():
    q, k, v = _qkv(n=1)
    out, lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, v[:, [0, 0, 0, 1, 1, 1], 0])
    q, k, v = _qkv(n=20)
    k = k[:, :, :1].expand_as(k).contiguous()
    out, lse = dense_attention(q, k, v)
    torch.testing.assert_close(out, v.mean(2)[:, [0, 0, 0, 1, 1, 1]], atol=1e-6, rtol=1e-5)
    one_key_lse = dense_attention(q, k[:, :, :1], v[:, :, :1])[1]
    torch.testing.assert_close(lse, one_key_lse + math.log(20))


def test_huge_logits_do_not_overflow():
    q, k, v = _qkv(n=30)
    k[:, :, :, 0] = 0.0
    k[:, :, 7, 0] = 1.0  # key 7 wins by a margin of 1e4 * sqrt(d) in the logits
    q[:, :, 0] = 1e4 * 4
    out, lse = dense_attention(q, k, v)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all() and lse.min() > 9e3
    torch.testing.assert_close(out, v[:, [0, 0, 0, 1, 1, 1], 7], atol=1e-6, rtol=1e-6)
    ref_out, ref_lse = _naive_attention(q, k, v)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_compute_in_float32(dtype):
    q, k, v = _qkv(dtype=dtype)
    out, lse = dense_attention(q, k, v)
    ref_out, ref_lse = dense_attention(q.float(), k.float(), v.float())
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    mask = torch.rand(2, 6, 50, generator=torch.Generator().manual_seed(0)) < 0.3
    torch.testing.assert_close(
        sampled_attention(q, k, v, mask, 4, 16, 2)[0],
        sampled_attention(q.float(), k.float(), v.float(), mask, 4, 16, 2)[0], atol=1e-5, rtol=1e-5)


def test_candidate_mask_counts_collisions():
    g = torch.Generator().manual_seed(0)
    qc = torch.randint(0, 4, (1, 4, 6), generator=g)
    kc = torch.randint(0, 4, (1, 2, 40, 6), generator=g)
    for m in (1, 2, 3):
        mask = candidate_mask(qc, kc, m)
        for h in range(4):
            count = (qc[0, h] == kc[0, h // 2]).sum(-1)
            assert torch.equal(mask[0, h], count >= m)
    with pytest.raises(ValueError, match="min_collisions=7"):
        candidate_mask(qc, kc, 7)


def test_sampled_attention_weights_each_candidate_by_its_inverse_probability():
    K, L, m = 3, 8, 2
    q, k, v = _qkv(B=1, Hq=2, Hkv=1, n=12, d=8)
    mask = torch.ones(1, 2, 12, dtype=torch.bool)
    mask[0, 0, ::3] = False
    out, lse = sampled_attention(q, k, v, mask, K, L, m)
    for h in range(2):
        keep = mask[0, h]
        kk, vv = k[0, 0, keep].double(), v[0, 0, keep].double()
        qq = q[0, h].double()
        cos = (kk @ qq) / (kk.norm(dim=-1) * qq.norm())
        p = (1 - torch.arccos(cos) / math.pi) ** K
        u = 1 - (1 - p) ** L - L * p * (1 - p) ** (L - 1)  # closed form for m = 2
        s = kk @ qq / math.sqrt(8) - torch.log(u)
        torch.testing.assert_close(lse[0, h].double(), torch.logsumexp(s, 0), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[0, h].double(), torch.softmax(s, 0) @ vv, atol=1e-5, rtol=1e-5)


def _estimator_error(L: int, seed: int) -> float:
    """Relative error of (sinks+window exact) merged with sampled middle, on a peaked pattern."""
    d, n, K = 32, 2000, 6
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(1, 1, n, d, generator=g)
    v = torch.randn(1, 1, n, d, generator=g)
    q = k[0, 0, :5].mean(0).view(1, 1, d) * 3.0  # the first keys dominate the attention
    k = k - k.mean(2, keepdim=True)
    proj = layer_projection(seed, 0, 1, d, K, L)
    mask = candidate_mask(hash_codes(q, proj[0], K), hash_codes(k, proj, K), 2)
    est, _ = sampled_attention(q, k, v, mask, K, L, 2)
    exact, _ = dense_attention(q, k, v)
    return float((est - exact).norm() / exact.norm())


def test_estimator_error_falls_as_tables_grow():
    errors = {L: sum(_estimator_error(L, s) for s in range(8)) / 8 for L in (8, 32, 128)}
    assert errors[128] < errors[32] < errors[8], errors
    assert errors[128] < 0.5 * errors[8], errors


def test_collision_probability_is_the_sampling_rate_of_the_mask():
    """The estimator's weights are right only if u_i is the real inclusion probability."""
    d, K, L, m = 16, 4, 10, 2
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 1, d, generator=g)
    k = torch.randn(1, 1, 6, d, generator=g)
    counts = torch.zeros(6)
    trials = 1500
    for seed in range(trials):
        proj = layer_projection(seed, 0, 1, d, K, L)
        counts += candidate_mask(hash_codes(q, proj[0], K), hash_codes(k, proj, K), m)[0, 0].float()
    cos = (k[0, 0] @ q[0, 0]) / (k[0, 0].norm(dim=-1) * q[0, 0].norm())
    u = collision_probability(cos.double(), K, L, m).float()
    assert torch.all((counts / trials - u).abs() < 5 * torch.sqrt(u * (1 - u) / trials) + 1e-3)


@pytest.mark.parametrize("call, match", [
    (lambda q, k, v: dense_attention(q[0], k, v), r"q: expected shape \[B, Hq, d\]"),
    (lambda q, k, v: dense_attention(q, k[0], v), r"k: expected shape \[B, Hkv, n, d\]"),
    (lambda q, k, v: dense_attention(q, k, v[:, :, :3]), "v: expected the shape of k"),
    (lambda q, k, v: dense_attention(q[:, :5], k, v), "multiple"),
    (lambda q, k, v: dense_attention(q[..., :8], k, v), "d=8"),
    (lambda q, k, v: dense_attention(q, k, v, mask=torch.ones(2, 6, 49, dtype=torch.bool)), "mask"),
    (lambda q, k, v: dense_attention(q, k, v, mask=torch.ones(2, 6, 50)), "torch.bool"),
    (lambda q, k, v: dense_attention(q.long(), k, v), "floating-point"),
])
def test_bad_inputs_raise_clear_errors(call, match):
    q, k, v = _qkv()
    with pytest.raises((ValueError, TypeError), match=match):
        call(q, k, v)
