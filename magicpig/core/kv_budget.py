"""The one ledger of the engine's memory, and the one home of its arithmetic (DESIGN.md §4, §5).

Three pools: the dense layers' device KV blocks (a free list of block ids, paged as in
vLLM), the sparse layers' sinks+window slots (one per running sequence), and the CPU-store
bytes (each request reserves its whole length's worth at admission, so the stores never
outgrow their budget mid-decode). The scheduler owns a :class:`KVBudget` and asks it
(nano-vllm's scheduler owns its ``BlockManager``, vLLM v1's its ``KVCacheManager``); the
runner only fills what the ledger granted; the simulator drives the same ledger with no
tensors at all. Pure Python, no torch: the sizes come in as integers (:class:`KVLayout`),
and the store's own bytes per token are asked from the store module by whoever builds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # only read here
    from magicpig.core.request import Request, SequenceKV

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}  # the store's K/V dtypes


# ---------------------------------------------------------------------------------- formulas
def blocks_for(tokens: int, block_size: int) -> int:
    """Blocks needed to hold ``tokens`` tokens (0 when ``block_size`` is 0: no dense layer)."""
    return -(-tokens // block_size) if block_size else 0


def kv_bytes_per_token(num_kv_heads: int, head_dim: int, dtype_bytes: int) -> int:
    """Bytes of one token's K and V in one layer."""
    return 2 * num_kv_heads * head_dim * dtype_bytes


def slot_tokens(sink_tokens: int, window_tokens: int) -> int:
    """Tokens a sinks+window slot holds: S sinks and W..2W window tokens (a full window spills
    W at a time into the store, which amortises hashing)."""
    return sink_tokens + 2 * window_tokens


def device_cache_bytes(num_layers: int, num_dense: int, per_token_layer: int, sink_tokens: int,
                       window_tokens: int, block_size: int) -> tuple[int, int]:
    """(bytes of one sequence slot over all sparse layers, bytes of one block over all dense
    layers): what a device budget is divided into."""
    slot = (num_layers - num_dense) * per_token_layer * slot_tokens(sink_tokens, window_tokens)
    return slot, num_dense * per_token_layer * block_size


def cpu_bytes_per_token(num_sparse_layers: int, num_kv_heads: int, store_bytes_per_token_head: int) -> int:
    """CPU-store bytes of one middle token over all sparse layers; ``store_bytes_per_token_head``
    is the store's own figure (``magicpig.store.cpu_store.store_bytes_per_token_head``)."""
    return num_sparse_layers * num_kv_heads * store_bytes_per_token_head


def blocks_in_budget(device_bytes: int, num_slots: int, slot_bytes: int, block_bytes: int) -> int:
    """Dense blocks that fit in a device budget beside ``num_slots`` slots; ValueError (naming
    ``device_memory_bytes``) when not even one block (or the slots) fit."""
    left = device_bytes - slot_bytes * num_slots
    num_blocks = left // block_bytes if block_bytes else 0
    if left < 0 or (block_bytes and num_blocks < 1):
        raise ValueError(
            f"device_memory_bytes={device_bytes}: too small for {num_slots} sequence slots "
            f"({slot_bytes} bytes each) and one KV block ({block_bytes} bytes)"
        )
    return int(num_blocks)


def admission_blocks(req: "Request", block_size: int) -> int:
    """Free blocks an admission needs: its prefill and its first decode's token (capped at the
    most it can ever hold), so that it never has to be preempted for its first token."""
    return blocks_for(min(req.prefill_length + 1, req.max_tokens), block_size)


# ------------------------------------------------------------------------------ the allocator
FREE, USED, RESERVED = 0, 1, 2  # block states; RESERVED: free, kept for a sequence's growth


class OutOfBlocks(RuntimeError):
    """The free list cannot give the blocks asked for (the scheduler checks before asking)."""


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


