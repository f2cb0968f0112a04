"""Metrics on hand-made cases whose values are worked out by hand.

The LongBench values are those of the official LongBench metrics.py and eval.py (THUDM/LongBench,
v1) with the packages it imports (``rouge`` 1.0.1, fuzzywuzzy without python-Levenshtein, jieba);
the comments carry the hand computation. Where the previous implementation (``rouge-score``,
``rapidfuzz``, characters for Chinese) gave another value, the comment says so: those asserts
fail on it.
"""

from __future__ import annotations

import difflib
import warnings

import pytest

from magicpig.eval import metrics as M

EPS = 1e-8  # the ``rouge`` package's F = 2PR / (P + R + 1e-8)


def rouge_f(p: float, r: float) -> float:
    return 2.0 * ((p * r) / (p + r + EPS))


def test_string_match_all_and_part():
    assert M.string_match_all("The numbers are 123 and 456.", ["123", "456"]) == 1.0
    assert M.string_match_all("The numbers are 123 and 789.", ["123", "456"]) == 0.5
    assert M.string_match_all("ABC-def", ["abc-DEF"]) == 1.0  # case-insensitive
    assert M.string_match_part("It is Paris.", ["London", "paris"]) == 1.0
    assert M.string_match_part("It is Rome.", ["London", "paris"]) == 0.0
    with pytest.raises(ValueError, match="references"):
        M.string_match_all("x", [])


def test_qa_f1():
    # pred tokens {paris, france}, ref {paris}: P=1/2, R=1, F1=2/3; articles/punctuation dropped.
    assert M.qa_f1("The Paris, France!", "paris") == pytest.approx(2 / 3)
    assert M.qa_f1("an apple", "Apple.") == 1.0
    assert M.qa_f1("nothing here", "Paris") == 0.0


def test_qa_f1_zh_uses_jieba_words():
    # The segmentation the values below rest on (jieba 0.42.1's dictionary).
    assert M.zh_words("价格是5元") == ["价格", "是", "5", "元"]
    assert M.zh_words("北京大学") == ["北京大学"]
    # ["北京", "。"] -> "。" normalises to "" and is dropped -> ["北京"] against ["北京"].
    assert M.qa_f1_zh("北京。", "北京") == 1.0
    # One word each, "北京大学" != "北京": 0 (per character it was P=2/4, R=1, 2/3).
    assert M.qa_f1_zh("北京大学", "北京") == 0.0
    # [价格, 是, 5, 元] vs [价格, 是, 5]: P=3/4, R=1, F1=6/7 (per character 8/9).
    assert M.qa_f1_zh("价格是5元", "价格是5") == pytest.approx(6 / 7)


def test_normalize_zh_is_the_official_character_list():
    # metrics.py removes ASCII punctuation ($ too, a Unicode symbol) and its own Chinese list,
    # which has 》 but not 《; a Unicode-category rule kept "$" and dropped "《".
    assert M.normalize_zh("《三体》，$5 A") == "《三体5a"


def test_rouge_l_summary_level_union_lcs():
    # "c. a b": sentences [c] and [a, b]; reference [a, b, c]. LCS per sentence pair: {c}, {a, b};
    # union 3 hits, 3 distinct words each side: P = R = 1, F = 2/(2 + 1e-8). rouge-score: one LCS
    # of "c a b" and "a b c" = 2 -> 2/3.
    assert M.rouge_l("c. a b", "a b c") == rouge_f(1, 1)
    # Distinct words: n = m = |{the}| = 1, 1 hit -> F = 2/(2 + 1e-8); rouge-score P=1/3, R=1 -> 1/2.
    assert M.rouge_l("the the the", "the") == rouge_f(1, 1)
    # The LCS the package reconstructs: [b, a] vs reference [a, b] walks back from (2, 2), the two
    # neighbours tie at 1 so it steps left in the prediction and takes "b"; [a] then adds "a":
    # 2 hits of 2 words, F = 2/(2 + 1e-8). Taking "a" from the first pair would give 1 hit, 1/2.
    assert M.rouge_l("b a. a", "a b") == rouge_f(1, 1)


def test_rouge_l_case_punctuation_and_sentences():
    # Case kept: "The" != "the"; 1 hit of 2 words each side: P = R = 1/2 (rouge-score: 1).
    assert M.rouge_l("The cat", "the cat") == rouge_f(0.5, 0.5)
    # Punctuation stays on the word: "cat," != "cat" (rouge-score: 1).
    assert M.rouge_l("cat, dog", "cat dog") == rouge_f(0.5, 0.5)
    # A final "." leaves an empty piece, dropped: [a, b] against [a, b] -> F = 2/(2 + 1e-8)...
    assert M.rouge_l("a b.", "a b") == rouge_f(1, 1)
    # ...but ". " leaves a blank piece, a sentence of one empty word: n = |{a, b, ""}| = 3,
    # hits {a, b}: P = 2/3, R = 1.
    assert M.rouge_l("a b. ", "a b") == rouge_f(2 / 3, 1)
    # Newlines do not end sentences; whitespace collapses inside one.
    assert M.rouge_l("a\n\n b", "a b") == rouge_f(1, 1)
    # No sentence on a side: the package raises and metrics.py scores 0.
    assert M.rouge_l("", "the cat") == 0.0
    assert M.rouge_l("...", "the cat") == 0.0
    assert M.rouge_l("the cat", "") == 0.0


def test_rouge_l_zh_jieba_words():
    # [今天天气, 很, 好] vs [今天天气, 不错], one sentence each: 1 hit, P = 1/3, R = 1/2
    # (per character it was P = 4/6, R = 4/6: 2/3).
    assert M.zh_words("今天天气不错") == ["今天天气", "不错"]
    assert M.rouge_l_zh("今天天气很好", "今天天气不错") == rouge_f(1 / 3, 1 / 2)


