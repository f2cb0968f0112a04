"""Dense, chunked prefill and the state it leaves behind (DESIGN.md §2 "Prefill").

Prefill is always exact. Its result, :class:`PrefillState`, holds the dense K/V of every layer
of every sequence on the device and the logits of each prompt's last token. It is read-only:
any number of decode sessions (one per attention method) can start from the same state.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from magicpig.model.llama import LlamaModel, causal_chunk_attention

DEFAULT_CHUNK = 4096  # rows per prefill chunk: big enough for efficient kernels, bounded memory
PROGRESS_MIN_TOKENS = 4096


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


@torch.inference_mode()
def prefill_sequence(
    model: LlamaModel,
    token_ids: list[int],
    chunk_size: int = DEFAULT_CHUNK,
    progress: bool | None = None,
    all_logits: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """Exact causal forward of one prompt in chunks of ``chunk_size`` tokens.

    Returns keys, values (per layer [Hkv, n, d]) and float32 logits: [n, vocab] if
    ``all_logits`` else [vocab] for the last token. Attention memory is O(chunk * n), not n^2.
    """
    a = model.args
    n = len(token_ids)
    ids = torch.tensor(token_ids, dtype=torch.int64, device=model.device)
    keys = [torch.empty(a.num_kv_heads, n, a.head_dim, device=model.device, dtype=model.dtype) for _ in range(a.num_layers)]
    values = [torch.empty_like(k) for k in keys]
    show = n >= PROGRESS_MIN_TOKENS if progress is None else progress
    bar = None
    if show:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc="prefill", unit="tok", leave=False)
    logits = []
    for start in range(0, n, chunk_size):
        end = min(n, start + chunk_size)
        positions = torch.arange(start, end, device=model.device)
        cos, sin = model.rope(positions, end - 1)
        x = model.embed(ids[start:end])
        for layer in range(a.num_layers):
            q, k, v = model.attention_input(layer, x, cos, sin)
            keys[layer][:, start:end] = k.transpose(0, 1)
            values[layer][:, start:end] = v.transpose(0, 1)
            attn = causal_chunk_attention(q, keys[layer][:, :end], values[layer][:, :end], start, model.scale)
            x = model.attention_output(layer, x, attn)
            x = model.mlp(layer, x)
        if all_logits:
            logits.append(model.logits(x))
        elif end == n:
            logits.append(model.logits(x[-1:])[0])
        if bar is not None:
            bar.update(end - start)
    if bar is not None:
        bar.close()
    return keys, values, (torch.cat(logits) if all_logits else logits[0])


def prefill(
    model: LlamaModel,
    prompts: list[list[int]],
    chunk_size: int = DEFAULT_CHUNK,
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
