"""Scores of one prediction against its references: RULER's string matches and LongBench's metrics.

All functions return a float in [0, 1] (the summaries multiply by 100). The LongBench metrics
reproduce the official ``LongBench/metrics.py`` and the scorer of ``LongBench/eval.py``
(THUDM/LongBench, v1) value for value, quirks included, without the packages that code imports
for English and code:

- ROUGE-L has the semantics of the PyPI package ``rouge`` (pltrdy, 1.0.1) that metrics.py calls
  (``Rouge().get_scores([pred], [ref], avg=True)["rouge-l"]["f"]``): case kept, punctuation
  kept on the words, sentences split at every ".", summary-level union LCS over distinct words,
  and its F with a 1e-8 in the denominator; 0 when a side has no sentence;
- code similarity is fuzzywuzzy's ``fuzz.ratio`` as it runs without python-Levenshtein:
  difflib's ratio as a rounded integer percentage;
- classification keeps metrics.py's removal from the list it iterates over;
- the Chinese metrics segment words with jieba, as metrics.py does.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from difflib import SequenceMatcher
from functools import lru_cache
from typing import Any, Callable, Sequence


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER: fraction of the references found (case-insensitive) in the prediction."""
    if not references:
        raise ValueError("references: expected at least one reference string")
    pred = prediction.lower()
    return sum(r.lower() in pred for r in references) / len(references)


def string_match_part(prediction: str, references: Sequence[str]) -> float:
    """RULER QA: 1 if any reference is found (case-insensitive) in the prediction, else 0."""
    if not references:
        raise ValueError("references: expected at least one reference string")
    pred = prediction.lower()
    return float(any(r.lower() in pred for r in references))


# ----------------------------------------------------------------------------- LongBench

