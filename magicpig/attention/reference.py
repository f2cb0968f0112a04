"""Exact torch reference of attention, the LSH-sampled estimator and the LSE merge.

This is the oracle every fast path (C++ store, numba, Triton) is tested against. All math is
float32 (float64 for the collision probabilities) on whatever device the inputs are on.
Shapes: q [B, Hq, d]; k, v [B, Hkv, n, d]; query head h reads KV head h // (Hq // Hkv).
"""

from __future__ import annotations

import math
from typing import Optional

import torch

from magicpig.lsh import LOG_U_FLOOR, log_collision_probability

_CHUNK = 8192  # tokens per chunk when comparing codes, to bound memory at [B, Hq, chunk, L]


def _check_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[int, int, int, int, int]:
    if q.dim() != 3:
        raise ValueError(f"q: expected shape [B, Hq, d], got {tuple(q.shape)}")
    if k.dim() != 4:
        raise ValueError(f"k: expected shape [B, Hkv, n, d], got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    B, Hq, d = q.shape
    if k.shape[0] != B or k.shape[3] != d:
        raise ValueError(f"k: expected [B={B}, Hkv, n, d={d}], got {tuple(k.shape)}")
    Hkv, n = k.shape[1], k.shape[2]
    if Hkv == 0 or Hq % Hkv != 0:
        raise ValueError(f"q heads Hq={Hq} must be a multiple of k heads Hkv={Hkv}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not t.is_floating_point():
            raise TypeError(f"{name}: expected a floating-point tensor, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name}: expected device {q.device}, got {t.device}")
    return B, Hq, Hkv, n, d


def _scores(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """q.k / sqrt(d) in float32: [B, Hq, n]."""
    B, Hq, d = q.shape
    Hkv, n = k.shape[1], k.shape[2]
    qg = q.float().view(B, Hkv, Hq // Hkv, d)
    return torch.einsum("bhgd,bhnd->bhgn", qg, k.float()).reshape(B, Hq, n) / math.sqrt(d)


def _check_per_key(name: str, t: Optional[torch.Tensor], shape: tuple[int, ...], device: torch.device) -> None:
    if t is None:
        return
    if tuple(t.shape) != shape:
        raise ValueError(f"{name}: expected shape {list(shape)} ([B, Hq, n]), got {list(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name}: expected device {device}, got {t.device}")


def attention_from_scores(
    scores: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scores) @ v over the keys in ``mask``.

    scores: float32 [B, Hq, n]; v [B, Hkv, n, d]; mask bool [B, Hq, n] or None.
    Returns out float32 [B, Hq, d] and lse float32 [B, Hq]; out = 0, lse = -inf where no key is
    selected.
    """
    B, Hq, n = scores.shape
    Hkv, d = v.shape[1], v.shape[3]
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1) if n > 0 else scores.new_full((B, Hq), float("-inf"))
    finite = torch.isfinite(lse)
    probs = torch.exp(scores - torch.where(finite, lse, torch.zeros_like(lse)).unsqueeze(-1))
    out = torch.einsum("bhgn,bhnd->bhgd", probs.view(B, Hkv, Hq // Hkv, n), v.float()).reshape(B, Hq, d)
    return out.masked_fill(~finite.unsqueeze(-1), 0.0), lse


def dense_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of one query per head with scale 1/sqrt(d), returning (out, lse).

    q [B, Hq, d]; k, v [B, Hkv, n, d]; mask bool [B, Hq, n] keeps keys (None = all);
    bias [B, Hq, n] is added to the scores. out float32 [B, Hq, d]; lse float32 [B, Hq]
    (natural log); out = 0 and lse = -inf when no key is kept.
    """
    B, Hq, _, n, _ = _check_qkv(q, k, v)
    _check_per_key("mask", mask, (B, Hq, n), q.device)
    _check_per_key("bias", bias, (B, Hq, n), q.device)
    if mask is not None and mask.dtype != torch.bool:
        raise TypeError(f"mask: expected dtype torch.bool, got {mask.dtype}")
    scores = _scores(q, k)
    if bias is not None:
        scores = scores + bias.float()
    return attention_from_scores(scores, v, mask)


def candidate_mask(query_codes: torch.Tensor, key_codes: torch.Tensor, min_collisions: int) -> torch.Tensor:
    """Keys colliding with the query in at least ``min_collisions`` tables.

    query_codes [B, Hq, L]; key_codes [B, Hkv, n, L] (integer). Returns bool [B, Hq, n].
    """
    if query_codes.dim() != 3 or key_codes.dim() != 4:
        raise ValueError(
            f"query_codes [B, Hq, L] and key_codes [B, Hkv, n, L] expected, got "
            f"{tuple(query_codes.shape)} and {tuple(key_codes.shape)}"
        )
    B, Hq, L = query_codes.shape
    Hkv, n = key_codes.shape[1], key_codes.shape[2]
    if key_codes.shape[0] != B or key_codes.shape[3] != L or Hkv == 0 or Hq % Hkv:
        raise ValueError(
            f"key_codes: expected [B={B}, Hkv dividing Hq={Hq}, n, L={L}], got {tuple(key_codes.shape)}"
        )
    if not 1 <= min_collisions <= L:
        raise ValueError(f"min_collisions={min_collisions}: expected an integer in [1, L={L}]")
    qc = query_codes.view(B, Hkv, Hq // Hkv, 1, L)
    chunks = []
    for start in range(0, n, _CHUNK):
        kc = key_codes[:, :, start : start + _CHUNK].unsqueeze(2)
        chunks.append((qc == kc).sum(-1) >= min_collisions)
    if not chunks:
        return torch.zeros(B, Hq, 0, dtype=torch.bool, device=query_codes.device)
    return torch.cat(chunks, dim=-1).reshape(B, Hq, n)


def cosine_similarity(q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """cos(q_h, k_i) for every query head and key: float32 [B, Hq, n]; 0 where a norm is 0."""
    B, Hq, d = q.shape
    Hkv = k.shape[1]
    dots = _scores(q, k) * math.sqrt(d)
    qn = q.float().norm(dim=-1).view(B, Hkv, Hq // Hkv, 1)
    kn = k.float().norm(dim=-1).unsqueeze(2)
    denom = (qn * kn).reshape(B, Hq, -1)
    return torch.where(denom > 0, dots / denom.clamp_min(1e-30), torch.zeros_like(dots)).clamp(-1.0, 1.0)


def sampled_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    K: int,
    L: int,
    min_collisions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LSH importance-sampling estimate of attention over the candidate keys in ``mask``.

    Score of candidate i: q.k_i/sqrt(d) - log u_i, where u_i = P[Binomial(L, p_i) >= m],
    p_i = (1 - arccos(cos_i)/pi)^K is its sampling probability (log u_i floored at
    LOG_U_FLOOR). Returns (out [B, Hq, d] float32, lse [B, Hq] float32); out = 0, lse = -inf
    where there is no candidate.
    """
    B, Hq, _, n, _ = _check_qkv(q, k, v)
    _check_per_key("mask", mask, (B, Hq, n), q.device)
    bias = torch.zeros(B, Hq, n, dtype=torch.float32, device=q.device)
    idx = mask.nonzero(as_tuple=True)
    if idx[0].numel():
        cos = cosine_similarity(q, k)[idx]
        log_u = log_collision_probability(cos, K, L, min_collisions).clamp_min(LOG_U_FLOOR)
        bias[idx] = (-log_u).float()
    return dense_attention(q, k, v, mask=mask, bias=bias)


def top_candidates(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, count: int) -> torch.Tensor:
    """The ``count`` candidates in ``mask`` with the highest score q.k/sqrt(d), per query head.

    q [B, Hq, d]; k [B, Hkv, n, d]; mask bool [B, Hq, n]. Returns bool [B, Hq, n], a subset of
    ``mask`` (all of it where it holds <= count keys). Ties go to the earlier position, as in
    the stores, which visit candidates in position order.
    """
    B, Hq, _, n, _ = _check_qkv(q, k, k)
    _check_per_key("mask", mask, (B, Hq, n), q.device)
    if count < 0:
        raise ValueError(f"count={count}: expected an integer >= 0")
    scores = _scores(q, k).masked_fill(~mask, float("-inf"))
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :count]
    head = torch.zeros_like(mask)
    head.scatter_(-1, order, True)
    return head & mask


def carried_head(
    q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, last_head: torch.Tensor, count: int
) -> torch.Tensor:
    """The exact head with ``MagicPIGConfig.carry_head``: the ``count`` keys of highest
    q.k/sqrt(d) among this step's candidates ``mask`` and the last step's head ``last_head``
    (read whether or not the hashes find them again); ties to the earlier position.

    q [B, Hq, d]; k [B, Hkv, n, d]; mask, last_head bool [B, Hq, n]. Returns bool [B, Hq, n],
    the head to pass to :func:`hybrid_attention` (and to carry into the next step).
    """
    _check_per_key("last_head", last_head, tuple(mask.shape), q.device)
    return top_candidates(q, k, mask | last_head, count)


def hybrid_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor,
    head: torch.Tensor,
    K: int,
    L: int,
    min_collisions: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention over the ``head`` keys merged by log-sum-exp with the importance-weighted
    sample of the other candidates (``mask & ~head``).

    The merge is one softmax in which a head key weighs exp(s_i) and a sampled key exp(s_i)/u_i,
    so for a ``head`` fixed before the keys are hashed, the numerator and the denominator are
    the exact sums over the head plus unbiased (Horvitz-Thompson) estimates of the sums over
    the rest. ``head`` may hold keys that are not candidates; with every key in it this is dense
    attention. q [B, Hq, d]; k, v [B, Hkv, n, d]; mask, head bool [B, Hq, n]. Returns (out
    [B, Hq, d] float32, lse [B, Hq] float32); out = 0, lse = -inf where neither set has a key.
    """
    B, Hq, _, n, _ = _check_qkv(q, k, v)
    _check_per_key("head", head, (B, Hq, n), q.device)
    tail = mask & ~head
    exact = dense_attention(q, k, v, mask=head)
    sampled = sampled_attention(q, k, v, tail, K, L, min_collisions)
    return merge_by_lse(*exact, *sampled)


def merge_by_lse(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attentions over disjoint key sets.

    out_*: [..., d]; lse_*: [...]. Returns (out, lse) as if one softmax ran over both sets;
    a side with lse = -inf contributes nothing, and both -inf gives out = 0, lse = -inf.
    """
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(
            f"merge_by_lse: expected out [..., d] and lse [...] of equal shapes, got "
            f"{tuple(out_a.shape)}, {tuple(lse_a.shape)}, {tuple(out_b.shape)}, {tuple(lse_b.shape)}"
        )
    lse_a, lse_b = lse_a.float(), lse_b.float()
    lse = torch.logaddexp(lse_a, lse_b)
    safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return w_a * out_a.float() + w_b * out_b.float(), lse
