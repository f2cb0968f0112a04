"""Token selection and the generation loop on top of a :class:`DecodeSession`."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Generator, Sequence

import torch

from magicpig.config import MAX_SEED, check_float, check_int
from magicpig.runtime.decode import DecodeSession

# Beyond this the softmax is uniform to float32 precision anyway; a bound keeps inf and 1e308 out.
MAX_TEMPERATURE = 1e4


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
    """temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off; seed None = nondeterministic."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        self.temperature = check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, MAX_SEED)


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


@dataclass
class _Row:
    """Generation state of one sequence of the batch."""

    prompt_tokens: int
    prefill_seconds: float
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    reason: str = "length"
    done: bool = False
    steps: int = 0
    stats: GenerationStats | None = None  # frozen when the row finishes

    def add_token(self, tok: int, tokenizer: Any, eos_ids: set[int], stop: Sequence[str]) -> None:
        self.out_ids.append(tok)
        if tok in eos_ids:
            self.done, self.reason = True, "eos"
        elif tokenizer is not None:
            text = tokenizer.decode(self.out_ids, skip_special_tokens=True)
            cut = min((text.find(s) for s in stop if s in text), default=-1)
            if cut >= 0:
                text, self.done, self.reason = text[:cut], True, "stop"
            self.text = text

    def new_text(self, final: bool, stop: Sequence[str]) -> str:
        """The text that became final since the last call (held back: a possible stop string)."""
        upto = len(self.text) if final else len(self.text) - _held_back(self.text, stop)
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece

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
    rows = [_Row(n, float(t)) for n, t in zip(session.lengths, prefill_seconds)]
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
