"""Metrics on hand-made cases whose values are worked out by hand."""

from __future__ import annotations

import pytest

from magicpig.eval import metrics as M


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
    assert M.qa_f1_zh("北京。", "北京") == 1.0
    assert M.qa_f1_zh("北京市", "北京") == pytest.approx(0.8)  # P=2/3, R=1


def test_rouge_l():
    # LCS("the cat sat", "the cat sat down") = 3: P=1, R=3/4, F=6/7.
    assert M.rouge_l("the cat sat", "the cat sat down") == pytest.approx(6 / 7)
    assert M.rouge_l("", "the cat") == 0.0
    assert M.rouge_l_zh("今天天气好", "今天天气很好") == pytest.approx(2 * 1 * (5 / 6) / (1 + 5 / 6))


def test_classification():
    classes = ["City", "Mountain", "Other location"]
    assert M.classification("Mountain", "Mountain", classes) == 1.0
    assert M.classification("City or Mountain", "Mountain", classes) == 0.5
    assert M.classification("City", "Mountain", classes) == 0.0
    # "location" would match inside "Other location" only as a substring of the reference.
    assert M.classification("Other location", "Other location", ["location", "Other location"]) == 1.0


def test_retrieval_count_code():
    assert M.retrieval("Paragraph 3", "Paragraph 3") == 1.0
    assert M.retrieval("Paragraph 3 or 4", "Paragraph 3") == 0.5
    assert M.retrieval("no idea", "Paragraph 3") == 0.0
    assert M.retrieval_zh("段落5", "段落5") == 1.0
    assert M.count("2", "2") == 1.0
    assert M.count("2 or 3", "2") == 0.5
    assert M.code_sim("    return a * b\nfoo", "    return a * b") == 1.0
    # comment lines are skipped; first real line compared
    assert M.code_sim("# compute\nreturn a*b", "return a*b") == 1.0
    assert 0 < M.code_sim("return a + b", "return a * b") < 1


def test_longbench_score_best_answer_and_first_line():
    assert M.longbench_score("qa_f1", "Paris", ["London", "Paris"]) == 1.0
    assert M.longbench_score("classification", "City\nMountain", ["Mountain"], ["City", "Mountain"],
                             first_line=True) == 0.0
    with pytest.raises(ValueError, match="metric"):
        M.longbench_score("bleu", "x", ["x"])
