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

from magicpig.eval.usage import OneLineParser, UsageError, report

_REPO = Path(__file__).resolve().parent.parent
_BENCHMARKS = {"cpu-attention": "bench_cpu_attention.py", "engine": "bench_engine.py", "generate": "bench_generate.py",
               "hashing": "bench_hashing.py", "prefill-memory": "bench_prefill_memory.py"}


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
    usage = f"usage: magicpig bench NAME [ARGS]  (NAME: {', '.join(sorted(_BENCHMARKS))}; NAME --help for its options)"
    if argv and argv[0] in ("-h", "--help"):
        print(usage)
        return 0
    if not argv:
        return report("magicpig bench", UsageError(f"missing NAME, one of {sorted(_BENCHMARKS)} (see --help)"))
    name, rest = argv[0], argv[1:]
    if name not in _BENCHMARKS:
        return report("magicpig bench", UsageError(f"unknown benchmark {name!r}: expected one of {sorted(_BENCHMARKS)}"))
    script = _REPO / "scripts" / _BENCHMARKS[name]
    if not script.exists():
        return report("magicpig bench", UsageError(
            f"{script} not found; benchmarks run from a source checkout (git clone, then pip install -e .)"))
    sys.argv = [str(script), *rest]
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _demo(argv: list[str]) -> int:
    from magicpig.demo import main

    return main(argv)


def _eval(argv: list[str]) -> int:
    from magicpig.eval.cli import main

    return main(argv)


COMMANDS = {
    "demo": (_demo, "needle-in-a-haystack demo on the embedded model (dense vs magicpig)"),
    "eval": (_eval, "RULER / LongBench evaluation of the attention methods"),
    "bench": (_bench, "benchmarks: " + ", ".join(sorted(_BENCHMARKS)) + " (NAME --help for options)"),
    "info": (_info, "SIMD level, threads, device and cache this install uses (--verify-cache)"),
}


def main(argv: Optional[list[str]] = None) -> int:
    """Entry point of ``magicpig``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in ("-V", "--version"):
        print(f"magicpig {_version()}")
        return 0
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
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
