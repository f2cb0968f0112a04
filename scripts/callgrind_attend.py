"""A fixed CPU-store attend workload for ``valgrind --tool=callgrind`` (issue 25 point 7: the
instruction counts of ``Store::attend`` before and after a change that must not change its
work); prints the outputs' checksum. ``--extension PATH`` loads that build of magicpig._C
instead of the installed one (to compare two builds side by side).

    valgrind --tool=callgrind --callgrind-out-file=cg.out python scripts/callgrind_attend.py
    callgrind_annotate --inclusive=yes cg.out | grep Store::attend
"""

from __future__ import annotations

import argparse
import importlib.machinery
import importlib.util
import sys


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attends", type=int, default=20)
    parser.add_argument("--extension", metavar="PATH", help="a build of magicpig._C to load instead")
    args = parser.parse_args()
    if args.extension:
        loader = importlib.machinery.ExtensionFileLoader("magicpig._C", args.extension)
        spec = importlib.util.spec_from_file_location("magicpig._C", args.extension, loader=loader)
        module = importlib.util.module_from_spec(spec)
        loader.exec_module(module)
        sys.modules["magicpig._C"] = module
    from magicpig.perf.bench_store import callgrind_workload

    print(repr(callgrind_workload(args.attends)))


if __name__ == "__main__":
    main()
