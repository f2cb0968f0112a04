"""Token selection and the generation loop on top of a :class:`DecodeSession`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch

from magicpig.runtime.decode import DecodeSession


@dataclass
class GenerationStats:
    """prefill_seconds: wall time of this prompt's prefill. decode_tokens_per_second: decode
    steps of this sequence per second of batch decode time. computation_cost: mean fraction of
    middle keys read over sparse layers (1.0 for dense). device_bytes / cpu_bytes: K/V bytes
    of this sequence in device caches / in the CPU store at the end."""

    prefill_seconds: float
    decode_tokens_per_second: float
    computation_cost: float
    device_bytes: int
    cpu_bytes: int
    prompt_tokens: int = 0
    new_tokens: int = 0
    decode_seconds: float = 0.0


@dataclass
class GenerationResult:
    """text: generated text (special tokens skipped, cut at a stop string). token_ids: the
    generated ids (including a final EOS). finish_reason: "eos", "stop" or "length"."""

    text: str
    token_ids: list[int]
    stats: GenerationStats
    finish_reason: str = "length"


@dataclass
class SamplingParams:
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise ValueError(f"temperature={self.temperature!r}: expected a float >= 0 (0 = greedy)")
        if isinstance(self.top_p, bool) or not isinstance(self.top_p, (int, float)) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r}: expected a float in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k={self.top_k!r}: expected an integer >= 0 (0 = off)")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed={self.seed!r}: expected None or an integer")


def select_tokens(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> torch.Tensor:
    """Next token per row of float32 logits [B, V] -> int64 [B]."""
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    scores = logits / params.temperature
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


def _held_back(text: str, stops: Sequence[str]) -> int:
    """How many trailing characters might still turn into a stop string (or a broken char)."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


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
    B = session.batch
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=first_logits.device).manual_seed(params.seed)
    out_ids: list[list[int]] = [[] for _ in range(B)]
    texts = [""] * B
    emitted = [0] * B
    reason = ["length"] * B
    done = [False] * B
    steps = [0] * B
    finish_time = [0.0] * B
    prompt_lengths = list(session.lengths)
    logits = first_logits
    t0 = time.perf_counter()
    try:
        for i in range(max_new_tokens):
            tokens = select_tokens(logits, params, generator)
            chosen = tokens.tolist()
            for b in range(B):
                if done[b]:
                    continue
                tok = chosen[b]
                out_ids[b].append(tok)
                if tok in eos_ids:
                    done[b], reason[b] = True, "eos"
                elif tokenizer is not None:
                    text = tokenizer.decode(out_ids[b], skip_special_tokens=True)
                    cut = min((text.find(s) for s in stop if s in text), default=-1)
                    if cut >= 0:
                        text, done[b], reason[b] = text[:cut], True, "stop"
                    texts[b] = text
                final = done[b] or i == max_new_tokens - 1
                upto = len(texts[b]) if final else len(texts[b]) - _held_back(texts[b], stop)
                if upto > emitted[b]:
                    yield b, texts[b][emitted[b] : upto]
                    emitted[b] = upto
                if done[b]:
                    finish_time[b] = time.perf_counter() - t0
            if all(done) or i == max_new_tokens - 1:
                break
            logits = session.step(tokens)
            for b in range(B):
                if not done[b]:
                    steps[b] += 1
        elapsed = time.perf_counter() - t0
        cost = session.computation_cost()
        dev_bytes = session.device_bytes()
        cpu_bytes = session.cpu_bytes()
    finally:
        session.close()
    results = []
    for b in range(B):
        seconds = finish_time[b] if done[b] else elapsed
        stats = GenerationStats(
            prefill_seconds=float(prefill_seconds[b]),
            decode_tokens_per_second=steps[b] / seconds if seconds > 0 and steps[b] else 0.0,
            computation_cost=float(cost[b]),
            device_bytes=int(dev_bytes[b]),
            cpu_bytes=int(cpu_bytes[b]),
            prompt_tokens=prompt_lengths[b],
            new_tokens=len(out_ids[b]),
            decode_seconds=seconds,
        )
        results.append(GenerationResult(texts[b], out_ids[b], stats, reason[b]))
    return results
