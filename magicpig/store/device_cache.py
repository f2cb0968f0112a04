"""The device side of the KV cache (DESIGN.md §4): static per-layer K/V buffers.

Dense layers keep every token of every sequence here; sparse layers keep only the sinks and
the local window (centred keys), while the middle lives in the CPU store. Buffers are static
(allocated once, written in place) so a decode step does no allocation and no concatenation.
How many tokens each row holds is tracked by the caller (all layers of one kind share it).
"""

from __future__ import annotations

import torch


class StaticKVCache:
    """K/V buffers of one layer for a batch: keys, values [B, Hkv, capacity, d]."""

    def __init__(
        self,
        batch: int,
        num_kv_heads: int,
        capacity: int,
        head_dim: int,
        device: torch.device,
        dtype: torch.dtype,
    ):
        shape = (batch, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def bytes_per_token(self) -> int:
        """Bytes one token of one row takes (keys + values, all KV heads)."""
        _, h, _, d = self.keys.shape
        return 2 * h * d * self.keys.element_size()

    def fill(self, row: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Write keys, values [Hkv, n, d] into row ``row`` at slots [start, start + n)."""
        n = keys.shape[1]
        self.keys[row, :, start : start + n] = keys
        self.values[row, :, start : start + n] = values

    def write(
        self, rows: slice, slot: int | None, slots: torch.Tensor | None, keys: torch.Tensor, values: torch.Tensor
    ) -> None:
        """One token per row of ``rows``: keys, values [b, Hkv, d] go to slot ``slot`` of every
        row when given (a plain copy, the common case), else to ``slots[i]`` (int64 [b])."""
        k_rows, v_rows = self.keys[rows], self.values[rows]
        if slot is not None:
            k_rows[:, :, slot] = keys
            v_rows[:, :, slot] = values
        else:
            index = torch.arange(k_rows.shape[0], device=k_rows.device)
            k_rows[index, :, slots] = keys
            v_rows[index, :, slots] = values

    def evict(self, row: int, start: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove slots [start, start+count) of a row holding ``length`` tokens, shifting the
        rest left. Returns the removed keys, values [Hkv, count, d] (copies)."""
        k = self.keys[row, :, start : start + count].clone()
        v = self.values[row, :, start : start + count].clone()
        tail = slice(start + count, length)
        rest = length - start - count
        self.keys[row, :, start : start + rest] = self.keys[row, :, tail].clone()
        self.values[row, :, start : start + rest] = self.values[row, :, tail].clone()
        return k, v

    def grow(self, capacity: int) -> None:
        """Reallocate to a larger capacity, keeping the contents."""
        if capacity <= self.capacity:
            return
        b, h, n, d = self.keys.shape
        for name in ("keys", "values"):
            old = getattr(self, name)
            new = torch.zeros((b, h, capacity, d), device=old.device, dtype=old.dtype)
            new[:, :, :n] = old
            setattr(self, name, new)