ROUGE_PAIRS = [
    ("c. a b", "a b c"), ("The cat", "the cat"), ("a b. ", "a b"), ("b a. a", "a b"),
    ("The cat sat on the mat. It was happy, very happy.", "A cat sat on a mat. The cat was happy."),
    ("x y z. z y x. y", "x. y. z"), ("one two three four", "four three two one"),
    ("Mr. Smith paid $3.50 for 2.5 kg.", "Mr Smith paid 3.50 dollars."),
]


def test_rouge_l_equals_the_rouge_package():
    rouge = pytest.importorskip("rouge")
    for hyp, ref in ROUGE_PAIRS + [("", "a"), ("a", "...")]:
        try:
            official = rouge.Rouge().get_scores([hyp], [ref], avg=True)["rouge-l"]["f"]
        except ValueError:  # empty side; metrics.py's rouge_score returns 0.0
            official = 0.0
        assert M.rouge_l(hyp, ref) == official, (hyp, ref)


def test_classification_reproduces_the_removal_while_iterating():
    classes = ["City", "Mountain", "Other location"]
    assert M.classification("Mountain", "Mountain", classes) == 1.0
    assert M.classification("City or Mountain", "Mountain", classes) == 0.5
    assert M.classification("City", "Mountain", classes) == 0.0
    # One proper substring of the reference matched: removed, [Other location] -> 1.
    assert M.classification("Other location", "Other location", ["location", "Other location"]) == 1.0
    # Matches [Other, location, Other location]: "Other" is removed at position 0, "location"
    # slides into it and the iteration goes on at position 1 ("Other location"): "location" is
    # never checked and stays. [location, Other location] -> 1/2 (removing both would give 1).
    assert M.classification("Other location", "Other location",
                            ["Other", "location", "Other location"]) == 0.5
    # Order matters: [Other location, Other, location]: "Other" removed at 1, the list has 2 items,
    # the loop ends with "location" unchecked: 1/2 again.
    assert M.classification("Other location", "Other location",
                            ["Other location", "Other", "location"]) == 0.5
    # No class named: 0. metrics.py's difflib fallback (which would pick "City" for "Citi") is dead
    # code, guarded by ``list != 0``.
    assert M.classification("Citi", "City", classes) == 0.0


def test_retrieval_and_count():
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or 4", "Paragraph 3") == 0.5
    assert M.retrieval("no idea", "Paragraph 3") == 0.0
    assert M.retrieval_zh("段落5", "段落5") == 1.0
    assert M.count("2", "2") == 1.0
    assert M.count("2 or 3", "2") == 0.5
    assert M.count("2", " 2") == 0.0  # compared as strings, as metrics.py does (no strip)


def test_code_sim_is_fuzzywuzzy_with_difflib():
    # difflib: "return a " (9) + " b" (2) match, 2*11/24 = 91.67 -> 92 (rapidfuzz: 0.9167).
    assert M.code_sim("return a + b", "return a * b") == 0.92
    # difflib takes the longest block first, the earliest on ties: a's first "b" with b's last
    # "b", which leaves nothing to match on either side: 2*1/6 = 33 (the LCS "=b" gives 67).
    assert M.code_sim("b=b", "=xb") == 0.33
    # 2*5/16 = 62.5, rounded half to even: 62.
    assert M.code_sim("abcdefgh", "abcdeZZZ") == 0.62
    # First line after leading newlines without ` / # / //; equal strings 100, even empty ones.
    assert M.code_sim("\n\n```python\n# c\n    return x\n", "    return x") == 1.0
    assert M.code_sim("# only a comment", "x = 1") == 0.0
    assert M.fuzz_ratio("", "") == 100 and M.fuzz_ratio("", "x") == 0


def test_fuzz_ratio_equals_fuzzywuzzy():
    fuzzywuzzy = pytest.importorskip("fuzzywuzzy")
    with warnings.catch_warnings():  # "Using slow pure-python SequenceMatcher": the case we want
        warnings.simplefilter("ignore")
        from fuzzywuzzy import fuzz
    if fuzz.SequenceMatcher is not difflib.SequenceMatcher:
        pytest.skip(f"fuzzywuzzy {fuzzywuzzy.__version__} runs on python-Levenshtein here")
    pairs = [("return a + b", "return a * b"), ("b=b", "=xb"), ("abcdefgh", "abcdeZZZ"), ("", ""),
             ("x", ""), ("    self.assertEqual(a, b)", "        self.assertTrue(a == b)"),
             ("for (int i = 0; i < n; ++i) {" * 8, "for (i = 0; i < n; i++) {" * 9)]  # > 200: autojunk
    for a, b in pairs:
        assert M.fuzz_ratio(a, b) == fuzz.ratio(a, b), (a, b)


def test_longbench_score_best_answer_and_first_line():
    assert M.longbench_score("qa_f1", "Paris", ["London", "Paris"]) == 1.0
    assert M.longbench_score("classification", "City\nMountain", ["Mountain"], ["City", "Mountain"],
                             first_line=True) == 0.0
    # first_line: "\n\nthe cat sat" -> "the cat sat": F = 2/(2 + 1e-8). Without it the newlines
    # are spaces in one sentence of 5 distinct words: P = 3/5, R = 1.
    pred = "\n\nthe cat sat\nDialogue: more"
    assert M.longbench_score("rouge", pred, ["the cat sat"], first_line=True) == rouge_f(1, 1)
    assert M.longbench_score("rouge", pred, ["the cat sat"]) == rouge_f(3 / 5, 1)
    with pytest.raises(ValueError, match="metric"):
        M.longbench_score("bleu", "x", ["x"])
