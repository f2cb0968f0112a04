"""The ``magicpig`` command: the demo, the evaluation runner, benchmarks and machine info.

User mistakes (a bad argument, an unknown model, an unusable cache or output folder) end in one
line on stderr, ``magicpig <command>: <message>``, and exit status 2. The commands check their
arguments and resolve the model's config before loading any weights, so these lines come in
about a second. Only that phase turns exceptions (:func:`user_error_types`) into such lines,
so an internal bug later on still shows its traceback.
"""

from __future__ import annotations

import runpy
import sys
from pathlib import Path
from typing import Optional

from magicpig.core.argtypes import OneLineParser
from magicpig.cli.args import UsageError, report

_REPO = Path(__file__).resolve().parents[2]  # magicpig/cli/main.py -> the checkout
_BENCHMARKS = {"cpu-attention": "bench_cpu_attention.py", "engine": "bench_engine.py", "generate": "bench_generate.py",
               "decode": "bench_decode.py", "hashing": "bench_hashing.py", "prefill-memory": "bench_prefill_memory.py",
               "prefill-overlap": "bench_prefill_overlap.py", "exact-keys": "bench_exact_keys.py"}


def _version() -> str:
    import magicpig

    return magicpig.__version__


def _info(argv: list[str]) -> int:
    parser = OneLineParser(prog="magicpig info", description="What this install can do.")
    parser.add_argument("--verify-cache", action="store_true",
                        help="compare the sha256 of every cached file with the one recorded when it was written")
    args = parser.parse_args(argv)
    import torch

    from magicpig.cache import cache_dir

    print(f"magicpig {_version()}, torch {torch.__version__}")
    print(f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}")
    try:
        from magicpig import _C

        print(f"CPU extension: {_C.cpu_info()}")
    except ImportError as err:
        print(f"CPU extension: not built ({err}); the numba backend will be used")
    print(f"cache: {cache_dir()} (set MAGICPIG_CACHE to move it)")
    return _verify_cache() if args.verify_cache else 0


def _verify_cache() -> int:
    from magicpig.cache import MANIFEST_SUFFIX, verify_cache

    results = verify_cache()
    for manifest, problem in results:
        single = manifest.with_name(manifest.name.removesuffix(MANIFEST_SUFFIX))  # a file's sidecar
        entry = single if single.is_file() else manifest.parent  # else a converted model's folder
        print(f"  {'ok' if problem is None else 'DAMAGED'}: {entry}" + (f": {problem}" if problem else ""))
    damaged = sum(problem is not None for _, problem in results)
    print(f"cache check: {len(results)} entries, {damaged} damaged" + (" (delete them; they are made again)" if damaged else ""))
    return 1 if damaged else 0


