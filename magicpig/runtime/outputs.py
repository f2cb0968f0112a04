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
    and cuts at a stop string, ``new_text`` hands out what became final (for streaming).

    Detokenising is incremental, so a token costs the same at any output length: each token
    decodes a short window (the ids since the last stable point, with the one before it as
    context) instead of the whole output. ``text`` always equals the decode of all ids
    (``skip_special_tokens``), cut at the first stop string; its first ``_stable`` characters
    can no longer change (a trailing broken UTF-8 character, "\ufffd", can)."""

    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    reason: str = "length"
    done: bool = False
    _prefix: int = 0  # ids[_prefix:_read] decode to the context before the unstable tail
    _read: int = 0
    _stable: int = 0

    def add_token(self, tok: int, tokenizer: Any, eos_ids: set[int], stop: Sequence[str]) -> None:
        self.out_ids.append(tok)
        if tok in eos_ids:
            self.done, self.reason = True, "eos"
        elif tokenizer is not None:
            searched = self._stable
            self._detokenize(tokenizer)
            self._cut_at_stop(stop, searched)

    def _detokenize(self, tokenizer: Any) -> None:
        """Extend ``text`` by the new token: decode the window from ``_prefix`` and keep what
        goes beyond the context's own decode (as vLLM and HF's streamers do)."""
        ids = self.out_ids
        context = tokenizer.decode(ids[self._prefix : self._read], skip_special_tokens=True)
        window = tokenizer.decode(ids[self._prefix :], skip_special_tokens=True)
        self.text = self.text[: self._stable] + window[len(context) :]
        if len(window) > len(context) and not window.endswith("\ufffd"):
            self._stable = len(self.text)
            self._prefix, self._read = self._read, len(ids)

    def _cut_at_stop(self, stop: Sequence[str], searched: int) -> None:
        """Cut ``text`` at the first stop string. The first ``searched`` characters held none
        (else generation would have stopped), so only an occurrence ending after them is new."""
        if not stop:
            return
        start = max(0, searched - max(map(len, stop)) + 1)
        cut = min((i for i in (self.text.find(s, start) for s in stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done, self.reason = self.text[:cut], True, "stop"
            self._stable = min(self._stable, cut)

    def new_text(self, final: bool, stop: Sequence[str]) -> str:
        """The text that became final since the last call (held back: a possible stop string)."""
        upto = len(self.text) if final else len(self.text) - _held_back(self.text, stop)
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece
