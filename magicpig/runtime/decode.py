"""Decode: one token per sequence per step, attention routed per layer (DESIGN.md §2, §4).

A :class:`DecodeSession` starts from a read-only :class:`PrefillState` and a
:class:`MagicPIGConfig`:

* ``method="dense"``: every layer keeps the full K/V in a static device cache (exact).
* any other method: layers in ``config.resolve_dense_layers`` stay dense; every other layer
  keeps the sinks ``[0, S)`` and the window (keys centred by ``mu``, the mean middle key per
  sequence and KV head) in a device cache, and hands the centred middle to the layer's
  :class:`~magicpig.attention.base.MiddleAttention` (``make_method``). A step starts the
  middle attention (``attend_async``; the CPU store runs it off the GIL), computes the exact
  sinks+window scores on the device meanwhile, waits, and merges by LSE (inside one softmax,
  see :func:`magicpig.model.llama.attention_with_middle`).
  When a window buffer fills up, its oldest ``spill`` tokens move into the middle, so decode
  length is unbounded (a prompt too short to have a middle gets its ``mu`` at the first spill).
"""

from __future__ import annotations

from typing import Callable

import torch

from magicpig.attention.base import MiddleAttention, make_method
from magicpig.config import MagicPIGConfig
from magicpig.model.llama import LlamaModel, attention_with_middle, decode_attention
from magicpig.runtime.prefill import PrefillState
from magicpig.store.device_cache import StaticKVCache


class _SparseLayer:
    """Device sinks+window cache, centring offsets and middle attention of one layer."""

    def __init__(self, cache: StaticKVCache, mu: torch.Tensor, method: MiddleAttention, seq_ids: list[int]):
        self.cache = cache
        self.mu = mu  # [B, Hkv, d] model dtype
        self.method = method
        self.seq_ids = seq_ids


class _Rows:
    """Batch rows [r0, r1) of one micro-batch and their per-step positions and masks."""

    def __init__(self, r0: int, r1: int):
        self.r0, self.r1 = r0, r1
        self.dense_valid: torch.Tensor | None = None
        self.dev_valid: torch.Tensor | None = None
        self.reads: list[torch.Tensor] = []


