import math

import mpmath
import numpy as np
import pytest
import torch

from magicpig.lsh import (
    SimHash,
    hash_codes_torch,
    collision_probability,
    hash_codes,
    head_seed,
    layer_projection,
    log_collision_probability,
)


def test_projection_is_a_deterministic_gaussian():
    a, b, c = SimHash(64, 10, 150, seed=7), SimHash(64, 10, 150, seed=7), SimHash(64, 10, 150, seed=8)
    assert a.projection.dtype == torch.float32 and a.projection.shape == (64, 1500)
    assert torch.equal(a.projection, b.projection)
    assert not torch.equal(a.projection, c.projection)
    # Golden values: numpy's PCG64 + standard_normal stream is platform independent, so a
    # change here means saved tables and other machines would disagree with this one.
    np.testing.assert_allclose(
        SimHash(4, 1, 2, seed=0).projection.flatten()[:4].numpy(),
        [0.12573022, -0.13210486, 0.64042264, 0.10490011],
        rtol=1e-6,
    )
    p = a.projection.double()
    assert abs(p.mean().item()) < 0.01 and abs(p.std().item() - 1.0) < 0.01


def test_head_seeds_differ_per_layer_and_head():
    seeds = {head_seed(0, layer, h) for layer in range(4) for h in range(8)}
    assert len(seeds) == 32
    proj = layer_projection(3, 2, 4, 16, 5, 7)
    assert proj.shape == (4, 16, 35)
    assert torch.equal(proj[1], SimHash(16, 5, 7, head_seed(3, 2, 1)).projection)


def test_hash_bit_order_is_table_major():
    h = SimHash(32, 6, 9, seed=1)
    x = torch.randn(5, 32)
    codes = h.hash(x)
    assert codes.dtype == torch.int32 and codes.shape == (5, 9)
    dots = x @ h.projection
    for i in range(5):
        for table in range(9):
            expected = sum(int(dots[i, table * 6 + b] > 0) << b for b in range(6))
            assert codes[i, table].item() == expected
    assert int(codes.min()) >= 0 and int(codes.max()) < 2**6


def test_hash_codes_broadcast_a_projection_per_head():
    proj = layer_projection(0, 0, 3, 16, 4, 5)
    x = torch.randn(2, 3, 7, 16, dtype=torch.bfloat16)
    codes = hash_codes(x, proj, 4)
    assert codes.shape == (2, 3, 7, 5)
    for h in range(3):
        assert torch.equal(codes[:, h], hash_codes(x[:, h], proj[h], 4))


