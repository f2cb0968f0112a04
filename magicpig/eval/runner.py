"""The evaluation runner: one exact prefill per sample, every method decodes from that state.

Flow per (length, task): build the samples (RULER generator or LongBench files), prefill each
prompt once, then for each method decode a batch of those states with the method's
:class:`MagicPIGConfig` and score the text. Every (benchmark, task, length, index, method)
result is one line of ``predictions.jsonl`` (appended and flushed as it is made), so a rerun
skips what is done. ``summary.md`` / ``summary.csv`` / ``accuracy_vs_cost.png`` are rebuilt
from that file at the end.

The model is reached through :func:`load_model` and :class:`ModelAdapter` only, so a change of
the model API changes one class here.
"""

from __future__ import annotations

import csv
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol, Sequence

from magicpig.config import METHODS, MagicPIGConfig
from magicpig.eval.paired import paired_markdown

PREDICTIONS = "predictions.jsonl"


# ----------------------------------------------------------------------------- methods


@dataclass(frozen=True)
class MethodSpec:
    """A method as the user named it (``label``) and the config it decodes with."""

    label: str
    config: MagicPIGConfig


_BUDGETED = ("topk", "quest", "oracle_sampling", "retrieval")
_INT_FIELDS = ("K", "L", "min_collisions", "sink_tokens", "window_tokens", "seed", "cpu_threads", "exact_keys")


def _parse_bool(text: str, key: str, value: str) -> bool:
    flag = {"1": True, "true": True, "0": False, "false": False}.get(value.strip().lower())
    if flag is None:
        raise ValueError(f"method {text!r}: {key}={value!r}: expected 1, 0, true or false")
    return flag


def parse_method(text: str, base: MagicPIGConfig | None = None) -> MethodSpec:
    """``name`` or ``name:args``: ``magicpig:K=8,L=75``, ``topk:0.03`` (a bare number is the
    budget), ``quest:budget=0.03,sink_tokens=4``. Unnamed fields keep ``base``'s values."""
    base = base or MagicPIGConfig()
    name, _, args = text.partition(":")
    if name not in METHODS:
        raise ValueError(f"method {text!r}: expected a name in {METHODS}, optionally ':key=value,...'")
    changes: dict[str, Any] = {"method": name}
    for part in filter(None, (p.strip() for p in args.split(","))):
        key, eq, value = part.partition("=")
        if not eq:
            if name not in _BUDGETED:
                raise ValueError(f"method {text!r}: a bare number is a budget, which {name} has none of")
            key, value = "budget", part
        key = key.strip()
        if key == "carry_head":
            changes[key] = _parse_bool(text, key, value)
            continue
        try:
            if key in _INT_FIELDS:
                changes[key] = int(value)
            elif key == "budget":
                changes[key] = float(value)
            elif key == "dense_layers":
                changes[key] = tuple(int(v) for v in value.split("+") if v)
            elif key in ("kv_dtype", "cpu_backend"):
                changes[key] = value
            else:
                raise ValueError(f"method {text!r}: unknown field {key!r}")
        except ValueError as err:
            if "unknown field" in str(err):
                raise
            raise ValueError(f"method {text!r}: {key}={value!r} is not a number") from err
    return MethodSpec(text, base.replace(**changes))


# ----------------------------------------------------------------------------- the model


class ModelAdapter(Protocol):
    """What the runner needs from a model."""

    tokenizer: Any
    max_context: int
    name: str

    def prefill(self, token_ids: list[list[int]]) -> Any: ...

    def select(self, state: Any, indices: list[int]) -> Any: ...

    def concat(self, states: list[Any]) -> Any: ...

    def generate(self, state: Any, config: MagicPIGConfig, max_new_tokens: int) -> list["Generated"]: ...


@dataclass
class Generated:
    text: str
    cost: float  # fraction of the middle keys read (1.0 for dense)
    new_tokens: int
    seconds: float


class LongContextAdapter:
    """:class:`magicpig.LongContextModel` behind :class:`ModelAdapter`."""

    def __init__(self, model: Any, name: str):
        self.model = model
        self.tokenizer = model.tokenizer
        self.max_context = int(model.args.max_context)
        self.name = name

    def prefill(self, token_ids: list[list[int]]) -> Any:
        return self.model.prefill(token_ids, progress=False)

    def select(self, state: Any, indices: list[int]) -> Any:
        return state.select(indices)

    def concat(self, states: list[Any]) -> Any:
        return type(states[0]).concat(states)

    def generate(self, state: Any, config: MagicPIGConfig, max_new_tokens: int) -> list[Generated]:
        start = time.perf_counter()
        results = self.model.generate_from(state, config, max_new_tokens=max_new_tokens)
        seconds = time.perf_counter() - start
        return [Generated(r.text, float(r.stats.computation_cost), int(r.stats.new_tokens or len(r.token_ids)),
                          seconds / len(results)) for r in results]


