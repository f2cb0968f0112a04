"""What a generation returns, detokenising and stop strings: each request's output text
(incremental detokenising, cut at a stop string, streamed as it becomes final) and its stats.
Pure Python; the engine keeps one :class:`OutputText` per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

from magicpig.core.sampling_params import StopStrings
from magicpig.core.stops import StopMatcher

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
class OutputText:
    """The generated ids and text of one sequence, with its finish: ``add_token`` detokenises
    and cuts at a stop string, ``new_text`` hands out what became final (for streaming).

    Detokenising is incremental, so a token costs the same at any output length: each token
    decodes a short window (the ids since the last stable point, with the one before it as
    context) instead of the whole output. ``text`` always equals the decode of all ids
    (``skip_special_tokens``), cut at the first stop string; its first ``_stable`` characters
    can no longer change (a trailing broken UTF-8 character, "\ufffd", can).

    Stop strings are found by their automaton (:mod:`magicpig.core.stops`), kept at the
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
