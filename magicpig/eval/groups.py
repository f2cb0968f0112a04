"""The work of a RULER or LongBench run as groups of :class:`EvalItem`: (group key, item maker,
count) per (length, task), which :func:`magicpig.eval.runner.run` consumes (``magicpig eval``
builds them from its arguments)."""

from __future__ import annotations

from functools import partial
from typing import Any

from magicpig.eval import longbench, ruler
from magicpig.eval.metrics import RULER_METRICS, longbench_score
from magicpig.eval.runner import EvalItem


def ruler_groups(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int, seed: int,
                 max_context: int | None, qa_shuffle: str = "official") -> list:
    """(group key, item maker, count) per (length, task) of a RULER run."""
    groups = []
    for length in lengths:
        for task in tasks:
            groups.append((("ruler", task, length),
                           partial(_ruler_items, tokenizer, task, length, samples, seed, max_context, qa_shuffle),
                           samples))
    return groups


def _ruler_items(tokenizer: Any, task: str, length: int, samples: int, seed: int,
                 max_context: int | None, qa_shuffle: str = "official") -> list[EvalItem]:
    items = []
    for i in range(samples):
        s = ruler.generate_sample(task, length, i, tokenizer, seed=seed, max_total=max_context,
                                    qa_shuffle=qa_shuffle)
        metric = RULER_METRICS[s.metric]

        def score(pred: str, answers: list[str] = s.answers, metric: Any = metric) -> float:
            return metric(ruler.postprocess_prediction(pred), answers)

        items.append(EvalItem("ruler", task, length, i, s.prompt, s.answers, s.tokens_to_generate, score,
                              info={"target_tokens": s.target_tokens}))
    return items


def longbench_groups(tokenizer: Any, data_dir: str, tasks: list[str], samples: int, max_length: int) -> list:
    groups = []
    for task in tasks:
        count = sum(1 for _ in longbench.read_records(data_dir, task))
        groups.append((("longbench", task, max_length),
                       partial(_longbench_items, tokenizer, data_dir, task, samples, max_length), min(samples, count)))
    return groups


def _longbench_items(tokenizer: Any, data_dir: str, task: str, samples: int, max_length: int) -> list[EvalItem]:
    items = []
    for s in longbench.load_samples(data_dir, task, tokenizer, max_length, limit=samples):
        def score(pred: str, s: longbench.LongBenchSample = s) -> float:
            return longbench_score(s.metric, pred, s.answers, s.all_classes, s.first_line)

        items.append(EvalItem("longbench", task, max_length, s.index, s.prompt, s.answers,
                              s.tokens_to_generate, score, info={"words": s.length}))
    return items