def _pair_at_angle(theta: float, d: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    a, b = torch.randn(2, d, generator=gen, dtype=torch.float64)
    a = a / a.norm()
    b = b - (b @ a) * a
    b = b / b.norm()
    return a, math.cos(theta) * a + math.sin(theta) * b


@pytest.mark.parametrize("K", [1, 3])
@pytest.mark.parametrize("theta", [0.3, math.pi / 2, 2.5])
def test_per_table_collision_rate_is_one_minus_theta_over_pi_to_the_K(K, theta):
    gen = torch.Generator().manual_seed(0)
    x, y = _pair_at_angle(theta, 32, gen)
    hits, total = 0, 0
    for seed in range(40):
        h = SimHash(32, K, 256, seed=seed)
        hits += int((h.hash(x.float()) == h.hash(y.float())).sum())
        total += 256
    p = (1 - theta / math.pi) ** K
    sigma = math.sqrt(p * (1 - p) / total)
    # 5 sigma: a wrong formula (e.g. cos instead of 1 - theta/pi) misses by far more.
    assert abs(hits / total - p) < 5 * sigma + 1e-9


@pytest.mark.parametrize("K, L, m", [(1, 1, 1), (4, 10, 2), (6, 20, 1), (8, 75, 3), (10, 150, 2)])
def test_collision_probability_matches_monte_carlo(K, L, m):
    rng = np.random.default_rng(K * 1000 + L)
    cos = np.array([-0.5, 0.0, 0.3, 0.6, 0.8, 0.95])
    p = (1 - np.arccos(cos) / np.pi) ** K
    draws = 200_000
    freq = (rng.binomial(L, p[:, None], size=(len(cos), draws)) >= m).mean(1)
    pred = collision_probability(torch.tensor(cos), K, L, m).numpy()
    sigma = np.sqrt(pred * (1 - pred) / draws)
    assert np.all(np.abs(freq - pred) <= 5 * sigma + 2e-5), (freq, pred)


def test_collision_probability_matches_real_simhash_tables():
    K, L, m, d = 3, 12, 2, 16
    gen = torch.Generator().manual_seed(1)
    x, y = _pair_at_angle(1.0, d, gen)
    trials = 3000
    hits = 0
    for seed in range(trials):
        h = SimHash(d, K, L, seed=seed)
        hits += int((h.hash(x.float()) == h.hash(y.float())).sum() >= m)
    pred = collision_probability(torch.tensor(math.cos(1.0)), K, L, m).item()
    assert abs(hits / trials - pred) < 5 * math.sqrt(pred * (1 - pred) / trials)


def _exact_log_upper_tail(cos: float, K: int, L: int, m: int) -> float:
    mpmath.mp.dps = 60
    p = (1 - mpmath.acos(mpmath.mpf(cos)) / mpmath.pi) ** K
    total = mpmath.fsum(mpmath.binomial(L, j) * p**j * (1 - p) ** (L - j) for j in range(m, L + 1))
    return float(mpmath.log(total))


@pytest.mark.parametrize(
    "cos, K, L, m",
    [(-0.9, 20, 1024, 2), (0.0, 16, 512, 3), (0.2, 10, 150, 2), (0.999999, 10, 150, 2),
     (0.9, 2, 1024, 1000), (0.5, 10, 1024, 1), (1.0, 20, 1024, 1024), (0.7, 1, 1, 1)],
)
def test_log_collision_probability_is_precise_at_the_extremes(cos, K, L, m):
    got = log_collision_probability(torch.tensor([cos], dtype=torch.float64), K, L, m).item()
    want = _exact_log_upper_tail(cos, K, L, m)
    assert math.isfinite(got)
    assert abs(got - want) <= 1e-9 * max(1.0, abs(want)), (got, want)


def test_probability_is_monotone_in_similarity_and_tables():
    cos = torch.linspace(-0.99, 0.99, 200, dtype=torch.float64)
    u = collision_probability(cos, 10, 150, 2)
    assert torch.all(u[1:] >= u[:-1]) and torch.all((u >= 0) & (u <= 1))
    assert torch.all(collision_probability(cos, 10, 300, 2) >= u)


@pytest.mark.parametrize("kwargs, match", [
    (dict(K=0, L=10, min_collisions=1), "K=0"), (dict(K=21, L=10, min_collisions=1), "K=21"),
    (dict(K=4, L=0, min_collisions=1), "L=0"), (dict(K=4, L=1025, min_collisions=1), "L=1025"),
    (dict(K=4, L=10, min_collisions=0), "min_collisions=0"),
    (dict(K=4, L=10, min_collisions=11), "min_collisions=11"),
])
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        collision_probability(torch.tensor([0.5]), **kwargs)


def test_bad_simhash_arguments_raise():
    with pytest.raises(ValueError, match="head_dim"):
        SimHash(0, 4, 4)
    with pytest.raises(ValueError, match="K=25"):
        SimHash(8, 25, 4)
    with pytest.raises(ValueError, match=r"head_dim=8\], got \[3, 7\]"):
        SimHash(8, 4, 4).hash(torch.randn(3, 7))


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: SimHash(8, 4, 4, seed=1.5), TypeError, "seed=1.5"),
        (lambda: SimHash(8, 4, 4, seed=-1), ValueError, "seed=-1"),
        (lambda: SimHash(8.0, 4, 4), TypeError, "head_dim"),
        (lambda: SimHash(8, 4, 4).hash(torch.randn(3, 8, dtype=torch.complex64)), TypeError, "real floating"),
        (lambda: SimHash(8, 4, 4).hash(torch.tensor(1.0)), ValueError, r"got \[\]"),
        (lambda: SimHash(8, 4, 4).hash(torch.ones(3, 8).numpy()), TypeError, "torch.Tensor"),
        (lambda: SimHash(8, 4, 4).hash(torch.ones(3, 8, dtype=torch.int64)), TypeError, "torch.int64"),
    ],
)
def test_simhash_rejects_bad_inputs_by_name(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_simhash_accepts_numpy_integers():
    np = pytest.importorskip("numpy")
    h = SimHash(np.int64(8), np.int32(4), np.int16(4), seed=np.uint64(3))
    assert torch.equal(h.projection, SimHash(8, 4, 4, seed=3).projection)


def test_hash_of_no_vectors_is_empty():
    h = SimHash(16, 4, 6, seed=0)
    assert h.hash(torch.zeros(0, 16)).shape == (0, 6)
    assert hash_codes(torch.zeros(2, 3, 0, 16), layer_projection(0, 0, 3, 16, 4, 6), 4).shape == (2, 3, 0, 6)


# ----------------------------------------------------------------- the CPU kernel (magicpig._C)

try:
    from magicpig import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None
needs_cpp = pytest.mark.skipif(_C is None, reason="C++ extension not built")
SIMD_LEVELS = ("scalar", "avx2", "avx512")


def _supported_levels() -> list[str]:
    best = _C.cpu_info()["simd_supported"] if _C is not None else "scalar"
    return list(SIMD_LEVELS[: SIMD_LEVELS.index(best) + 1])


def _assert_codes_agree(got: torch.Tensor, want: torch.Tensor, x: torch.Tensor, proj: torch.Tensor, K: int):
    """Codes equal bit for bit, except bits whose projection is within float rounding of 0
    (the kernel and BLAS sum the d products in different orders)."""
    assert got.shape == want.shape and got.dtype == torch.int32
    dots = torch.matmul(x.double(), proj.double())  # [..., K*L], broadcast as in hash_codes
    scale = torch.matmul(x.double().abs(), proj.double().abs())
    shifts = torch.arange(K)
    got_bits = ((got.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    want_bits = ((want.unsqueeze(-1) >> shifts) & 1).flatten(-2)
    differ = got_bits != want_bits
    assert torch.all(dots[differ].abs() <= 1e-5 * scale[differ] + 1e-30), "a clear-cut bit differs"
    assert differ.float().mean() < 1e-3


@needs_cpp
@pytest.mark.parametrize("level", SIMD_LEVELS)
@pytest.mark.parametrize(
    "x_shape, heads, d, K, L",
    [
        ((3, 257, 64), 3, 64, 10, 400),  # prefill rows: 257 = 4 tasks + a partial row tile
        ((1, 3, 3, 64), 3, 64, 10, 150),  # decode: [B, Hkv, G, d]
        ((2, 1, 5, 128), 3, 128, 7, 13),  # broadcast over heads; K*L = 91: a partial column tile
        ((37, 3), None, 3, 20, 7),  # odd d, K at its maximum, one projection
        ((1, 64), None, 64, 1, 1),  # one token, one one-bit table
        ((2, 64), None, 64, 20, 1024),  # the largest K*L
    ],
)
def test_cpu_kernel_matches_torch_reference(level, x_shape, heads, d, K, L):
    if level not in _supported_levels():
        pytest.skip(f"this CPU has no {level}")
    gen = torch.Generator().manual_seed(hash((x_shape, K, L)) % 2**31)
    x = torch.randn(*x_shape, generator=gen)
    proj = layer_projection(5, 2, heads, d, K, L) if heads else SimHash(d, K, L, seed=5).projection
    start = _C.cpu_info()["simd"]
    try:
        _C.set_simd(level)
        got = hash_codes(x, proj, K)
    finally:
        _C.set_simd(start)
    want = hash_codes_torch(x, proj, K)
    _assert_codes_agree(got, want, x, proj, K)


@needs_cpp
def test_cpu_kernel_adversarial_inputs():
    proj = layer_projection(0, 0, 2, 32, 8, 40)
    # All-zero and all-equal keys: every projection is exactly 0 or shared by every row.
    assert torch.all(hash_codes(torch.zeros(2, 9, 32), proj, 8) == 0)
    same = hash_codes(torch.ones(2, 9, 32), proj, 8)
    assert torch.equal(same, same[:, :1].expand_as(same))
    assert torch.equal(same, hash_codes_torch(torch.ones(2, 9, 32), proj, 8))
    # Huge and tiny magnitudes: only the signs matter (no overflow at 1e30 * N(0,1) * 32).
    x = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(0))
    assert torch.equal(hash_codes(x * 1e30, proj, 8), hash_codes(x, proj, 8))
    assert torch.equal(hash_codes(x * 1e-30, proj, 8), hash_codes(x, proj, 8))
    # Half precision inputs are hashed as their float32 values.
    for dtype in (torch.float16, torch.bfloat16):
        xh = x.to(dtype)
        _assert_codes_agree(hash_codes(xh, proj, 8), hash_codes_torch(xh, proj, 8), xh.float(), proj, 8)
    # A non-contiguous view hashes like its contiguous copy.
    view = torch.randn(9, 2, 32).transpose(0, 1)
    assert torch.equal(hash_codes(view, proj, 8), hash_codes(view.contiguous(), proj, 8))


@needs_cpp
def test_cpu_kernel_result_does_not_depend_on_the_thread_count():
    x = torch.randn(3, 1000, 64, generator=torch.Generator().manual_seed(1))
    proj = layer_projection(0, 3, 3, 64, 10, 150)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = hash_codes(x, proj, 10)
        torch.set_num_threads(2)
        two = hash_codes(x, proj, 10)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_hash_codes_rejects_bad_k_and_projection():
    proj = SimHash(16, 4, 6, seed=0).projection
    with pytest.raises(ValueError, match="K=0"):
        hash_codes(torch.randn(2, 16), proj, 0)
    with pytest.raises(ValueError, match="K=24"):
        hash_codes(torch.randn(2, 16), torch.randn(16, 48), 24)
    with pytest.raises(ValueError, match="not a multiple of K=5"):
        hash_codes(torch.randn(2, 16), proj, 5)
    with pytest.raises(ValueError, match="projection shape"):
        hash_codes(torch.randn(2, 16), proj.reshape(1, 1, 16, 24), 4)
    with pytest.raises(ValueError, match="head_dim=0"):
        hash_codes(torch.randn(2, 0), torch.randn(0, 24), 4)
