"""``magicpig eval ruler|longbench|summary|pick-kl``: run the benchmarks, write the summaries,
pick (K, L) for a budget.

Examples::

    magicpig eval ruler --model smollm2-135m-instruct --lengths 4096 8192 --tasks all \\
        --samples 20 --methods dense magicpig:K=8,L=75 topk:0.03 quest:0.03 --out results/
    magicpig eval longbench --data ~/LongBench/data --tasks hotpotqa trec --samples 50 \\
        --methods dense magicpig --out results-lb/
    magicpig eval summary --out results/
    magicpig eval summary --out all/ --merge part-a/ part-b/   # pieces of one run, one table
    magicpig eval pick-kl --cost 0.03        # (K, L) for a 3% budget on the model

A bare method name uses its defaults (MagicPIGConfig); ``name:key=value,...`` overrides them and
``topk:0.03`` sets the budget. A rerun with the same --out skips the answers already there.
"""

from __future__ import annotations

import argparse
import sys
from functools import partial
from pathlib import Path
from typing import Any

from magicpig.eval import longbench, ruler
from magicpig.eval.metrics import RULER_METRICS, longbench_score
from magicpig.eval.runner import (
    EvalItem,
    ModelAdapter,
    load_model,
    merge_records,
    parse_method,
    read_records,
    run,
    write_summary,
)