# metrics.py's normalize_zh_answer removes string.punctuation and exactly these characters (its
# list has 》 but not 《, and ASCII '.' again).
ZH_PUNCTUATION = ("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》「」『』"
                  "【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ZH_REMOVED = frozenset(string.punctuation + ZH_PUNCTUATION)
_EN_REMOVED = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower-case, drop ASCII punctuation and the articles a/an/the, collapse whitespace
    (metrics.py normalize_answer, from SQuAD)."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_REMOVED)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh(text: str) -> str:
    """Lower-case, drop ASCII and metrics.py's Chinese punctuation and all whitespace
    (metrics.py normalize_zh_answer)."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_REMOVED).split())


@lru_cache(maxsize=1)
def _jieba() -> Any:
    """jieba, imported on the first Chinese score; its dictionary-loading messages silenced."""
    import jieba

    jieba.setLogLevel(logging.WARNING)
    return jieba


def zh_words(text: str) -> list[str]:
    """jieba's words of ``text`` in its default (accurate, HMM) mode, as metrics.py cuts them."""
    return list(_jieba().cut(text, cut_all=False))


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised answers (metrics.py qa_f1_score)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """F1 of the jieba words, each normalised and the empty ones dropped (metrics.py
    qa_f1_zh_score)."""
    def words(text: str) -> list[str]:
        return [w for w in map(normalize_zh, zh_words(text)) if w]

    return _f1(words(prediction), words(reference))


def _rouge_sentences(text: str) -> list[list[str]]:
    """The ``rouge`` package's sentences of ``text`` as word lists (Rouge._get_avg_scores):
    split at every '.', pieces dropped only when empty *before* whitespace is collapsed (so a
    blank piece, e.g. after a final ". ", is a sentence of one empty word), words split at single
    spaces. No lower-casing and no punctuation removal: "Cat," and "cat" are different words."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _lcs_words(ref: list[str], hyp: list[str]) -> set[str]:
    """The distinct words of the one LCS of two sentences that ``rouge`` reconstructs
    (rouge_score._recon_lcs): the usual DP table, then a walk back from the end that takes a
    match, else steps up in ``ref`` only when that cell is strictly larger, else left in ``hyp``.
    Which LCS that is matters, as only its distinct words count."""
    table = [[0] * (len(hyp) + 1) for _ in range(len(ref) + 1)]
    for i, r in enumerate(ref, 1):
        above, row = table[i - 1], table[i]
        for j, h in enumerate(hyp, 1):
            row[j] = above[j - 1] + 1 if r == h else max(above[j], row[j - 1])
    words: set[str] = set()
    i, j = len(ref), len(hyp)
    while i > 0 and j > 0:
        if ref[i - 1] == hyp[j - 1]:
            words.add(ref[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return words


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F as metrics.py rouge_score gets it from the ``rouge`` package
    (rouge_score.rouge_l_summary_level with its default exclusive=True).

    The LCS "hits" are the distinct words in the union, over every (reference sentence,
    prediction sentence) pair, of the words of the LCS the package reconstructs; recall and
    precision divide them by the number of *distinct* words of the reference and of the
    prediction; F = 2PR / (P + R + 1e-8). An empty side is 0 (the package raises; metrics.py
    catches it). ``rouge-score`` (one LCS over all tokens, lower-cased, punctuation dropped) differs:
    "c. a b" against "a b c" is 1 - 5e-9 here (each sentence has its own LCS) and 2/3 there;
    "The cat" against "the cat" is 1/2 here and 1 there.
    """
    hyp, ref = _rouge_sentences(prediction), _rouge_sentences(reference)
    if not hyp or not ref:
        return 0.0
    hits: set[str] = set()
    for ref_sentence in ref:
        for hyp_sentence in hyp:
            hits |= _lcs_words(ref_sentence, hyp_sentence)
    recall = len(hits) / len({w for s in ref for w in s})
    precision = len(hits) / len({w for s in hyp for w in s})
    # The package's expression, term for term, so the floats are the same.
    return 2.0 * ((precision * recall) / (precision + recall + 1e-8))


def rouge_l_zh(prediction: str, reference: str) -> float:
    """ROUGE-L of the jieba words joined by spaces (metrics.py rouge_zh_score): Chinese
    punctuation stays as words and only an ASCII '.' ends a sentence."""
    return rouge_l(" ".join(zh_words(prediction)), " ".join(zh_words(reference)))


def classification(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench classification (metrics.py classification_score): 1/len(matches) if the
    reference is among the classes named in the prediction, else 0.

    The official code drops a matched class that is a proper substring of the reference by
    removing it from the list it is iterating over, so the class right after each removed one is
    never checked and stays. Reproduced: with classes ["Other", "location", "Other location"],
    reference "Other location" and a prediction naming all three, "Other" goes, "location" is
    skipped and stays, and the score is 1/2, not 1. (Its difflib fallback for no match is dead
    code: it tests ``list != 0``, always true.)
    """
    if not all_classes:
        raise ValueError("all_classes: expected the task's list of class names")
    matches = [c for c in all_classes if c in prediction]
    i = 0  # a list iterator's position: it moves on by one even when the list shrank under it
    while i < len(matches):
        term = matches[i]
        if term in reference and term != reference:
            matches.remove(term)  # the first equal item, as list.remove does there
        i += 1
    return 1.0 / len(matches) if reference in matches else 0.0


def _paragraph_match(prediction: str, reference: str, pattern: str, label: str) -> float:
    """Share of the numbers in the prediction equal to the paragraph number in the reference."""
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"reference={reference!r}: expected '{label}'")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """LongBench passage retrieval (metrics.py retrieval_score): share of the numbers in the
    prediction equal to the reference's "Paragraph N"."""
    return _paragraph_match(prediction, reference, r"Paragraph (\d+)", "Paragraph N")


def retrieval_zh(prediction: str, reference: str) -> float:
    """Chinese passage retrieval: as :func:`retrieval` with "段落N" (retrieval_zh_score)."""
    return _paragraph_match(prediction, reference, r"段落(\d+)", "段落N")


def count(prediction: str, reference: str) -> float:
    """LongBench passage count (metrics.py count_score): share of the numbers in the prediction
    equal to the reference, compared as strings (no stripping)."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference) for n in numbers) / len(numbers) if numbers else 0.0


def fuzz_ratio(a: str, b: str) -> int:
    """fuzzywuzzy's ``fuzz.ratio`` without python-Levenshtein, the install metrics.py asks for:
    100 for equal strings (two empty ones too), 0 if one is empty, else difflib's
    SequenceMatcher ratio (autojunk on, as fuzzywuzzy leaves it) as a percentage rounded to an
    integer with Python's round (half to even)."""
    if a == b:
        return 100
    if not a or not b:
        return 0
    return int(round(100 * SequenceMatcher(None, a, b).ratio()))


def code_sim(prediction: str, reference: str) -> float:
    """LongBench code edit similarity (metrics.py code_sim_score): fuzz_ratio / 100 of the first
    predicted line (leading newlines stripped) without ` / # / //, or "" if none, to the
    reference line."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz_ratio(line, reference) / 100


LONG_BENCH_METRICS: dict[str, Callable[..., float]] = {
    "qa_f1": qa_f1,
    "qa_f1_zh": qa_f1_zh,
    "rouge": rouge_l,
    "rouge_zh": rouge_l_zh,
    "classification": classification,
    "retrieval": retrieval,
    "retrieval_zh": retrieval_zh,
    "count": count,
    "code_sim": code_sim,
}


def longbench_score(metric: str, prediction: str, answers: Sequence[str],
                    all_classes: Sequence[str] | None = None, first_line: bool = False) -> float:
    """Best score of the prediction over the reference answers (eval.py scorer). ``first_line``:
    score only the first line of the prediction after its leading newlines, as eval.py does for
    trec, triviaqa, samsum and lsht (the tasks whose config says first_line)."""
    if metric not in LONG_BENCH_METRICS:
        raise ValueError(f"metric={metric!r}: expected one of {sorted(LONG_BENCH_METRICS)}")
    if not answers:
        raise ValueError("answers: expected at least one reference answer")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = LONG_BENCH_METRICS[metric]
    if metric == "classification":
        return max(fn(prediction, a, all_classes or []) for a in answers)
    return max(fn(prediction, a) for a in answers)


RULER_METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {
    "string_match_all": string_match_all,
    "string_match_part": string_match_part,
}
