"""``magicpig demo``: its command line (the demo itself is :mod:`magicpig.demo`)."""

from __future__ import annotations

import argparse
from typing import Any

from magicpig.demo import load_model, run_demo


def main(argv: list[str] | None = None) -> int:
    """Entry of `magicpig demo` (see --help)."""
    from magicpig.core.argtypes import OneLineParser
    from magicpig.cli.args import report, user_error_types

    parser = OneLineParser(prog="magicpig demo", description="Needle-in-a-haystack on the embedded model: dense vs magicpig attention.")
    parser.add_argument("--tokens", type=int, default=6000, help="prompt length in tokens (default 6000)")
    parser.add_argument("--model", default=None, help="model (default: the embedded smollm2-135m-instruct)")
    parser.add_argument("--depth", type=float, default=0.5, help="needle position in [0, 1] (default 0.5)")
    parser.add_argument("--max-new-tokens", type=int, default=20)
    parser.add_argument("--K", type=int, default=None, help="bits per table (with --L; default: chosen for the model)")
    parser.add_argument("--L", type=int, default=None, help="tables (with --K; default: chosen for the model)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None)
    args = parser.parse_args(argv)
    # Everything a user can get wrong is checked before the weights load (seconds); errors
    # after that are bugs and keep their traceback.
    try:
        config = check_args(args)
        model = load_model(args)
    except user_error_types() as err:
        return report(parser.prog, err)
    return run_demo(args, model, config)


def check_args(args: argparse.Namespace) -> Any:
    """The MagicPIGConfig of the demo's sparse run, once every argument is known to be usable
    (the model is resolved and its config read, no weights loaded); ValueError/UsageError else."""
    from magicpig import MagicPIGConfig
    from magicpig.cli.args import UsageError, check_device, resolve_model_args
    from magicpig.config import MAX_K, MAX_L, MAX_SEED, check_float, check_int

    check_int("--tokens", args.tokens, 200)
    check_float("--depth", args.depth, 0.0, 1.0)
    check_int("--max-new-tokens", args.max_new_tokens, 1)
    if (args.K is None) != (args.L is None):
        raise UsageError(f"--K {args.K} --L {args.L}: expected both or neither (neither: chosen for the model)")
    lsh = {} if args.K is None else {"K": check_int("--K", args.K, 1, MAX_K), "L": check_int("--L", args.L, 1, MAX_L)}
    config = MagicPIGConfig(seed=check_int("--seed", args.seed, 0, MAX_SEED), **lsh)
    args.device = check_device("--device", args.device)
    args.model_dir, model_args = resolve_model_args("--model", args.model)
    config.check_model(model_args.num_layers, model_args.max_context)
    if args.tokens + args.max_new_tokens > model_args.max_context:
        raise UsageError(f"--tokens {args.tokens} + --max-new-tokens {args.max_new_tokens} exceed the "
                         f"model's {model_args.max_context} positions")
    return config
