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


class OutOfBlocks(RuntimeError):
    """The free list cannot give the blocks asked for (the scheduler checks before asking)."""


FREE, USED, RESERVED = 0, 1, 2  # block states; RESERVED: free, kept for a sequence's growth


class BlockAllocator:
    """The free list of ``num_blocks`` block ids (pure bookkeeping, no tensors).

    It keeps sequences in contiguous runs where it can: a new sequence goes to the first gap
    with ``room`` for its expected length, and the rest of that room is reserved for its growth
    (other sequences are placed elsewhere, and take reserved blocks only when nothing else is
    free); a growing sequence gets the block after its last when that is not in use. A sequence
    in one run is read in place by the attention; only a fragmented one is gathered."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._state = bytearray(num_blocks)  # FREE / USED / RESERVED; bytearray.find scans in C
        self._num_free = num_blocks  # FREE + RESERVED
        self._reservations: dict[int, int] = {}  # first block of a sequence -> end of its room

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def allocate(self, count: int, after: int | None = None, room: int = 0) -> list[int]:
        """``count`` block ids: right after block ``after`` when those are not in use, else
        from the first unreserved gap of ``max(count, room)`` blocks (reserving the rest of it),
        else the first gap of ``count``, else any free ones."""
        if count > self._num_free:
            raise OutOfBlocks(f"asked for {count} KV blocks, {self._num_free} of {self.num_blocks} free")
        if count == 0:
            return []
        if after is not None and USED not in self._state[after + 1 : after + 1 + count] \
                and after + count < self.num_blocks:
            return self._take(list(range(after + 1, after + 1 + count)))
        want = max(count, room)
        start = self._state.find(bytes(want))
        if start >= 0:
            self._state[start + count : start + want] = bytes([RESERVED]) * (want - count)
            self._reservations[start] = start + want
        else:
            start = self._state.find(bytes(count))
        if start >= 0:
            return self._take(list(range(start, start + count)))
        return self._take([i for i, st in enumerate(self._state) if st != USED][:count])

    def _take(self, blocks: list[int]) -> list[int]:
        for b in blocks:
            self._state[b] = USED
        self._num_free -= len(blocks)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Return a sequence's blocks (and drop what is left of its reservation)."""
        for b in blocks:
            self._state[b] = FREE
        self._num_free += len(blocks)
        end = self._reservations.pop(blocks[0], None) if blocks else None
        if end is not None:
            for b in range(blocks[0], end):
                if self._state[b] == RESERVED:
                    self._state[b] = FREE


def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` tokens."""
    return -(-tokens // block_size)


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
