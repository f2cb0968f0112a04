"""Pick the LSH parameters ``(K, L)`` that give a target computation cost.

Users think in budgets ("read 2% of the keys"), the sampler in ``(K, L)``. A key at cosine
``c`` from the query becomes a candidate with probability
``P[Binomial(L, p(c)) >= m]``, ``p(c) = (1 - arccos(c)/pi)^K`` (DESIGN.md §2), so on a
calibration sample of (query, key) cosines the expected candidate fraction of a ``(K, L)`` is
the mean of that probability: :func:`predicted_cost`. It grows with ``L`` and shrinks with
``K`` and ``m``. :func:`kl_options` finds, for each ``(K, m)`` in a range, the smallest ``L``
that reaches the target; :func:`choose_kl` returns the option whose candidate probability is
highest on the keys that matter (the most query-aligned ``top_fraction`` of the calibration
pairs), i.e. the sharpest selection curve at that cost. More tables with a higher collision
threshold sharpen the curve (as ``L`` grows with ``m / L`` fixed it tends to a step, a top-k by
angle) at the price of index memory and hashing, which ``max_tables`` bounds. On SmolLM2 this
matters: at ~3% cost, K=10, L=150, m=2 raised the NLL of dense's RULER answers 15x more
than K=10, L=400, m=4 (docs/RESULTS.md).
The cosines must be between queries and *centred* keys, as the store hashes them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import torch

from magicpig.config import MAX_K, MAX_L
from magicpig.lsh import collision_probability

HISTOGRAM_BINS = 1001  # cosines are binned on [-1, 1] in steps of 0.002


@dataclass(frozen=True)
class KLChoice:
    K: int
    L: int
    predicted_cost: float
    min_collisions: int = 2
    recall: float = float("nan")  # predicted candidate probability of the top keys (choose_kl)


def calibration_cosines(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Cosines of every (query, key) pair of one head: queries [Nq, d], keys [Nk, d] -> [Nq*Nk].

    Keys should be centred (minus the mean of the middle keys) as the store hashes them.
    """
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(
            f"queries {tuple(queries.shape)} and keys {tuple(keys.shape)}: expected [Nq, d] and [Nk, d]"
        )
    q = torch.nn.functional.normalize(queries.double(), dim=-1)
    k = torch.nn.functional.normalize(keys.double(), dim=-1)
    return (q @ k.T).flatten()


