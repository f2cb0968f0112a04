"""``magicpig eval ruler|longbench|summary|pick-kl``: run the benchmarks, write the summaries,
pick (K, L) for a budget.

Examples::

    magicpig eval ruler --model smollm2-135m-instruct --lengths 4096 8192 --tasks all \\
        --samples 20 --methods dense magicpig:K=8,L=75 topk:0.03 quest:0.03 --out results/
    magicpig eval longbench --data ~/LongBench/data --tasks hotpotqa trec --samples 50 \\
        --methods dense magicpig --out results-lb/
    magicpig eval summary --out results/
    magicpig eval ruler ... --workers 2 --out results/   # two processes, merged into results/
    magicpig eval summary --out all/ --merge part-a/ part-b/   # pieces of one run, one table
    magicpig eval pick-kl --cost 0.03        # (K, L) for a 3% budget on the model

A bare method name uses its defaults (MagicPIGConfig); ``name:key=value,...`` overrides them and
``topk:0.03`` sets the budget. A rerun with the same --out skips the answers already there.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from magicpig.cache import FetchError
from magicpig.core.argtypes import OneLineParser
from magicpig.cli.args import (
    DTYPES,
    UsageError,
    check_device,
    check_out_dir,
    report,
    resolve_model_args,
    user_error_types,
)
from magicpig.config import MAX_K, MAX_L, MAX_SEED, check_float, check_int
from magicpig.eval import longbench, ruler
from magicpig.eval.groups import longbench_groups, ruler_groups
from magicpig.eval.workers import parse_shard
from magicpig.eval.runner import (
    MethodSpec,
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
    p.add_argument("--dtype", default=None, choices=DTYPES, help="float32 / bfloat16 / float16 (default: by device)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="cap on generated tokens (default: the benchmark's per-task length)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice; 1 is faster on a busy machine, "
                   "where spinning intra-op threads wait on each other)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=1,
                   help="split the run over this many processes of this machine, each with its share of "
                   "the cores (or --threads each), merged into --out (default: %(default)s)")
    p.add_argument("--shard", default=None, metavar="I/N",
                   help="run only the samples whose index %% N == I: one piece of a run split by hand "
                   "(e.g. over machines); merge the pieces with `magicpig eval summary --merge`")


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog="magicpig eval", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="bench", required=True)
    r = sub.add_parser("ruler", help="RULER's 13 synthetic tasks at given lengths")
    _common(r)
    r.add_argument("--lengths", type=int, nargs="+", default=[4096], help="lengths in tokens: prompt + tokens to generate (RULER's max_seq_length)")
    r.add_argument("--tasks", nargs="+", default=["all"], help=f"'all' or some of {list(ruler.TASKS)}")
    r.add_argument("--seed", type=int, default=0, help="sample generator seed")
    r.add_argument("--qa-shuffle", choices=ruler.QA_SHUFFLES, default="official",
                   help="QA document order: RULER's fixed-seed layout or one shuffle per sample")
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


def _check_pick_kl(args: argparse.Namespace) -> None:
    """pick-kl's arguments, all before the model loads."""
    check_float("--cost", args.cost, 0.0, 1.0, low_open=True, high_open=True)
    check_int("--length", args.length, 256)
    check_int("--steps", args.steps, 1)
    kmin, kmax = (check_int("--k-range", k, 1, MAX_K) for k in args.k_range)
    if kmin > kmax:
        raise UsageError(f"--k-range {kmin} {kmax}: expected KMIN <= KMAX")
    if len(args.min_collisions) not in (1, 2):
        raise UsageError(f"--min-collisions {args.min_collisions}: expected one threshold or MIN MAX")
    m_lo, m_hi = (check_int("--min-collisions", m, 1, MAX_L) for m in (args.min_collisions[0], args.min_collisions[-1]))
    if m_lo > m_hi:
        raise UsageError(f"--min-collisions {m_lo} {m_hi}: expected MIN <= MAX")
    check_int("--max-tables", args.max_tables, m_lo, MAX_L)
    check_device("--device", args.device)
    _, model_args = resolve_model_args("--model", args.model)
    if args.length > model_args.max_context:
        raise UsageError(f"--length {args.length} exceeds the model's {model_args.max_context} positions")


