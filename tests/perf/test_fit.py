"""magicpig.perf.fit: the scipy-based fits (the curve and store fits are also covered through
their callers in test_cost_model.py and test_profiler.py). No torch."""

from __future__ import annotations

import itertools
import math
import subprocess
import sys

import numpy as np
import pytest

from magicpig.perf.fit import bounded_least_squares, fit_curve, minimize_1d, nonneg_least_squares
from magicpig.perf.profile import Saturation


def test_import_pulls_in_no_torch():
    code = "import sys, magicpig.perf.fit; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_minimize_1d_finds_a_minimum_beside_a_flat_side():
    # Flat (a plateau above the minimum) on the left, a narrow well on the right: a bracketing
    # search started over the whole interval can settle on the plateau; the grid finds the well.
    f = lambda x: 1.0 if x < 2.0 else (x - 2.7) ** 2  # noqa: E731
    x, fx = minimize_1d(f, 0.0, 3.0)
    assert x == pytest.approx(2.7, abs=1e-6)
    assert fx == pytest.approx(0.0, abs=1e-12)


def test_minimize_1d_at_a_bound():
    x, fx = minimize_1d(lambda x: x, -1.0, 1.0)
    assert x == pytest.approx(-1.0, abs=1e-6)


def test_fit_curve_prefers_linear_when_it_fits_best():
    shares = (0.25, 0.5, 1.0)
    sse = lambda sat: sum((math.log(sat(x)) - math.log(x)) ** 2 for x in shares)  # noqa: E731
    assert fit_curve(sse) == Saturation(None)


def _subset_reference(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares on relative error by trying every subset of columns (what the
    store fit did before scipy): the best subset whose unconstrained solution is >= 0."""
    a = x / y[:, None]
    best, out = math.inf, np.zeros(x.shape[1])
    for k in range(1, x.shape[1] + 1):
        for cols in itertools.combinations(range(x.shape[1]), k):
            w, *_ = np.linalg.lstsq(a[:, cols], np.ones(len(y)), rcond=None)
            if (w < 0).any():
                continue
            full = np.zeros(x.shape[1])
            full[list(cols)] = w
            err = float(((a @ full) - 1.0) @ ((a @ full) - 1.0))
            if err < best:
                best, out = err, full
    return out


@pytest.mark.parametrize("seed", range(6))
def test_nonneg_least_squares_matches_the_subset_search(seed):
    rng = np.random.default_rng(seed)
    rows = rng.uniform(1e3, 1e6, size=(40, 2))
    x = np.column_stack([np.ones(40), rows])
    truth = np.array([4e-5, 2e-9, 3e-11]) * rng.uniform(0.0, 2.0, 3)  # some costs near 0
    y = x @ truth * np.exp(rng.normal(0.0, 0.3, 40))
    got = np.array(nonneg_least_squares(x.tolist(), y.tolist()))
    assert (got >= 0).all()
    np.testing.assert_allclose(got, _subset_reference(x, y), rtol=1e-6, atol=1e-18)


def test_bounded_least_squares_recovers_parameters_and_keeps_bounds():
    t = np.linspace(0.0, 2.0, 20)
    y = 3.0 * np.exp(-1.5 * t)
    residuals = lambda p: (p[0] * np.exp(-p[1] * t) - y).tolist()  # noqa: E731
    a, b = bounded_least_squares(residuals, [1.0, 0.5], [(0.0, 10.0), (0.0, 5.0)])
    assert (a, b) == pytest.approx((3.0, 1.5), rel=1e-8)
    # The optimum outside the box: the fit stops on the bound; a start outside is clipped in.
    a, b = bounded_least_squares(residuals, [20.0, 0.5], [(0.0, 2.0), (0.0, 5.0)])
    assert a == pytest.approx(2.0, abs=1e-8) and 0.0 <= b <= 5.0