def _histogram(cosines: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(bin centres, weights summing to 1) of the cosines on [-1, 1]."""
    c = torch.as_tensor(cosines, dtype=torch.float64).flatten().clamp(-1, 1)
    if c.numel() == 0:
        raise ValueError("cosines: expected a non-empty calibration sample")
    idx = torch.round((c + 1) / 2 * (HISTOGRAM_BINS - 1)).long()
    weights = torch.bincount(idx, minlength=HISTOGRAM_BINS).double() / c.numel()
    centres = torch.linspace(-1, 1, HISTOGRAM_BINS, dtype=torch.float64)
    keep = weights > 0
    return centres[keep], weights[keep]


def predicted_cost(cosines: torch.Tensor, K: int, L: int, min_collisions: int = 2) -> float:
    """Expected fraction of keys that become candidates, over the calibration cosines."""
    centres, weights = _histogram(cosines)
    return float((collision_probability(centres, K, L, min_collisions) * weights).sum())


def _smallest_l(centres: torch.Tensor, weights: torch.Tensor, K: int, target: float,
                min_collisions: int, max_tables: int) -> int | None:
    def cost(L: int) -> float:
        return float((collision_probability(centres, K, L, min_collisions) * weights).sum())

    # Exponential then binary search: evaluating a large L costs O(L) per bin, so never probe
    # far above the answer.
    if cost(min_collisions) >= target:
        return min_collisions
    lo, hi = min_collisions, min_collisions
    while True:
        hi = min(2 * hi, max_tables)
        if cost(hi) >= target:
            break
        if hi == max_tables:
            return None
        lo = hi
    while hi - lo > 1:  # cost(lo) < target <= cost(hi)
        mid = (lo + hi) // 2
        if cost(mid) >= target:
            hi = mid
        else:
            lo = mid
    return hi


def _as_range(value: int | tuple[int, int]) -> tuple[int, int]:
    lo, hi = (value, value) if isinstance(value, int) else tuple(value)
    return int(lo), int(hi)


def kl_options(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
               min_collisions: int | tuple[int, int] = 2, max_tables: int = MAX_L) -> list[KLChoice]:
    """For each K in K_range and each collision threshold in ``min_collisions`` (an int or an
    inclusive (lo, hi) range), the smallest L with predicted cost >= target_cost (options
    needing more than ``max_tables`` tables are left out)."""
    if not 0 < target_cost < 1:
        raise ValueError(f"target_cost={target_cost!r}: expected a fraction in (0, 1)")
    k_lo, k_hi = K_range
    if not 1 <= k_lo <= k_hi <= MAX_K:
        raise ValueError(f"K_range={K_range!r}: expected 1 <= K_min <= K_max <= {MAX_K}")
    m_lo, m_hi = _as_range(min_collisions)
    if not 1 <= m_lo <= m_hi:
        raise ValueError(f"min_collisions={min_collisions!r}: expected an integer >= 1 or a range lo <= hi")
    if not m_lo <= max_tables <= MAX_L:
        raise ValueError(f"max_tables={max_tables!r}: expected an integer in [{m_lo}, {MAX_L}]")
    centres, weights = _histogram(cosines)
    out = []
    for K in range(k_lo, k_hi + 1):
        for m in range(m_lo, min(m_hi, max_tables) + 1):
            L = _smallest_l(centres, weights, K, target_cost, m, max_tables)
            if L is not None:
                cost = float((collision_probability(centres, K, L, m) * weights).sum())
                out.append(KLChoice(K, L, cost, m))
    return out


def top_recall(cosines: torch.Tensor, K: int, L: int, min_collisions: int, top_fraction: float) -> float:
    """Mean candidate probability of the ``top_fraction`` most query-aligned calibration pairs."""
    c = torch.as_tensor(cosines, dtype=torch.float64).flatten().clamp(-1, 1)
    top = c.topk(max(1, int(round(top_fraction * c.numel())))).values
    return float(collision_probability(top, K, L, min_collisions).mean())


def ranked_options(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
                   min_collisions: int | tuple[int, int] = 2, max_tables: int = 300,
                   top_fraction: float | None = None) -> list[KLChoice]:
    """The options of :func:`kl_options`, each with its :func:`top_recall` over the
    ``top_fraction`` (default ``target_cost / 4``) highest cosines, best first (fewer tables
    breaking ties). Raises ValueError when no option fits ``max_tables``."""
    top = target_cost / 4 if top_fraction is None else top_fraction
    if not 0 < top <= 1:
        raise ValueError(f"top_fraction={top_fraction!r}: expected a fraction in (0, 1]")
    options = kl_options(cosines, target_cost, K_range, min_collisions, max_tables)
    if not options:
        raise ValueError(
            f"no K in {K_range} reaches cost {target_cost} with at most {max_tables} tables; "
            "raise max_tables or lower K_range"
        )
    scored = [replace(o, recall=top_recall(cosines, o.K, o.L, o.min_collisions, top)) for o in options]
    return sorted(scored, key=lambda o: (-round(o.recall, 6), o.L))


def choose_kl(cosines: torch.Tensor, target_cost: float, K_range: tuple[int, int] = (4, 16),
              min_collisions: int | tuple[int, int] = 2, max_tables: int = 300,
              top_fraction: float | None = None) -> KLChoice:
    """The option that reads the keys that matter most reliably: the first of
    :func:`ranked_options`. Raises ValueError when no option fits ``max_tables``."""
    return ranked_options(cosines, target_cost, K_range, min_collisions, max_tables, top_fraction)[0]


# ----------------------------------------------------------------------------- calibration on a model


def model_cosines(model: Any, token_ids: list[int], steps: int = 8, max_pairs: int = 2_000_000,
                  seed: int = 0) -> torch.Tensor:
    """Cosines between real decode queries and the centred middle keys of a model.

    Prefills ``token_ids`` with ``model`` (a :class:`magicpig.LongContextModel`), decodes
    ``steps`` greedy tokens with exact attention while recording, in every sparse layer, the
    queries each head sends and the centred middle keys it was given; returns the cosines of
    (query head, its KV head's keys) pairs, subsampled to at most ``max_pairs``.
    """
    from magicpig.attention import baselines

    records: list[torch.Tensor] = []

    class _Recorder(baselines.DenseMiddle):
        """Exact attention that also keeps the cosines of the queries it answers."""

        def _attend_one(self, seq_id, q, kv_of):
            keys = torch.nn.functional.normalize(self._keys[seq_id], dim=-1)
            qn = torch.nn.functional.normalize(q, dim=-1)
            hkv, n, d = keys.shape
            records.append(torch.einsum("hgd,hnd->hgn", qn.view(hkv, -1, d), keys).flatten())
            return super()._attend_one(seq_id, q, kv_of)

    # A sparse config (so layers are offloaded with centred keys, as the store sees them)
    # whose middle attention, for this session only, is the exact recorder.
    cfg = model.config.replace(method="topk", budget=1.0)
    state = model.prefill([list(token_ids)], progress=False)
    with model.decode_session(state, cfg, steps, method_factory=_Recorder) as session:
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            tokens = session.step(tokens).argmax(-1)
    if not records:
        raise ValueError("no middle keys were attended: the prompt is shorter than sinks + window")
    cos = torch.cat(records)
    if cos.numel() > max_pairs:
        g = torch.Generator().manual_seed(seed)
        cos = cos[torch.randperm(cos.numel(), generator=g)[:max_pairs]]
    return cos
