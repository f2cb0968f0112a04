"""The numba backend of CPUStore: the same algorithm as the C++ one, written simply.

Used when the extension is not built or with ``backend="numba"``; tested equal to the C++
backend. Per (sequence, KV head) it keeps K/V upcast to fp32 after rounding to the store dtype
(so the numbers are the ones the C++ backend reads), fp32 key norms, the raw codes, and per table
a CSR of bucket lists over the low min(K, 12) code bits (int32 ids; the full code is compared
through the kept codes). Tokens appended since the last CSR build form a tail scanned directly;
the CSR is rebuilt when the tail reaches TAIL_MERGE tokens. Scores and weights are computed in
float64 with the same interpolated log-u table as the C++ kernels.
"""

from __future__ import annotations

import math

import numba
import numpy as np
import torch

from magicpig.config import check_carry_head

TAIL_MERGE = 256
BLOCK_TOKENS = 65535  # the C++ store's block (kBlockTokens): its exact head keeps the best per block
MAX_LOW_BITS = 12  # as LOW_BITS of cpu_store and kMaxLowBits of the C++ store
_TORCH_DTYPE = {0: torch.bfloat16, 1: torch.float16, 2: torch.float32}


@numba.njit(cache=True)
def _log_u(t, table, t_lo, inv_h, floor):
    points = table.size // 2
    u = (t - t_lo) * inv_h
    if u < 0.0:
        return floor
    uc = min(u, points - 1.0)
    i = min(int(uc), points - 2)
    f = uc - i
    g = 1.0 - f
    h = (
        (1.0 + 2.0 * f) * g * g * table[2 * i]
        + f * g * g * table[2 * i + 1]
        + f * f * (3.0 - 2.0 * f) * table[2 * i + 2]
        - f * f * g * table[2 * i + 3]
    )
    return max(h, floor)


@numba.njit(cache=True, parallel=True)
def _build_csr(codes, n, low_bits, offsets, ids):
    """codes int32 [H, cap, L] -> offsets int32 [H, L, nb+1], ids int32 [H, L, n] (counting sort)."""
    H, L = codes.shape[0], codes.shape[2]
    nb = 1 << low_bits
    mask = nb - 1
    for task in numba.prange(H * L):
        h, l = task // L, task % L
        cnt = np.zeros(nb + 1, np.int64)
        for i in range(n):
            cnt[(codes[h, i, l] & mask) + 1] += 1
        for b in range(nb):
            cnt[b + 1] += cnt[b]
        for b in range(nb + 1):
            offsets[h, l, b] = cnt[b]
        for i in range(n):
            b = codes[h, i, l] & mask
            ids[h, l, cnt[b]] = i
            cnt[b] += 1


