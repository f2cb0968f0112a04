"""SimHash projections, hash codes and collision probabilities (DESIGN.md §2).

Table ``l`` maps a vector ``x`` to the K-bit integer whose bit ``b`` is
``[x . projection[:, l*K + b] > 0]``; this bit order is part of the public API because the
CPU store, the Triton kernels and saved tables all depend on it.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from magicpig.config import MAX_K, MAX_L, check_int, max_cpu_threads

try:  # the C++ extension hashes on the CPU; without it the torch path does
    from magicpig import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

# log u_i is clamped from below so that a candidate whose collision probability underflows
# still gets a finite (huge) importance weight instead of +inf. The C++ store uses the same.
LOG_U_FLOOR = -69.0


def _check_kl(head_dim: int, K: int, L: int) -> None:
    check_int("head_dim", head_dim, 1)
    check_int("K", K, 1, MAX_K)
    check_int("L", L, 1, MAX_L)


def _check_vectors(name: str, x: object, head_dim: int) -> None:
    """x must be a real floating-point torch tensor [..., head_dim] with at least one dim."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor [..., {head_dim}], got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name}: expected a real floating-point tensor, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != head_dim:
        raise ValueError(f"{name}: expected shape [..., head_dim={head_dim}], got {list(x.shape)}")


