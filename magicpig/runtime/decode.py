"""DecodeSession: a fixed batch decoded from a read-only prefill state (DESIGN.md §2, §4).

The evaluation prefills each sample once and decodes every attention method from that state;
a session is that decode: a :class:`~magicpig.runtime.runner.ModelRunner` sized for the batch,
with every row of the state added by ``add_prefilled``. The mechanism (paged dense layers,
sinks + window slots, the middle attention with its ping-pong, window spills, centring) is the
runner's, the same the engine uses.
"""

from __future__ import annotations

from typing import Callable

import torch

from magicpig.attention.base import MiddleAttention
from magicpig.config import MagicPIGConfig
from magicpig.core.kv_budget import blocks_for
from magicpig.core.request import SequenceKV
from magicpig.model.llama import LlamaModel
from magicpig.runtime.prefill import PrefillState
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, ModelRunner
from magicpig.runtime.standalone import StandaloneRunner


class SparseLayerView:
    """One sparse layer as seen by one session: its slot cache, per-row mu [B, Hkv, d] and the
    middle attention with the rows' ids (for tests and tools that inspect the state)."""

    def __init__(self, runner: ModelRunner, layer: int, seqs: list[SequenceKV]):
        sp = runner.sparse[layer]
        self.cache, self.method = sp.cache, sp.method
        self.mu = sp.mu[[s.slot for s in seqs]]
        self.seq_ids = [s.store_ids[layer] for s in seqs]


class DecodeSession:
    """Incremental decode of a batch from a prefill state with one attention configuration.

    ``step(tokens)`` feeds one token per sequence and returns the next-token logits. The
    prefill state is never modified. Call :meth:`close` (or use it as a context manager) to
    release the middle K/V held by the methods.
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
        self.model, self.config, self.batch = model, config, state.batch_size
        bs = DEFAULT_BLOCK_SIZE
        num_blocks = sum(blocks_for(n + max(1, max_new_tokens) + 1, bs) for n in state.lengths)
        # The rows' blocks and slots come from a ledger of exactly this batch, as in the engine.
        self.standalone = StandaloneRunner(model, config, self.batch, num_blocks, bs, method_factory=method_factory)
        self.runner = self.standalone.runner
        self.seqs = [self.standalone.add_prefilled(state.keys[b], state.values[b], max(1, max_new_tokens))
                     for b in range(self.batch)]
        self.dense_layers = tuple(sorted(self.runner.dense))

    @property
    def lengths(self) -> list[int]:
        """Tokens per sequence so far (prompt + fed)."""
        return [s.length for s in self.seqs]

    @property
    def fill(self) -> list[int]:
        """Tokens in each sequence's sinks + window slot."""
        return [s.fill for s in self.seqs]

    @property
    def middle(self) -> list[int]:
        """Tokens in each sequence's middle (held by the middle attention)."""
        return [s.middle for s in self.seqs]

    @property
    def sparse(self) -> dict[int, SparseLayerView]:
        return {layer: SparseLayerView(self.runner, layer, self.seqs) for layer in self.runner.sparse}

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed tokens int64 [B] (one per sequence); returns float32 logits [B, vocab]."""
        return self.standalone.decode(self.seqs, tokens)

    def computation_cost(self) -> list[float]:
        """Per sequence: mean fraction of middle keys read, over sparse layers, KV-read heads
        and decode steps (1.0 in dense mode, 0.0 when nothing was ever in the middle)."""
        if not self.runner.sparse:
            return [1.0] * self.batch
        return [s.computation_cost for s in self.seqs]

    def device_bytes(self) -> list[int]:
        """Per sequence: bytes of its K/V in device caches (tokens held, not buffer slack)."""
        return [self.runner.device_bytes(s) for s in self.seqs]

    def cpu_bytes(self) -> list[int]:
        """Per sequence: bytes the middle-attention methods hold (the CPU store)."""
        return [self.runner.cpu_bytes(s) for s in self.seqs]

    def close(self) -> None:
        for seq in self.seqs:
            self.standalone.release(seq)
        self.standalone.close()

    def __enter__(self) -> "DecodeSession":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
