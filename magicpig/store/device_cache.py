"""The device side of the KV cache (DESIGN.md §4).

* Dense layers keep every token of every sequence in fixed-size blocks from a free list
  (:class:`BlockAllocator`, :class:`PagedKVCache`): a sequence owns a block table, joins and
  leaves at any step, and its blocks go back to the free list when it finishes.
* Sparse layers keep only the sinks and the local window (centred keys) per sequence, in one
  fixed-size slot per sequence (:class:`SlotKVCache`); the middle lives in the CPU store.

Buffers are allocated once and written in place, so a decode step allocates only the batch's
gathered view of them.
"""

from __future__ import annotations

import torch


class OutOfBlocks(RuntimeError):
    """The free list cannot give the blocks asked for (the scheduler checks before asking)."""


class BlockAllocator:
    """A free list of ``num_blocks`` block ids (pure bookkeeping, no tensors)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))  # pop() hands out low ids first

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocks(f"asked for {count} KV blocks, {len(self._free)} of {self.num_blocks} free")
        return [self._free.pop() for _ in range(count)]

    def free(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` tokens."""
    return -(-tokens // block_size)


class PagedKVCache:
    """K/V of one dense layer in blocks: keys, values [num_blocks, Hkv, block_size, d]."""

    def __init__(self, num_blocks: int, num_kv_heads: int, block_size: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_blocks, num_kv_heads, block_size, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.block_size = block_size

    def bytes_per_token(self) -> int:
        _, h, _, d = self.keys.shape
        return 2 * h * d * self.keys.element_size()

    def fill(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write a sequence's first n tokens, keys/values [Hkv, n, d], into its blocks."""
        bs, n = self.block_size, keys.shape[1]
        for i, block in enumerate(blocks[: blocks_for(n, bs)]):
            lo, hi = i * bs, min(n, (i + 1) * bs)
            self.keys[block, :, : hi - lo] = keys[:, lo:hi]
            self.values[block, :, : hi - lo] = values[:, lo:hi]

    def write(self, table: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> None:
        """One token per row: keys/values [b, Hkv, d] at int64 ``positions`` [b] of the
        sequences whose block tables are the rows of ``table`` [b, max_blocks]."""
        rows = torch.arange(table.shape[0], device=table.device)
        block = table[rows, positions // self.block_size]
        offset = positions % self.block_size
        self.keys[block, :, offset] = keys
        self.values[block, :, offset] = values

    def gather(self, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [b, Hkv, max_blocks * block_size, d] of the sequences of ``table``
        (a copy; slots past a sequence's length hold stale data: mask them)."""
        b, nb = table.shape
        _, h, bs, d = self.keys.shape

        def one(pool: torch.Tensor) -> torch.Tensor:
            return pool[table].permute(0, 2, 1, 3, 4).reshape(b, h, nb * bs, d)

        return one(self.keys), one(self.values)


class SlotKVCache:
    """Sinks + window K/V of one sparse layer: keys, values [num_slots, Hkv, capacity, d],
    one slot per running sequence. How many tokens a slot holds is tracked by the caller."""

    def __init__(self, num_slots: int, num_kv_heads: int, capacity: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype):
        shape = (num_slots, num_kv_heads, capacity, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)

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
