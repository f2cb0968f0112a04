"""ModelRunner: the mechanism under the engine (DESIGN.md §4) — caches, prefill and the decode
step of a batch whose members change every step.

A runner holds, for its whole lifetime:

* per dense layer a :class:`PagedKVCache` (blocks from one :class:`BlockAllocator`; a sequence
  owns a block table);
* per sparse layer a :class:`SlotKVCache` (sinks + window, one slot per running sequence), the
  centring offsets ``mu`` per slot, and one :class:`MiddleAttention` (for magicpig: one CPU
  store) in which every sequence has an id.

Per sequence, :class:`SequenceKV` records where its state lives. ``prefill`` runs a whole prompt
layer by layer and offloads as it goes (peak device memory: the dense layers' K/V plus one
layer's working set); ``begin_prefill`` + ``prefill_chunk`` run a prompt in pieces across
engine steps (token-major: each piece goes through every layer); ``add_prefilled`` starts a
sequence from a full prefill state (the evaluation prefills once and decodes every method from
it); ``decode`` feeds one token per sequence; ``release`` frees everything a sequence holds at
once. The runner knows nothing of queues,
requests or sampling.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

from magicpig.attention.base import MiddleAttention, PendingAppend, make_method
from magicpig.config import MagicPIGConfig
from magicpig.model.llama import LlamaModel, attention_with_middle, causal_chunk_attention, decode_attention
from magicpig.store.device_cache import BlockAllocator, PagedKVCache, SlotKVCache, blocks_for
from magicpig.store.cpu_store import index_bytes_per_token_head

DEFAULT_BLOCK_SIZE = 256
PREFILL_CHUNK = 4096  # rows per prefill chunk: efficient kernels, bounded attention memory


def dense_layer_set(config: MagicPIGConfig, num_layers: int) -> set[int]:
    """Layers whose K/V stay whole on the device (every layer for method "dense")."""
    if config.method == "dense":
        return set(range(num_layers))
    return set(config.resolve_dense_layers(num_layers))


def cache_bytes(model: LlamaModel, config: MagicPIGConfig, block_size: int) -> tuple[int, int]:
    """(bytes of one sequence slot over all sparse layers, bytes of one block over all dense
    layers) of a runner for ``model`` and ``config``: what a device budget is divided into."""
    a = model.args
    per_token_layer = 2 * a.num_kv_heads * a.head_dim * torch.finfo(model.dtype).bits // 8
    dense = len(dense_layer_set(config, a.num_layers))
    slot_tokens = config.sink_tokens + 2 * config.window_tokens
    return (a.num_layers - dense) * per_token_layer * slot_tokens, dense * per_token_layer * block_size


@dataclass
class SequenceKV:
    """Where one sequence's KV state lives. length: tokens whose K/V are held (prompt + fed).
    blocks: its dense-layer block table. slot: its sinks+window slot. fill / middle: tokens in
    the slot / in the middle (fill + middle == length on sparse layers). store_ids: its id in
    each sparse layer's middle attention. cost_sum / cost_steps: fraction of middle keys read,
    summed over the decode steps that had a middle."""

    length: int
    blocks: list[int] = field(default_factory=list)
    slot: int = -1
    fill: int = 0
    middle: int = 0
    store_ids: dict[int, int] = field(default_factory=dict)
    cost_sum: float = 0.0
    cost_steps: int = 0

    @property
    def computation_cost(self) -> float:
        return self.cost_sum / self.cost_steps if self.cost_steps else 0.0


@dataclass
class PartialPrefill:
    """A prompt part-way through a chunked prefill (:meth:`ModelRunner.prefill_chunk`).

    seq: its sequence, holding the blocks, slot and store ids of the whole prompt from the first
    chunk on. token_ids: the prompt. done: tokens prefilled so far. keys / values: per sparse
    layer the prompt's K/V so far, [Hkv, n, d] in the model dtype on the device. The sparse
    layers' K/V reach their slot and CPU store only after the last chunk, because the middle's
    bounds and its centring need the whole prompt, and every chunk's exact attention reads all
    the tokens before it; dense layers write straight into their blocks."""

    seq: SequenceKV
    token_ids: list[int]
    done: int = 0
    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


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


class ModelRunner:
    """Caches and steps for up to ``max_num_seqs`` sequences of one model and config.

    num_blocks: dense-layer KV blocks of ``block_size`` tokens (shared by all sequences).
    ``method_factory(config, layer, num_kv_heads, head_dim)`` builds each sparse layer's middle
    attention (default: the class registered under ``config.method``). ``overlap_appends``:
    build a layer's CPU tables while the next layer prefills (default: on a GPU). ``ping_pong``:
    decode in two micro-batches that overlap the store with the device (default: on a GPU).
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
        layers = range(a.num_layers)
        dense = dense_layer_set(config, a.num_layers)
        self.allocator = BlockAllocator(num_blocks)
        self.dense = {l: PagedKVCache(num_blocks, a.num_kv_heads, block_size, a.head_dim, self.device, dtype)
                      for l in layers if l in dense}
        S, W = config.sink_tokens, config.window_tokens
        # A slot holds W..W+spill window tokens; spilling W at a time amortises hashing.
        self.spill = W
        self.slot_capacity = S + W + self.spill
        factory = make_method if method_factory is None else method_factory
        self.sparse: dict[int, tuple[SlotKVCache, torch.Tensor, MiddleAttention]] = {}
        for layer in layers:
            if layer not in dense:
                cache = SlotKVCache(max_num_seqs, a.num_kv_heads, self.slot_capacity, a.head_dim, self.device, dtype)
                mu = torch.zeros(max_num_seqs, a.num_kv_heads, a.head_dim, device=self.device, dtype=dtype)
                self.sparse[layer] = (cache, mu, factory(config, layer, a.num_kv_heads, a.head_dim))
        self._free_slots = list(range(max_num_seqs - 1, -1, -1))
        # A prefill and a decode may run at once on two lanes (serve/lanes.py): the block pool,
        # the slots and the stores' sequence tables are shared, so their updates take this lock.
        self._lock = threading.Lock()
        self.max_num_seqs = max_num_seqs
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

    # ------------------------------------------------------------------ capacity
    def blocks_needed(self, tokens: int) -> int:
        """Dense-layer blocks a sequence of ``tokens`` tokens holds (0 without dense layers)."""
        return blocks_for(tokens, self.block_size) if self.dense else 0

    @property
    def free_slots(self) -> int:
        return len(self._free_slots)

    def device_bytes_per_block(self) -> int:
        return cache_bytes(self.model, self.config, self.block_size)[1]

    def can_append(self, seq: SequenceKV) -> bool:
        """True when the sequence's next token has a dense block to go to."""
        return self.blocks_needed(seq.length + 1) <= len(seq.blocks) or self.allocator.num_free > 0

    # ------------------------------------------------------------------- admit
    def _new_sequence(self, length: int, expected: int) -> SequenceKV:
        """A sequence of ``length`` tokens, placed where ``expected`` tokens would fit in one
        run of blocks if there is such a gap (growth then stays contiguous)."""
        with self._lock:
            if not self._free_slots:
                raise RuntimeError(f"all {self.max_num_seqs} sequence slots are in use")
            blocks = self.allocator.allocate(self.blocks_needed(length), room=self.blocks_needed(max(length, expected)))
            seq = SequenceKV(length=length, blocks=blocks)
            seq.slot = self._free_slots.pop() if self.sparse else -1
            for layer, (_, _, method) in self.sparse.items():
                seq.store_ids[layer] = method.add_sequence()
        S, W = self.config.sink_tokens, self.config.window_tokens
        seq.fill, seq.middle = min(length, S + W), max(0, length - S - W)
        return seq

    def _store_layer(self, seq: SequenceKV, layer: int, k: torch.Tensor, v: torch.Tensor) -> PendingAppend:
        """Hand one layer's prompt K/V [Hkv, n, d] to its cache: all of it into the dense
        blocks, or sinks + window into the slot and the centred middle to the CPU side, whose
        index is built on the store's worker when ``overlap_appends`` (wait before decoding)."""
        if layer in self.dense:
            self.dense[layer].fill(seq.blocks, k, v)
            return PendingAppend()
        cache, mu, method = self.sparse[layer]
        S, W, n = self.config.sink_tokens, self.config.window_tokens, k.shape[1]
        if seq.middle == 0:
            cache.fill(seq.slot, k, v)
            mu[seq.slot] = 0
            return PendingAppend()
        lo, hi = S, n - W
        # Centre by the mean middle key (fp32 mean): softmax is shift-invariant, and centred
        # keys spread over the hash buckets far better.
        mu[seq.slot] = k[:, lo:hi].float().mean(dim=1).to(k.dtype)
        kc = k - mu[seq.slot][:, None, :]
        cache.fill(seq.slot, kc[:, :S], v[:, :S])
        cache.fill(seq.slot, kc[:, hi:], v[:, hi:], start=S)
        if self.overlap_appends:
            return method.append_async(seq.store_ids[layer], kc[:, lo:hi], v[:, lo:hi])
        method.append(seq.store_ids[layer], kc[:, lo:hi], v[:, lo:hi])
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

    def add_prefilled(self, keys: list[torch.Tensor], values: list[torch.Tensor], expected: int = 0) -> SequenceKV:
        """A sequence from a full prefill state: keys[layer], values[layer] [Hkv, n, d].
        ``expected``: the tokens it may grow to (placement hint)."""
        seq = self._new_sequence(keys[0].shape[1], expected)
        try:
            self._wait_all([self._store_layer(seq, layer, keys[layer], values[layer])
                            for layer in range(self.model.args.num_layers)])
        except BaseException:
            self.release(seq)
            raise
        return seq

    @torch.inference_mode()
    def prefill(
        self, token_ids: list[int], chunk_size: int = PREFILL_CHUNK, expected: int = 0
    ) -> tuple[SequenceKV, torch.Tensor]:
        """Exact causal prefill of one prompt, layer by layer; each layer's K/V goes to its
        cache as soon as the layer is done. Returns the sequence and float32 logits [vocab]
        after the last token. ``expected``: the tokens it may grow to (placement hint)."""
        m, n = self.model, len(token_ids)
        a = m.args
        seq = self._new_sequence(n, expected)
        pending: list[PendingAppend] = []
        try:
            ids = torch.tensor(token_ids, dtype=torch.int64, device=self.device)
            cos, sin = m.rope(torch.arange(n, device=self.device), n - 1)
            x = m.embed(ids)  # [n, hidden], updated in place chunk by chunk, layer by layer
            for layer in range(a.num_layers):
                k_all = torch.empty(a.num_kv_heads, n, a.head_dim, device=self.device, dtype=m.dtype)
                v_all = torch.empty_like(k_all)
                for start in range(0, n, chunk_size):
                    end = min(n, start + chunk_size)
                    q, k, v = m.attention_input(layer, x[start:end], cos[start:end], sin[start:end])
                    k_all[:, start:end], v_all[:, start:end] = k.transpose(0, 1), v.transpose(0, 1)
                    attn = causal_chunk_attention(q, k_all[:, :end], v_all[:, :end], start, m.scale)
                    x[start:end] = m.mlp(layer, m.attention_output(layer, x[start:end], attn))
                # This layer's tables are built while the next layer computes (overlap_appends).
                pending.append(self._store_layer(seq, layer, k_all, v_all))
            logits = m.logits(x[-1:])[0]
            self._wait_all(pending)
            return seq, logits
        except BaseException:
            self._wait_all_quietly(pending)
            self.release(seq)
            raise

    def begin_prefill(self, token_ids: list[int], expected: int = 0) -> PartialPrefill:
        """Admit a prompt for a prefill in chunks: its sequence gets the memory of the whole
        prompt now; :meth:`prefill_chunk` then runs it piece by piece (a chunked prefill keeps
        the sparse layers' prompt K/V on the device until its last chunk, where the whole-prompt
        :meth:`prefill` hands each layer on as soon as it is done)."""
        if not token_ids:
            raise ValueError("token_ids: expected at least one token")
        a, n = self.model.args, len(token_ids)
        partial = PartialPrefill(self._new_sequence(n, expected), list(token_ids))
        for layer in self.sparse:
            partial.keys[layer] = torch.empty(a.num_kv_heads, n, a.head_dim, device=self.device, dtype=self.model.dtype)
            partial.values[layer] = torch.empty_like(partial.keys[layer])
        return partial

    @torch.inference_mode()
    def prefill_chunk(
        self, partial: PartialPrefill, num_tokens: int, chunk_size: int = PREFILL_CHUNK
    ) -> torch.Tensor | None:
        """Prefill the next ``num_tokens`` tokens of ``partial`` (exact causal attention over
        everything before them). Returns float32 logits [vocab] after the prompt's last token
        when this chunk completes it (its K/V then go to the slots and CPU stores), else None."""
        left = partial.num_tokens - partial.done
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or not 1 <= num_tokens <= left:
            raise ValueError(f"num_tokens={num_tokens!r}: expected an int in [1, {left}] (tokens left to prefill)")
        end = partial.done + num_tokens
        for start in range(partial.done, end, chunk_size):
            x = self._prefill_rows(partial, start, min(end, start + chunk_size))
        partial.done = end
        if end < partial.num_tokens:
            return None
        self._wait_all([self._store_layer(partial.seq, layer, partial.keys[layer], partial.values[layer])
                        for layer in self.sparse])
        partial.keys, partial.values = {}, {}
        return self.model.logits(x[-1:])[0]

    def _prefill_rows(self, partial: PartialPrefill, start: int, end: int) -> torch.Tensor:
        """Tokens [start, end) of the prompt through every layer; returns their hidden states."""
        m = self.model
        ids = torch.tensor(partial.token_ids[start:end], dtype=torch.int64, device=self.device)
        cos, sin = m.rope(torch.arange(start, end, device=self.device), end - 1)
        x = m.embed(ids)
        for layer in range(m.args.num_layers):
            q, k, v = m.attention_input(layer, x, cos, sin)
            k, v = k.transpose(0, 1), v.transpose(0, 1)  # [Hkv, T, d]
            if layer in self.dense:
                cache = self.dense[layer]
                cache.fill(partial.seq.blocks, k, v, start=start)
                keys, values = cache.sequence(partial.seq.blocks, end)
            else:
                keys, values = partial.keys[layer][:, :end], partial.values[layer][:, :end]
                keys[:, start:end], values[:, start:end] = k, v
            attn = causal_chunk_attention(q, keys, values, start, m.scale)
            x = m.mlp(layer, m.attention_output(layer, x, attn))
        return x

    def release(self, seq: SequenceKV) -> None:
        """Free the sequence's blocks, slot and middle K/V (idempotent)."""
        with self._lock:
            self.allocator.free(seq.blocks)
            seq.blocks = []
            for layer, sid in seq.store_ids.items():
                self.sparse[layer][2].remove_sequence(sid)
            seq.store_ids = {}
            if seq.slot >= 0:
                self._free_slots.append(seq.slot)
                seq.slot = -1

    # ------------------------------------------------------------------- decode
    def _prepare_step(self, seqs: list[SequenceKV]) -> None:
        """Blocks for each sequence's next token; full windows spill into the middle."""
        for seq in seqs:
            grow = self.blocks_needed(seq.length + 1) - len(seq.blocks)
            if grow > 0:
                with self._lock:
                    seq.blocks += self.allocator.allocate(grow, after=seq.blocks[-1] if seq.blocks else None)
            if self.sparse and seq.fill >= self.slot_capacity:
                self._spill(seq)

    def _spill(self, seq: SequenceKV) -> None:
        S = self.config.sink_tokens
        for layer, (cache, mu, method) in self.sparse.items():
            if seq.middle == 0:
                self._centre_first_middle(cache, mu, seq)
            k, v = cache.evict(seq.slot, S, self.spill, seq.fill)
            method.append(seq.store_ids[layer], k, v)
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
        cache, mu, method = self.sparse[layer]
        cache.write(part.slots, part.fills, k - mu[part.slots], v)
        return q, method.attend_trusted(part.store_ids[layer], q)  # ids and shapes are the runner's own

    def _layer_finish(self, layer: int, x: torch.Tensor, part: _Part, started: tuple) -> torch.Tensor:
        """Second half: (wait for the middle and merge,) O-projection and MLP."""
        m = self.model
        first, pending = started
        if pending is None:
            attn = first
        else:
            def middle() -> tuple[torch.Tensor, torch.Tensor]:
                out_mid, lse_mid, num_read = pending.wait()
                part.reads.append(num_read)
                return out_mid.to(self.device), lse_mid.to(self.device)

            keys, values = self.sparse[layer][0].gather(part.slots, part.n_dev)
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
        return total + sum(c.bytes_per_token() for c, _, _ in self.sparse.values()) * seq.fill

    def cpu_bytes(self, seq: SequenceKV) -> int:
        """Bytes the middle attention holds for the sequence (the CPU store)."""
        return sum(self.sparse[layer][2].nbytes(sid) for layer, sid in seq.store_ids.items())

    def cpu_bytes_per_token(self) -> int:
        """Estimated CPU-store bytes of one middle token over all sparse layers (K/V in the
        store dtype, the bucket ids of every table and a norm), for admission."""
        if not self.sparse or self.config.method == "dense":
            return 0
        a, cfg = self.model.args, self.config
        kv = {"bf16": 2, "fp16": 2, "fp32": 4}[cfg.kv_dtype] * 2 * a.head_dim
        index = index_bytes_per_token_head(cfg.K, cfg.L) if cfg.method == "magicpig" else 0
        return len(self.sparse) * a.num_kv_heads * (kv + index)

    def close(self) -> None:
        """Stop the middle attentions' worker threads."""
        for _, _, method in self.sparse.values():
            close = getattr(getattr(method, "store", None), "close", None)
            if close is not None:
                close()
