"""The store's table of importance weights log u as a function of t = log p.

For a candidate at cosine c with the query, p = (1 - arccos(c)/pi)^K is its collision
probability in one table and u = P[Binomial(L, p) >= m] its probability of being sampled
(DESIGN.md §2). Both backends evaluate log u for every candidate of every query, so instead of
summing binomial tails per candidate they interpolate a table computed once per (K, L, m):
H(t) = log u at t = log p is smooth in t on (-inf, 0] (for small p it is ~ log C(L, m) + m t),
so a cubic Hermite interpolant with exact derivatives on a uniform grid is accurate to ~1e-9.
Below t_lo, log u <= log C(L, m) + m t < LOG_U_FLOOR (union bound), so the floor applies, as in
the reference (magicpig.lsh.log_collision_probability clamped at LOG_U_FLOOR).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from magicpig.lsh import LOG_U_FLOOR

TABLE_POINTS = 4096


@dataclass(frozen=True)
class LogUTable:
    """H(t_i) and H'(t_i)*h interleaved: values float32 [2 * points]; grid t_i = t_lo + i*h."""

    values: np.ndarray
    t_lo: float
    h: float
    log_u_floor: float

    def __call__(self, t: np.ndarray) -> np.ndarray:
        """log u at t = log p (float64 [...]), interpolated exactly as the C++ kernel does."""
        t = np.asarray(t, dtype=np.float64)
        points = self.values.size // 2
        u = (t - self.t_lo) / self.h
        uc = np.clip(u, 0.0, points - 1.0)
        i = np.minimum(uc.astype(np.int64), points - 2)
        f = uc - i
        y0, d0 = self.values[2 * i].astype(np.float64), self.values[2 * i + 1].astype(np.float64)
        y1, d1 = self.values[2 * i + 2].astype(np.float64), self.values[2 * i + 3].astype(np.float64)
        g = 1.0 - f
        h = (1 + 2 * f) * g * g * y0 + f * g * g * d0 + f * f * (3 - 2 * f) * y1 - f * f * g * d1
        return np.maximum(np.where(u < 0, self.log_u_floor, h), self.log_u_floor)


def _log_choose(L: int, js: np.ndarray) -> np.ndarray:
    lg = np.vectorize(math.lgamma)
    return lg(L + 1.0) - lg(js + 1.0) - lg(L - js + 1.0)


def _xlogy(k: np.ndarray, logy: np.ndarray) -> np.ndarray:
    """k * logy with 0 * log 0 = 0 (a zero exponent contributes nothing even when y = 0)."""
    with np.errstate(invalid="ignore"):
        return np.where(k == 0, 0.0, k * logy)


def _log_u_and_slope(t: np.ndarray, L: int, m: int) -> tuple[np.ndarray, np.ndarray]:
    """H(t) = log sum_{j>=m} C(L,j) p^j q^(L-j) and dH/dt, in float64, for p = e^t <= 1."""
    js = np.arange(m, L + 1, dtype=np.float64)
    lc = _log_choose(L, js)
    with np.errstate(divide="ignore"):
        logq = np.log(-np.expm1(t))[:, None]  # -inf at t = 0
    tt = t[:, None]
    terms = lc + js * tt + _xlogy(L - js, logq)
    top = terms.max(axis=1, keepdims=True)
    H = top[:, 0] + np.log(np.exp(terms - top).sum(axis=1))
    # dH/dt = sum_j w_j [j - (L-j) p/q]; the second part written without dividing by q:
    # (L-j) C(L,j) p^(j+1) q^(L-j-1), finite at p = 1.
    pos = (js * np.exp(terms - H[:, None])).sum(axis=1)
    lower = js < L
    jl = js[lower]
    neg_terms = lc[lower] + np.log(L - jl) + (jl + 1) * tt + _xlogy(L - jl - 1, logq)
    neg = np.exp(neg_terms - H[:, None]).sum(axis=1) if jl.size else np.zeros_like(H)
    return H, pos - neg


@functools.lru_cache(maxsize=64)
def log_u_table(K: int, L: int, min_collisions: int, points: int = TABLE_POINTS) -> LogUTable:
    """The Hermite table of log u over t in [t_lo, 0] for one (K, L, m).

    K does not enter H(t) (only t = K log(1 - theta/pi) does); it is accepted so the call
    documents which store the table belongs to. Cached (every layer's store asks for the same
    table, ~40 ms each at L=150) and returned read-only.
    """
    m = min_collisions
    log_c = float(_log_choose(L, np.array([float(m)]))[0])
    t_lo = (LOG_U_FLOOR - log_c) / m - 1.0  # below: log u < floor
    grid = np.linspace(t_lo, 0.0, points)
    h = float(grid[1] - grid[0])
    H = np.empty(points)
    dH = np.empty(points)
    for s in range(0, points, 256):  # bounded memory: [256, L - m + 1] at a time
        H[s : s + 256], dH[s : s + 256] = _log_u_and_slope(grid[s : s + 256], L, m)
    values = np.empty(2 * points, dtype=np.float32)
    values[0::2] = H
    values[1::2] = dH * h
    values.flags.writeable = False
    return LogUTable(values=values, t_lo=float(t_lo), h=h, log_u_floor=float(LOG_U_FLOOR))