@numba.njit(cache=True)
def _kept_by_block(raw, counts, m, p, exact, n):
    """Whether candidate p is among the ``exact`` best candidates (raw score, then position) of
    its 65535-token block: the ones the C++ kernel's per-block heap keeps."""
    start = (p // BLOCK_TOKENS) * BLOCK_TOKENS
    above = 0
    for i in range(start, min(n, start + BLOCK_TOKENS)):
        if counts[i] >= m and (raw[i] > raw[p] or (raw[i] == raw[p] and i < p)):
            above += 1
    return above < exact


@numba.njit(cache=True)
def _carry(carried, counts, m, raw, keys, h, q, scale, exact, n):
    """Adds the last head's keys (positions, -1 = none) that are not candidates to the pool the
    head is chosen from (sets their raw score). Returns the rows read: the carried keys that are
    not candidates kept by their block, as the C++ store counts them."""
    read = 0
    for e in range(carried.shape[0]):
        p = carried[e]
        if p < 0 or p >= n:
            continue
        if counts[p] >= m and _kept_by_block(raw, counts, m, p, exact, n):
            continue
        read += 1
        if counts[p] < m:
            dot = 0.0
            for k in range(keys.shape[2]):
                dot += np.float64(q[k]) * np.float64(keys[h, p, k])
            raw[p] = dot * scale
    return read


@numba.njit(cache=True, parallel=True)
def _attend_sequence(
    keys, values, norms, codes, n, csr_len, offsets, ids, low_bits, q, qnorm, qcodes, K, m, table, t_lo, inv_h,
    floor, exact, carry, carried, out, lse, ncand, head,
):
    """One sequence: q float32 [Hq, d]; qcodes int32 [Hq, L]; writes out [Hq, d], lse [Hq], ncand [Hq].
    The ``exact`` keys of highest raw score q.k/sqrt(d) (ties: the earlier token) among the
    candidates (and, with ``carry``, the last head's keys carried [Hq, exact]) weigh exp(raw);
    the other candidates exp(raw)/u. head int64 [Hq, exact]: this head's positions (-1: none)."""
    H, d, L = keys.shape[0], keys.shape[2], codes.shape[2]
    Hq = q.shape[0]
    G = Hq // H
    mask = (1 << low_bits) - 1
    scale = 1.0 / math.sqrt(d)
    for hq in numba.prange(Hq):
        h = hq // G
        counts = np.zeros(n, np.int32)
        for l in range(L):
            code = qcodes[hq, l]
            b = code & mask
            for e in range(offsets[h, l, b], offsets[h, l, b + 1]):
                i = ids[h, l, e]
                if codes[h, i, l] == code:
                    counts[i] += 1
        for i in range(csr_len, n):
            c = 0
            for l in range(L):
                if codes[h, i, l] == qcodes[hq, l]:
                    c += 1
            counts[i] = c
        scores = np.full(n, -np.inf)
        raw = np.full(n, -np.inf)
        found = 0
        for i in range(n):
            if counts[i] < m:
                continue
            found += 1
            dot = 0.0
            for k in range(d):
                dot += np.float64(q[hq, k]) * np.float64(keys[h, i, k])
            denom = np.float64(qnorm[hq]) * np.float64(norms[h, i])
            c = dot / denom if denom > 0 else 0.0
            c = min(max(c, -1.0), 1.0)
            t = K * math.log1p(-math.acos(c) / math.pi) if c > -1.0 else -np.inf
            raw[i] = dot * scale
            scores[i] = raw[i] - _log_u(t, table, t_lo, inv_h, floor)
        read = _carry(carried[hq], counts, m, raw, keys, h, q[hq], scale, exact, n) if carry else 0
        if exact > 0:
            order = np.argsort(-raw, kind="mergesort")  # stable: ties keep position order
            for r in range(min(exact, n)):
                if raw[order[r]] == -np.inf:
                    break
                scores[order[r]] = raw[order[r]]
                head[hq, r] = order[r]
        ncand[hq] = found + read
        for k in range(d):
            out[hq, k] = 0.0
        mx = -np.inf
        for i in range(n):
            mx = max(mx, scores[i])
        if mx == -np.inf:
            lse[hq] = -np.inf
            continue
        acc = np.zeros(d)
        total = 0.0
        for i in range(n):
            if scores[i] == -np.inf:
                continue
            w = math.exp(scores[i] - mx)
            total += w
            for k in range(d):
                acc[k] += w * values[h, i, k]
        for k in range(d):
            out[hq, k] = acc[k] / total
        lse[hq] = mx + math.log(total)


class _Sequence:
    def __init__(self, H: int, d: int, L: int, low_bits: int):
        self.n = 0
        self.csr_len = 0
        self.keys = np.empty((H, 0, d), np.float32)
        self.values = np.empty((H, 0, d), np.float32)
        self.norms = np.empty((H, 0), np.float32)
        self.codes = np.empty((H, 0, L), np.int32)
        self.offsets = np.zeros((H, L, (1 << low_bits) + 1), np.int32)  # empty CSR
        self.ids = np.empty((H, L, 0), np.int32)
        self.last_head = np.empty((0, 0), np.int64)  # carry_head: the last attend's head [Hq, exact]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.keys, self.values, self.norms, self.codes, self.offsets, self.ids,
                                      self.last_head))


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    """a with axis 1 of capacity >= n (geometric), contents kept."""
    if a.shape[1] >= n:
        return a
    cap = max(n, a.shape[1] + a.shape[1] // 2)
    b = np.empty((a.shape[0], cap) + a.shape[2:], a.dtype)
    b[:, : a.shape[1]] = a
    return b


class NumbaStore:
    """Same constructor and methods as magicpig._C.Store (see CPUStore)."""

    def __init__(self, num_kv_heads, head_dim, K, L, min_collisions, dtype, num_threads, table, t_lo, h, log_u_floor,
                 exact_keys=0, carry_head=False):
        self.H, self.d, self.K, self.L, self.m = num_kv_heads, head_dim, K, L, min_collisions
        self.exact = int(exact_keys)
        self.carry = check_carry_head("carry_head", bool(carry_head), self.exact)
        self.dtype = int(dtype)
        self.num_threads = num_threads
        self.table = np.asarray(table, np.float64)
        self.t_lo, self.inv_h, self.floor = float(t_lo), 1.0 / float(h), float(log_u_floor)
        self.low_bits = min(K, MAX_LOW_BITS)
        self._seqs: dict[int, _Sequence] = {}
        self._next = 0

    def add_sequence(self) -> int:
        sid = self._next
        self._next += 1
        self._seqs[sid] = _Sequence(self.H, self.d, self.L, self.low_bits)
        return sid

    def fork(self, seq_id: int, tokens: int) -> int:
        """A new sequence holding a deep copy of the first ``tokens`` tokens of seq_id (the CSR
        rebuilt over them; no carried head, as a fresh sequence). Only the C++ backend shares
        the prefix's memory: here a fork costs a copy of it."""
        src = self._seqs[seq_id]
        if not 0 <= tokens <= src.n:
            raise ValueError(f"tokens={tokens}: expected an integer in [0, {src.n}]")
        sid = self.add_sequence()
        s = self._seqs[sid]
        s.keys, s.values = src.keys[:, :tokens].copy(), src.values[:, :tokens].copy()
        s.norms, s.codes = src.norms[:, :tokens].copy(), src.codes[:, :tokens].copy()
        s.n = tokens
        if tokens:
            self._build(s)
        return sid

    def read(self, seq_id: int, start: int, end: int, keys: np.ndarray, values: np.ndarray) -> None:
        """Tokens [start, end) into keys, values [H, end - start, d] of the store dtype (bf16 as
        uint16 bits): the fp32 copies held are the rounded values, so converting back is exact."""
        s = self._seqs[seq_id]
        if not 0 <= start <= end <= s.n:
            raise ValueError(f"start={start}, end={end}: expected 0 <= start <= end <= {s.n}")
        for src, dst in ((s.keys, keys), (s.values, values)):
            t = torch.from_numpy(np.ascontiguousarray(src[:, start:end])).to(_TORCH_DTYPE[self.dtype])
            raw = t.view(torch.int16).numpy().view(np.uint16) if self.dtype == 0 else t.numpy()
            dst.reshape(raw.shape)[...] = raw

    def remove_sequence(self, seq_id: int) -> None:
        del self._seqs[seq_id]

    def length(self, seq_id: int) -> int:
        return self._seqs[seq_id].n

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self._seqs.values())

    def nbytes_of(self, seq_id: int) -> int:
        return self._seqs[seq_id].nbytes()

    def _fp32(self, x: np.ndarray, t: int) -> np.ndarray:
        """Store-dtype buffer (bf16 as uint16 bits) -> fp32 [H, t, d]."""
        tt = torch.from_numpy(x.view(np.int16) if x.dtype == np.uint16 else x)
        if self.dtype == 0:
            tt = tt.view(torch.bfloat16)
        return tt.float().reshape(self.H, t, self.d).numpy()

    def append(self, seq_id: int, keys, values, codes, t: int) -> None:
        s = self._seqs[seq_id]
        n0, n1 = s.n, s.n + t
        s.keys, s.values = _grow(s.keys, n1), _grow(s.values, n1)
        s.norms, s.codes = _grow(s.norms, n1), _grow(s.codes, n1)
        k = self._fp32(keys, t)
        s.keys[:, n0:n1] = k
        s.values[:, n0:n1] = self._fp32(values, t)
        s.norms[:, n0:n1] = torch.from_numpy(k).norm(dim=-1).numpy()
        s.codes[:, n0:n1] = codes.reshape(self.H, t, self.L)
        s.n = n1
        if s.n - s.csr_len >= TAIL_MERGE:
            self._build(s)

    def _build(self, s: _Sequence) -> None:
        """The CSR over all of s's tokens (its tail emptied)."""
        s.offsets = np.empty((self.H, self.L, (1 << self.low_bits) + 1), np.int32)
        s.ids = np.empty((self.H, self.L, s.n), np.int32)
        self._threads(lambda: _build_csr(s.codes, s.n, self.low_bits, s.offsets, s.ids))
        s.csr_len = s.n

    def _threads(self, fn):
        if self.num_threads:
            prev = numba.get_num_threads()
            numba.set_num_threads(min(self.num_threads, numba.config.NUMBA_NUM_THREADS))
            try:
                return fn()
            finally:
                numba.set_num_threads(prev)
        return fn()

    def attend(self, seq_ids, B, Hq, q, qcodes, out, lse, ncand) -> None:
        q = q.reshape(B, Hq, self.d)
        qcodes = qcodes.reshape(B, Hq, self.L)
        qnorm = np.sqrt((q.astype(np.float64) ** 2).sum(-1)).astype(np.float32)
        seqs = [self._seqs[int(seq_ids[b])] for b in range(B)]
        # every row's carried head read before any is written (a sequence may be named twice)
        carried = [s.last_head if s.last_head.shape == (Hq, self.exact) else np.full((Hq, self.exact), -1, np.int64)
                   for s in seqs]
        heads = [np.full((Hq, self.exact), -1, np.int64) for _ in seqs]
        for b, s in enumerate(seqs):
            self._threads(
                lambda: _attend_sequence(
                    s.keys, s.values, s.norms, s.codes, s.n, s.csr_len, s.offsets, s.ids, self.low_bits, q[b],
                    qnorm[b], qcodes[b], self.K, self.m, self.table, self.t_lo, self.inv_h, self.floor, self.exact,
                    self.carry, carried[b], out[b], lse[b], ncand[b], heads[b],
                )
            )
        if self.carry:
            for s, head in zip(seqs, heads):
                s.last_head = head