def load_model(name: str, device: str | None = None, dtype: str | None = None) -> ModelAdapter:
    """Load ``name`` (alias, directory, .gguf or cached hub id) for evaluation."""
    from magicpig import LongContextModel

    return LongContextAdapter(LongContextModel.from_pretrained(name, device=device, dtype=dtype), name)


# ----------------------------------------------------------------------------- items


@dataclass
class EvalItem:
    """One prompt to answer, whatever the benchmark."""

    benchmark: str
    task: str
    length: int
    index: int
    prompt: str
    answers: list[str]
    max_new_tokens: int
    score: Callable[[str], float]  # prediction -> [0, 1]
    info: dict[str, Any] = field(default_factory=dict)  # extra fields for the record

    def key(self, method: str) -> tuple:
        return (self.benchmark, self.task, self.length, self.index, method)


def record_key(rec: dict[str, Any]) -> tuple:
    return (rec["benchmark"], rec["task"], rec["length"], rec["index"], rec["method"])


def read_records(out_dir: Path) -> list[dict[str, Any]]:
    """The records of ``out_dir/predictions.jsonl`` (a torn last line from a kill is skipped)."""
    path = out_dir / PREDICTIONS
    if not path.is_file():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def merge_records(out_dir: str | Path, sources: Sequence[str | Path]) -> int:
    """Append to ``out_dir/predictions.jsonl`` the records of ``sources`` (other output
    directories, e.g. pieces of one run split over processes or machines) that it lacks;
    returns how many were added. All records must come from one model."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(out)
    done = {record_key(r) for r in records}
    models = {r.get("model") for r in records}
    added = []
    for src in sources:
        if not (Path(src) / PREDICTIONS).is_file():
            raise ValueError(f"merge source {src}: no {PREDICTIONS} there")
        for rec in read_records(Path(src)):
            models.add(rec.get("model"))
            if record_key(rec) not in done:
                done.add(record_key(rec))
                added.append(rec)
    if len(models) > 1:
        raise ValueError(f"merge: records of several models {sorted(map(str, models))}; keep one model per --out")
    with open(out / PREDICTIONS, "a", encoding="utf-8") as sink:
        for rec in added:
            sink.write(json.dumps(rec) + "\n")
    return len(added)


# ----------------------------------------------------------------------------- running

ItemGroups = Iterable[tuple[tuple[str, str, int], Callable[[], list[EvalItem]], int]]


def run(
    adapter: ModelAdapter,
    groups: ItemGroups,
    methods: Sequence[MethodSpec],
    out_dir: str | Path,
    batch_size: int = 4,
    total: int | None = None,
    progress: bool = True,
    max_new_tokens: int | None = None,
    shard: tuple[int, int] = (0, 1),
) -> list[dict[str, Any]]:
    """Evaluate every method on every item; returns all records of ``out_dir``.

    groups: (group name, a function making the group's items, number of items) per
    (benchmark, task, length); items are only built (and prompts tokenised) for groups with
    work left. Records already in ``out_dir`` are skipped. ``max_new_tokens`` caps each
    item's own generation length. ``shard`` (i, n): only the items whose index % n == i, one
    piece of a run split over n processes (every task gets its share of every piece).
    """
    from tqdm import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r}: expected an integer >= 1")
    part, parts = shard
    if not 0 <= part < parts:
        raise ValueError(f"shard={shard!r}: expected (i, n) with 0 <= i < n")
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise ValueError(f"methods: duplicate names in {labels}")
    out = Path(out_dir)
    records = _records_of_model(out, adapter.name)
    done = {record_key(r) for r in records}
    groups = list(groups)
    units = sum(len(range(part, n, parts)) for _, _, n in groups) * len(methods) if total is None else total
    bar = tqdm(total=units, disable=not progress, desc="eval", unit="answer", dynamic_ncols=True)
    with open(out / PREDICTIONS, "a", encoding="utf-8") as sink:

        def keep(rec: dict[str, Any]) -> None:  # every answer on disk as soon as it exists (resumable)
            sink.write(json.dumps(rec) + "\n")
            sink.flush()
            records.append(rec)
            done.add(record_key(rec))
            bar.update(1)

        for (benchmark, task, length), make_items, count in groups:
            pending_keys = [(benchmark, task, length, i, m) for i in range(part, count, parts) for m in labels]
            skipped = sum(k in done for k in pending_keys)
            bar.update(skipped)
            if skipped == len(pending_keys):
                continue
            bar.set_postfix_str(f"{task}@{length}")
            try:
                items = make_items()
            except ValueError as err:  # e.g. a task that cannot fit this length: skip, say so
                bar.write(f"skipping {task}@{length}: {err}")
                bar.update(len(pending_keys) - skipped)
                continue
            items = [it for it in items if it.index % parts == part]
            for batch_start in range(0, len(items), batch_size):
                _run_batch(adapter, items[batch_start:batch_start + batch_size], methods, done, max_new_tokens, keep)
    bar.close()
    return records


def _records_of_model(out: Path, model: str) -> list[dict[str, Any]]:
    """The records already in ``out`` (created if missing); all must be ``model``'s."""
    out.mkdir(parents=True, exist_ok=True)
    records = read_records(out)
    models = {r.get("model") for r in records}
    if records and models != {model}:
        raise ValueError(
            f"{out / PREDICTIONS} holds results of model(s) {sorted(map(str, models))}, not "
            f"{model!r}: use another --out"
        )
    return records


def _run_batch(adapter: ModelAdapter, batch: list[EvalItem], methods: Sequence[MethodSpec], done: set,
               max_new_tokens: int | None, keep: Callable[[dict[str, Any]], None]) -> None:
    """Prefill the items of ``batch`` that some method has not answered (one exact prefill per
    prompt), then decode each method from that state for the items it lacks; ``keep`` each record."""
    todo = [[m for m in methods if it.key(m.label) not in done] for it in batch]
    need = [i for i, ms in enumerate(todo) if ms]
    if not need:
        return
    ids = [_encode(adapter, batch[i].prompt) for i in need]
    state = adapter.concat([adapter.prefill([x]) for x in ids])  # one prefill per sample
    for m in methods:
        rows = [j for j, i in enumerate(need) if m in todo[i]]
        if not rows:
            continue
        first = batch[need[rows[0]]]
        lens = [len(ids[j]) for j in rows]
        max_new = min(first.max_new_tokens, adapter.max_context - max(lens), max_new_tokens or adapter.max_context)
        if max_new < 1:
            raise ValueError(
                f"{first.task}@{first.length}: prompts of {max(lens)} tokens leave no room to generate "
                f"within the model's {adapter.max_context} positions"
            )
        gens = adapter.generate(adapter.select(state, rows), m.config, max_new)
        for j, gen in zip(rows, gens):
            keep(_record(adapter, batch[need[j]], m, gen, len(ids[j])))


def _encode(adapter: ModelAdapter, prompt: str) -> list[int]:
    # Prompts are already rendered (chat template + answer prefix), so no special tokens.
    return list(adapter.tokenizer(prompt, add_special_tokens=False)["input_ids"])


def _record(adapter: ModelAdapter, item: EvalItem, m: MethodSpec, gen: Generated, prompt_tokens: int) -> dict[str, Any]:
    return {
        "benchmark": item.benchmark, "task": item.task, "length": item.length, "index": item.index,
        "method": m.label, "model": adapter.name, "prediction": gen.text, "answers": item.answers,
        "score": item.score(gen.text), "cost": gen.cost, "prompt_tokens": prompt_tokens,
        "new_tokens": gen.new_tokens, "seconds": round(gen.seconds, 3), **item.info,
    }


# ----------------------------------------------------------------------------- summaries


def summarize(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows (benchmark, task, length, method, n, score [0-100], cost [%]) plus, per
    (benchmark, length, method), an ``average`` row over tasks (each task weighted equally)."""
    groups: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        groups[(r["benchmark"], r["task"], r["length"], r["method"])].append(r)
    rows = []
    for (bench, task, length, method), recs in sorted(groups.items(), key=lambda kv: tuple(map(str, kv[0]))):
        rows.append({"benchmark": bench, "task": task, "length": length, "method": method, "n": len(recs),
                     "score": 100 * _mean(r["score"] for r in recs),
                     "cost": 100 * _mean(r["cost"] for r in recs)})
    avg: dict[tuple, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        avg[(row["benchmark"], row["length"], row["method"])].append(row)
    for (bench, length, method), task_rows in avg.items():
        rows.append({"benchmark": bench, "task": "average", "length": length, "method": method,
                     "n": sum(r["n"] for r in task_rows), "score": _mean(r["score"] for r in task_rows),
                     "cost": _mean(r["cost"] for r in task_rows)})
    return rows


def _mean(values: Iterable[float]) -> float:
    vals = list(values)
    return sum(vals) / len(vals) if vals else math.nan


def write_summary(out_dir: str | Path, records: Sequence[dict[str, Any]], method_order: Sequence[str] = ()) -> dict[str, Path]:
    """summary.csv, summary.md and accuracy_vs_cost.png in ``out_dir``; returns their paths.
    summary.md holds the score tables and, below them, every method answer by answer against
    the first of ``method_order`` (:mod:`magicpig.eval.paired`)."""
    out = Path(out_dir)
    rows = summarize(records)
    paths = {"csv": out / "summary.csv", "md": out / "summary.md", "png": out / "accuracy_vs_cost.png"}
    with open(paths["csv"], "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=["benchmark", "task", "length", "method", "n", "score", "cost"])
        w.writeheader()
        for r in rows:
            w.writerow({**r, "score": f"{r['score']:.2f}", "cost": f"{r['cost']:.3f}"})
    paired = paired_markdown(records, _ordered_methods(rows, method_order))
    paths["md"].write_text(summary_markdown(rows, method_order) + ("\n" + paired if paired else ""), encoding="utf-8")
    plot_accuracy_vs_cost(rows, paths["png"], method_order)
    return paths


def _ordered_methods(rows: Sequence[dict[str, Any]], method_order: Sequence[str]) -> list[str]:
    seen = [m for m in method_order if any(r["method"] == m for r in rows)]
    return seen + sorted({r["method"] for r in rows} - set(seen))


def summary_markdown(rows: Sequence[dict[str, Any]], method_order: Sequence[str] = ()) -> str:
    """One table per (benchmark, length): tasks down, methods across, score (0-100); the last
    rows are the task average and the mean computation cost in % of the middle keys read."""
    parts = []
    methods = _ordered_methods(rows, method_order)
    for bench, length in sorted({(r["benchmark"], r["length"]) for r in rows}, key=lambda x: (x[0], x[1])):
        sel = [r for r in rows if r["benchmark"] == bench and r["length"] == length]
        ms = [m for m in methods if any(r["method"] == m for r in sel)]
        tasks = []
        for r in sel:
            if r["task"] != "average" and r["task"] not in tasks:
                tasks.append(r["task"])
        cell = {(r["task"], r["method"]): r for r in sel}
        lines = [f"### {bench} @ {length} tokens", "", "| task | " + " | ".join(ms) + " |",
                 "|---|" + "---:|" * len(ms)]
        for t in tasks + ["average"]:
            vals = [f"{cell[(t, m)]['score']:.1f}" if (t, m) in cell else "" for m in ms]
            name = f"**{t}**" if t == "average" else t
            lines.append(f"| {name} | " + " | ".join(vals) + " |")
        costs = [f"{cell[('average', m)]['cost']:.2f}" if ("average", m) in cell else "" for m in ms]
        lines.append("| cost (% keys read) | " + " | ".join(costs) + " |")
        ns = [str(cell[("average", m)]["n"]) if ("average", m) in cell else "" for m in ms]
        lines.append("| answers | " + " | ".join(ns) + " |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def plot_accuracy_vs_cost(rows: Sequence[dict[str, Any]], path: Path, method_order: Sequence[str] = ()) -> None:
    """Average score against mean computation cost, one point per (method, length)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    avg = [r for r in rows if r["task"] == "average"]
    fig, ax = plt.subplots(figsize=(9.5, 4.5))
    markers = "osD^v<>ph*"
    lengths = sorted({r["length"] for r in avg})
    for i, m in enumerate(_ordered_methods(avg, method_order)):
        pts = sorted((r["length"], r["cost"], r["score"]) for r in avg if r["method"] == m)
        for length, cost, score in pts:
            ax.scatter(max(cost, 0.01), score, marker=markers[lengths.index(length) % len(markers)],
                       color=f"C{i % 10}", label=f"{m} @ {length}")
    ax.set_xscale("log")
    ax.set_xlabel("computation cost (% of middle keys read, log scale; 0 drawn at 0.01)")
    ax.set_ylabel("average score (0-100)")
    ax.set_title("accuracy vs cost")
    ax.grid(True, which="both", alpha=0.3)
    # Outside the axes: with many methods a legend inside covers points.
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