def _bench(argv: list[str]) -> int:
    # Not argparse: everything after NAME, --help included, belongs to the benchmark script.
    names = sorted([*_BENCHMARKS, "serve", "prefix"])
    usage = f"usage: magicpig bench NAME [ARGS]  (NAME: {', '.join(names)}; NAME --help for its options)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv:
        return report("magicpig bench", UsageError(f"missing NAME, one of {names} (see --help)"))
    name, rest = argv[0], argv[1:]
    if name == "serve":  # in the package: a load generator users run against any server
        from magicpig.bench.serve import main as bench_serve

        try:
            return bench_serve(rest, ruler_source=_ruler_workload)
        except (ValueError, TypeError) as err:
            return report("magicpig bench serve", err)
    if name == "prefix":  # in the package: document QA with and without prefix caching
        from magicpig.bench.prefix import main as bench_prefix

        return bench_prefix(rest)
    if name not in _BENCHMARKS:
        return report("magicpig bench", UsageError(f"unknown benchmark {name!r}: expected one of {names}"))
    script = _REPO / "scripts" / _BENCHMARKS[name]
    if not script.exists():
        return report("magicpig bench", UsageError(
            f"{script} not found; benchmarks run from a source checkout (git clone, then pip install -e .)"))
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _serve_parser() -> OneLineParser:
    p = OneLineParser(prog="magicpig serve", description="OpenAI-compatible HTTP server (docs/SERVING.md).")
    p.add_argument("--model", default=None, help="model name or path (default: smollm2-135m-instruct)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--api-key", default=None,
                   help="require 'Authorization: Bearer KEY' on /v1 (default: $MAGICPIG_API_KEY, else none)")
    p.add_argument("--max-num-seqs", type=int, default=16, help="most requests running at once (default 16)")
    p.add_argument("--max-waiting", type=int, default=256, help="most queued requests; more get 503 (default 256)")
    p.add_argument("--max-model-len", type=int, default=None, help="most prompt + new tokens (default: the model's)")
    p.add_argument("--max-body-bytes", type=int, default=None,
                   help="largest request body (default: 64 bytes per position of --max-model-len, at least 1 MiB)")
    p.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM or Ctrl-C, seconds running requests may take to finish before they are "
                        "ended with an error (default 30)")
    p.add_argument("--device", default=None, help="torch device (default: cuda when present, else cpu)")
    p.add_argument("--method", default="magicpig", help="attention method: magicpig, dense, or a baseline")
    for name in ("K", "L", "min-collisions", "sink-tokens", "window-tokens"):
        p.add_argument(f"--{name}", type=int, default=None, help=f"MagicPIGConfig.{name.replace('-', '_')}")
    p.add_argument("--policy", default="fcfs", choices=["fcfs", "chunked", "prefill_first", "static", "nexus"],
                   help="scheduling policy (docs/ENGINE.md; default fcfs)")
    p.add_argument("--profile", default=None,
                   help="cost-model profile (a shipped name or a JSON path) that --policy nexus prices decode with")
    p.add_argument("--max-prefill-tokens", type=int, default=8192,
                   help="prompt tokens prefilled per step under --policy fcfs (default 8192)")
    p.add_argument("--no-chunked-prefill", dest="chunked_prefill", action="store_false",
                   help="prefill each prompt whole in the step that admits it (default: prompts longer than the "
                        "step's budget are prefilled in chunks over several steps)")
    p.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="turn off automatic prefix caching. By default a prompt is cut into blocks of 256 tokens, "
                        "each named by a hash of its tokens and every block before it; a request reuses the "
                        "longest chain of blocks an earlier request computed (dense layers' device blocks, and "
                        "each sparse layer's middle K/V and LSH tables in the CPU store, shared read-only) and "
                        "prefills only the rest. Finished requests' prompt and output stay cached (a chat's next "
                        "turn reuses the last) until their memory is needed: then least recently used first. "
                        "usage.prompt_tokens_details.cached_tokens and /metrics magicpig_prefix_cache_* report it")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    return p


def _engine_policy(args, model_dir, config):
    """(policy, cost model) of ``magicpig serve``'s options."""
    if args.policy != "nexus":
        if args.profile is not None:
            raise UsageError("--profile: only --policy nexus uses a cost-model profile")
        return args.policy, None
    if args.profile is None:
        raise UsageError("--policy nexus needs --profile NAME_OR_PATH (a cost-model profile of this device; "
                         "shipped: h100_llama31_8b)")
    from magicpig.model.loading import load_config
    from magicpig.perf.cost_model import CostModel
    from magicpig.perf.profile import load_profile
    from magicpig.perf.shape import ModelShape
    from magicpig.core.policies import PolicyConfig

    profile = load_profile(args.profile)
    # A profile measured on the served model carries its shape (with the runtime's byte widths);
    # otherwise the served model's config on the profiled device.
    shape = profile.model or ModelShape.from_dict(load_config(model_dir).to_dict())
    return PolicyConfig("nexus", method=config.method if config.method == "dense" else "magicpig"), \
        CostModel.for_config(profile, shape, config)


