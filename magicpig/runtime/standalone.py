"""A runner with a ledger of its own, for tools and tests that drive the runner directly (the
profiler, the decode benchmark, the runner's tests): the ledger grants each sequence its blocks
and slot, the runner fills them, as under the engine (whose scheduler owns the ledger)."""

from __future__ import annotations

import torch

from typing import Any

from magicpig.config import MagicPIGConfig
from magicpig.core.kv_budget import KVBudget, KVLayout
from magicpig.core.request import Request, SequenceKV
from magicpig.core.sampling_params import SamplingParams
from magicpig.model.llama import LlamaModel
from magicpig.runtime.prefill import PREFILL_CHUNK
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, ModelRunner


class StandaloneRunner:
    """``runner`` (a :class:`ModelRunner`) and ``kv`` (its :class:`KVBudget`)."""

    def __init__(self, model: LlamaModel, config: MagicPIGConfig, max_num_seqs: int, num_blocks: int,
                 block_size: int = DEFAULT_BLOCK_SIZE, **runner_kwargs: Any):
        self.runner = ModelRunner(model, config, max_num_seqs, num_blocks, block_size, **runner_kwargs)
        self.kv = KVBudget(KVLayout(block_size if self.runner.dense else 0, num_blocks, max_num_seqs,
                                    cpu_bytes_total=0, cpu_bytes_per_token=0))
        self.requests: dict[int, Request] = {}

    def admit(self, ids: list[int], max_new_tokens: int = 64) -> SequenceKV:
        """A granted, empty sequence for the prompt ``ids`` (placed where it can grow by
        ``max_new_tokens`` in one run of blocks)."""
        req = Request(f"r{len(self.requests)}", list(ids), SamplingParams(max_new_tokens=max_new_tokens))
        self.kv.admit(req)
        self.requests[id(req.kv)] = req
        return req.kv

    def prefill(self, ids: list[int], chunk_size: int = PREFILL_CHUNK) -> tuple[SequenceKV, torch.Tensor]:
        """The whole prompt in one go: its sequence and the logits after its last token."""
        kv = self.admit(ids)
        try:
            return kv, self.runner.prefill(kv, ids, len(ids), chunk_size)
        except BaseException:
            self.release(kv)
            raise

    def add_prefilled(self, keys: list[torch.Tensor], values: list[torch.Tensor], max_new_tokens: int = 64) -> SequenceKV:
        """A sequence started from a full prefill state: keys[layer], values[layer] [Hkv, n, d]."""
        kv = self.admit([0] * keys[0].shape[1], max_new_tokens)
        try:
            self.runner.add_prefilled(kv, keys, values)
        except BaseException:
            self.release(kv)
            raise
        return kv

    def decode(self, seqs: list[SequenceKV], tokens: torch.Tensor) -> torch.Tensor:
        """One token per sequence (int64 [B]); their blocks grown first. float32 logits [B, V]."""
        for seq in seqs:
            self.kv.grow(seq, seq.length + 1)
        return self.runner.decode(seqs, tokens)

    def release(self, kv: SequenceKV) -> None:
        """Free everything the sequence holds (idempotent)."""
        self.runner.release(kv)
        req = self.requests.pop(id(kv), None)
        if req is not None:
            self.kv.free(req)

    @property
    def blocks_in_use(self) -> int:
        return self.kv.allocator.num_used

    def close(self) -> None:
        self.runner.close()
