"""Automatic prefix caching: the block hash chain and the tree of cached prefixes (DESIGN.md §5b).

vLLM's semantics: a token sequence is cut into full blocks of ``block_size`` tokens; block i's
key is a hash of its tokens, of block i-1's key (so one key names the whole prefix up to it) and
of a salt naming whatever changes the stored state (the model, its dtype, the MagicPIGConfig).
A new request reuses the longest chain of cached blocks and prefills only the rest.

The unit of caching and eviction is a :class:`CacheNode` (SGLang's radix-tree node): the full
blocks one sequence added beyond the cached prefix it started from. A node knows its parent (the
node its first block follows, possibly part-way through the parent's blocks), the dense-layer
device blocks of its whole prefix, and the CPU-store bytes of its own tokens; what it holds in
the stores (each sparse layer's read-only fork of the prefix, its sinks and centring) is the
runner's, kept under ``node_id``. Running requests hold references; a node with no reference
and no child is evictable, least recently used first. Pure Python: no torch.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from array import array
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

from magicpig.config import check_int

_node_ids = itertools.count()


def block_hashes(token_ids: list[int], block_size: int, salt: bytes, known: Iterable[bytes] = ()) -> list[bytes]:
    """Keys of the full blocks of ``token_ids``: block i's is blake2b(key i-1, salt, its tokens).
    ``known``: keys already computed for a prefix of the same tokens (extended, not redone)."""
    keys = list(known)
    parent = keys[-1] if keys else b""
    for start in range(len(keys) * block_size, len(token_ids) - block_size + 1, block_size):
        h = hashlib.blake2b(parent, digest_size=16)
        h.update(salt)
        h.update(array("q", token_ids[start : start + block_size]).tobytes())
        parent = h.digest()
        keys.append(parent)
    return keys


@dataclass(eq=False)
class CacheNode:
    """Cached full blocks ``[start, end)`` (tokens) of one sequence, after its parent's first
    ``start`` tokens. block_table: the dense-layer device blocks of tokens ``[0, end)``
    (ancestors' then its own; empty without dense layers). own_blocks: the ones it holds a
    reference on. cpu_bytes: the CPU-store bytes of its own tokens (the ledger's figure).
    refs: running requests using it; children: nodes that follow it."""

    parent: Optional["CacheNode"]
    start: int
    end: int
    hashes: list[bytes]
    block_table: list[int]
    own_blocks: list[int]
    cpu_bytes: int
    last_used: float
    refs: int = 0
    children: int = 0
    node_id: int = field(default_factory=lambda: next(_node_ids))

    @property
    def evictable(self) -> bool:
        return self.refs == 0 and self.children == 0

    @property
    def num_tokens(self) -> int:
        """Tokens it adds (its own)."""
        return self.end - self.start


@dataclass(frozen=True)
class PrefixMatch:
    """The longest cached prefix of a request: ``tokens`` tokens through ``node`` (None: no hit)."""

    node: Optional[CacheNode] = None
    tokens: int = 0


@dataclass
class CacheStats:
    """Counters since start: queries / hits in prompt tokens (vLLM's prefix_cache_queries /
    prefix_cache_hits), nodes evicted, and the blocks / bytes evicted with them."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0
    evicted_tokens: int = 0


class PrefixCache:
    """The hash map of cached blocks and their nodes. ``clock``: LRU time (perf_counter)."""

    def __init__(self, block_size: int, salt: bytes = b"", clock: Callable[[], float] = time.perf_counter):
        self.block_size = check_int("block_size", block_size, 1)
        self.salt = salt
        self.clock = clock
        self._blocks: dict[bytes, tuple[CacheNode, int]] = {}  # key -> (node, block index in the chain)
        self.nodes: dict[int, CacheNode] = {}
        self.stats = CacheStats()

    def hashes(self, token_ids: list[int], known: Iterable[bytes] = ()) -> list[bytes]:
        return block_hashes(token_ids, self.block_size, self.salt, known)

    # ----------------------------------------------------------------------- lookup
    def _longest(self, keys: list[bytes]) -> tuple[Optional[CacheNode], int]:
        """(node holding the last cached block of the chain, number of cached blocks)."""
        node, count = None, 0
        for i, key in enumerate(keys):
            hit = self._blocks.get(key)
            if hit is None:
                break
            node, count = hit[0], i + 1
        return node, count

    def match(self, keys: list[bytes], prefill_length: int) -> PrefixMatch:
        """The longest cached chain of ``keys`` that leaves at least one token to prefill (the
        first token is sampled from the last prefilled position's logits)."""
        node, count = self._longest(keys)
        tokens = min(count * self.block_size, (prefill_length - 1) // self.block_size * self.block_size)
        if tokens <= 0 or node is None:
            return PrefixMatch()
        node = self._blocks[keys[tokens // self.block_size - 1]][0]  # the node holding its last block
        return PrefixMatch(node, tokens)

    def record_query(self, prompt_tokens: int, hit_tokens: int) -> None:
        self.stats.query_tokens += prompt_tokens
        self.stats.hit_tokens += hit_tokens

    def acquire(self, node: CacheNode) -> None:
        node.refs += 1
        node.last_used = self.clock()

    def release(self, node: CacheNode) -> None:
        assert node.refs > 0, f"node {node.node_id} released more often than acquired"
        node.refs -= 1
        node.last_used = self.clock()

    # ----------------------------------------------------------------------- insert
    def insert(self, keys: list[bytes], block_table: list[int], cpu_bytes_per_token: int) -> Optional[CacheNode]:
        """Cache a sequence's full blocks (``keys``; ``block_table``: its dense-layer blocks, or
        [] without dense layers). Returns the new node of the blocks not cached yet (its own
        blocks are ``block_table``'s from there), or None when every block already is."""
        parent, count = self._longest(keys)
        if count == len(keys):
            if parent is not None:
                parent.last_used = self.clock()
            return None
        bs = self.block_size
        own = block_table[count : len(keys)]
        node = CacheNode(parent=parent, start=count * bs, end=len(keys) * bs, hashes=keys[count:],
                         block_table=(parent.block_table[:count] if parent else []) + own, own_blocks=own,
                         cpu_bytes=cpu_bytes_per_token * (len(keys) - count) * bs, last_used=self.clock())
        if parent is not None:
            parent.children += 1
        for i, key in enumerate(keys[count:], start=count):
            self._blocks[key] = (node, i)
        self.nodes[node.node_id] = node
        return node

    # ---------------------------------------------------------------------- eviction
    def lru(self, keep: Optional[CacheNode] = None) -> Optional[CacheNode]:
        """The evictable node used longest ago (deeper first on a tie), never ``keep`` or its
        ancestors; None when nothing can go."""
        protected = set()
        while keep is not None:
            protected.add(keep.node_id)
            keep = keep.parent
        best = None
        for node in self.nodes.values():
            if node.evictable and node.node_id not in protected:
                if best is None or (node.last_used, -node.end) < (best.last_used, -best.end):
                    best = node
        return best

    def remove(self, node: CacheNode) -> None:
        """Forget an evictable node (its blocks' keys and its place under its parent)."""
        assert node.evictable, f"node {node.node_id} is in use ({node.refs} refs, {node.children} children)"
        for key in node.hashes:
            if self._blocks.get(key, (None,))[0] is node:
                del self._blocks[key]
        if node.parent is not None:
            node.parent.children -= 1
        del self.nodes[node.node_id]
        self.stats.evictions += 1
        self.stats.evicted_tokens += node.num_tokens

    @property
    def cached_tokens(self) -> int:
        return sum(n.num_tokens for n in self.nodes.values())
