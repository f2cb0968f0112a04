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

from magicpig.core.prefix_cache import CacheNode, PrefixCache, PrefixMatch

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
    in one run is read in place by the attention; only a fragmented one is gathered.

    A block may be held by several owners (requests sharing a cached prefix, and the prefix
    cache itself): ``share`` adds a holder, ``free`` drops one, and the block is free again when
    its last holder drops it (vLLM's block ref_cnt)."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._state = bytearray(num_blocks)  # FREE / USED / RESERVED; bytearray.find scans in C
        self._num_free = num_blocks  # FREE + RESERVED
        self._reservations: dict[int, int] = {}  # first block of a sequence -> end of its room
        self._extra: dict[int, int] = {}  # block -> holders beyond the first (only shared blocks)

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

    def share(self, blocks: list[int]) -> None:
        """One more holder of each of ``blocks`` (in use)."""
        for b in blocks:
            assert self._state[b] == USED, f"block {b} is not in use"
            self._extra[b] = self._extra.get(b, 0) + 1

    def holders(self, block: int) -> int:
        return 0 if self._state[block] != USED else 1 + self._extra.get(block, 0)

    def free(self, blocks: list[int]) -> None:
        """Drop one holder of each block; a block whose last holder goes is free again (and
        what is left of a reservation starting at it is dropped)."""
        for b in blocks:
            extra = self._extra.get(b, 0)
            if extra:
                if extra == 1:
                    del self._extra[b]
                else:
                    self._extra[b] = extra - 1
                continue
            assert self._state[b] == USED, f"block {b} freed twice"
            self._state[b] = FREE
            self._num_free += 1
            end = self._reservations.pop(b, None)
            if end is not None:
                for r in range(b, end):
                    if self._state[r] == RESERVED:
                        self._state[r] = FREE


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
    table, and takes everything back when it finishes or is preempted.

    With a :class:`PrefixCache` (``cache``) it is also the prefix cache's memory: a request
    admitted on a cached prefix shares that prefix's blocks (one more holder each) and reserves
    CPU bytes for its own tokens only; ``cache_request`` turns a request's full blocks into a
    cache node (the blocks gain the node as a holder, and the CPU bytes of the node's tokens
    move from the request's reservation to the cache); nodes nobody uses stay until an
    admission needs their memory (``evict_one``, least recently used first). Evicted nodes
    collect in ``evicted`` until the scheduler hands them to the runner."""

    def __init__(self, layout: KVLayout, cache: PrefixCache | None = None):
        self.layout = layout
        self.allocator = BlockAllocator(layout.num_blocks)
        self._free_slots = list(range(layout.num_slots - 1, -1, -1))
        self._cpu_reserved: dict[int, int] = {}  # id(request) -> bytes reserved
        if cache is not None and layout.block_size and cache.block_size != layout.block_size:
            raise ValueError(f"cache block_size={cache.block_size}: must equal the dense blocks' {layout.block_size}")
        self.cache = cache
        self.cached_cpu_bytes = 0  # CPU-store bytes of the cache nodes' own tokens
        self.evicted: list[CacheNode] = []

    # ------------------------------------------------------------------------ what is free
    @property
    def free_blocks(self) -> int:
        return self.allocator.num_free

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    @property
    def cpu_bytes_free(self) -> int:
        return self.layout.cpu_bytes_total - sum(self._cpu_reserved.values()) - self.cached_cpu_bytes

    def cached_blocks(self) -> int:
        """Device blocks held by the prefix cache's nodes."""
        return sum(len(n.own_blocks) for n in self.cache.nodes.values()) if self.cache else 0

    def reclaimable(self) -> tuple[int, int]:
        """(blocks, CPU bytes) of cache nodes no running request uses: free for the taking."""
        idle = [n for n in self.cache.nodes.values() if n.refs == 0] if self.cache else []
        return sum(len(n.own_blocks) for n in idle), sum(n.cpu_bytes for n in idle)

    def pressure(self) -> float:
        """The larger used fraction of the block pool and the CPU-store budget (memory the
        prefix cache could give back counts as free)."""
        L = self.layout
        blocks, cpu = self.reclaimable()
        used = [1 - (self.free_blocks + blocks) / L.num_blocks if L.num_blocks and L.block_size else 0.0,
                1 - (self.cpu_bytes_free + cpu) / L.cpu_bytes_total if L.cpu_bytes_total else 0.0]
        return max(used)

    # --------------------------------------------------------------------------- per request
    def blocks_for(self, tokens: int) -> int:
        return blocks_for(tokens, self.layout.block_size)

    def cpu_bytes(self, req: "Request", cached: int = 0) -> int:
        """CPU-store bytes held back for a request from admission to finish (its tokens beyond
        the ``cached`` prefix it shares)."""
        return self.layout.cpu_bytes_per_token * (req.max_tokens - cached)

    def admission_blocks(self, req: "Request", cached: int = 0) -> int:
        """Free blocks its admission takes (those of a ``cached`` prefix are shared)."""
        return admission_blocks(req, self.layout.block_size) - self.blocks_for(cached)

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

    def match(self, req: "Request") -> PrefixMatch:
        """The longest cached prefix of what the request's admission would prefill (no hit
        without a cache, or for a request that does not use it)."""
        if self.cache is None or not req.cacheable:
            return PrefixMatch()
        return self.cache.match(self.block_hashes(req, req.prefill_length), req.prefill_length)

    def block_hashes(self, req: "Request", tokens: int) -> list[bytes]:
        """Keys of the full blocks of the request's first ``tokens`` tokens (prompt, then
        output), computed once per request and extended as it grows (``req.block_hashes``)."""
        bs = self.cache.block_size
        req.block_hashes = self.cache.hashes(req.all_token_ids[:tokens], req.block_hashes[: tokens // bs])
        return req.block_hashes[: tokens // bs]

    def admit(self, req: "Request", match: PrefixMatch | None = None) -> None:
        """Grant a waiting request its slot, the blocks of its prefill (those of a matched
        cached prefix shared, the rest placed where its whole length fits in one run if it can)
        and its CPU-store reservation; its KV state starts after the cached prefix. The caller
        checked that they are free."""
        kv = req.kv
        assert not kv.blocks and kv.slot < 0 and id(req) not in self._cpu_reserved, "admitted twice"
        if not self._free_slots:
            raise RuntimeError(f"all {self.layout.num_slots} sequence slots are in use")
        cached = match.tokens if match is not None else 0
        shared = match.node.block_table[: self.blocks_for(cached)] if cached else []
        kv.slot = self._free_slots.pop()
        self.allocator.share(shared)
        own = self.blocks_for(req.prefill_length) - len(shared)
        kv.blocks = shared + self.allocator.allocate(own, room=self.blocks_for(req.max_tokens) - len(shared))
        self._cpu_reserved[id(req)] = self.cpu_bytes(req, cached)
        if self.cache is not None and req.cacheable:
            self.cache.record_query(req.prefill_length, cached)
        req.num_cached_tokens = cached
        if cached:
            self.cache.acquire(match.node)
            kv.prefix, kv.cached, kv.length = match.node, cached, cached
            kv.cache_refs.append(match.node)

    def grow(self, kv: "SequenceKV", tokens: int) -> None:
        """Extend the block table to hold ``tokens`` tokens (the blocks after its last where free)."""
        more = self.growth(kv, tokens)
        if more:
            kv.blocks += self.allocator.allocate(more, after=kv.blocks[-1] if kv.blocks else None)

    def free(self, req: "Request") -> None:
        """Drop everything the request holds (idempotent): blocks it shares stay with their
        other holders, cache nodes it used lose its reference."""
        kv = req.kv
        self.allocator.free(kv.blocks)
        kv.blocks = []
        if kv.slot >= 0:
            self._free_slots.append(kv.slot)
            kv.slot = -1
        self._cpu_reserved.pop(id(req), None)
        for node in kv.cache_refs:
            self.cache.release(node)
        kv.cache_refs = []

    # ------------------------------------------------------------------------ the cache
    def cache_request(self, req: "Request") -> CacheNode | None:
        """Cache the full blocks of the tokens the request holds K/V of (its prompt once
        prefilled; prompt and output when it finishes). Returns the new node (the runner then
        keeps its store state), or None when nothing new was cached. The request holds a
        reference on the node until it is freed."""
        if self.cache is None or not req.cacheable:
            return None
        node = self.cache.insert(self.block_hashes(req, req.num_computed_tokens),
                                 req.kv.blocks if self.layout.block_size else [], self.layout.cpu_bytes_per_token)
        if node is None:
            return None
        self.allocator.share(node.own_blocks)
        reserved = self._cpu_reserved.get(id(req), 0)
        self._cpu_reserved[id(req)] = reserved - min(reserved, node.cpu_bytes)  # now the cache's
        self.cached_cpu_bytes += node.cpu_bytes
        self.cache.acquire(node)
        req.kv.cache_refs.append(node)
        return node

    def evict_one(self, keep: CacheNode | None = None) -> int | None:
        """Evict the least recently used node nobody uses (never ``keep`` or its ancestors);
        returns the blocks it gave back, or None when nothing can go."""
        node = self.cache.lru(keep) if self.cache is not None else None
        return None if node is None else self._evict(node)

    def _evict(self, node: CacheNode) -> int:
        before = self.free_blocks
        self.cache.remove(node)
        self.allocator.free(node.own_blocks)
        self.cached_cpu_bytes -= node.cpu_bytes
        self.evicted.append(node)
        return self.free_blocks - before

    def uncache(self, node: CacheNode, kv: "SequenceKV") -> None:
        """Undo ``cache_request`` of a node just made from ``kv`` (its store state could not be
        kept): ``kv`` drops its reference and the node goes."""
        kv.cache_refs.remove(node)
        self.cache.release(node)
        self._evict(node)
        self.evicted.remove(node)

    def clear_cache(self) -> int:
        """Evict every node nobody uses (vLLM's reset_prefix_cache); returns how many went."""
        count = 0
        while self.evict_one() is not None:
            count += 1
        return count
