"""How one request is decoded: its sampling parameters and stop strings (pure data, no torch;
the scheduler, the engine and the HTTP layer all read them)."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass
from typing import Sequence

from magicpig.config import MAX_SEED, check_float, check_int
from magicpig.core.stops import StopMatcher

# Beyond this the softmax is uniform to float32 precision anyway; a bound keeps inf and 1e308 out.
MAX_TEMPERATURE = 1e4

# Stop strings per request, and characters per stop string (the HTTP layer checks the same
# numbers). OpenAI takes 4 strings, vLLM any list; lm-eval-style harnesses send a handful of
# short ones (few-shot separators such as "\n\n" or "Question:"). 64 of up to 1024 characters
# is generous for them and bounds what one request costs before its first token: at most 64Ki
# automaton states, ~1.3 MiB and ~0.1 s of pure Python to build, once, on the thread that
# builds the SamplingParams. Per token the search does not depend on the number (about two
# steps a character); the length bounds how far one token's scan can fall back.
MAX_STOP_STRINGS = 64
MAX_STOP_CHARS = 1024


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 = greedy; top_k 0 = off; top_p 1.0 = off;
    seed None = nondeterministic; max_new_tokens: the most tokens generated; stop: strings
    that end the text (not included in it; a :class:`StopStrings` once built)."""

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


class StopStrings(tuple):
    """Checked stop strings (a tuple of str: see :func:`stop_list`) carrying their automaton,
    ``matcher``. It is built once, where the SamplingParams is built (the HTTP handler, not the
    engine thread), and survives ``dataclasses.replace``, which hands the same object back to
    ``stop_list``; callers keep passing ``params.stop`` to :class:`OutputText`."""

    matcher: StopMatcher

    def __new__(cls, stops: Sequence[str] = ()) -> "StopStrings":
        self = super().__new__(cls, stops)
        self.matcher = StopMatcher(self)
        return self


def stop_list(stop: str | Sequence[str] | None) -> StopStrings:
    """None, a string or a sequence of non-empty strings (at most ``MAX_STOP_STRINGS``, each of
    at most ``MAX_STOP_CHARS`` characters) -> the stop strings, with their automaton."""
    if isinstance(stop, StopStrings):
        return stop  # checked already
    if stop is None:
        stop = ()
    if isinstance(stop, str):
        stop = [stop]
    # The count first: a list of millions is refused before anything walks or prints it.
    if isinstance(stop, (list, tuple)) and len(stop) > MAX_STOP_STRINGS:
        raise ValueError(f"stop: at most {MAX_STOP_STRINGS} stop strings, got {len(stop)}")
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop={reprlib.repr(stop)}: expected None, a non-empty string or a list of them")
    longest = max(map(len, stop), default=0)
    if longest > MAX_STOP_CHARS:
        raise ValueError(f"stop: a stop string has at most {MAX_STOP_CHARS} characters, got {longest}")
    return StopStrings(stop)


