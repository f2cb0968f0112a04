"""The one exact, chunked prefill loop (DESIGN.md §2 "Prefill"), and the read-only prefill
state the evaluation decodes every method from.

:func:`prefill_rows` runs tokens ``[start, end)`` of a prompt through every layer, layer by
layer (a layer's K/V are complete, and can be handed on, before the next layer starts), in
sub-chunks of at most ``chunk_size`` rows so that attention memory is O(chunk * n), not n^2.
Where each layer's K/V go is the caller's: a :class:`PrefillKV` writes a sub-chunk's keys and
reads back everything before it. The runner's (``runtime/runner.py``) writes dense layers into
their paged blocks and sparse layers into a buffer handed to the CPU store when the layer is
done; :class:`FullKV` keeps every layer whole (the evaluation's :class:`PrefillState`, and the
dense reference logits of :func:`prefill_sequence`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

import torch

from magicpig.model.llama import LlamaModel, causal_chunk_attention

PREFILL_CHUNK = 4096  # rows per sub-chunk: big enough for efficient kernels, bounded memory
PROGRESS_MIN_TOKENS = 4096


class PrefillKV(Protocol):
    """Where :func:`prefill_rows` keeps each layer's K/V."""

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        """keys, values [Hkv, T, d] (post-RoPE, model dtype) are tokens [start, start + T)."""

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys, values [Hkv, end, d]: the layer's first ``end`` tokens."""

    def layer_done(self, layer: int, end: int) -> None:
        """Every row up to ``end`` has been through ``layer``."""


@torch.inference_mode()
def prefill_rows(model: LlamaModel, token_ids: list[int], start: int, end: int, kv: PrefillKV,
                 chunk_size: int = PREFILL_CHUNK, all_logits: bool = False, bar: object = None) -> torch.Tensor:
    """Exact causal forward of tokens [start, end) of ``token_ids`` (the K/V of tokens before
    ``start`` are in ``kv``). Returns float32 logits: [end - start, vocab] if ``all_logits``,
    else [vocab] after the last row. ``bar``: a tqdm bar advanced by one per layer."""
    device = model.device
    ids = torch.tensor(token_ids[start:end], dtype=torch.int64, device=device)
    cos, sin = model.rope(torch.arange(start, end, device=device), end - 1)
    x = model.embed(ids)  # [T, hidden], updated in place sub-chunk by sub-chunk, layer by layer
    for layer in range(model.args.num_layers):
        for lo in range(start, end, chunk_size):
            hi = min(end, lo + chunk_size)
            rows = slice(lo - start, hi - start)
            q, k, v = model.attention_input(layer, x[rows], cos[rows], sin[rows])
            kv.write(layer, k.transpose(0, 1), v.transpose(0, 1), lo)
            keys, values = kv.read(layer, hi)
            attn = causal_chunk_attention(q, keys, values, lo, model.scale)
            x[rows] = model.mlp(layer, model.attention_output(layer, x[rows], attn))
        kv.layer_done(layer, end)
        if bar is not None:
            bar.update(1)
    return model.logits(x) if all_logits else model.logits(x[-1:])[0]


class FullKV:
    """Every layer's K/V of one prompt of ``n`` tokens, whole: keys[layer], values[layer]
    [Hkv, n, d] in the model dtype on the model device."""

    def __init__(self, model: LlamaModel, n: int):
        a = model.args
        self.keys = [torch.empty(a.num_kv_heads, n, a.head_dim, device=model.device, dtype=model.dtype)
                     for _ in range(a.num_layers)]
        self.values = [torch.empty_like(k) for k in self.keys]

    def write(self, layer: int, keys: torch.Tensor, values: torch.Tensor, start: int) -> None:
        self.keys[layer][:, start : start + keys.shape[1]] = keys
        self.values[layer][:, start : start + keys.shape[1]] = values

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.keys[layer][:, :end], self.values[layer][:, :end]

    def layer_done(self, layer: int, end: int) -> None:
        pass


@dataclass
class PrefillState:
    """Everything decode needs from a batch of prompts.

    token_ids: the prompts. keys[b][layer], values[b][layer]: [Hkv, n_b, d] in the model dtype
    on the model device (post-RoPE keys, not centred). last_logits: float32 [B, vocab], the
    logits after each prompt's last token. prefill_seconds[b]: wall time of prompt b.
    """

    token_ids: list[list[int]]
    keys: list[list[torch.Tensor]]
    values: list[list[torch.Tensor]]
    last_logits: torch.Tensor
    prefill_seconds: list[float] = field(default_factory=list)

    @property
    def batch_size(self) -> int:
        return len(self.token_ids)

    @property
    def lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in (self.keys, self.values) for seq in kv for t in seq)

    def select(self, indices: list[int]) -> "PrefillState":
        """A state of the chosen sequences (shares tensors; nothing is copied)."""
        return PrefillState(
            token_ids=[self.token_ids[i] for i in indices],
            keys=[self.keys[i] for i in indices],
            values=[self.values[i] for i in indices],
            last_logits=self.last_logits[list(indices)],
            prefill_seconds=[self.prefill_seconds[i] for i in indices],
        )

    @staticmethod
    def concat(states: list["PrefillState"]) -> "PrefillState":
        """One batch from several states (shares tensors)."""
        return PrefillState(
            token_ids=[t for s in states for t in s.token_ids],
            keys=[k for s in states for k in s.keys],
            values=[v for s in states for v in s.values],
            last_logits=torch.cat([s.last_logits for s in states]),
            prefill_seconds=[t for s in states for t in s.prefill_seconds],
        )


def prefill_sequence(
    model: LlamaModel,
    token_ids: list[int],
    chunk_size: int = PREFILL_CHUNK,
    progress: bool | None = None,
    all_logits: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Exact causal forward of one prompt (:func:`prefill_rows` keeping every layer whole).

    Returns keys, values (per layer [Hkv, n, d]) and float32 logits: [n, vocab] if
    ``all_logits`` else [vocab] for the last token."""
    n = len(token_ids)
    kv = FullKV(model, n)
    show = n >= PROGRESS_MIN_TOKENS if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=model.args.num_layers, desc=f"prefill {n} tokens", unit="layer", leave=False)
    try:
        logits = prefill_rows(model, token_ids, 0, n, kv, chunk_size, all_logits, bar)
    finally:
        if bar is not None:
            bar.close()
    return kv.keys, kv.values, logits


def prefill(
    model: LlamaModel,
    prompts: list[list[int]],
    chunk_size: int = PREFILL_CHUNK,
    progress: bool | None = None,
) -> PrefillState:
    """Prefill each prompt alone (so a batch equals its prompts run one by one)."""
    keys, values, last, seconds = [], [], [], []
    for ids in prompts:
        t0 = time.perf_counter()
        k, v, logits = prefill_sequence(model, ids, chunk_size, progress)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)
        seconds.append(time.perf_counter() - t0)
        keys.append(k)
        values.append(v)
        last.append(logits)
    return PrefillState([list(p) for p in prompts], keys, values, torch.stack(last), seconds)