# --------------------------------------------------------------------------------- the ledger
@dataclass(frozen=True)
class KVLayout:
    """The pools' sizes. block_size: tokens per dense block (0: the model has no dense layer).
    num_blocks: dense blocks. num_slots: sequence slots (the most running requests).
    cpu_bytes_total: the CPU-store budget. cpu_bytes_per_token: a request's store bytes per token (0: no store).
    slot_bytes / block_bytes: device bytes of one slot / one block (for messages and sizing)."""

    block_size: int
    num_blocks: int
    num_slots: int
    cpu_bytes_total: int
    cpu_bytes_per_token: int
    slot_bytes: int = 0
    block_bytes: int = 0


class KVBudget:
    """The ledger: grants a request its slot, blocks and CPU-store reservation, grows its block
    table, and takes everything back when it finishes or is preempted."""

    def __init__(self, layout: KVLayout):
        self.layout = layout
        self.allocator = BlockAllocator(layout.num_blocks)
        self._free_slots = list(range(layout.num_slots - 1, -1, -1))
        self._cpu_reserved: dict[int, int] = {}  # id(request) -> bytes reserved

    # ------------------------------------------------------------------------ what is free
    @property
    def free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def cpu_bytes_free(self) -> int:
        return self.layout.cpu_bytes_total - sum(self._cpu_reserved.values())

    def pressure(self) -> float:
        """The larger used fraction of the block pool and the CPU-store budget."""
        L = self.layout
        used = [1 - self.free_blocks / L.num_blocks if L.num_blocks and L.block_size else 0.0,
                1 - self.cpu_bytes_free / L.cpu_bytes_total if L.cpu_bytes_total else 0.0]
        return max(used)

    # --------------------------------------------------------------------------- per request
    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.layout.block_size)

    def cpu_bytes(self, req: "Request") -> int:
        """CPU-store bytes held back for a request from admission to finish."""
        return self.layout.cpu_bytes_per_token * req.max_tokens

    def admission_blocks(self, req: "Request") -> int:
        return admission_blocks(req, self.layout.block_size)

    def growth(self, kv: "SequenceKV", tokens: int) -> int:
        """Blocks ``kv`` still needs to hold ``tokens`` tokens."""
        return max(0, self.blocks_for(tokens) - len(kv.blocks))

    def never_fits(self, req: "Request") -> str | None:
        """Why a request can never run here (its whole length does not fit an empty engine),
        or None."""
        L = self.layout
        blocks = self.blocks_for(req.max_tokens)
        if blocks > L.num_blocks:
            return (f"request of {req.num_prompt_tokens} prompt + {req.params.max_new_tokens} new tokens needs "
                    f"{blocks} KV blocks ({blocks * L.block_bytes} bytes); the device budget holds "
                    f"{L.num_blocks} ({L.num_blocks * L.block_bytes} bytes)")
        cpu = self.cpu_bytes(req)
        if cpu > L.cpu_bytes_total:
            return (f"request of {req.max_tokens} tokens needs about {cpu} bytes of CPU store; "
                    f"cpu_memory_bytes={L.cpu_bytes_total}")
        return None

    def admit(self, req: "Request") -> None:
        """Grant a waiting request its slot, the blocks of its prefill (placed where its whole
        length fits in one run if it can) and its CPU-store reservation. The caller checked
        that they are free."""
        kv = req.kv
        assert not kv.blocks and kv.slot < 0 and id(req) not in self._cpu_reserved, "admitted twice"
        if not self._free_slots:
            raise RuntimeError(f"all {self.layout.num_slots} sequence slots are in use")
        kv.slot = self._free_slots.pop()
        kv.blocks = self.allocator.allocate(self.blocks_for(req.prefill_length), room=self.blocks_for(req.max_tokens))
        self._cpu_reserved[id(req)] = self.cpu_bytes(req)

    def grow(self, kv: "SequenceKV", tokens: int) -> None:
        """Extend the block table to hold ``tokens`` tokens (the blocks after its last where free)."""
        more = self.growth(kv, tokens)
        if more:
            kv.blocks += self.allocator.allocate(more, after=kv.blocks[-1] if kv.blocks else None)

    def free(self, req: "Request") -> None:
        """Take back everything the request holds (idempotent)."""
        kv = req.kv
        self.allocator.free(kv.blocks)
        kv.blocks = []
        if kv.slot >= 0:
            self._free_slots.append(kv.slot)
            kv.slot = -1
        self._cpu_reserved.pop(id(req), None)
