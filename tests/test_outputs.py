"""Streaming detokenisation (OutputText): incremental, and equal to decoding every id at once."""

from __future__ import annotations

import functools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from magicpig.model.loading import embedded_model_dir, load_tokenizer
from magicpig.runtime.outputs import OutputText


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
    if full and draw(st.booleans()):  # a stop string that occurs (a piece of the full text)
        a = draw(st.integers(0, len(full) - 1))
        stops.append(full[a : a + draw(st.integers(1, 6))])
    if draw(st.booleans()):
        stops.append(draw(st.sampled_from(["\n\n", "zzqx", "\ufffd", " the"])))
    return ids, stops


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


if __name__ == "__main__":
    pytest.main([__file__])