def head_seed(seed: int, layer: int, kv_head: int) -> int:
    """The seed of the projection of one (layer, KV head), derived from ``config.seed``."""
    state = np.random.SeedSequence([int(seed), int(layer), int(kv_head)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def gaussian_projection(head_dim: int, K: int, L: int, seed: int) -> torch.Tensor:
    """float32 [head_dim, K*L] with i.i.d. N(0, 1) entries, the same for a seed on every machine.

    numpy's PCG64 stream is used (not torch's generator) because its output for a seed is
    specified independently of the platform and of the torch version.
    """
    _check_kl(head_dim, K, L)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    return torch.from_numpy(rng.standard_normal((head_dim, K * L)).astype(np.float32))


def hash_codes(x: torch.Tensor, projection: torch.Tensor, K: int) -> torch.Tensor:
    """SimHash codes of ``x``.

    x: [..., d] any float dtype. projection: float32 [d, K*L], or [H, d, K*L] broadcast
    against x's leading dims (e.g. x [B, H, n, d]). Returns int32 [..., L] on x's device.
    On a GPU the fused Triton kernel computes them, on the CPU the extension's fused kernel
    (``magicpig._C.simhash_codes``), otherwise :func:`hash_codes_torch`; all three agree
    except where a projection is within rounding of 0.
    """
    if not isinstance(projection, torch.Tensor) or projection.dim() not in (2, 3):
        raise ValueError(f"projection shape {tuple(projection.shape)}: expected [d, K*L] or [H, d, K*L]")
    _check_kl(projection.shape[-2], K, projection.shape[-1] // K if isinstance(K, int) and K > 0 else 1)
    if projection.shape[-1] % K != 0:
        raise ValueError(f"projection last dim {projection.shape[-1]} is not a multiple of K={K}")
    _check_vectors("x", x, projection.shape[-2])
    proj = projection.to(device=x.device, dtype=torch.float32)
    if x.is_cuda and proj.dim() == 2:
        # On a GPU the fused Triton kernel avoids writing the [..., K*L] projections out.
        from magicpig.kernels.simhash import simhash_codes

        return simhash_codes(x, proj, K)
    if x.device.type == "cpu" and _C is not None:
        return _hash_codes_cpp(x.detach(), proj, K)
    return hash_codes_torch(x, proj, K)


def hash_codes_torch(x: torch.Tensor, projection: torch.Tensor, K: int) -> torch.Tensor:
    """The torch reference of :func:`hash_codes` (same arguments): matmul, sign, pack."""
    proj = projection.to(device=x.device, dtype=torch.float32)
    signs = torch.matmul(x.float(), proj) > 0
    bits = signs.view(*signs.shape[:-1], projection.shape[-1] // K, K).to(torch.float32)  # explicit L: t may be 0
    # Packing as a float matvec is exact (codes < 2^20 < 2^24) and faster than an int multiply-sum.
    weights = torch.pow(2.0, torch.arange(K, device=x.device, dtype=torch.float32))
    return torch.matmul(bits, weights).to(torch.int32)


def _hash_codes_cpp(x: torch.Tensor, proj: torch.Tensor, K: int) -> torch.Tensor:
    """hash_codes on the CPU through the extension, which takes x as [H, rows, d] and the
    projection as [H, d, K*L] (no copy of x for x [H, n, d] or [n, d] float32)."""
    d, KL = proj.shape[-2], proj.shape[-1]
    L = KL // K
    if proj.dim() == 2:
        out_shape = (*x.shape[:-1], L)
        heads = proj.unsqueeze(0)
    else:
        if x.dim() < 2:
            raise ValueError(f"x shape {tuple(x.shape)}: expected [..., n, d] with a projection per head")
        heads = proj
        lead = torch.broadcast_shapes(x.shape[:-2], proj.shape[:1])
        out_shape = (*lead, x.shape[-2], L)
    H = heads.shape[0]
    if math.prod(out_shape) == 0:
        return torch.empty(out_shape, dtype=torch.int32)
    if proj.dim() == 2:
        rows = x.reshape(1, -1, d)
    else:
        # [..., H, n, d] -> [H, (...) * n, d]: each head's rows together, as the kernel takes
        # them. A view, not a copy, for x [H, n, d] or one sequence's [1, H, n, d].
        n = out_shape[-2]
        rows = x.expand(*out_shape[:-1], d).reshape(-1, H, n, d).transpose(0, 1).reshape(H, -1, d)
    rows = rows.to(torch.float32).contiguous()
    codes = torch.empty(H, rows.shape[1], L, dtype=torch.int32)
    _C.simhash_codes(rows.numpy(), H, rows.shape[1], d, heads.contiguous().numpy(), K, L, codes.numpy(),
                     min(torch.get_num_threads(), max_cpu_threads()))
    if proj.dim() == 2:
        return codes.reshape(out_shape)
    return codes.reshape(H, -1, n, L).transpose(0, 1).reshape(out_shape)

class SimHash:
    """L tables of K random hyperplanes each over vectors of size ``head_dim``."""

    def __init__(self, head_dim: int, K: int, L: int, seed: int = 0):
        _check_kl(head_dim, K, L)
        self.head_dim, self.K, self.L = int(head_dim), int(K), int(L)
        self.seed = check_int("seed", seed, 0, 2**64 - 1)  # head_seed gives 64-bit seeds
        self.projection = gaussian_projection(self.head_dim, self.K, self.L, self.seed)

    def hash(self, x: torch.Tensor) -> torch.Tensor:
        """x: real float [..., head_dim] -> int32 codes [..., L] in [0, 2^K)."""
        _check_vectors("x", x, self.head_dim)
        return hash_codes(x, self.projection, self.K)


def layer_projection(seed: int, layer: int, num_kv_heads: int, head_dim: int, K: int, L: int) -> torch.Tensor:
    """float32 [num_kv_heads, head_dim, K*L]: the projections of every KV head of one layer."""
    return torch.stack(
        [gaussian_projection(head_dim, K, L, head_seed(seed, layer, h)) for h in range(num_kv_heads)]
    )


def _log_binomial_terms(logp: torch.Tensor, logq: torch.Tensor, L: int, js: torch.Tensor) -> torch.Tensor:
    """log[C(L, j) p^j q^(L-j)] for every element and every j in js: [..., len(js)]."""
    js = js.to(torch.float64)
    log_choose = torch.lgamma(torch.tensor(L + 1.0, dtype=torch.float64)) - torch.lgamma(js + 1) - torch.lgamma(L - js + 1)
    lp, lq = logp.unsqueeze(-1), logq.unsqueeze(-1)
    # 0 * log 0 = 0: a zero exponent contributes nothing even when p or q is 0.
    jlp = torch.where(js > 0, js * lp, torch.zeros_like(lp))
    jlq = torch.where(L - js > 0, (L - js) * lq, torch.zeros_like(lq))
    return log_choose.to(logp.device) + jlp + jlq


def log_collision_probability(cos_sim: torch.Tensor, K: int, L: int, min_collisions: int) -> torch.Tensor:
    """log P[Binomial(L, p) >= m] with p = (1 - arccos(cos)/pi)^K, in float64.

    Stable at both ends: when the lower tail P[X < m] is below 1/2 the answer is
    log1p(-lower); otherwise the upper tail is summed directly in log space, so tiny
    probabilities (p -> 0, where 1 - lower would cancel) keep their relative precision.
    """
    _check_kl(1, K, L)
    check_int("min_collisions", min_collisions, 1, L)
    cos = torch.as_tensor(cos_sim, dtype=torch.float64).clamp(-1.0, 1.0)
    logp = K * torch.log1p(-torch.arccos(cos) / math.pi)
    logq = torch.log(-torch.expm1(logp))
    device = cos.device
    lower = torch.logsumexp(_log_binomial_terms(logp, logq, L, torch.arange(min_collisions, device=device)), -1)
    out = torch.log(-torch.expm1(lower))
    small = lower > -math.log(2.0)
    if small.any():
        upper_js = torch.arange(min_collisions, L + 1, device=device)
        out[small] = torch.logsumexp(_log_binomial_terms(logp[small], logq[small], L, upper_js), -1)
    return out


def collision_probability(cos_sim: torch.Tensor, K: int, L: int, min_collisions: int) -> torch.Tensor:
    """P[at least ``min_collisions`` of L K-bit tables collide] for keys at cosine ``cos_sim``."""
    return torch.exp(log_collision_probability(cos_sim, K, L, min_collisions))
