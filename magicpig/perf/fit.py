"""Every fit of the lab tooling, through ``scipy.optimize`` (numpy + scipy; no torch).

* :func:`minimize_1d`: a scalar objective on an interval: a grid scan (the objectives here can
  have a flat side, where a bracketing method alone can stall), then bounded Brent
  (``minimize_scalar(method="bounded")``) in the best grid cell's neighbourhood.
* :func:`fit_curve` / :func:`fit_saturation`: a :class:`~magicpig.perf.profile.Saturation`
  curve minimising a least-squares objective (x0 on a log scale, optionally the shape), and
  the curve of measured (share, seconds) points (least squares on log time).
* :func:`nonneg_least_squares` / :func:`fit_store_attend`: the CPU store's per-call, per-row
  and per-entry costs of measured attend calls (``nnls`` on relative error: costs stay >= 0).
* :func:`bounded_least_squares`: non-linear least squares within box bounds
  (``least_squares``, trust-region reflective), the profiler's joint fit of the per-share rates
  (:func:`magicpig.perf.profiler.fit_rates`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
from scipy.optimize import least_squares, minimize_scalar, nnls

from magicpig.config import check_float
from magicpig.perf.profile import Saturation, StoreProfile

# Brent's absolute tolerance on the argument (its own relative one, sqrt(machine epsilon), is
# the floor): the objectives are smooth near their minimum, so this is what the float allows.
_XATOL = 1e-12


# ------------------------------------------------------------------------------ one variable
def minimize_1d(f: Callable[[float], float], lo: float, hi: float, grid: int = 48) -> tuple[float, float]:
    """Minimum of f on [lo, hi]: a grid scan of ``grid`` points, then bounded Brent between the
    best point's neighbours. Returns (argmin, min): the better of the grid's and Brent's."""
    xs = [lo + (hi - lo) * i / (grid - 1) for i in range(grid)]
    fs = [f(x) for x in xs]
    i = min(range(grid), key=fs.__getitem__)
    best = (xs[i], fs[i])
    a, b = xs[max(i - 1, 0)], xs[min(i + 1, grid - 1)]
    res = minimize_scalar(f, bounds=(a, b), method="bounded", options={"xatol": _XATOL, "maxiter": 500})
    x, fx = float(res.x), float(res.fun)
    return (x, fx) if fx < best[1] else best


# ------------------------------------------------------------------------------ saturation
@dataclass(frozen=True)
class SaturationFit:
    """A fitted curve, the fitted time at full share (seconds) and each point's relative error
    (modelled / measured - 1)."""

    saturation: Saturation
    full_time_s: float
    relative_errors: tuple[float, ...]


def fit_curve(sse: Callable[[Saturation], float], fit_shape: bool = False) -> Saturation:
    """The saturation curve minimising ``sse(curve)`` (any least-squares objective): x0 over
    [1e-3, 1e3] on a log scale, the shape p over [0.25, 4] when ``fit_shape``, else 1; the
    linear curve is a candidate too."""

    def best_x0(p: float) -> tuple[float, float]:
        return minimize_1d(lambda u: sse(Saturation(math.exp(u), p)), math.log(1e-3), math.log(1e3))

    if fit_shape:
        log_p, _ = minimize_1d(lambda v: best_x0(math.exp(v))[1], math.log(0.25), math.log(4.0), grid=16)
        p = math.exp(log_p)
    else:
        p = 1.0
    u, value = best_x0(p)
    fitted = Saturation(math.exp(u), p)
    return Saturation(None) if sse(Saturation(None)) < value else fitted


def _check_points(points: Sequence[Sequence[float]], width: int, name: str) -> list[tuple[float, ...]]:
    rows = [tuple(p) for p in points]
    if not rows or any(len(r) != width for r in rows):
        raise ValueError(f"{name}: expected a non-empty sequence of {width}-tuples")
    for r in rows:
        for v in r:
            check_float(name, v, 0.0, math.inf)
    return rows


