"""ModelRunner: the mechanism under the engine (DESIGN.md §4) — caches, the chunked prefill and
the decode step of a batch whose members change every step.

A runner holds, for its whole lifetime:

* per dense layer a :class:`PagedKVCache` (a sequence owns a block table);
* per sparse layer a :class:`SparseLayer`: a :class:`SlotKVCache` (sinks + window, one slot
  per running sequence), the centring offsets ``mu`` per slot, and one
  :class:`MiddleAttention` (for magicpig: one CPU store) in which every sequence has an id.

It allocates nothing on its own: a sequence's blocks and slot are the ledger's grants
(:mod:`magicpig.core.kv_budget`), recorded in its :class:`SequenceKV`, and the runner checks
that they cover what it writes. ``prefill`` runs the next tokens of a prompt (the whole prompt,
or one chunk of it per engine step) through :func:`prefill_rows`, the one prefill loop, handing
each sparse layer's middle to its store as soon as the prompt is complete for that layer;
``add_prefilled`` starts a sequence from a full prefill state (the evaluation prefills once
and decodes every method from it); ``decode`` feeds one token per sequence; ``release`` frees
a sequence's store entries. The runner knows nothing of queues, requests or sampling.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch

from magicpig.attention.base import MiddleAttention, PendingAppend
from magicpig.attention.registry import make_method
from magicpig.config import MagicPIGConfig
from magicpig.core.kv_budget import (
    KVLayout, blocks_for, blocks_in_budget, cpu_bytes_per_token, device_cache_bytes,
    kv_bytes_per_token, slot_tokens,
)
from magicpig.core.request import SequenceKV
from magicpig.model.llama import LlamaModel, attention_with_middle, decode_attention
from magicpig.runtime.prefill import PREFILL_CHUNK, prefill_rows
from magicpig.store.cpu_store import store_bytes_per_token_head
from magicpig.store.device_cache import PagedKVCache, SlotKVCache

DEFAULT_BLOCK_SIZE = 256


def dense_layer_set(config: MagicPIGConfig, num_layers: int) -> set[int]:
    """Layers whose K/V stay whole on the device (every layer for method "dense")."""
    if config.method == "dense":
        return set(range(num_layers))
    return set(config.resolve_dense_layers(num_layers))


def cache_bytes(model: LlamaModel, config: MagicPIGConfig, block_size: int) -> tuple[int, int]:
    """(bytes of one sequence slot over all sparse layers, bytes of one block over all dense
    layers) of a runner for ``model`` and ``config``: what a device budget is divided into."""
    a = model.args
    per_token_layer = kv_bytes_per_token(a.num_kv_heads, a.head_dim, torch.finfo(model.dtype).bits // 8)
    dense = len(dense_layer_set(config, a.num_layers))
    return device_cache_bytes(a.num_layers, dense, per_token_layer, config.sink_tokens, config.window_tokens,
                              block_size)


def store_bytes_per_token(model: LlamaModel, config: MagicPIGConfig) -> int:
    """CPU-store bytes of one middle token over all sparse layers (0 without a store), as the
    store itself counts them."""
    a = model.args
    sparse = a.num_layers - len(dense_layer_set(config, a.num_layers))
    if not sparse or config.method == "dense":
        return 0
    per_head = store_bytes_per_token_head(config.K or 0, config.L or 0, a.head_dim, config.kv_dtype, config.method)
    return cpu_bytes_per_token(sparse, a.num_kv_heads, per_head)


def kv_layout(model: LlamaModel, config: MagicPIGConfig, max_num_seqs: int, device_bytes: int,
              cpu_bytes: int, block_size: int = DEFAULT_BLOCK_SIZE) -> KVLayout:
    """The ledger's pools for a runner of ``model`` and ``config`` in these budgets:
    ``max_num_seqs`` slots, the rest of ``device_bytes`` in dense blocks."""
    slot, block = cache_bytes(model, config, block_size)
    has_dense = bool(dense_layer_set(config, model.args.num_layers))
    return KVLayout(
        block_size=block_size if has_dense else 0,
        num_blocks=blocks_in_budget(device_bytes, max_num_seqs, slot, block),
        num_slots=max_num_seqs,
        cpu_bytes_total=cpu_bytes,
        cpu_bytes_per_token=store_bytes_per_token(model, config),
        slot_bytes=slot, block_bytes=block,
    )


@dataclass
class SparseLayer:
    """One sparse layer's state: its sinks+window slots, the centring offsets mu
    [num_slots, Hkv, d] (model dtype), and its middle attention (one CPU store for magicpig)."""

    cache: SlotKVCache
    mu: torch.Tensor
    method: MiddleAttention


@dataclass
class NodeKV:
    """What a cached prefix (a prefix-cache node of ``end`` tokens) keeps in the sparse layers,
    per layer: a read-only fork in its store of the middle tokens ``[S, end)`` (shared with the
    sequence it came from and every request starting from it: no copy), its sinks' K/V
    [Hkv, <=S, d] (centred, model dtype, on the device) and its centring mu [Hkv, d]. Requests
    starting from it take its mu, sinks and as much of the fork as falls before their window."""

    forks: dict[int, int]
    sinks: dict[int, tuple[torch.Tensor, torch.Tensor]]
    mu: dict[int, torch.Tensor]


class _Part:
    """Per-step indexing data of one micro-batch (rows [r0, r1) of the step's batch)."""

    def __init__(self, runner: "ModelRunner", seqs: list[SequenceKV], r0: int, r1: int):
        device, m = runner.device, runner.model
        self.seqs, self.r0, self.r1 = seqs[r0:r1], r0, r1
        lengths = [s.length for s in self.seqs]
        self.pos = torch.tensor(lengths, dtype=torch.int64, device=device)
        self.cos, self.sin = m.rope(self.pos, max(lengths))
        self.reads: list[torch.Tensor] = []
        if runner.dense:
            cache = next(iter(runner.dense.values()))  # every dense layer has the same layout
            slots = [cache.slot(s.blocks, s.length) for s in self.seqs]
            self.dense_slots = torch.tensor(slots, dtype=torch.int64, device=device)
        if runner.sparse:
            fills = [s.fill for s in self.seqs]
            self.slots = torch.tensor([s.slot for s in self.seqs], dtype=torch.int64, device=device)
            self.fills = torch.tensor(fills, dtype=torch.int64, device=device)
            self.n_dev = max(fills) + 1
            cols = torch.arange(self.n_dev, device=device)
            self.dev_valid = cols[None, :] <= self.fills[:, None]
            self.store_ids = {layer: [s.store_ids[layer] for s in self.seqs] for layer in runner.sparse}


class _PromptKV:
    """Where :func:`prefill_rows` keeps a prompt's K/V for the runner: dense layers in the
    sequence's blocks; sparse layers in a buffer of the whole prompt, handed to the slot and
    store (:meth:`ModelRunner._store_layer`) as soon as a layer has seen the last token. A
    prompt prefilled in one go needs one layer's buffer at a time; one prefilled in chunks keeps
    every sparse layer's buffer between its chunks."""

    def __init__(self, runner: "ModelRunner", kv: SequenceKV, n: int):
        self.runner, self.kv, self.n = runner, kv, n
        self.buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.pending: list[PendingAppend] = []

    def _buffer(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer not in self.buffers:
            a, m = self.runner.model.args, self.runner.model
            k = torch.empty(a.num_kv_heads, self.n, a.head_dim, device=m.device, dtype=m.dtype)
            self.buffers[layer] = (k, torch.empty_like(k))
            if self.kv.cached:
                self.runner._read_prefix(self.kv, layer, *self.buffers[layer])
        return self.buffers[layer]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        if layer in self.runner.dense:
            self.runner.dense[layer].fill(self.kv.blocks, keys, values, start=start)
            return
        k, v = self._buffer(layer)
        k[:, start : start + keys.shape[1]], v[:, start : start + keys.shape[1]] = keys, values

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer in self.runner.dense:
            return self.runner.dense[layer].sequence(self.kv.blocks, end)
        k, v = self._buffer(layer)
        return k[:, :end], v[:, :end]

    def layer_done(self, layer: int, end: int) -> None:
        if end == self.n and layer in self.runner.sparse:
            k, v = self.buffers.pop(layer)  # the store keeps what it needs; the buffer goes
            self.pending.append(self.runner._store_layer(self.kv, layer, k, v))


class ModelRunner:
    """Caches and steps for up to ``max_num_seqs`` sequences of one model and config.

    num_blocks: dense-layer KV blocks of ``block_size`` tokens (shared by all sequences; the
    ledger hands them out). ``method_factory(config, layer, num_kv_heads, head_dim)`` builds
    each sparse layer's middle attention (default: the class registered under
    ``config.method``). ``overlap_appends``: build a layer's CPU tables while the next layer
    prefills (default: on a GPU). ``ping_pong``: decode in two micro-batches that overlap the
    store with the device (default: on a GPU).
    """

    def __init__(
        self,
        model: LlamaModel,
        config: MagicPIGConfig,
        max_num_seqs: int,
        num_blocks: int,
        block_size: int = DEFAULT_BLOCK_SIZE,
        method_factory: Callable[[MagicPIGConfig, int, int, int], MiddleAttention] | None = None,
        overlap_appends: bool | None = None,
        ping_pong: bool | None = None,
    ):
        a = model.args
        self.model, self.config, self.block_size = model, config, block_size
        self.device, dtype = model.device, model.dtype
        dense = dense_layer_set(config, a.num_layers)
        self.dense = {l: PagedKVCache(num_blocks, a.num_kv_heads, block_size, a.head_dim, self.device, dtype)
                      for l in range(a.num_layers) if l in dense}
        # A slot holds W..W+spill window tokens; spilling W at a time amortises hashing.
        self.spill = config.window_tokens
        self.slot_capacity = slot_tokens(config.sink_tokens, config.window_tokens)
        factory = make_method if method_factory is None else method_factory
        self.sparse: dict[int, SparseLayer] = {
            layer: SparseLayer(
                SlotKVCache(max_num_seqs, a.num_kv_heads, self.slot_capacity, a.head_dim, self.device, dtype),
                torch.zeros(max_num_seqs, a.num_kv_heads, a.head_dim, device=self.device, dtype=dtype),
                factory(config, layer, a.num_kv_heads, a.head_dim))
            for layer in range(a.num_layers) if layer not in dense
        }
        self.max_num_seqs = max_num_seqs
        # A prefill and a decode may run at once on two lanes (engine/lanes.py): the stores'
        # sequence tables are shared, so adding and removing sequences takes this lock.
        self._lock = threading.Lock()
        # Sparse layers' prompt K/V of prompts part-way through a chunked prefill, by id(kv):
        # the middle's bounds and centring need the whole prompt, so they reach the slot and
        # store only when it is complete.
        self._prompt_kv: dict[int, _PromptKV] = {}
        self._nodes: dict[int, NodeKV] = {}  # the prefix cache's nodes' store state, by node_id
        # A prefill hands each sparse layer's middle to its store's worker thread and goes on
        # with the next layer (the tables are built meanwhile). None: on a GPU, where the
        # worker has the host cores to itself; on a CPU device it would share the cores that
        # compute the next layer (docs/GENERATE.md has both measured).
        self.overlap_appends = self.device.type == "cuda" if overlap_appends is None else bool(overlap_appends)
        # Two micro-batches let the store attend one while the device computes the other, but
        # every weight is then read twice. On a CPU device the store is called inline (there is
        # no separate device to overlap with), so the split would only cost: measured at Llama
        # layer shapes, 16k x 4, one batch 336 ms a step against 509 ms split (scripts/bench_decode.py).
        self.ping_pong = self.device.type == "cuda" if ping_pong is None else bool(ping_pong)
        self.store_seconds = 0.0  # decode time spent waiting for the middle attention, in all
        self._store_base = self._store_total()  # the empty stores' own bytes (tables, objects)

    # ------------------------------------------------------------------ capacity
    def blocks_needed(self, tokens: int) -> int:
        """Dense-layer blocks a sequence of ``tokens`` tokens holds (0 without dense layers)."""
        return blocks_for(tokens, self.block_size) if self.dense else 0

    def _check_grant(self, kv: SequenceKV, tokens: int) -> None:
        """The ledger granted what ``tokens`` tokens need (the runner allocates nothing)."""
        assert len(kv.blocks) >= self.blocks_needed(tokens), f"{len(kv.blocks)} blocks granted for {tokens} tokens"
        assert kv.slot >= 0 or not self.sparse, "no slot granted"

    # ------------------------------------------------------------------- admit
    def _add_to_stores(self, kv: SequenceKV, n: int) -> None:
        """Give ``kv`` (a prompt of ``n`` tokens) its id in every sparse layer's store: an empty
        sequence, or, on a cached prefix, a fork of the prefix's middle up to where its own
        window begins (tokens of the prefix inside its window go to its slot instead)."""
        S, W = self.config.sink_tokens, self.config.window_tokens
        node = self._nodes[kv.prefix.node_id] if kv.cached else None
        shared = max(0, min(kv.cached, n - W) - S)
        with self._lock:
            for layer, sp in self.sparse.items():
                kv.store_ids[layer] = sp.method.fork(node.forks[layer], shared) if node else sp.method.add_sequence()

    def _read_prefix(self, kv: SequenceKV, layer: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill tokens [0, kv.cached) of a sparse layer's prompt buffers (keys, values
        [Hkv, n, d]) from the cached prefix: its sinks, and its middle streamed back from the
        store, un-centred (+mu), so the suffix's prefill attends every earlier token exactly
        as a full prefill does (up to the store's kv_dtype rounding of the middle)."""
        node, c = self._nodes[kv.prefix.node_id], kv.cached
        sink_k, sink_v = node.sinks[layer]
        mu = node.mu[layer][:, None, :]
        s = min(c, sink_k.shape[1])
        keys[:, :s], values[:, :s] = sink_k[:, :s] + mu, sink_v[:, :s]
        if c > s:
            mid_k, mid_v = self.sparse[layer].method.read(node.forks[layer], 0, c - s)
            keys[:, s:c] = mid_k.to(keys.device, keys.dtype) + mu
            values[:, s:c] = mid_v.to(values.device, values.dtype)

    def _place(self, kv: SequenceKV, n: int) -> None:
        """A complete prompt of ``n`` tokens: how it splits between the slot and the middle."""
        S, W = self.config.sink_tokens, self.config.window_tokens
        kv.length, kv.fill, kv.middle = n, min(n, S + W), max(0, n - S - W)

    def _store_layer(self, kv: SequenceKV, layer: int, k: torch.Tensor, v: torch.Tensor) -> PendingAppend:
        """Hand one sparse layer's prompt K/V [Hkv, n, d] on: sinks + window into the slot and
        the centred middle to the CPU side, whose index is built on the store's worker when
        ``overlap_appends`` (wait before decoding)."""
        sp = self.sparse[layer]
        S, W, n = self.config.sink_tokens, self.config.window_tokens, k.shape[1]
        if n <= S + W:
            sp.cache.fill(kv.slot, k, v)
            sp.mu[kv.slot] = 0
            return PendingAppend()
        lo, hi = S, n - W
        if kv.cached:  # the shared middle is centred by the prefix's mu: so is the rest
            sp.mu[kv.slot] = self._nodes[kv.prefix.node_id].mu[layer]
            lo += sp.method.length(kv.store_ids[layer])  # the fork holds [S, lo) already
        else:
            # Centre by the mean middle key (fp32 mean): softmax is shift-invariant, and centred
            # keys spread over the hash buckets far better.
            sp.mu[kv.slot] = k[:, lo:hi].float().mean(dim=1).to(k.dtype)
        kc = k - sp.mu[kv.slot][:, None, :]
        sp.cache.fill(kv.slot, kc[:, :S], v[:, :S])
        sp.cache.fill(kv.slot, kc[:, hi:], v[:, hi:], start=S)
        if self.overlap_appends:
            return sp.method.append_async(kv.store_ids[layer], kc[:, lo:hi], v[:, lo:hi])
        sp.method.append(kv.store_ids[layer], kc[:, lo:hi], v[:, lo:hi])
        return PendingAppend()

    @classmethod
    def _wait_all_quietly(cls, pending: list[PendingAppend]) -> None:
        """Wait for the appends already started (before releasing their sequence); errors
        are dropped: the caller is raising one already."""
        try:
            cls._wait_all(pending)
        except BaseException:  # noqa: BLE001
            pass

    @staticmethod
    def _wait_all(pending: list[PendingAppend]) -> None:
        """Wait for every layer's append (all of them, even after an error, which then raises)."""
        error = None
        for p in pending:
            try:
                p.wait()
            except BaseException as err:  # noqa: BLE001 - re-raised below, after the others
                error = error or err
        if error is not None:
            raise error

    def add_prefilled(self, kv: SequenceKV, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        """Start ``kv`` (granted, empty) from a full prefill state: keys[layer], values[layer]
        [Hkv, n, d]."""
        n = keys[0].shape[1]
        self._check_grant(kv, n)
        assert kv.length == 0 and not kv.store_ids, "add_prefilled starts an empty sequence"
        self._add_to_stores(kv, n)
        pending: list[PendingAppend] = []
        try:
            for layer in range(self.model.args.num_layers):
                if layer in self.dense:
                    self.dense[layer].fill(kv.blocks, keys[layer], values[layer])
                else:
                    pending.append(self._store_layer(kv, layer, keys[layer], values[layer]))
            self._wait_all(pending)
        except BaseException:
            self._wait_all_quietly(pending)
            raise
        self._place(kv, n)

    def prefill(self, kv: SequenceKV, token_ids: list[int], num_tokens: int,
                chunk_size: int = PREFILL_CHUNK) -> torch.Tensor | None:
        """Prefill the next ``num_tokens`` tokens of the prompt ``token_ids`` for ``kv`` (exact
        causal attention over everything before them; from token ``kv.length``). Returns
        float32 logits [vocab] after the prompt's last token when this completes it (its
        sparse layers' K/V have then gone to the slots and CPU stores), else None."""
        start, n = kv.length, len(token_ids)
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= n - start:
            raise ValueError(f"num_tokens={num_tokens!r}: expected an int in [1, {n - start}] (tokens left to prefill)")
        self._check_grant(kv, n)
        if not kv.store_ids:  # its first chunk (after the cached prefix, if any)
            self._add_to_stores(kv, n)
        sink = self._prompt_kv.get(id(kv)) or _PromptKV(self, kv, n)
        self._prompt_kv[id(kv)] = sink
        try:
            logits = prefill_rows(self.model, token_ids, start, start + num_tokens, sink, chunk_size)
            if start + num_tokens < n:
                kv.length = start + num_tokens
                return None
            self._prompt_kv.pop(id(kv))
            self._wait_all(sink.pending)
        except BaseException:
            self._wait_all_quietly(sink.pending)
            raise
        self._place(kv, n)
        return logits

    # ------------------------------------------------------------- prefix cache
    def cache_node(self, node_id: int, end: int, kv: SequenceKV) -> None:
        """Keep the store state of a new prefix-cache node: tokens [0, end) of ``kv`` (a
        sequence whose K/V are complete up to at least ``end``). Each sparse layer forks the
        part of ``kv``'s middle before ``end`` (no copy) and appends to the fork the tokens of
        [S, end) still in ``kv``'s window; its sinks and mu are copied (a few rows)."""
        S = self.config.sink_tokens
        forks, sinks, mus = {}, {}, {}
        with self._lock:
            for layer, sp in self.sparse.items():
                take = max(0, min(end - S, kv.middle))
                forks[layer] = sp.method.fork(kv.store_ids[layer], take)
                extra = end - S - take  # tokens [S + middle, end): the window's first ones
                if extra > 0:
                    sp.method.append(forks[layer], sp.cache.keys[kv.slot, :, S : S + extra],
                                     sp.cache.values[kv.slot, :, S : S + extra])
                sinks[layer] = (sp.cache.keys[kv.slot, :, : min(S, end)].clone(),
                                sp.cache.values[kv.slot, :, : min(S, end)].clone())
                mus[layer] = sp.mu[kv.slot].clone()
        self._nodes[node_id] = NodeKV(forks, sinks, mus)

    def drop_node(self, node_id: int) -> None:
        """Forget an evicted node's store state (idempotent); requests that started from it
        keep their own forks, which hold what they share of it."""
        node = self._nodes.pop(node_id, None)
        if node is None:
            return
        with self._lock:
            for layer, fork in node.forks.items():
                self.sparse[layer].method.remove_sequence(fork)

    def store_bytes(self) -> int:
        """Bytes the CPU stores hold for sequences: running requests and cached prefixes,
        shared blocks counted once (0 when they hold none)."""
        return self._store_total() - self._store_base

    def _store_total(self) -> int:
        return sum(sp.method.nbytes() for sp in self.sparse.values())

    def release(self, kv: SequenceKV) -> None:
        """Free the sequence's middle K/V and part-way prompt K/V (idempotent). Its blocks and
        slot are the ledger's to take back."""
        self._prompt_kv.pop(id(kv), None)
        with self._lock:
            for layer, sid in kv.store_ids.items():
                self.sparse[layer].method.remove_sequence(sid)
            kv.store_ids = {}

    # ------------------------------------------------------------------- decode
    def _prepare_step(self, seqs: list[SequenceKV]) -> None:
        """Check each sequence's next token has its block (the ledger's grant); full windows
        spill into the middle."""
        for seq in seqs:
            self._check_grant(seq, seq.length + 1)
            if self.sparse and seq.fill >= self.slot_capacity:
                self._spill(seq)

    def _spill(self, seq: SequenceKV) -> None:
        S = self.config.sink_tokens
        for layer, sp in self.sparse.items():
            if seq.middle == 0:
                self._centre_first_middle(sp.cache, sp.mu, seq)
            k, v = sp.cache.evict(seq.slot, S, self.spill, seq.fill)
            sp.method.append(seq.store_ids[layer], k, v)
        seq.fill -= self.spill
        seq.middle += self.spill

    def _centre_first_middle(self, cache: SlotKVCache, mu: torch.Tensor, seq: SequenceKV) -> None:
        """A prompt that fit in sinks + window had no middle to centre by (mu = 0): centre now,
        by the mean of the first block to spill. Every key of the sequence shifts by the same
        mu, so each query's softmax is unchanged; only the hashing gets centred keys."""
        S, keys = self.config.sink_tokens, cache.keys
        shift = keys[seq.slot, :, S : S + self.spill].float().mean(dim=1).to(keys.dtype)  # [Hkv, d]
        keys[seq.slot, :, : seq.fill] -= shift[:, None, :]
        mu[seq.slot] += shift

    def _split(self, seqs: list[SequenceKV]) -> list[tuple[int, int]]:
        """Two micro-batches for the ping-pong, balanced by CPU-store work (middle tokens),
        not by row count; one when there is no middle attention, a single sequence, or no
        ping-pong (``ping_pong``)."""
        if not self.sparse or len(seqs) < 2 or not self.ping_pong:
            return [(0, len(seqs))]
        work = [s.middle + 1 for s in seqs]
        total, run, best, cut = sum(work), 0, None, 1
        for i in range(1, len(seqs)):
            run += work[i - 1]
            gap = abs(total - 2 * run)
            if best is None or gap < best:
                best, cut = gap, i
        return [(0, cut), (cut, len(seqs))]

    def _layer_start(self, layer: int, x: torch.Tensor, part: _Part) -> tuple:
        """First half of a layer: QKV, cache write, and either the whole dense attention or
        the start of the middle attention."""
        m = self.model
        q, k, v = m.attention_input(layer, x, part.cos, part.sin)
        if layer in self.dense:
            cache = self.dense[layer]
            cache.write(part.dense_slots, k, v)
            # One attention per sequence over its blocks read in place (no gather of the batch's
            # K/V into one padded tensor: that copy cost as much as the attention itself).
            outs = []
            for i, seq in enumerate(part.seqs):
                keys, values = cache.sequence(seq.blocks, seq.length + 1)
                outs.append(decode_attention(q[i : i + 1], keys[None], values[None], None, m.scale))
            return torch.cat(outs), None
        sp = self.sparse[layer]
        sp.cache.write(part.slots, part.fills, k - sp.mu[part.slots], v)
        return q, sp.method.attend_trusted(part.store_ids[layer], q)  # ids and shapes are the runner's own

    def _layer_finish(self, layer: int, x: torch.Tensor, part: _Part, started: tuple) -> torch.Tensor:
        """Second half: (wait for the middle and merge,) O-projection and MLP."""
        m = self.model
        first, pending = started
        if pending is None:
            attn = first
        else:
            def middle() -> tuple[torch.Tensor, torch.Tensor]:
                t0 = time.perf_counter()
                out_mid, lse_mid, num_read = pending.wait()
                self.store_seconds += time.perf_counter() - t0
                part.reads.append(num_read)
                return out_mid.to(self.device), lse_mid.to(self.device)

            keys, values = self.sparse[layer].cache.gather(part.slots, part.n_dev)
            # Sinks + window scores on the device while the CPU store attends the middle;
            # one softmax then merges both (the LSE merge of DESIGN.md §2).
            attn = attention_with_middle(first, keys, values, part.dev_valid, m.scale, middle)
        return m.mlp(layer, m.attention_output(layer, x, attn))

    def _run_layers(self, x: torch.Tensor, parts: list[_Part]) -> torch.Tensor:
        """All layers over the parts; with two parts, ping-pong (DESIGN.md §4): while the CPU
        store attends one part's middle for layer l, the device finishes the other part's
        layer l-1 and starts its layer l."""
        xs = [x[p.r0 : p.r1] for p in parts]
        num_layers = self.model.args.num_layers
        if len(parts) == 1:
            for layer in range(num_layers):
                xs[0] = self._layer_finish(layer, xs[0], parts[0], self._layer_start(layer, xs[0], parts[0]))
            return xs[0]
        a, b = parts
        started_b = None
        for layer in range(num_layers):
            started_a = self._layer_start(layer, xs[0], a)
            if layer > 0:
                xs[1] = self._layer_finish(layer - 1, xs[1], b, started_b)
            started_b = self._layer_start(layer, xs[1], b)
            xs[0] = self._layer_finish(layer, xs[0], a, started_a)
        xs[1] = self._layer_finish(num_layers - 1, xs[1], b, started_b)
        return torch.cat(xs)

    @torch.inference_mode()
    def decode(self, seqs: list[SequenceKV], tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per sequence (int64 [B]); returns float32 logits [B, vocab].

        The sequences may differ in length and change from step to step; each one's result
        does not depend on the others (up to float summation order)."""
        self._prepare_step(seqs)
        parts = [_Part(self, seqs, r0, r1) for r0, r1 in self._split(seqs)]
        x = self._run_layers(self.model.embed(tokens.to(self.device)), parts)
        for part in parts:
            self._account(part)
        for seq in seqs:
            seq.length += 1
            if self.sparse:
                seq.fill += 1
        return self.model.logits(x)

    def _account(self, part: _Part) -> None:
        """Add the step's fraction of middle keys read (mean over sparse layers and heads)."""
        if not part.reads:
            return
        per_seq = torch.stack(part.reads).double().mean(dim=(0, 2)).tolist()  # [b]
        for seq, read in zip(part.seqs, per_seq):
            if seq.middle > 0:
                seq.cost_sum += read / seq.middle
                seq.cost_steps += 1

    # -------------------------------------------------------------------- stats
    def device_bytes(self, seq: SequenceKV) -> int:
        """Bytes of the sequence's K/V in device caches (tokens held, not block slack)."""
        total = sum(c.bytes_per_token() for c in self.dense.values()) * seq.length
        return total + sum(sp.cache.bytes_per_token() for sp in self.sparse.values()) * seq.fill

    def cpu_bytes(self, seq: SequenceKV) -> int:
        """Bytes the middle attention holds for the sequence (the CPU store)."""
        return sum(self.sparse[layer].method.nbytes(sid) for layer, sid in seq.store_ids.items())

    def cpu_bytes_per_token(self) -> int:
        """CPU-store bytes of one middle token over all sparse layers (the ledger's figure)."""
        return store_bytes_per_token(self.model, self.config)

    def close(self) -> None:
        """Stop the middle attentions' worker threads."""
        for sp in self.sparse.values():
            close = getattr(getattr(sp.method, "store", None), "close", None)
            if close is not None:
                close()
