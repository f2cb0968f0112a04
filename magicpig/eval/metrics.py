"""Scores of one prediction against its references: RULER's string matches and LongBench's metrics.

All functions return a float in [0, 1] (the summaries multiply by 100). LongBench's metrics
follow the benchmark's published definitions; ROUGE-L comes from ``rouge-score`` (Google's
implementation) and the code edit similarity from ``rapidfuzz`` (``fuzz.ratio``, the same
Levenshtein ratio as LongBench's fuzzywuzzy). Chinese tasks are tokenised per character (the
benchmark uses jieba words), so their numbers are close to, not identical with, the paper's.
"""

from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Callable, Sequence


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


def normalize_answer(text: str) -> str:
    """Lower-case, drop punctuation and the articles a/an/the, collapse whitespace (SQuAD)."""
    text = text.lower()
    text = "".join(ch for ch in text if ch not in set(string.punctuation))
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def normalize_zh(text: str) -> str:
    """Lower-case and drop all punctuation (any Unicode P* category, e.g. 。，？) and whitespace."""
    return "".join(ch for ch in text.lower()
                   if not unicodedata.category(ch).startswith("P") and not ch.isspace())


def _f1(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, reference: str) -> float:
    """Token F1 of the normalised answers (SQuAD / LongBench qa_f1_score)."""
    return _f1(normalize_answer(prediction).split(), normalize_answer(reference).split())


def qa_f1_zh(prediction: str, reference: str) -> float:
    """Character F1 of the normalised Chinese answers."""
    return _f1(list(normalize_zh(prediction)), list(normalize_zh(reference)))


def rouge_l(prediction: str, reference: str) -> float:
    """ROUGE-L F-measure (rouge-score, no stemming)."""
    from rouge_score import rouge_scorer

    if not prediction.strip() or not reference.strip():
        return 0.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def rouge_l_zh(prediction: str, reference: str) -> float:
    """ROUGE-L over characters (each character a token) for Chinese summaries."""
    from rouge_score import rouge_scorer, tokenizers

    class _Chars(tokenizers.Tokenizer):
        def tokenize(self, text: str) -> list[str]:
            return list(normalize_zh(text))

    scorer = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_Chars())
    if not normalize_zh(prediction) or not normalize_zh(reference):
        return 0.0
    return scorer.score(reference, prediction)["rougeL"].fmeasure


def classification(prediction: str, reference: str, all_classes: Sequence[str]) -> float:
    """LongBench classification: the classes named in the prediction, minus those that are only
    substrings of the reference; 1/len(matches) if the reference is among them, else 0."""
    if not all_classes:
        raise ValueError("all_classes: expected the task's list of class names")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in reference and c != reference)]
    return 1.0 / len(matches) if reference in matches else 0.0


def _paragraph_match(prediction: str, reference: str, pattern: str, label: str) -> float:
    """Share of the numbers in the prediction equal to the paragraph number in the reference."""
    found = re.findall(pattern, reference)
    if not found:
        raise ValueError(f"reference={reference!r}: expected '{label}'")
    numbers = re.findall(r"\d+", prediction)
    return sum(n == found[0] for n in numbers) / len(numbers) if numbers else 0.0


def retrieval(prediction: str, reference: str) -> float:
    """LongBench passage retrieval: share of the numbers in the prediction equal to the
    reference's "Paragraph N"."""
    return _paragraph_match(prediction, reference, r"Paragraph (\d+)", "Paragraph N")


def retrieval_zh(prediction: str, reference: str) -> float:
    """Chinese passage retrieval: as :func:`retrieval` with "段落N"."""
    return _paragraph_match(prediction, reference, r"段落(\d+)", "段落N")


def count(prediction: str, reference: str) -> float:
    """LongBench passage count: share of the numbers in the prediction equal to the reference."""
    numbers = re.findall(r"\d+", prediction)
    return sum(n == str(reference).strip() for n in numbers) / len(numbers) if numbers else 0.0


def code_sim(prediction: str, reference: str) -> float:
    """LongBench code edit similarity: Levenshtein ratio of the first code line predicted
    (skipping lines with ``` / # / // comments) to the reference line."""
    from rapidfuzz import fuzz

    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return fuzz.ratio(line, reference) / 100.0


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
    """Best score of the prediction over the reference answers (LongBench's scorer)."""
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
