"""LongBench (Bai et al., 2023) from the official jsonl files in a directory the user points at.

Each ``<DIR>/<task>.jsonl`` line holds ``input``, ``context``, ``answers``, ``all_classes`` and
``length`` (LongBench-E files ``<task>_e.jsonl`` work too). The per-task prompt template,
generation length, metric and whether the chat template is applied come from
``magicpig/eval/data/longbench.json`` (the benchmark's ``config/dataset2prompt.json`` and
``dataset2maxlen.json``). Prompts longer than the budget (:func:`prompt_budget`) are cut in the
middle, keeping the first and the last half (``pred.py``'s rule). The files are the official
ones: ``data.zip`` of the Hugging Face dataset ``THUDM/LongBench``, unzipped; this module never
downloads them.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator

from magicpig.eval.ruler import render_prompt

CONFIG_FILE = Path(__file__).with_name("data") / "longbench.json"


@lru_cache(maxsize=None)
def task_configs() -> dict[str, dict[str, Any]]:
    """task -> {"prompt", "max_gen", "metric", "chat", "first_line"}."""
    return json.loads(CONFIG_FILE.read_text(encoding="utf-8"))["tasks"]


@dataclass
class LongBenchSample:
    task: str
    index: int
    prompt: str
    answers: list[str]
    all_classes: list[str]
    num_tokens: int
    tokens_to_generate: int
    metric: str
    first_line: bool
    length: int  # the dataset's "length" field (words), for bucketing like LongBench-E

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def available_tasks(data_dir: str | Path) -> list[str]:
    """Tasks of our config that have a jsonl file in ``data_dir``, in config order."""
    d = Path(data_dir)
    return [t for t in task_configs() if _task_file(d, t) is not None]


def _task_file(data_dir: Path, task: str) -> Path | None:
    for name in (f"{task}.jsonl", f"{task}_e.jsonl"):
        if (data_dir / name).is_file():
            return data_dir / name
    return None


def resolve_tasks(data_dir: str | Path, names: list[str]) -> list[str]:
    """Expand ``all`` (every task with a file) and check the names exist as files."""
    d = Path(data_dir)
    if not d.is_dir():
        raise ValueError(f"--data {str(d)!r}: expected a directory of LongBench <task>.jsonl files")
    out: list[str] = []
    for name in names:
        if name == "all":
            out += [t for t in available_tasks(d) if t not in out]
            continue
        if name not in task_configs():
            raise ValueError(f"task {name!r}: expected 'all' or one of {list(task_configs())}")
        if _task_file(d, name) is None:
            raise ValueError(f"task {name!r}: no {name}.jsonl or {name}_e.jsonl in {d}")
        if name not in out:
            out.append(name)
    if not out:
        raise ValueError(f"no LongBench task files found in {d} (expected e.g. hotpotqa.jsonl)")
    return out


def read_records(data_dir: str | Path, task: str) -> Iterator[dict[str, Any]]:
    """The records of one task file, checked for the fields we use."""
    path = _task_file(Path(data_dir), task)
    if path is None:
        raise ValueError(f"task {task!r}: no jsonl file in {data_dir}")
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            rec = json.loads(line)
            missing = [k for k in ("input", "context", "answers") if k not in rec]
            if missing:
                raise ValueError(f"{path}:{line_no}: missing field(s) {missing}")
            if not isinstance(rec["answers"], list) or not rec["answers"]:
                raise ValueError(f"{path}:{line_no}: 'answers' must be a non-empty list")
            yield rec


def truncate_middle(tokenizer: Any, text: str, max_tokens: int) -> str:
    """``text`` unchanged if it has at most ``max_tokens`` tokens, else its first and last
    ``max_tokens // 2`` tokens decoded and joined (LongBench pred.py: ``half = int(max_length/2)``
    from each end, so an odd budget keeps one token less)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) <= max_tokens:
        return text
    half = max_tokens // 2
    return (tokenizer.decode(ids[:half], skip_special_tokens=True)
            + tokenizer.decode(ids[len(ids) - half:], skip_special_tokens=True))


def prompt_budget(task: str, max_length: int) -> int:
    """Most tokens of a ``task`` prompt (chat template included) when the prompt and the answer
    must fit in ``max_length`` tokens: ``max_length`` minus the task's generation length
    (dataset2maxlen: 32 for hotpotqa, 512 for gov_report).

    ``max_length`` defaults to the model's context (``magicpig eval longbench --max-length``).
    Official LongBench truncates the prompt *before* the chat template to ``model2maxlen[model]``,
    which is the model's context minus a flat 500 left for the answer and the template (3500 for
    its 4k models, 7500 for 8k, 31500 for 32k). Here the room left is the task's own generation
    length and the template counts inside the budget, as in our RULER runner (target =
    length - tokens_to_generate): the prompt plus the longest answer fit the model exactly, and
    short-answer tasks keep more context than the official runs (4064 tokens for hotpotqa at 4096
    against llama2-7b-chat-4k's 3500). ValueError if nothing is left for the prompt.
    """
    max_gen = task_configs()[task]["max_gen"]
    if max_length - max_gen <= 0:
        raise ValueError(f"max_length={max_length}: expected more than {task}'s {max_gen} generated tokens")
    return max_length - max_gen


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _fit_prompt(tokenizer: Any, text: str, chat: bool, budget: int) -> tuple[str, int]:
    """(prompt, tokens): ``text`` middle-truncated so that it, inside the chat template when
    ``chat``, has at most ``budget`` tokens. Decoding the two halves and encoding the result can
    merge or split tokens at the cut (a few more than planned): shrink by the excess and retry."""
    overhead = _count(tokenizer, render_prompt(tokenizer, "", "")) if chat else 0
    limit = budget - overhead
    if limit <= 0:
        raise ValueError(f"a prompt budget of {budget} tokens leaves no room inside the {overhead}-token chat template")
    for _ in range(4):
        kept = truncate_middle(tokenizer, text, limit)
        prompt = render_prompt(tokenizer, kept, "") if chat else kept
        n = _count(tokenizer, prompt)
        if n <= budget:
            break
        limit = max(0, limit - (n - budget))
    return prompt, n


def build_sample(task: str, index: int, record: dict[str, Any], tokenizer: Any,
                 max_length: int) -> LongBenchSample:
    """One sample: template filled, middle-truncated to :func:`prompt_budget` tokens with the chat
    template (for the tasks LongBench chats on) around it."""
    cfg = task_configs()[task]
    text = cfg["prompt"].format(context=record["context"], input=record["input"])
    prompt, n = _fit_prompt(tokenizer, text, cfg["chat"], prompt_budget(task, max_length))
    return LongBenchSample(task=task, index=index, prompt=prompt, answers=[str(a) for a in record["answers"]],
                           all_classes=list(record.get("all_classes") or []), num_tokens=n,
                           tokens_to_generate=cfg["max_gen"], metric=cfg["metric"],
                           first_line=cfg["first_line"], length=int(record.get("length", 0)))


def load_samples(data_dir: str | Path, task: str, tokenizer: Any, max_length: int,
                 limit: int | None = None) -> list[LongBenchSample]:
    """The first ``limit`` samples (all when None) of a task."""
    out = []
    for i, rec in enumerate(read_records(data_dir, task)):
        if limit is not None and i >= limit:
            break
        out.append(build_sample(task, i, rec, tokenizer, max_length))
    return out