def _pick_kl(args: argparse.Namespace) -> int:
    try:
        _check_pick_kl(args)
        from magicpig import LongContextModel  # torch and transformers: after the cheap checks

        model = LongContextModel.from_pretrained(args.model, device=args.device)
    except user_error_types() as err:
        return report("magicpig eval pick-kl", err)
    # As before: what the calibration itself refuses (a prompt shorter than sinks + window, no
    # (K, L) within --max-tables) and RULER's data failing to fetch are one line, not a bug.
    try:
        ranked = _rank_kl(args, model)
    except (ValueError, FetchError) as err:
        return report("magicpig eval pick-kl", err)
    top = args.cost / 4
    print(f"  K    L  m  predicted cost  recall of the top {100 * top:.2f}% pairs")
    for o in ranked[:12]:
        print(f"{o.K:3d} {o.L:4d} {o.min_collisions:2d}  {100 * o.predicted_cost:13.2f}%  {o.recall:.3f}")
    best = ranked[0]
    print(f"chosen: magicpig:K={best.K},L={best.L},min_collisions={best.min_collisions} "
          f"(predicted cost {100 * best.predicted_cost:.2f}%)")
    return 0


def _rank_kl(args: argparse.Namespace, model: Any) -> list:
    """The (K, L, m) options for --cost on the model's queries, best first."""
    from magicpig.runtime.calibration import model_cosines, ranked_options

    sample = ruler.generate_sample("niah_single_2", args.length, 0, model.tokenizer,
                                   max_total=int(model.args.max_context))
    ids = model.tokenizer(sample.prompt, add_special_tokens=False)["input_ids"]
    cos = model_cosines(model.loaded, ids, model.config, steps=args.steps)
    print(f"calibration: {cos.numel()} (query, key) pairs from {args.steps} decode steps at {len(ids)} tokens")
    m_range = (args.min_collisions[0], args.min_collisions[-1])
    return ranked_options(cos, args.cost, tuple(args.k_range), m_range, args.max_tables, args.cost / 4)


