"""The ``magicpig`` command: the demo, the evaluation runner, benchmarks and machine info."""

from __future__ import annotations

import argparse
import runpy
import sys
from pathlib import Path

_REPO = Path(__file__).resolve().parent.parent
_BENCHMARKS = {"cpu-attention": "bench_cpu_attention.py", "generate": "bench_generate.py", "hashing": "bench_hashing.py"}


def _info(argv: list[str]) -> int:
    argparse.ArgumentParser(prog="magicpig info", description="What this install can do.").parse_args(argv)
    import torch

    import magicpig

    print(f"magicpig {magicpig.__version__}, torch {torch.__version__}")
    print(f"device: {'cuda (' + torch.cuda.get_device_name() + ')' if torch.cuda.is_available() else 'cpu'}")
    try:
        from magicpig import _C

        print(f"CPU extension: {_C.cpu_info()}")
    except ImportError as err:
        print(f"CPU extension: not built ({err}); the numba backend will be used")
    return 0


def _bench(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="magicpig bench", description="Run a benchmark script.")
    parser.add_argument("name", choices=sorted(_BENCHMARKS))
    args, rest = parser.parse_known_args(argv)
    script = _REPO / "scripts" / _BENCHMARKS[args.name]
    if not script.exists():
        print(f"magicpig bench: {script} not found; benchmarks run from a source checkout "
              "(git clone, then pip install -e .)", file=sys.stderr)
        return 2
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
    "bench": (_bench, "benchmarks: " + ", ".join(sorted(_BENCHMARKS))),
    "info": (_info, "SIMD level, threads and device this install uses"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = [f"  {name:<6} {help_}" for name, (_, help_) in COMMANDS.items()]
        print("usage: magicpig COMMAND [ARGS]\n\ncommands:\n" + "\n".join(lines))
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nmagicpig: unknown command {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    command, _ = COMMANDS[argv[0]]
    return int(command(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
