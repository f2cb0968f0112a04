"""The device side of the KV cache (DESIGN.md §4).

* Dense layers keep every token of every sequence in fixed-size blocks (:class:`PagedKVCache`):
  a sequence owns a block table (granted by the ledger, :mod:`magicpig.core.kv_budget`), joins
  and leaves at any step, and its blocks go back to the free list when it finishes.
* Sparse layers keep only the sinks and the local window (centred keys) per sequence, in one
  fixed-size slot per sequence (:class:`SlotKVCache`); the middle lives in the CPU store.

Buffers are allocated once and written in place, so a decode step allocates only the batch's
gathered view of them.
"""

from __future__ import annotations

import mmap

import torch


def zero_buffer(shape: tuple[int, ...], device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A zero tensor of ``shape``. On a CPU device it sits on an anonymous memory map, whose
    pages are zero and take memory only when first written: a CPU engine's whole device budget
    (a quarter of RAM by default) is reserved at start but resident only as blocks fill.
    ``torch.zeros`` would write every byte up front. Elsewhere, ``torch.zeros``."""
    device = torch.device(device)
    numel = 1
    for size in shape:
        numel *= size
    if device.type != "cpu" or numel == 0:
        return torch.zeros(shape, device=device, dtype=dtype)
    nbytes = numel * torch.empty((), dtype=dtype).element_size()
    # The tensor keeps the map alive; the map is unmapped when the tensor is freed.
    return torch.frombuffer(mmap.mmap(-1, nbytes), dtype=dtype).view(shape)


def is_run(blocks: list[int]) -> bool:
    """True when the block ids are consecutive (one contiguous run)."""
    return not blocks or blocks[-1] - blocks[0] == len(blocks) - 1


class PagedKVCache:
    """K/V of one dense layer in blocks: keys, values [Hkv, num_blocks * block_size, d].

    Heads outermost, so that block ``b`` is the token range [b*bs, (b+1)*bs) of every head and
    a run of consecutive blocks is one contiguous range: attention reads it without a copy."""

    def __init__(self, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_kv_heads, num_blocks * block_size, head_dim)
        self.keys = zero_buffer(shape, device, dtype)
        self.values = zero_buffer(shape, device, dtype)
        self.block_size = block_size

    def bytes_per_token(self) -> int:
        h, _, d = self.keys.shape
        return 2 * h * d * self.keys.element_size()

    def fill(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Write keys/values [Hkv, n, d] as a sequence's tokens [start, start + n) into its
        blocks (one copy per block touched)."""
        bs, end = self.block_size, start + keys.shape[1]
        pos = start
        while pos < end:
            offset = pos % bs
            take = min(bs - offset, end - pos)
            dst = blocks[pos // bs] * bs + offset
            self.keys[:, dst : dst + take] = keys[:, pos - start : pos - start + take]
            self.values[:, dst : dst + take] = values[:, pos - start : pos - start + take]
            pos += take

    def write(self, slots: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One token per row: keys/values [b, Hkv, d] at the flat token slots int64 [b]
        (block * block_size + offset, see :meth:`slot`)."""
        self.keys[:, slots] = keys.transpose(0, 1)
        self.values[:, slots] = values.transpose(0, 1)

    def slot(self, blocks: list[int], position: int) -> int:
        """The flat token slot of ``position`` in a sequence with these blocks."""
        return blocks[position // self.block_size] * self.block_size + position % self.block_size

    def sequence(self, blocks: list[int], n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [Hkv, n, d] of a sequence's first n tokens: a view when its blocks are
        one run, else gathered (a copy)."""
        bs = self.block_size
        if is_run(blocks):
            lo = blocks[0] * bs
            return self.keys[:, lo : lo + n], self.values[:, lo : lo + n]
        index = (torch.tensor(blocks, device=self.keys.device)[:, None] * bs
                 + torch.arange(bs, device=self.keys.device)).flatten()[:n]
        return self.keys.index_select(1, index), self.values.index_select(1, index)


class SlotKVCache:
    """Sinks + window K/V of one sparse layer: keys, values [num_slots, Hkv, capacity, d],
    one slot per running sequence. How many tokens a slot holds is tracked by the caller."""

    def __init__(self, num_slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.keys = zero_buffer(shape, device, dtype)
        self.values = zero_buffer(shape, device, dtype)

    @property
    def capacity(self) -> int:
        return self.keys.shape[2]

    def bytes_per_token(self) -> int:
        _, h, _, d = self.keys.shape
        return 2 * h * d * self.keys.element_size()

    def fill(self, slot: int, keys: torch.Tensor, values: torch.Tensor, start: int = 0) -> None:
        """Write keys, values [Hkv, n, d] into ``slot`` at positions [start, start + n)."""
        n = keys.shape[1]
        self.keys[slot, :, start : start + n] = keys
        self.values[slot, :, start : start + n] = values

    def write(self, slots: torch.Tensor, fills: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One token per row: keys/values [b, Hkv, d] at position ``fills[i]`` of ``slots[i]``."""
        self.keys[slots, :, fills] = keys
        self.values[slots, :, fills] = values

    def gather(self, slots: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [b, Hkv, n, d]: the first n positions of each slot (a copy)."""
        return self.keys[slots, :, :n], self.values[slots, :, :n]

    def evict(self, slot: int, start: int, count: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove positions [start, start+count) of a slot holding ``length`` tokens, shifting
        the rest left. Returns the removed keys, values [Hkv, count, d] (copies)."""
        k = self.keys[slot, :, start : start + count].clone()
        v = self.values[slot, :, start : start + count].clone()
        rest = length - start - count
        tail = slice(start + count, length)
        self.keys[slot, :, start : start + rest] = self.keys[slot, :, tail].clone()
        self.values[slot, :, start : start + rest] = self.values[slot, :, tail].clone()
        return k, v