def main(argv: list[str] | None = None, adapter: ModelAdapter | None = None) -> int:
    """Entry point of ``magicpig eval``; ``adapter`` lets tests pass a model in."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if args.bench == "pick-kl":
        return _pick_kl(args)
    if args.bench == "summary":
        return _summary(args)
    prog = f"magicpig eval {args.bench}"
    # Every user mistake is found before the weights load (seconds to minutes); errors after
    # that are bugs and keep their traceback.
    try:
        methods, tasks = _check_run_args(args, adapter.name if adapter is not None else args.model)
        if args.workers > 1:  # the workers load the model; here only its config is checked
            _, model_args = resolve_model_args("--model", args.model)
            _check_model_fit(args, methods, model_args.num_layers, model_args.max_context)
        else:
            adapter = _load_checked(args, methods, adapter)
    except user_error_types() as err:
        return report(prog, err)
    out = Path(args.out)
    if args.workers > 1:
        return _run_workers(args, argv, methods, out)
    if args.bench == "ruler":
        groups = ruler_groups(adapter.tokenizer, tasks, args.lengths, args.samples, args.seed, adapter.max_context,
                              args.qa_shuffle)
    else:
        max_length = args.max_length or adapter.max_context
        groups = longbench_groups(adapter.tokenizer, args.data, tasks, args.samples, max_length)
    try:
        records = run(adapter, groups, methods, out, batch_size=args.batch_size, progress=not args.no_progress,
                      max_new_tokens=args.max_new_tokens, shard=args.shard or (0, 1))
    except FetchError as err:  # RULER's data could not be fetched or cached: not a bug
        return report(prog, err)
    _write_and_print_summary(out, records, [m.label for m in methods])
    return 0


def _run_workers(args: argparse.Namespace, argv: list[str] | None, methods: list[MethodSpec], out: Path) -> int:
    """``--workers N``: the same command as N processes (magicpig.eval.workers), then the
    summary of everything in ``out``."""
    from magicpig.eval.workers import run_workers

    argv = sys.argv[1:] if argv is None else argv
    status = run_workers(list(argv), out, args.workers, args.threads)
    records = read_records(out)
    if records:
        _write_and_print_summary(out, records, [m.label for m in methods])
    return status


def _write_and_print_summary(out: Path, records: list, labels: list[str]) -> None:
    """The end of a run: summary.md/.csv/.png written into ``out``, the table printed."""
    paths = write_summary(out, records, labels)
    print(paths["md"].read_text())
    print(f"wrote {out / 'predictions.jsonl'}, {paths['md']}, {paths['csv']}, {paths['png']}")


def _summary(args: argparse.Namespace) -> int:
    out = Path(args.out)
    try:
        check_out_dir("--out", args.out)
        added = merge_records(out, args.merge) if args.merge else 0
    except (UsageError, ValueError) as err:
        return report("magicpig eval summary", err)
    if args.merge:
        print(f"merged {added} records into {out / 'predictions.jsonl'}")
    records = read_records(out)
    if not records:
        print(f"magicpig eval summary: no predictions in {out}", file=sys.stderr)
        return 2
    paths = write_summary(out, records, args.methods)
    print(paths["md"].read_text())
    return 0


def _check_run_args(args: argparse.Namespace, model_name: str) -> tuple[list[MethodSpec], list[str]]:
    """(methods, tasks) of a ruler/longbench run once its arguments are known to be usable;
    nothing here needs the model."""
    methods = [_parse_method(m) for m in args.methods]
    labels = [m.label for m in methods]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--methods {' '.join(labels)}: a method is named twice")
    check_int("--samples", args.samples, 1)
    check_int("--batch-size", args.batch_size, 1)
    if args.max_new_tokens is not None:
        check_int("--max-new-tokens", args.max_new_tokens, 1)
    if args.threads is not None:
        check_int("--threads", args.threads, 1)
    check_int("--workers", args.workers, 1)
    if args.shard is not None:
        if args.workers > 1:
            raise UsageError(f"--shard {args.shard} with --workers {args.workers}: give one or the other")
        try:
            args.shard = parse_shard(args.shard)
        except ValueError as err:
            raise UsageError(str(err)) from None
    if args.bench == "ruler":
        check_int("--seed", args.seed, 0, MAX_SEED)
        for n in args.lengths:
            check_int("--lengths", n, 256)
        tasks = ruler.resolve_tasks(args.tasks)
    else:
        if args.max_length is not None:
            check_int("--max-length", args.max_length, 1)
        tasks = longbench.resolve_tasks(args.data, args.tasks)
    _check_out(args.out, model_name)
    check_device("--device", args.device)
    return methods, tasks


def _parse_method(text: str) -> MethodSpec:
    try:
        return parse_method(text)
    except (ValueError, TypeError) as err:
        raise UsageError(f"--methods {text}: {err}") from err


def _check_out(out: str, model_name: str) -> None:
    """--out can be written, and holds no results of another model (a resume must not mix them)."""
    path = check_out_dir("--out", out)
    models = {r.get("model") for r in read_records(path)} if path.is_dir() else set()
    if models and models != {model_name}:
        raise UsageError(f"--out {out} holds results of model(s) {sorted(map(str, models))}, "
                         f"not {model_name!r}: use another --out")


def _load_checked(args: argparse.Namespace, methods: list[MethodSpec], adapter: ModelAdapter | None) -> ModelAdapter:
    """The model (``adapter`` when given), after checking the methods and lengths against its
    config, which is read before the weights."""
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    if adapter is None:
        _, model_args = resolve_model_args("--model", args.model)
        _check_model_fit(args, methods, model_args.num_layers, model_args.max_context)
        return load_model(args.model, device=args.device, dtype=args.dtype)
    model_args = getattr(getattr(adapter, "model", None), "args", None)  # test doubles have none
    _check_model_fit(args, methods, model_args.num_layers if model_args else None, adapter.max_context)
    return adapter


def _check_model_fit(args: argparse.Namespace, methods: list[MethodSpec], num_layers: int | None,
                     max_context: int) -> None:
    for m in methods:
        try:
            if num_layers is not None:
                m.config.check_model(num_layers, max_context)
        except ValueError as err:
            raise UsageError(f"--methods {m.label}: {err}") from err
    too_long = [n for n in getattr(args, "lengths", []) if n > max_context]
    if too_long:
        raise UsageError(f"--lengths {too_long} exceed the model's {max_context} positions")


if __name__ == "__main__":
    sys.exit(main())
