"""Token selection: greedy, or sampled with temperature, top-k and top-p (per request, from
its own generator)."""

from __future__ import annotations

import torch

from magicpig.core.sampling_params import SamplingParams


def select_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of float32 logits [B, V] -> int64 [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    # Shift the maximum to 0 and divide in float64: with a tiny temperature logits / T overflows
    # to +-inf (and T itself underflows to 0 in float32), and softmax(inf - inf) is NaN; shifted,
    # the best token stays at 0 and the rest go to -inf. [B, V] float64 is small next to a step.
    scores = (logits - logits.max(dim=-1, keepdim=True).values).double() / params.temperature
    if params.top_k > 0 and params.top_k < scores.shape[-1]:
        kth = torch.topk(scores, params.top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        probs = torch.softmax(sorted_scores, dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first always stays).
        drop = (probs.cumsum(-1) - probs) >= params.top_p
        sorted_scores = sorted_scores.masked_fill(drop, float("-inf"))
        scores = torch.full_like(scores, float("-inf")).scatter(-1, order, sorted_scores)
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