DEFAULT_METHODS = ["dense", "magicpig", "topk", "quest", "streaming"]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m-instruct",
                   help="alias, local HF directory, .gguf file or cached hub id (default: %(default)s)")
    p.add_argument("--methods", nargs="+", default=DEFAULT_METHODS,
                   help="methods, e.g. dense magicpig:K=8,L=75 topk:0.03 (default: %(default)s)")
    p.add_argument("--samples", type=int, default=20, help="samples per task (and length)")
    p.add_argument("--out", required=True, help="output directory (resumable)")
    p.add_argument("--batch-size", type=int, default=4, help="sequences decoded together per method")
    p.add_argument("--device", default=None, help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--dtype", default=None, help="float32 / bfloat16 / float16 (default: by device)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (default: the benchmark's per-task length)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine, "
                   "where spinning intra-op threads wait on each other)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="magicpig eval", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    r = sub.add_parser("ruler", help="RULER's 13 synthetic tasks at given lengths")
    _common(r)
    r.add_argument("--lengths", type=int, nargs="+", default=[4096], help="target prompt lengths in tokens")
    r.add_argument("--tasks", nargs="+", default=["all"], help=f"'all' or some of {list(ruler.TASKS)}")
    r.add_argument("--seed", type=int, default=0, help="sample generator seed")
    lb = sub.add_parser("longbench", help="LongBench from the official jsonl files")
    _common(lb)
    lb.add_argument("--data", required=True, help="directory with <task>.jsonl files")
    lb.add_argument("--tasks", nargs="+", default=["all"], help="'all' (every file found) or task names")
    lb.add_argument("--max-length", type=int, default=None,
                    help="prompt + generation token limit (default: the model's context)")
    s = sub.add_parser("summary", help="rebuild summary.md / .csv / .png from predictions.jsonl")
    s.add_argument("--out", required=True)
    s.add_argument("--merge", nargs="+", default=[], metavar="DIR",
                   help="first add the predictions of these output directories (pieces of one run)")
    s.add_argument("--methods", nargs="+", default=[], help="column order of the tables (method labels)")
    k = sub.add_parser("pick-kl", help="(K, L) for a target computation cost, calibrated on the model")
    k.add_argument("--model", default="smollm2-135m-instruct")
    k.add_argument("--cost", type=float, required=True, help="target fraction of middle keys, e.g. 0.03")
    k.add_argument("--length", type=int, default=4096, help="calibration prompt length (RULER niah_single_2)")
    k.add_argument("--steps", type=int, default=8, help="decode steps whose queries are recorded")
    k.add_argument("--k-range", type=int, nargs=2, default=[6, 14], metavar=("KMIN", "KMAX"))
    k.add_argument("--max-tables", type=int, default=300)
    k.add_argument("--min-collisions", type=int, nargs="+", default=[2, 8], metavar="M",
                   help="collision threshold, or an inclusive range MIN MAX to search (default 2 8)")
    k.add_argument("--device", default=None)
    return parser


def _pick_kl(args: argparse.Namespace) -> int:
    from magicpig import LongContextModel
    from magicpig.eval.budget import model_cosines, ranked_options

    model = LongContextModel.from_pretrained(args.model, device=args.device)
    sample = ruler.generate_sample("niah_single_2", args.length, 0, model.tokenizer,
                                   max_total=int(model.args.max_context))
    ids = model.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    cos = model_cosines(model, ids, steps=args.steps)
    k_range = (args.k_range[0], args.k_range[1])
    if len(args.min_collisions) not in (1, 2):
        raise SystemExit(f"--min-collisions {args.min_collisions}: expected one threshold or MIN MAX")
    m_range = (args.min_collisions[0], args.min_collisions[-1])
    top = args.cost / 4
    print(f"calibration: {cos.numel()} (query, key) pairs from {args.steps} decode steps at {len(ids)} tokens")
    ranked = ranked_options(cos, args.cost, k_range, m_range, args.max_tables, top)
    print(f"  K    L  m  predicted cost  recall of the top {100 * top:.2f}% pairs")
    for o in ranked[:12]:
        print(f"{o.K:3d} {o.L:4d} {o.min_collisions:2d}  {100 * o.predicted_cost:13.2f}%  {o.recall:.3f}")
    best = ranked[0]
    print(f"chosen: magicpig:K={best.K},L={best.L},min_collisions={best.min_collisions} "
          f"(predicted cost {100 * best.predicted_cost:.2f}%)")
    return 0


def ruler_groups(tokenizer: Any, tasks: list[str], lengths: list[int], samples: int, seed: int,
                 max_context: int | None) -> list:
    """(group key, item maker, count) per (length, task) of a RULER run."""
    groups = []
    for length in lengths:
        for task in tasks:
            groups.append((("ruler", task, length),
                           partial(_ruler_items, tokenizer, task, length, samples, seed, max_context), samples))
    return groups


def _ruler_items(tokenizer: Any, task: str, length: int, samples: int, seed: int,
                 max_context: int | None) -> list[EvalItem]:
    items = []
    for i in range(samples):
        s = ruler.generate_sample(task, length, i, tokenizer, seed=seed, max_total=max_context)
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


def main(argv: list[str] | None = None, adapter: ModelAdapter | None = None) -> int:
    """Entry point of ``magicpig eval``; ``adapter`` lets tests pass a model in."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench == "pick-kl":
        try:
            return _pick_kl(args)
        except ValueError as err:
            print(f"magicpig eval pick-kl: {err}", file=sys.stderr)
            return 2
    out = Path(args.out)
    if args.bench == "summary":
        try:
            added = merge_records(out, args.merge) if args.merge else 0
        except ValueError as err:
            print(f"magicpig eval summary: {err}", file=sys.stderr)
            return 2
        if args.merge:
            print(f"merged {added} records into {out / 'predictions.jsonl'}")
        records = read_records(out)
        if not records:
            print(f"magicpig eval: no predictions in {out}", file=sys.stderr)
            return 2
        paths = write_summary(out, records, args.methods)
        print(paths["md"].read_text())
        return 0
    try:
        methods = [parse_method(m) for m in args.methods]
        if args.samples < 1:
            raise ValueError(f"--samples {args.samples}: expected an integer >= 1")
        if args.max_new_tokens is not None and args.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens {args.max_new_tokens}: expected an integer >= 1")
        if args.bench == "ruler":
            tasks = ruler.resolve_tasks(args.tasks)
            bad = [n for n in args.lengths if n < 256]
            if bad:
                raise ValueError(f"--lengths {bad}: expected token counts >= 256")
        else:
            tasks = longbench.resolve_tasks(args.data, args.tasks)
    except ValueError as err:
        print(f"magicpig eval: {err}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"magicpig eval: --threads {args.threads}: expected an integer >= 1", file=sys.stderr)
            return 2
        import torch

        torch.set_num_threads(args.threads)
    if adapter is None:
        adapter = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.bench == "ruler":
        too_long = [n for n in args.lengths if n > adapter.max_context]
        if too_long:
            print(f"magicpig eval: --lengths {too_long} exceed the model's {adapter.max_context} positions",
                  file=sys.stderr)
            return 2
        groups = ruler_groups(adapter.tokenizer, tasks, args.lengths, args.samples, args.seed, adapter.max_context)
    else:
        max_length = args.max_length or adapter.max_context
        groups = longbench_groups(adapter.tokenizer, args.data, tasks, args.samples, max_length)
    records = run(adapter, groups, methods, out, batch_size=args.batch_size, progress=not args.no_progress,
                  max_new_tokens=args.max_new_tokens)
    paths = write_summary(out, records, [m.label for m in methods])
    print(paths["md"].read_text())
    print(f"wrote {out / 'predictions.jsonl'}, {paths['md']}, {paths['csv']}, {paths['png']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
