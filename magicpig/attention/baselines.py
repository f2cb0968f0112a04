"""The baselines of DESIGN.md §3 as :class:`MiddleAttention` implementations (torch path).

Every method here holds the (centred) middle K/V of one layer in torch tensors and answers a
decode query with ``(out, lse, num_read)`` over the middle keys it chose; the runtime merges
that with the exact sinks + window part by log-sum-exp. They run on the torch reference path
(:func:`magicpig.attention.reference.dense_attention` with a mask), which is what an
evaluation needs: the same prefilled state, a different choice of keys.

Budget convention (topk, quest, oracle_sampling, retrieval): a middle of ``n > 0`` keys gets
``budget_keys(n, budget) = min(n, max(1, round(budget * n)))`` keys, so a method never
reads nothing from a non-empty middle (a budget rounding to 0 keys still reads 1). An empty
middle gives ``out = 0, lse = -inf, num_read = 0`` for every method.

``num_read`` counts middle tokens whose K/V were read. Quest's page metadata (a min and a
max key vector per 16-token page, i.e. 2/16 of the key bytes) and retrieval's index
traversal are not counted, as in the MagicPIG paper's cost axis; they are index overhead.
"""

from __future__ import annotations

import math

import torch

from magicpig.attention.base import MiddleAttention
from magicpig.attention.reference import dense_attention
from magicpig.config import MagicPIGConfig, check_int

QUEST_PAGE_SIZE = 16
# Below this many middle keys the retrieval baseline searches exactly: an ANN graph over a
# handful of vectors is pure overhead and HNSW recall is poorest on tiny graphs.
RETRIEVAL_EXACT_BELOW = 1024
# HNSW graph degree and build beam: M=16, efConstruction=40 builds an 8k x 64 index in ~0.3 s
# on one core with ~98% recall@3% on Gaussian keys (M=32 took 4x longer for +1%).
HNSW_NEIGHBOURS = 16
HNSW_BUILD_BEAM = 40


def budget_keys(n: int, budget: float) -> int:
    """Number of middle keys a budgeted method reads out of ``n`` (see the module doc)."""
    if n <= 0:
        return 0
    return min(n, max(1, int(math.floor(budget * n + 0.5))))


def _kv_head_of(num_q_heads: int, num_kv_heads: int) -> torch.Tensor:
    """[Hq] int64: the KV head each query head reads (GQA: h // (Hq // Hkv)); Hq is checked by
    :meth:`MiddleAttention.check_queries`."""
    return torch.arange(num_q_heads) // (num_q_heads // num_kv_heads)


