"""Token selection and the generation loop on top of a :class:`DecodeSession`."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Generator, Sequence

import torch

from magicpig.runtime.decode import DecodeSession
from magicpig.runtime.outputs import GenerationResult, GenerationStats, OutputText, SamplingParams, stop_list

__all__ = ["GenerationResult", "GenerationStats", "OutputText", "SamplingParams", "decode_loop", "select_tokens",
           "stop_list"]


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


@dataclass
class _Row(OutputText):
    """Generation state of one sequence of a fixed batch (:func:`decode_loop`)."""

    prompt_tokens: int = 0
    prefill_seconds: float = 0.0
    steps: int = 0
    stats: GenerationStats | None = None  # frozen when the row finishes

    def freeze_stats(self, session: DecodeSession, b: int, seconds: float) -> None:
        """Record row b's stats now: a finished row stays in the batch until the loop ends, but
        what it reads and holds afterwards is not its own."""
        self.stats = GenerationStats(
            prefill_seconds=self.prefill_seconds,
            decode_tokens_per_second=self.steps / seconds if seconds > 0 and self.steps else 0.0,
            computation_cost=float(session.computation_cost()[b]),
            device_bytes=int(session.device_bytes()[b]),
            cpu_bytes=int(session.cpu_bytes()[b]),
            prompt_tokens=self.prompt_tokens,
            new_tokens=len(self.out_ids),
            decode_seconds=seconds,
        )


def decode_loop(
    session: DecodeSession,
    first_logits: torch.Tensor,
    tokenizer: Any,
    max_new_tokens: int,
    params: SamplingParams,
    eos_ids: set[int],
    stop: Sequence[str],
    prefill_seconds: Sequence[float],
) -> Generator[tuple[int, str], None, list[GenerationResult]]:
    """Generate for every sequence of the session; yields (sequence index, text piece) as text
    becomes final and returns the results. The session is closed at the end."""
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=first_logits.device).manual_seed(params.seed)
    rows = [_Row(prompt_tokens=n, prefill_seconds=float(t)) for n, t in zip(session.lengths, prefill_seconds)]
    logits = first_logits
    t0 = time.perf_counter()
    try:
        for i in range(max_new_tokens):
            last = i == max_new_tokens - 1
            chosen = select_tokens(logits, params, generator).tolist()
            for b, row in enumerate(rows):
                if row.done:
                    continue
                row.add_token(chosen[b], tokenizer, eos_ids, stop)
                piece = row.new_text(row.done or last, stop)
                if piece:
                    yield b, piece
                if row.done or last:
                    row.freeze_stats(session, b, time.perf_counter() - t0)
            if all(r.done for r in rows) or last:
                break
            logits = session.step(torch.tensor(chosen, dtype=torch.int64))
            for row in rows:
                row.steps += not row.done
    finally:
        session.close()
    return [GenerationResult(r.text, r.out_ids, r.stats, r.reason) for r in rows]
