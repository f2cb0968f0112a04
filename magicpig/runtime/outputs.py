"""What a generation returns and how it is asked for: pure data, no torch (the scheduler and
the HTTP layer use these too)."""

from __future__ import annotations

import reprlib
from dataclasses import dataclass, field
from typing import Any, Sequence

from magicpig.config import MAX_SEED, check_float, check_int
from magicpig.runtime.stops import StopMatcher

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


@dataclass
class OutputText:
    """The generated ids and text of one sequence, with its finish: ``add_token`` detokenises
    and cuts at a stop string, ``new_text`` hands out what became final (for streaming).

    Detokenising is incremental, so a token costs the same at any output length: each token
    decodes a short window (the ids since the last stable point, with the one before it as
    context) instead of the whole output. ``text`` always equals the decode of all ids
    (``skip_special_tokens``), cut at the first stop string; its first ``_stable`` characters
    can no longer change (a trailing broken UTF-8 character, "\ufffd", can).

    Stop strings are found by their automaton (:mod:`magicpig.runtime.stops`), kept at the
    stable point: a token reads only the characters after it, so its cost does not depend on
    the number of stop strings. ``stop`` is the same stop strings on every call (the
    ``StopStrings`` of the SamplingParams, whose automaton was built with them; a plain
    sequence gets one built here on first use)."""

    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    reason: str = "length"
    done: bool = False
    _prefix: int = 0  # ids[_prefix:_read] decode to the context before the unstable tail
    _read: int = 0
    _stable: int = 0
    _state: int = 0  # the stop automaton's state after text[:_stable]
    _hold: int = 0  # how many trailing characters of text might still become a stop string
    _matcher: StopMatcher | None = field(default=None, repr=False, compare=False)

    def add_token(self, tok: int, tokenizer: Any, eos_ids: set[int], stop: Sequence[str]) -> None:
        self.out_ids.append(tok)
        if tok in eos_ids:
            self.done, self.reason = True, "eos"
        elif tokenizer is not None:
            searched = self._stable
            self._detokenize(tokenizer)
            if stop:
                self._cut_at_stop(self._matcher_for(stop), searched)

    def _matcher_for(self, stop: Sequence[str]) -> StopMatcher:
        """The automaton of ``stop``: the one a StopStrings carries, else one built for this
        sequence on first use and kept (rebuilt only if the stop strings change)."""
        if isinstance(stop, StopStrings):
            return stop.matcher
        if self._matcher is None or self._matcher.stops != tuple(stop):
            self._matcher = StopMatcher(stop)
        return self._matcher

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

    def _cut_at_stop(self, matcher: StopMatcher, searched: int) -> None:
        """Cut ``text`` at the first stop string. The first ``searched`` characters held none
        (else generation would have stopped) and have not changed, so the automaton resumes
        from its state there and reads only the rest; it also records its state at the new
        stable point and the hold-back for ``new_text``."""
        scan = matcher.search(self.text, searched, self._state, self._stable)
        if scan.cut < 0:
            self._state = scan.mark_state
            self._hold = self._hold_back(matcher, scan.prev_state, scan.end_state)
            return
        self.text, self.done, self.reason = self.text[: scan.cut], True, "stop"
        self._stable = min(self._stable, scan.cut)
        # The cut may lie before the checkpoint, off the scan's path: re-read the states from
        # the last max_len characters (once per sequence).
        self._state = matcher.state_after(self.text, self._stable)
        end = len(self.text)
        self._hold = self._hold_back(matcher, matcher.state_after(self.text, end - 1),
                                     matcher.state_after(self.text, end))

    def _hold_back(self, matcher: StopMatcher, prev_state: int, end_state: int) -> int:
        """How many trailing characters of ``text`` might still become part of a stop string,
        from the automaton's states before and after its last character. A trailing broken
        character ("\ufffd") becomes another one, which may complete a stop string that starts
        before it: hold it back with the stop prefix before it (holding only the broken
        character let a stop string's start be streamed and then cut)."""
        if self.text.endswith("\ufffd"):
            return 1 + matcher.depth(prev_state)
        return matcher.depth(end_state)

    def new_text(self, final: bool, stop: Sequence[str]) -> str:
        """The text that became final since the last call (held back: a possible stop string,
        as found by the last ``add_token``, or a trailing broken character)."""
        hold = self._hold if stop else (1 if self.text.endswith("\ufffd") else 0)
        upto = len(self.text) if final else len(self.text) - hold
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece
