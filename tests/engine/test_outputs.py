"""Streaming detokenisation (OutputText): incremental, and equal to decoding every id at once."""

from __future__ import annotations

import dataclasses
import functools
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magicpig.model.loading import embedded_model_dir, load_tokenizer
from magicpig.core.sampling_params import MAX_STOP_CHARS, MAX_STOP_STRINGS, SamplingParams, stop_list
from magicpig.core.stops import StopMatcher
from magicpig.engine.outputs import OutputText


@functools.lru_cache(maxsize=1)
def _tokenizer():
    return load_tokenizer(embedded_model_dir())


@functools.lru_cache(maxsize=1)
def _id_pools() -> tuple[list[int], list[int], list[int]]:
    """(ordinary ids, ids that decode alone to a broken UTF-8 character, special ids)."""
    tok = _tokenizer()
    broken = [i for i in range(tok.vocab_size) if "\ufffd" in tok.decode([i])]
    special = sorted(set(tok.all_special_ids))
    ordinary = [i for i in range(200, 20000, 37) if i not in special and i not in set(broken)]
    return ordinary, broken[:400], special


def _expected(ids: list[int], stop: list[str]) -> tuple[str, bool]:
    """The whole decode of ids, cut at the first stop string; and whether one was found."""
    text = _tokenizer().decode(ids, skip_special_tokens=True)
    cut = min((i for i in (text.find(s) for s in stop) if i >= 0), default=-1)
    return (text[:cut], True) if cut >= 0 else (text, False)


@st.composite
def _outputs(draw):
    ordinary, broken, special = _id_pools()
    pool = st.one_of(st.sampled_from(ordinary), st.sampled_from(broken), st.sampled_from(special))
    ids = draw(st.lists(pool, min_size=1, max_size=60))
    full = _tokenizer().decode(ids, skip_special_tokens=True)
    stops = []
    for _ in range(draw(st.integers(0, 3)) if full else 0):  # stop strings that occur (pieces
        a = draw(st.integers(0, len(full) - 1))              # of the full text, overlapping)
        stops.append(full[a : a + draw(st.integers(1, 6))])
    if stops and draw(st.booleans()):  # one that is a prefix or suffix of another
        stops.append(draw(st.sampled_from([stops[0][:-1], stops[0][1:]])) or "x")
    if draw(st.booleans()):
        stops.append(draw(st.sampled_from(["\n\n", "zzqx", "\ufffd", " the"])))
    # As the engine passes them (checked, with their automaton) or as a plain list.
    return ids, stop_list(stops) if draw(st.booleans()) else stops


@settings(max_examples=150, deadline=None)
@given(_outputs())
def test_incremental_text_equals_the_whole_decode_at_every_step(case):
    """After every token, text == decode(all ids so far) cut at the first stop string, and the
    streamed pieces are always a prefix of it (nothing streamed is taken back)."""
    ids, stop = case
    out, streamed = OutputText(), ""
    for i, tok in enumerate(ids):
        out.add_token(tok, _tokenizer(), set(), stop)
        want, stopped = _expected(ids[: i + 1], stop)
        assert out.text == want and out.done == stopped
        streamed += out.new_text(final=out.done, stop=stop)
        assert want.startswith(streamed)
        if out.done:
            assert out.reason == "stop"
            break
    streamed += out.new_text(final=True, stop=stop)
    assert streamed == out.text


def test_each_token_decodes_a_short_window():
    """The cost of a token does not grow with the output: over 3,000 tokens no decode call sees
    more than a few ids (the old code decoded all of them every time: O(n^2))."""
    ordinary, broken, _ = _id_pools()
    tok = _tokenizer()
    seen: list[int] = []

    class Counting:
        def decode(self, ids, **kwargs):
            seen.append(len(ids))
            return tok.decode(ids, **kwargs)

    ids = [ordinary[(7 * i) % len(ordinary)] if i % 50 else broken[i % len(broken)] for i in range(3000)]
    out = OutputText()
    for t in ids:
        out.add_token(t, Counting(), set(), ["zzqx"])
    assert out.text == tok.decode(ids, skip_special_tokens=True)
    assert max(seen) <= 8, max(seen)


def test_a_stop_string_finished_by_a_broken_character_is_not_streamed_first():
    """"\x0c" then a broken character that becomes "¡": with the stop string "\x0c¡", the
    "\x0c" before the broken character must be held back too (holding only the broken one
    streamed "\x0c" and then cut the text to "": found by the property test above)."""
    tok, stop = _tokenizer(), ["\x0c¡"]
    assert tok.decode([200, 141]) == "\x0c\ufffd" and tok.decode([200, 141, 111]) == "\x0c¡"
    out, streamed = OutputText(), ""
    for t in (200, 141, 111):
        out.add_token(t, tok, set(), stop)
        streamed += out.new_text(out.done, stop)
    assert out.done and out.reason == "stop" and out.text == streamed == ""


def test_eos_ends_without_text_and_no_tokenizer_keeps_ids():
    tok = _tokenizer()
    out = OutputText()
    out.add_token(_id_pools()[0][0], tok, {2}, [])
    out.add_token(2, tok, {2}, [])
    assert out.done and out.reason == "eos" and out.text == tok.decode([_id_pools()[0][0]])
    bare = OutputText()
    for t in (5, 6, 7):
        bare.add_token(t, None, set(), ["x"])
    assert bare.out_ids == [5, 6, 7] and bare.text == "" and not bare.done


def _naive_cut(text: str, stops: list[str]) -> int:
    """The reference: where the first stop string starts (-1: none), by searching for each."""
    return min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)


def _naive_held_back(text: str, stops: list[str]) -> int:
    """The reference hold-back (outputs.py's own before the automaton): for each stop string,
    the longest proper prefix the text ends with; 1 for a trailing broken character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:k]):
                hold = max(hold, k)
                break
    return hold


def _matcher_hold(m: StopMatcher, state: int, text: str) -> int:
    return max(m.depth(state), 1 if text.endswith("\ufffd") else 0)


_ALPHABET = "aab\ufffdé漢"  # few letters, so stop strings overlap and repeat ("aaa" vs "aa")


@st.composite
def _texts_and_stops(draw):
    text = draw(st.text(_ALPHABET, max_size=40))
    stops = draw(st.lists(st.text(_ALPHABET, min_size=1, max_size=6), max_size=6))
    for _ in range(draw(st.integers(0, 3)) if text else 0):  # pieces that occur in the text
        a = draw(st.integers(0, len(text) - 1))
        stops.append(text[a : a + draw(st.integers(1, 8))])
    if stops and draw(st.booleans()):  # a prefix or suffix of another stop string
        s = draw(st.sampled_from(stops))
        stops.append(draw(st.sampled_from([s[:-1], s[1:]])) or s)
    if not stops:
        stops.append(draw(st.sampled_from(["aaa", "aa", "\ufffd", "漢é"])))
    return text, stops


@settings(max_examples=400, deadline=None)
@given(_texts_and_stops())
def test_automaton_agrees_with_searching_for_each_stop_string(case):
    """The earliest match start equals the naive ``min(text.find(s))``, and the hold-back of
    the text up to it equals the naive one: read at once, from the last ``max_len``
    characters, or resumed from recorded states at arbitrary checkpoints."""
    text, stops = case
    m = StopMatcher(stops)
    cut = _naive_cut(text, stops)
    kept = text[:cut] if cut >= 0 else text
    scan = m.search(text)
    assert scan.cut == cut
    assert _matcher_hold(m, m.state_after(kept), kept) == _naive_held_back(kept, stops)
    if cut < 0:
        assert _matcher_hold(m, scan.end_state, text) == _naive_held_back(text, stops)
    # Resumed, as OutputText does: prefixes of growing length, each read from the checkpoint.
    rng = random.Random(len(text) * 31 + len(stops))
    begin, state = 0, 0
    for end in sorted({rng.randint(0, len(text)) for _ in range(4)} | {len(text)}):
        mark = rng.randint(begin, end)
        scan = m.search(text[:end], begin, state, mark)
        assert scan.cut == _naive_cut(text[:end], stops)
        if scan.cut >= 0:
            break
        assert _matcher_hold(m, scan.end_state, text[:end]) == _naive_held_back(text[:end], stops)
        assert scan.mark_state == m.state_after(text, mark)
        begin, state = mark, scan.mark_state


def _steps_per_token(stops: list[str], ids: list[int]) -> tuple[int, int, int]:
    """(automaton steps, characters, the most steps of one token) over ``ids``."""
    tok, params = _tokenizer(), SamplingParams(stop=stops)
    out, most = OutputText(), 0
    for t in ids:
        before = params.stop.matcher.steps
        out.add_token(t, tok, set(), params.stop)
        out.new_text(False, params.stop)
        most = max(most, params.stop.matcher.steps - before)
    assert not out.done
    return params.stop.matcher.steps, len(out.text), most


def test_stop_search_per_token_does_not_depend_on_the_number_of_stops():
    """Counted, not timed: with 64 stop strings of 1024 characters that follow the output for
    1023 of them (deep states, the automaton's worst case), 2,000 tokens take about as many
    steps as with one short stop string: at most two per character over the output. The
    search for each stop string read 64 x 1024 characters per token (and the hold-back
    sliced as many prefixes)."""
    ordinary = _id_pools()[0]
    ids = [ordinary[(7 * i) % len(ordinary)] for i in range(2000)]
    text = _tokenizer().decode(ids, skip_special_tokens=True)
    rng = random.Random(0)
    starts = [rng.randrange(len(text) - MAX_STOP_CHARS) for _ in range(MAX_STOP_STRINGS)]
    many = [text[a : a + MAX_STOP_CHARS - 1] + "\x00" for a in starts]
    one_steps, chars, one_most = _steps_per_token(["zzqx"], ids)
    many_steps, chars_many, many_most = _steps_per_token(many, ids)
    assert chars == chars_many == len(text)
    assert one_steps <= 2 * chars and many_steps <= 2 * chars + MAX_STOP_CHARS
    assert many_steps <= 2 * one_steps, (one_steps, many_steps)
    # One token may fall back a long way (amortised above), never more than the longest stop.
    assert many_most <= 2 * MAX_STOP_CHARS


def test_stop_limits():
    """At most MAX_STOP_STRINGS stop strings of at most MAX_STOP_CHARS characters: beyond,
    a ValueError naming ``stop`` (short, even for a huge list); at the limits, accepted."""
    assert (MAX_STOP_STRINGS, MAX_STOP_CHARS) == (64, 1024)
    for stop in (["x"] * 65, ["a" * 1025], ["ok", "b" * 1025], ["y"] * 100_000):
        for make in (stop_list, lambda s: SamplingParams(stop=s)):
            with pytest.raises(ValueError, match="^stop") as err:
                make(stop)
            assert len(str(err.value)) < 200
    with pytest.raises(ValueError, match="at most 64 stop strings, got 65"):
        SamplingParams(stop=["x"] * 65)
    with pytest.raises(ValueError, match="stop="):
        stop_list(["fine", 5])
    assert len(stop_list([str(i) for i in range(64)])) == 64
    assert SamplingParams(stop=["a" * 1024]).stop == ("a" * 1024,)
    assert stop_list(None) == () and stop_list("x") == ("x",)


def test_automaton_is_built_once_per_request():
    """Built with the SamplingParams (the HTTP handler's thread); dataclasses.replace (the
    engine thread sets max_new_tokens) keeps it instead of building another."""
    params = SamplingParams(stop=["\n\n", "Question:"])
    again = dataclasses.replace(params, max_new_tokens=7)
    assert again.stop.matcher is params.stop.matcher and again.stop == ("\n\n", "Question:")


if __name__ == "__main__":
    pytest.main([__file__])