def fit_saturation(points: Sequence[tuple[float, float]], fit_shape: bool = False) -> SaturationFit:
    """Fit time(x) = T / s(x) to measured (share, seconds) points by least squares on log
    time (relative errors weigh alike at every share). T, the full-share time, has a closed
    form for each curve; the curve is found by :func:`fit_curve`. Needs two distinct shares."""
    rows = _check_points(points, 2, "points")
    shares = [check_float("points share", x, 0.0, 1.0, low_open=True) for x, _ in rows]
    logs = [math.log(check_float("points seconds", t, 0.0, math.inf, low_open=True)) for _, t in rows]
    if len(set(shares)) < 2:
        raise ValueError(f"points: expected at least two distinct shares, got {sorted(set(shares))}")

    def log_scale(sat: Saturation) -> float:
        return sum(lt + math.log(sat(x)) for x, lt in zip(shares, logs)) / len(shares)

    def sse(sat: Saturation) -> float:
        ls = log_scale(sat)
        return sum((ls - math.log(sat(x)) - lt) ** 2 for x, lt in zip(shares, logs))

    sat = fit_curve(sse, fit_shape)
    full = math.exp(log_scale(sat))
    errors = tuple(full / sat(x) / math.exp(lt) - 1.0 for x, lt in zip(shares, logs))
    return SaturationFit(sat, full, errors)


# ------------------------------------------------------------------------------ CPU store
def nonneg_least_squares(x: Sequence[Sequence[float]], y: Sequence[float]) -> list[float]:
    """Least squares y ~ x @ w with w >= 0 (``nnls``), rows weighted by 1/y so that small and
    large calls count by their relative error. The columns are scaled to unit norm for the
    solver (costs per call, per row and per entry differ by orders of magnitude)."""
    targets = np.maximum(np.asarray(y, dtype=np.float64), 1e-300)
    a = np.asarray(x, dtype=np.float64) / targets[:, None]
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0.0] = 1.0
    w, _ = nnls(a / scale, np.ones(len(targets)))
    return [float(v) for v in w / scale]


def fit_store_attend(points: Sequence[Sequence[float]], threads: int, append_s: float = 0.0) -> StoreProfile:
    """Fit a :class:`StoreProfile` to measured attend calls: ``(rows, seconds)`` or
    ``(rows, entries, seconds)`` per call (rows and entries from ``Store.last_attend_stats``),
    by non-negative least squares on relative error. ``append_s`` is carried as given."""
    width = len(tuple(points[0])) if len(points) else 2
    if width not in (2, 3):
        raise ValueError(f"points: expected (rows, seconds) or (rows, entries, seconds) tuples, got width {width}")
    rows = _check_points(points, width, "points")
    x = [[1.0, r[0]] + ([r[1]] if width == 3 else []) for r in rows]
    y = [check_float("points seconds", r[-1], 0.0, math.inf, low_open=True) for r in rows]
    w = nonneg_least_squares(x, y)
    entry_s = w[2] if width == 3 else 0.0
    return StoreProfile(call_s=w[0], row_s=w[1], entry_s=entry_s, append_s=append_s, threads=threads)


# ------------------------------------------------------------------------------ many variables
def bounded_least_squares(residuals: Callable[[list[float]], Sequence[float]], theta: Sequence[float],
                          bounds: Sequence[tuple[float, float]]) -> list[float]:
    """The parameters within ``bounds`` (one (low, high) per parameter) minimising
    sum(residuals(theta)^2), from the start ``theta`` (clipped into the bounds):
    ``least_squares`` (trust-region reflective, 2-point Jacobians, tolerances 1e-12)."""
    lo = np.array([b[0] for b in bounds], dtype=np.float64)
    hi = np.array([b[1] for b in bounds], dtype=np.float64)
    start = np.clip(np.asarray(theta, dtype=np.float64), lo, hi)
    res = least_squares(lambda t: np.asarray(residuals([float(v) for v in t]), dtype=np.float64), start,
                        bounds=(lo, hi), method="trf", ftol=1e-12, xtol=1e-12, gtol=1e-12)
    return [float(v) for v in res.x]