class DecodeSession:
    """Incremental decode of a batch from a prefill state with one attention configuration.

    ``step(tokens)`` feeds one token per sequence and returns the next-token logits. The
    session owns its caches; the prefill state is never modified. Call :meth:`close` (or use
    it as a context manager) to release the middle K/V held by the methods.
    """

    def __init__(
        self,
        model: LlamaModel,
        state: PrefillState,
        config: MagicPIGConfig,
        max_new_tokens: int = 256,
        method_factory: Callable[[MagicPIGConfig, int, int, int], MiddleAttention] | None = None,
    ):
        """``method_factory(config, layer, num_kv_heads, head_dim)`` builds each sparse layer's
        middle attention (default: the method registered under ``config.method``); a custom
        one lets a tool observe or replace the middle attention of one session only."""
        a = model.args
        self.method_factory = make_method if method_factory is None else method_factory
        self.model = model
        self.config = config
        self.batch = state.batch_size
        self.lengths = state.lengths  # tokens per sequence so far (prompt + fed)
        device, dtype = model.device, model.dtype
        if config.method == "dense":
            self.dense_layers = tuple(range(a.num_layers))
        else:
            self.dense_layers = config.resolve_dense_layers(a.num_layers)
        capacity = max(self.lengths) + max(1, max_new_tokens)
        self.dense: dict[int, StaticKVCache] = {}
        for layer in self.dense_layers:
            cache = StaticKVCache(self.batch, a.num_kv_heads, capacity, a.head_dim, device, dtype)
            for b in range(self.batch):
                cache.fill(b, state.keys[b][layer], state.values[b][layer])
            self.dense[layer] = cache
        self.sparse: dict[int, _SparseLayer] = {}
        S, W = config.sink_tokens, config.window_tokens
        # The window buffer holds W..W+spill tokens; spilling in blocks amortises hashing.
        self.spill = W
        self.device_capacity = S + W + self.spill
        self.fill = [min(n, S + W) for n in self.lengths]  # tokens in each sinks+window buffer
        self.middle = [max(0, n - S - W) for n in self.lengths]  # tokens in each middle
        for layer in range(a.num_layers):
            if layer not in self.dense:
                self.sparse[layer] = self._offload(layer, state)
        self.cost_sum = torch.zeros(self.batch, dtype=torch.float64, device=device)
        self.cost_count = torch.zeros(self.batch, dtype=torch.float64, device=device)

    # ---------------------------------------------------------------- prefill -> caches
    def _offload(self, layer: int, state: PrefillState) -> _SparseLayer:
        a, m = self.model.args, self.model
        S, W = self.config.sink_tokens, self.config.window_tokens
        cache = StaticKVCache(self.batch, a.num_kv_heads, self.device_capacity, a.head_dim, m.device, m.dtype)
        mu = torch.zeros(self.batch, a.num_kv_heads, a.head_dim, device=m.device, dtype=m.dtype)
        method = self.method_factory(self.config, layer, a.num_kv_heads, a.head_dim)
        seq_ids = []
        for b in range(self.batch):
            k, v = state.keys[b][layer], state.values[b][layer]
            n = k.shape[1]
            seq_ids.append(method.add_sequence())
            if self.middle[b] > 0:
                lo, hi = S, n - W
                # Centre by the mean middle key (fp32 mean): softmax is shift-invariant, and
                # centred keys spread over the hash buckets far better.
                mu[b] = k[:, lo:hi].float().mean(dim=1).to(m.dtype)
                kc = k - mu[b][:, None, :]
                method.append(seq_ids[-1], kc[:, lo:hi], v[:, lo:hi])
                cache.fill(b, kc[:, :S], v[:, :S])
                cache.fill(b, kc[:, hi:], v[:, hi:], start=S)
            else:
                cache.fill(b, k, v)
        return _SparseLayer(cache, mu, method, seq_ids)

    # ---------------------------------------------------------------------- decode
    def _spill_full_windows(self) -> None:
        S = self.config.sink_tokens
        for b in range(self.batch):
            if self.fill[b] < self.device_capacity:
                continue
            for sp in self.sparse.values():
                if self.middle[b] == 0:
                    self._centre_first_middle(sp, b)
                k, v = sp.cache.evict(b, S, self.spill, self.fill[b])
                sp.method.append(sp.seq_ids[b], k, v)
            self.fill[b] -= self.spill
            self.middle[b] += self.spill

    def _centre_first_middle(self, sp: _SparseLayer, b: int) -> None:
        """A prompt that fit in sinks + window had no middle to centre by (mu = 0): centre now,
        by the mean of the first block to spill. Every key of the row shifts by the same mu,
        so each query's softmax is unchanged; only the hashing gets the centred keys."""
        S, keys = self.config.sink_tokens, sp.cache.keys
        mu = keys[b, :, S : S + self.spill].float().mean(dim=1).to(keys.dtype)  # [Hkv, d]
        keys[b, :, : self.fill[b]] -= mu[:, None, :]
        sp.mu[b] += mu

    def _ensure_dense_capacity(self) -> None:
        need = max(self.lengths) + 1
        for cache in self.dense.values():
            if need > cache.capacity:
                cache.grow(max(need, 2 * cache.capacity))

    def _rows(self, r0: int, r1: int) -> "_Rows":
        """Per-step indexing data of the batch rows [r0, r1)."""
        device = self.model.device
        lengths = self.lengths[r0:r1]
        rows = _Rows(r0, r1)
        rows.pos = torch.tensor(lengths, dtype=torch.int64, device=device)
        rows.cos, rows.sin = self.model.rope(rows.pos, max(lengths))
        rows.n_dense = max(lengths) + 1
        rows.dense_slot = lengths[0] if min(lengths) == max(lengths) else None
        if rows.dense_slot is None:
            rows.dense_valid = torch.arange(rows.n_dense, device=device)[None, :] <= rows.pos[:, None]
        if self.sparse:
            fill = self.fill[r0:r1]
            rows.slots = torch.tensor(fill, dtype=torch.int64, device=device)
            rows.n_dev = max(fill) + 1
            rows.dev_slot = fill[0] if min(fill) == max(fill) else None
            if rows.dev_slot is None:
                rows.dev_valid = torch.arange(rows.n_dev, device=device)[None, :] <= rows.slots[:, None]
        return rows

    def _layer_start(self, layer: int, x: torch.Tensor, rows: "_Rows") -> tuple:
        """First half of a layer for some rows: QKV, cache write, and either the whole dense
        attention or the start of the middle attention (returns what _layer_finish needs)."""
        m = self.model
        q, k, v = m.attention_input(layer, x, rows.cos, rows.sin)
        sl = slice(rows.r0, rows.r1)
        if layer in self.dense:
            cache = self.dense[layer]
            cache.write(sl, rows.dense_slot, rows.pos, k, v)
            n = rows.n_dense
            attn = decode_attention(q, cache.keys[sl, :, :n], cache.values[sl, :, :n], rows.dense_valid, m.scale)
            return attn, None
        sp = self.sparse[layer]
        sp.cache.write(sl, rows.dev_slot, rows.slots, k - sp.mu[sl], v)
        return q, sp.method.attend_async(sp.seq_ids[rows.r0 : rows.r1], q)

    def _layer_finish(self, layer: int, x: torch.Tensor, rows: "_Rows", started: tuple) -> torch.Tensor:
        """Second half: (wait for the middle and merge,) O-projection and MLP."""
        m = self.model
        first, pending = started
        if pending is None:
            attn = first
        else:
            sp, sl, device = self.sparse[layer], slice(rows.r0, rows.r1), m.device

            def middle():
                out_mid, lse_mid, num_read = pending.wait()
                rows.reads.append(num_read)
                return out_mid.to(device), lse_mid.to(device)

            n = rows.n_dev
            # Sinks + window scores on the device while the CPU store attends the middle;
            # one softmax then merges both (the LSE merge of DESIGN.md §2, step 5).
            attn = attention_with_middle(
                first, sp.cache.keys[sl, :, :n], sp.cache.values[sl, :, :n], rows.dev_valid, m.scale, middle
            )
        x = m.attention_output(layer, x, attn)
        return m.mlp(layer, x)

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens int64 [B] (one per sequence); returns float32 logits [B, vocab].

        With sparse layers and B >= 2 the batch runs as two micro-batches in ping-pong
        (DESIGN.md §4): while the CPU store attends one half's middle for layer l, the device
        finishes the other half's layer l-1 and starts its layer l.
        """
        m = self.model
        if self.sparse:
            self._spill_full_windows()
        self._ensure_dense_capacity()
        x_all = m.embed(tokens.to(m.device))
        if self.sparse and self.batch >= 2:
            half = self.batch // 2
            parts = [self._rows(0, half), self._rows(half, self.batch)]
        else:
            parts = [self._rows(0, self.batch)]
        xs = [x_all[r.r0 : r.r1] for r in parts]
        started: list = [None] * len(parts)
        num_layers = m.args.num_layers
        if len(parts) == 1:
            for layer in range(num_layers):
                xs[0] = self._layer_finish(layer, xs[0], parts[0], self._layer_start(layer, xs[0], parts[0]))
        else:
            a, b = parts
            for layer in range(num_layers):
                started[0] = self._layer_start(layer, xs[0], a)
                if layer > 0:
                    xs[1] = self._layer_finish(layer - 1, xs[1], b, started[1])
                started[1] = self._layer_start(layer, xs[1], b)
                xs[0] = self._layer_finish(layer, xs[0], a, started[0])
            xs[1] = self._layer_finish(num_layers - 1, xs[1], b, started[1])
        if self.sparse:
            self._account([torch.cat([r.reads[i] for r in parts]) for i in range(len(parts[0].reads))])
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        self.lengths = [n + 1 for n in self.lengths]
        if self.sparse:
            self.fill = [f + 1 for f in self.fill]
        return m.logits(x)

    def _account(self, reads: list[torch.Tensor]) -> None:
        """Add this step's fraction of middle keys read (mean over sparse layers and heads)."""
        device = self.cost_sum.device
        middle = torch.tensor(self.middle, dtype=torch.float64, device=device)
        has_middle = (middle > 0).double()
        per_seq = torch.stack(reads).to(device).double().mean(dim=(0, 2))  # [B]
        self.cost_sum += per_seq / middle.clamp_min(1.0) * has_middle
        self.cost_count += has_middle

    # ----------------------------------------------------------------------- stats
    def computation_cost(self) -> list[float]:
        """Per sequence: mean fraction of middle keys read, over sparse layers, KV-read heads
        and decode steps (1.0 in dense mode, 0.0 when nothing was ever in the middle)."""
        if len(self.dense_layers) == self.model.args.num_layers:
            return [1.0] * self.batch
        counts = self.cost_count.clamp_min(1.0)
        return (self.cost_sum / counts).tolist()

    def device_bytes(self) -> list[int]:
        """Per sequence: bytes of its K/V in device caches (tokens held, not buffer slack)."""
        out = []
        for b in range(self.batch):
            total = sum(c.bytes_per_token() * self.lengths[b] for c in self.dense.values())
            total += sum(sp.cache.bytes_per_token() * self.fill[b] for sp in self.sparse.values())
            out.append(total)
        return out

    def cpu_bytes(self) -> list[int]:
        """Per sequence: bytes the middle-attention methods hold (the CPU store)."""
        return [sum(sp.method.nbytes(sp.seq_ids[b]) for sp in self.sparse.values()) for b in range(self.batch)]

    def close(self) -> None:
        for sp in self.sparse.values():
            for sid in sp.seq_ids:
                sp.method.remove_sequence(sid)
            sp.seq_ids = []
        self.sparse = {}
        self.dense = {}

    def __enter__(self) -> "DecodeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
