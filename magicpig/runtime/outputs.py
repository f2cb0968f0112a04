"""What a generation returns and how it is asked for: pure data, no torch (the scheduler and
the HTTP layer use these too)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from magicpig.config import MAX_SEED, check_float, check_int

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
    """How one request is decoded. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off;
    seed None = nondeterministic; max_new_tokens: the most tokens generated; stop: strings
    that end the text (not included in it)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    max_new_tokens: int = 128
    stop: str | Sequence[str] | None = None

    def __post_init__(self) -> None:
        self.max_new_tokens = check_int("max_new_tokens", self.max_new_tokens, 1)
        self.stop = stop_list(self.stop)
        self.temperature = check_float("temperature", self.temperature, 0.0, MAX_TEMPERATURE)
        self.top_p = check_float("top_p", self.top_p, 0.0, 1.0, low_open=True)
        self.top_k = check_int("top_k", self.top_k, 0)
        if self.seed is not None:
            self.seed = check_int("seed", self.seed, 0, MAX_SEED)


def stop_list(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """None, a string or a sequence of non-empty strings -> a tuple of stop strings."""
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop={stop!r}: expected None, a non-empty string or a list of them")
    return tuple(stop)


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
class OutputText:
    """The generated ids and text of one sequence, with its finish: ``add_token`` detokenises
    and cuts at a stop string, ``new_text`` hands out what became final (for streaming)."""

    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    reason: str = "length"
    done: bool = False

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
