"""Aho-Corasick automaton over a request's stop strings: where the first stop string starts in
a generated text, and how many trailing characters might still grow into one, at a cost per
character read that does not depend on how many stop strings there are (searching for each
stop string on every token cost seconds per token with thousands of them)."""

from __future__ import annotations

from array import array
from typing import NamedTuple, Sequence

_CHAR_BITS = 21  # ord(ch) < 0x110000 <= 2**21: a (state, char) edge packs into one int key


class Scan(NamedTuple):
    """What :meth:`StopMatcher.search` found. ``cut``: the earliest start of a stop string that
    ends in the part read (-1: none). ``mark_state`` / ``end_state`` / ``prev_state``: the
    states after text[:mark] / the whole text / all but its last character (the start state
    if nothing was read). The states are meaningless once ``cut >= 0``: reading may end early."""

    cut: int
    mark_state: int
    end_state: int
    prev_state: int


class StopMatcher:
    """The automaton. State s stands for the longest suffix of the text read so far that is a
    prefix of some stop string; ``depth(s)`` is its length, which is the hold-back of streaming
    (that many trailing characters might still become a stop string). ``_out[s]`` is the length
    of the longest stop string ending there (0: none), so the earliest-starting match among
    those ending at a character is known in O(1). Reading a character follows failure links
    (to the state of the longest proper suffix), each of which shortens the state's string
    while a character lengthens it by at most one: a scan takes at most two steps per character
    plus the depth it starts at, whatever the number of stop strings. ``steps`` counts them
    (for tests of the cost)."""

    def __init__(self, stops: Sequence[str]) -> None:
        if not all(stops):
            raise ValueError("stop strings must be non-empty")  # "" would match everywhere
        self.stops = tuple(stops)
        self.max_len = max(map(len, self.stops), default=0)
        self.steps = 0
        # Trie edges: a state's first child in two arrays (most states have one child: the
        # unshared tails of long stop strings), further children in one dict keyed by
        # (state, char) packed into an int. ~20 bytes a state instead of ~100 with a dict per
        # edge: 1.3 MiB, not 7, for 64 stop strings of 1024 characters.
        self._first_char, self._first_child = array("i", [-1]), array("i", [0])
        self._more: dict[int, int] = {}
        self._depth, self._out, self._fail = array("i", [0]), array("i", [0]), array("i", [0])
        # Breadth first: character d of every stop string, then d + 1. A new state's failure
        # link is shallower than it, so it exists and is linked already.
        states = [0] * len(self.stops)  # the state of each stop string's first d characters
        for d in range(self.max_len):
            for k, s in enumerate(self.stops):
                if d < len(s):
                    states[k] = self._child(states[k], s[d])
                    if d + 1 == len(s):
                        self._out[states[k]] = len(s)  # the longest stop string ending here
        self.steps = 0

    def _edge(self, state: int, code: int) -> int | None:
        """The trie child of ``state`` by the character ``chr(code)``, if any."""
        if self._first_char[state] == code:
            return self._first_child[state]
        return self._more.get(state << _CHAR_BITS | code)

    def _child(self, parent: int, ch: str) -> int:
        """The trie state after ``parent`` by ``ch``, made (with its failure link) if new."""
        code = ord(ch)
        child = self._edge(parent, code)
        if child is None:
            link = self._next(self._fail[parent], ch) if parent else 0
            child = len(self._depth)
            if self._first_char[parent] < 0:
                self._first_char[parent], self._first_child[parent] = code, child
            else:
                self._more[parent << _CHAR_BITS | code] = child
            self._first_char.append(-1)
            self._first_child.append(0)
            self._depth.append(self._depth[parent] + 1)
            self._fail.append(link)
            self._out.append(self._out[link])  # stop strings ending at its suffixes
        return child

    def _next(self, state: int, ch: str) -> int:
        """The state after reading ``ch`` in ``state``."""
        code = ord(ch)
        while True:
            self.steps += 1
            child = self._edge(state, code)
            if child is not None:
                return child
            if state == 0:
                return 0
            state = self._fail[state]

    def depth(self, state: int) -> int:
        """How many trailing characters of the text read might still become a stop string."""
        return self._depth[state]

    def search(self, text: str, begin: int = 0, state: int = 0, mark: int | None = None) -> Scan:
        """Read text[begin:] from ``state`` (the state after text[:begin]). The cut is the
        earliest start of a stop string ending after index ``begin - 1``: had text[:begin] held
        one, the caller would have stopped there, so this is the first one in the whole text.
        ``mark`` (begin..len(text), default begin) is where the state is also recorded."""
        mark = begin if mark is None else mark
        cut, mark_state, prev = -1, state, state
        for i in range(begin, len(text)):
            if i == mark:
                mark_state = state
            prev, state = state, self._next(state, text[i])
            if self._out[state] and (cut < 0 or i + 1 - self._out[state] < cut):
                cut = i + 1 - self._out[state]
            if 0 <= cut <= i + 2 - self.max_len:
                break  # a stop string ending later starts at i + 2 - max_len or after
        if mark >= len(text):
            mark_state = state
        return Scan(cut, mark_state, state, prev)

    def state_after(self, text: str, end: int | None = None) -> int:
        """The state after reading text[:end] from the start. Its string is a suffix of at
        most ``max_len`` characters, so reading only those from the root gives the same state:
        O(max_len) for any text length."""
        end = len(text) if end is None else end
        state = 0
        for i in range(max(0, end - self.max_len), end):
            state = self._next(state, text[i])
        return state
