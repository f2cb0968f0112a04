"""A runner with its ledger, as the engine builds them, for tests that drive the runner directly:
the ledger grants each sequence its blocks and slot, the runner fills them."""

from __future__ import annotations

import torch

from magicpig.core.kv_budget import KVBudget, KVLayout
from magicpig.core.request import Request, SequenceKV
from magicpig.core.sampling_params import SamplingParams
from magicpig.runtime.prefill import PREFILL_CHUNK
from magicpig.runtime.runner import ModelRunner


class Ledgered:
    """``runner`` (a :class:`ModelRunner`) and ``kv`` (its :class:`KVBudget`)."""

    def __init__(self, model, config, max_num_seqs: int, num_blocks: int, block_size: int, **runner_kwargs):
        self.runner = ModelRunner(model.model, config, max_num_seqs, num_blocks, block_size, **runner_kwargs)
        self.kv = KVBudget(KVLayout(block_size if self.runner.dense else 0, num_blocks, max_num_seqs,
                                    bool(self.runner.sparse), cpu_bytes_total=0, cpu_bytes_per_token=0))
        self.requests: dict[int, Request] = {}

    def admit(self, ids: list[int], max_new_tokens: int = 64) -> SequenceKV:
        """A granted, empty sequence for the prompt ``ids``."""
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

    def decode(self, seqs: list[SequenceKV], tokens: torch.Tensor) -> torch.Tensor:
        for seq in seqs:
            self.kv.grow(seq, seq.length + 1)
        return self.runner.decode(seqs, tokens)

    def release(self, kv: SequenceKV) -> None:
        self.runner.release(kv)
        self.kv.free(self.requests.pop(id(kv)))

    @property
    def blocks_in_use(self) -> int:
        return self.kv.allocator.num_used

    def close(self) -> None:
        self.runner.close()