def _serve(argv: list[str]) -> int:
    import os

    from magicpig.config import MagicPIGConfig, check_float, check_int
    from magicpig.cli.args import check_device, resolve_model_args, user_error_types

    args = _serve_parser().parse_args(argv)
    try:
        check_int("--port", args.port, 0, 65535)
        check_int("--max-waiting", args.max_waiting, 1)
        if args.max_body_bytes is not None:
            check_int("--max-body-bytes", args.max_body_bytes, 1)
        check_float("--shutdown-timeout", args.shutdown_timeout, 0.0, 24 * 3600.0)
        fields = {k: getattr(args, k) for k in ("K", "L", "min_collisions", "sink_tokens", "window_tokens")}
        config = MagicPIGConfig(method=args.method, **{k: v for k, v in fields.items() if v is not None})
        device = check_device("--device", args.device)
        model_dir, model_args = resolve_model_args("--model", args.model)
        config.check_model(model_args.num_layers, model_args.max_context)
        from magicpig.engine.engine import Engine
        from magicpig.llm import calibrate
        from magicpig.model.loaded import load_model

        loaded = load_model(model_dir, device=device)
        config = calibrate(loaded, config)  # K, L chosen for the model where unset (cached per model)
        policy, cost = _engine_policy(args, model_dir, config)
        engine = Engine(loaded, config, max_num_seqs=args.max_num_seqs,
                        max_model_len=args.max_model_len, policy=policy, cost=cost,
                        max_prefill_tokens=args.max_prefill_tokens, chunked_prefill=args.chunked_prefill,
                        prefix_caching=args.prefix_caching)
    except user_error_types() as err:
        return report("magicpig serve", err)
    from magicpig.serve.server import serve

    served = args.model or "smollm2-135m-instruct"
    serve(engine, served, args.host, args.port, args.api_key or os.environ.get("MAGICPIG_API_KEY") or None,
          args.max_waiting, args.max_body_bytes, args.log_level, args.shutdown_timeout)
    return 0


def _ruler_workload(args) -> list:
    """RULER prompts for ``magicpig bench serve --dataset ruler`` (the eval layer builds them)."""
    from magicpig.eval.ruler import generate_sample
    from magicpig.model.loading import load_tokenizer, resolve_model_dir
    from magicpig.bench.serve import WorkItem

    # The served model's tokenizer fits the prompts (the embedded one when --model is not local).
    try:
        tokenizer = load_tokenizer(resolve_model_dir(args.model))
    except Exception:  # noqa: BLE001 - a served name that is no local model
        tokenizer = load_tokenizer(resolve_model_dir(None))
    samples = [generate_sample(args.ruler_task, args.ruler_length, i, tokenizer) for i in range(args.num_prompts)]
    # The prompt already carries the chat template: it goes to /v1/completions as text.
    return [WorkItem(s.prompt, s.tokens_to_generate) for s in samples]


def _profile(argv: list[str]) -> int:
    from magicpig.cli.args import user_error_types
    from magicpig.perf.profiler import main as profile

    try:
        return profile(argv)
    except user_error_types() as err:
        return report("magicpig profile", err)


def _simulate(argv: list[str]) -> int:
    from magicpig.perf.simulator import main as simulate

    try:
        return simulate(argv)
    except (ValueError, TypeError) as err:
        return report("magicpig simulate", err)


def _demo(argv: list[str]) -> int:
    from magicpig.cli.demo import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from magicpig.cli.eval import main

    return main(argv)


COMMANDS = {
    "demo": (_demo, "needle-in-a-haystack demo on the embedded model (dense vs magicpig)"),
    "eval": (_eval, "RULER / LongBench evaluation of the attention methods"),
    "bench": (_bench, "benchmarks: " + ", ".join(sorted([*_BENCHMARKS, "serve", "prefix"])) + " (NAME --help for options)"),
    "serve": (_serve, "OpenAI-compatible HTTP server on the engine (127.0.0.1:8000 by default)"),
    "profile": (_profile, "measure this machine's prefill, decode and CPU-store times into a cost-model profile"),
    "simulate": (_simulate, "discrete-event simulation of the scheduling policies at GPU scale (cost model)"),
    "info": (_info, "SIMD level, threads, device and cache this install uses (--verify-cache)"),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``magicpig``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"magicpig {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: magicpig [--version] COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines)
              + "\n\nCOMMAND --help shows a command's options.")
        if argv and argv[0] not in ("-h", "--help"):
            print(f"magicpig: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    return int(command(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
