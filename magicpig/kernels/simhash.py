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
    for b in tl.static_range(K):
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
    block_n, block_l = 16, 16
    block_d = max(16, triton.next_power_of_2(d))
    grid = (triton.cdiv(rows.shape[0], block_n), triton.cdiv(L, block_l))
    if rows.shape[0]:
        _simhash_kernel[grid](
            rows, proj, out, rows.shape[0], d, L,
            rows.stride(0), proj.stride(0), out.stride(0),
            K=K, BLOCK_N=block_n, BLOCK_D=block_d, BLOCK_L=block_l,
        )
    return out.view(*x.shape[:-1], L)
