"""Triton kernel: SimHash codes of many vectors in one pass (DESIGN.md §2, "hash q on device").

Fuses the projection matmul, the sign test and the packing of K bits per table, so the
[N, K*L] float projections never reach memory. Bit ``b`` of table ``l`` is
``[x . projection[:, l*K + b] > 0]``, the order fixed by :mod:`magicpig.lsh`, which is the
reference this kernel is tested against (with ``TRITON_INTERPRET=1`` on machines without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from magicpig.kernels.aot import AotSpec

BLOCK_N = 16  # rows of x per program
BLOCK_L = 16  # hash tables per program


def _block_d(d: int) -> int:
    """Padded head dim of a launch: a power of two, at least 16 (tl.dot's smallest block)."""
    return max(16, triton.next_power_of_2(d))


@triton.jit
def _simhash_kernel(
    x_ptr, p_ptr, out_ptr,
    N, D, L,
    stride_xn, stride_pd, stride_on,
    K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_L: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_l = tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tables = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    dims = tl.arange(0, BLOCK_D)
    x = tl.load(
        x_ptr + rows[:, None] * stride_xn + dims[None, :],
        mask=(rows[:, None] < N) & (dims[None, :] < D), other=0.0,
    ).to(tl.float32)
    code = tl.zeros((BLOCK_N, BLOCK_L), dtype=tl.int32)
    # A runtime loop, not tl.static_range: unrolled, the K iterations' loads were all hoisted and
    # the sm_90 build spilled (K=10, d=128: 10.8 KB of spill stores per thread, measured by
    # tests/test_kernels_aot.py); rolled, it needs at most 90 registers. Same dots, same order.
    for b in tl.range(K):
        # Column l*K + b of the projection for every table l of this block: [BLOCK_D, BLOCK_L].
        cols = tables * K + b
        p = tl.load(
            p_ptr + dims[:, None] * stride_pd + cols[None, :],
            mask=(dims[:, None] < D) & (tables[None, :] < L), other=0.0,
        )
        dots = tl.dot(x, p, input_precision="ieee")
        code = code | ((dots > 0).to(tl.int32) << b)
    tl.store(
        out_ptr + rows[:, None] * stride_on + tables[None, :], code,
        mask=(rows[:, None] < N) & (tables[None, :] < L),
    )


def simhash_codes(x: torch.Tensor, projection: torch.Tensor, K: int) -> torch.Tensor:
    """SimHash codes with the Triton kernel.

    x: [..., d] float (fp32/fp16/bf16), projection: float32 [d, K*L]. Returns int32 [..., L].
    """
    if projection.dim() != 2 or projection.shape[1] % K:
        raise ValueError(f"projection: expected float32 [d, K*L] with K={K}, got {tuple(projection.shape)}")
    d, L = projection.shape[0], projection.shape[1] // K
    if x.shape[-1] != d:
        raise ValueError(f"x: expected last dim {d}, got {x.shape[-1]}")
    if x.device != projection.device:
        raise ValueError(f"x on {x.device} and projection on {projection.device}: expected one device")
    rows = x.reshape(-1, d).contiguous()
    proj = projection.to(torch.float32).contiguous()
    out = torch.empty(rows.shape[0], L, dtype=torch.int32, device=x.device)
    grid = (triton.cdiv(rows.shape[0], BLOCK_N), triton.cdiv(L, BLOCK_L))
    if rows.shape[0]:
        _simhash_kernel[grid](
            rows, proj, out, rows.shape[0], d, L,
            rows.stride(0), proj.stride(0), out.stride(0),
            K=K, BLOCK_N=BLOCK_N, BLOCK_D=_block_d(d), BLOCK_L=BLOCK_L,
        )
    return out.view(*x.shape[:-1], L)


# What the ahead-of-time compile check builds for sm_90 (magicpig.kernels.aot,
# tests/test_kernels_aot.py): launches simhash_codes makes with x in a model dtype (the projection
# is always float32), head dims 64 and 128, K of 7 and the paper's 10.
_AOT_LAUNCHES = [(x, d, K) for x in ("*fp32", "*bf16") for d in (64, 128) for K in (7, 10)] + [("*fp16", 128, 10)]
AOT_SPECS = [
    AotSpec(
        _simhash_kernel,
        {"x_ptr": x, "p_ptr": "*fp32", "out_ptr": "*i32",
         **dict.fromkeys(("N", "D", "L", "stride_xn", "stride_pd", "stride_on"), "i32")},
        {"K": K, "BLOCK_N": BLOCK_N, "BLOCK_D": _block_d(d), "BLOCK_L": BLOCK_L},
    )
    for x, d, K in _AOT_LAUNCHES
]