def _masked_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of q [Hq, d] over k, v [Hkv, n, d] restricted to mask [Hq, n]."""
    out, lse = dense_attention(
        q[None], k[None], v[None], mask=None if mask is None else mask[None]
    )
    return out[0], lse[0]


class _TorchMiddle(MiddleAttention):
    """Shared storage: per sequence, middle keys and values [Hkv, n, d] in float32."""

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._next_id = 0

    def add_sequence(self) -> int:
        seq_id = self._next_id
        self._next_id += 1
        self._keys[seq_id] = torch.zeros(self.num_kv_heads, 0, self.head_dim)
        self._values[seq_id] = torch.zeros(self.num_kv_heads, 0, self.head_dim)
        return seq_id

    def _check_seq(self, seq_id: int) -> None:
        if seq_id not in self._keys:
            raise KeyError(f"seq_id={seq_id!r} is not a registered sequence of this layer")

    def remove_sequence(self, seq_id: int) -> None:
        self._check_seq(seq_id)
        del self._keys[seq_id]
        del self._values[seq_id]

    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._check_seq(seq_id)
        self.check_kv(keys, values)
        k = keys.detach().to("cpu", torch.float32)
        v = values.detach().to("cpu", torch.float32)
        self._keys[seq_id] = torch.cat([self._keys[seq_id], k], dim=1)
        self._values[seq_id] = torch.cat([self._values[seq_id], v], dim=1)

    def length(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._keys[seq_id].shape[1]

    def fork(self, seq_id: int, tokens: int) -> int:
        """A new sequence with a copy of the first ``tokens`` keys and values (a copy, not a view:
        a view would keep the source's whole tensors alive after its removal). Per-sequence
        caches (Quest's pages, retrieval's indexes) are keyed by id, so the fork builds its own."""
        tokens = check_int("tokens", tokens, 0, self.length(seq_id))
        new = self.add_sequence()
        self._keys[new] = self._keys[seq_id][:, :tokens].clone()
        self._values[new] = self._values[seq_id][:, :tokens].clone()
        return new

    def read(self, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of tokens [start, end) as held (float32), copied."""
        start = check_int("start", start, 0)
        end = check_int("end", end, start, self.length(seq_id))
        return self._keys[seq_id][:, start:end].clone(), self._values[seq_id][:, start:end].clone()

    def nbytes(self, seq_id: int | None = None) -> int:
        ids = list(self._keys) if seq_id is None else [seq_id]
        return sum(self._keys[i].nbytes + self._values[i].nbytes for i in ids)

    def attend(
        self, seq_ids: list[int], queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        self.check_queries(seq_ids, queries)
        device = queries.device
        hq = queries.shape[1]
        kv_of = _kv_head_of(hq, self.num_kv_heads)
        outs, lses, reads = [], [], []
        for b, seq_id in enumerate(seq_ids):
            self._check_seq(seq_id)
            q = queries[b].detach().to("cpu", torch.float32)
            n = self._keys[seq_id].shape[1]
            if n == 0:
                out = torch.zeros(hq, self.head_dim)
                lse = torch.full((hq,), float("-inf"))
                read = torch.zeros(hq, dtype=torch.int32)
            else:
                out, lse, read = self._attend_one(seq_id, q, kv_of)
            outs.append(out)
            lses.append(lse)
            reads.append(read.to(torch.int32))
        return (
            torch.stack(outs).to(device),
            torch.stack(lses).to(device),
            torch.stack(reads).to(device),
        )

    def _attend_one(
        self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One sequence with a non-empty middle: q [Hq, d] -> out [Hq, d], lse [Hq], read [Hq]."""
        mask = self._choose(seq_id, q, kv_of)
        out, lse = _masked_attention(q, self._keys[seq_id], self._values[seq_id], mask)
        return out, lse, mask.sum(-1)

    def _choose(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        """bool [Hq, n]: the middle keys each query head reads."""
        raise NotImplementedError

    def _scores(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        """[Hq, n] float32: q . k for each query head against its KV head's keys."""
        keys = self._keys[seq_id]
        hkv, n, d = keys.shape
        # Query heads of a GQA group are consecutive: score them as [Hkv, G, d] x [Hkv, n, d]
        # rather than gathering a copy of the keys per query head.
        return torch.einsum("hgd,hnd->hgn", q.reshape(hkv, -1, d), keys).reshape(q.shape[0], n)


class DenseMiddle(_TorchMiddle):
    """Exact attention over every middle key (the reference the others are measured against)."""

    def _choose(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        return torch.ones(q.shape[0], self._keys[seq_id].shape[1], dtype=torch.bool)


def _top_mask(scores: torch.Tensor, count: int) -> torch.Tensor:
    """bool like scores [H, n]: True at the ``count`` largest entries of each row."""
    idx = torch.topk(scores, count, dim=-1).indices
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask.scatter_(-1, idx, True)
    return mask


class TopKMiddle(_TorchMiddle):
    """Exact top-k keys by q . k per query head, k = budget_keys(n, config.budget)."""

    def _choose(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        scores = self._scores(seq_id, q, kv_of)
        return _top_mask(scores, budget_keys(scores.shape[1], self.config.budget))


def quest_page_bounds(q: torch.Tensor, keys: torch.Tensor, page_size: int = QUEST_PAGE_SIZE) -> torch.Tensor:
    """Quest's upper bound of q . k over each page.

    q: [H, d] float32; keys: [H, n, d] float32 (the KV head of each query head, already
    gathered). Pages are consecutive runs of ``page_size`` tokens (the last may be shorter).
    Returns [H, ceil(n / page_size)]: sum_j max(q_j * min_j, q_j * max_j) with min/max taken
    per channel over the page, which is >= q . k for every key k of the page.
    """
    kmin, kmax = page_min_max(keys, page_size)
    return _bounds_from_min_max(q, kmin, kmax)


def page_min_max(keys: torch.Tensor, page_size: int = QUEST_PAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel min and max key of each page: keys [H, n, d] -> two [H, ceil(n/page), d]."""
    h, n, d = keys.shape
    pages = -(-n // page_size)
    pad = pages * page_size - n
    # Pad by repeating the page's last key so padding never widens a page's [min, max].
    if pad:
        keys = torch.cat([keys, keys[:, -1:, :].expand(h, pad, d)], dim=1)
    paged = keys.reshape(h, pages, page_size, d)
    return paged.amin(dim=2), paged.amax(dim=2)


def _bounds_from_min_max(q: torch.Tensor, kmin: torch.Tensor, kmax: torch.Tensor) -> torch.Tensor:
    qe = q[:, None, :]
    return torch.maximum(qe * kmin, qe * kmax).sum(-1)


class QuestMiddle(_TorchMiddle):
    """Quest: 16-token pages ranked by their key min/max upper bound; top pages fill the budget.

    The number of pages read is max(1, round(budget_keys / 16)); num_read counts the tokens of
    the chosen pages (a short last page counts its real length).
    """

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        # Page metadata per sequence, (length it covers, min, max); rebuilt after appends.
        self._pages: dict[int, tuple[int, torch.Tensor, torch.Tensor]] = {}

    def remove_sequence(self, seq_id: int) -> None:
        super().remove_sequence(seq_id)
        self._pages.pop(seq_id, None)

    def _choose(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        n = self._keys[seq_id].shape[1]
        cached = self._pages.get(seq_id)
        if cached is None or cached[0] != n:
            cached = (n, *page_min_max(self._keys[seq_id]))
            self._pages[seq_id] = cached
        bounds = _bounds_from_min_max(q, cached[1][kv_of], cached[2][kv_of])
        pages = bounds.shape[1]
        want = min(pages, max(1, int(math.floor(budget_keys(n, self.config.budget) / QUEST_PAGE_SIZE + 0.5))))
        page_mask = _top_mask(bounds, want)
        return page_mask.repeat_interleave(QUEST_PAGE_SIZE, dim=1)[:, :n]


class OracleSamplingMiddle(_TorchMiddle):
    """Sampling from the true attention distribution (the theoretical bound of sampling).

    Draws ``budget_keys(n, budget)`` indices i.i.d. with replacement from p = softmax(q.k/sqrt(d))
    and returns out = (1/B) sum_b v_{i_b}, the plain Monte-Carlo estimate, which is *unbiased*
    for sum_i p_i v_i (no self-normalisation is needed because the sampler knows p exactly).
    The lse returned is the exact middle log-sum-exp (an oracle quantity), so the merge with
    the sinks + window weights the middle exactly. num_read is the number of distinct keys
    drawn. Draws come from a generator seeded by (config.seed, layer), so runs repeat.
    """

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self._gen = torch.Generator().manual_seed(config.seed * 1_000_003 + layer)

    def _attend_one(
        self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self._scores(seq_id, q, kv_of) / math.sqrt(self.head_dim)
        lse = torch.logsumexp(logits, dim=-1)
        probs = torch.softmax(logits, dim=-1)
        draws = budget_keys(logits.shape[1], self.config.budget)
        idx = torch.multinomial(probs, draws, replacement=True, generator=self._gen)
        counts = torch.zeros_like(probs)
        counts.scatter_add_(-1, idx, torch.ones_like(idx, dtype=counts.dtype))
        values = self._values[seq_id]
        hkv, n, d = values.shape
        weights = (counts / draws).view(hkv, -1, n)
        out = torch.einsum("hgn,hnd->hgd", weights, values).reshape(-1, d)
        return out, lse, (counts > 0).sum(-1)


class StreamingMiddle(_TorchMiddle):
    """StreamingLLM: sinks + window only, so the middle contributes nothing (lse = -inf).

    Only the middle length is tracked; no K/V is kept: fork works (a length), read raises
    NotImplementedError.
    """

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self._lengths: dict[int, int] = {}

    def add_sequence(self) -> int:
        seq_id = super().add_sequence()
        self._lengths[seq_id] = 0
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        super().remove_sequence(seq_id)
        del self._lengths[seq_id]

    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        self._check_seq(seq_id)
        self.check_kv(keys, values)
        self._lengths[seq_id] += keys.shape[1]

    def length(self, seq_id: int) -> int:
        self._check_seq(seq_id)
        return self._lengths[seq_id]

    def fork(self, seq_id: int, tokens: int) -> int:
        """A new sequence of ``tokens`` middle tokens (only the length is tracked)."""
        new = super().fork(seq_id, tokens)  # checks tokens; copies the (empty) K/V
        self._lengths[new] = int(tokens)
        return new

    def read(self, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Not served: StreamingLLM keeps no middle K/V (NotImplementedError)."""
        self._check_seq(seq_id)
        raise NotImplementedError("StreamingMiddle.read: streaming keeps no middle K/V to read back")

    def _attend_one(
        self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hq = q.shape[0]
        return (
            torch.zeros(hq, self.head_dim),
            torch.full((hq,), float("-inf")),
            torch.zeros(hq, dtype=torch.int32),
        )

    def attend(self, seq_ids: list[int], queries: torch.Tensor):
        # The stored key tensors stay empty; answer from the tracked lengths instead.
        for seq_id in seq_ids:
            self._check_seq(seq_id)
        self.check_queries(seq_ids, queries)
        b, hq = queries.shape[0], queries.shape[1]
        dev = queries.device
        return (
            torch.zeros(b, hq, self.head_dim, device=dev),
            torch.full((b, hq), float("-inf"), device=dev),
            torch.zeros(b, hq, dtype=torch.int32, device=dev),
        )


class RetrievalMiddle(_TorchMiddle):
    """RetrievalAttention-style approximate top-k from a faiss inner-product index.

    One ``faiss.IndexHNSWFlat(d, 16, METRIC_INNER_PRODUCT)`` per (sequence, KV head), built
    at the first attend and extended with keys appended since (HNSW needs no training). The query
    heads of a GQA group search their KV head's index for budget_keys(n, budget) neighbours
    (efSearch = max(64, 2k)); attention is then exact over the keys found. A middle of fewer
    than RETRIEVAL_EXACT_BELOW keys is searched exactly (torch top-k).
    """

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self._indexes: dict[int, list] = {}

    def remove_sequence(self, seq_id: int) -> None:
        super().remove_sequence(seq_id)
        self._indexes.pop(seq_id, None)

    def _index_for(self, seq_id: int) -> list:
        """The per-KV-head HNSW indexes of a sequence, built (or extended) up to its length."""
        import faiss

        idx = self._indexes.get(seq_id)
        if idx is None:
            idx = []
            for _ in range(self.num_kv_heads):
                index = faiss.IndexHNSWFlat(self.head_dim, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
                index.hnsw.efConstruction = HNSW_BUILD_BEAM
                idx.append(index)
            self._indexes[seq_id] = idx
        keys = self._keys[seq_id]
        have = idx[0].ntotal
        if have < keys.shape[1]:
            for h in range(self.num_kv_heads):
                idx[h].add(keys[h, have:].contiguous().numpy())
        return idx

    def _choose(self, seq_id: int, q: torch.Tensor, kv_of: torch.Tensor) -> torch.Tensor:
        n = self._keys[seq_id].shape[1]
        count = budget_keys(n, self.config.budget)
        if n < RETRIEVAL_EXACT_BELOW:
            return _top_mask(self._scores(seq_id, q, kv_of), count)
        indexes = self._index_for(seq_id)
        mask = torch.zeros(q.shape[0], n, dtype=torch.bool)
        for kv in range(self.num_kv_heads):
            heads = (kv_of == kv).nonzero().flatten()
            index = indexes[kv]
            index.hnsw.efSearch = max(64, 2 * count)
            _, found = index.search(q[heads].contiguous().numpy(), count)
            found_t = torch.from_numpy(found).long()
            valid = found_t >= 0  # faiss pads with -1 when fewer are reachable
            for row, head in enumerate(heads.tolist()):
                mask[head, found_t[row][valid[row]]] = True
        return mask
