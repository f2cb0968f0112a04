"""``magicpig eval ruler|longbench --workers N``: one run split over N processes of this machine.

Worker i runs the same command with ``--shard i/N`` (the samples whose index % N == i, so every
task is shared out evenly) into ``<out>/workers/<i>of<N>``, with its own share of the cores;
this process only watches, then merges the pieces into ``<out>`` and writes the summary. A
rerun resumes: each worker skips what its directory (seeded from ``<out>``) already holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from magicpig.eval.runner import PREDICTIONS, merge_records

POLL_S = 2.0


def parse_shard(text: str) -> tuple[int, int]:
    """'I/N' -> (I, N) with 0 <= I < N; ValueError naming --shard otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text}: expected I/N, e.g. 0/2") from None
    if not 0 <= i < n:
        raise ValueError(f"--shard {text}: expected 0 <= I < N")
    return i, n


def without_workers(argv: list[str]) -> list[str]:
    """``argv`` without its --workers option (``--workers N`` or ``--workers=N``)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def worker_dirs(out: Path, n: int) -> list[Path]:
    return [out / "workers" / f"{i}of{n}" for i in range(n)]


def worker_command(argv: list[str], i: int, n: int, out: Path, threads: int) -> list[str]:
    """The command line of worker i: this run's arguments, then its shard, directory, threads
    (argparse keeps the last value of an option given twice)."""
    return [sys.executable, "-m", "magicpig", "eval", *without_workers(argv),
            "--shard", f"{i}/{n}", "--out", str(out), "--threads", str(threads), "--no-progress"]


def run_workers(argv: list[str], out: Path, n: int, threads: int | None) -> int:
    """Run the command of ``argv`` as ``n`` workers and merge their records into ``out``;
    returns 0, or 1 when a worker failed (what the others finished is merged all the same)."""
    from tqdm import tqdm

    threads = threads or max(1, (os.cpu_count() or 1) // n)
    dirs = worker_dirs(out, n)
    for d in dirs:  # resume from anything already in out (an earlier run, another split)
        d.mkdir(parents=True, exist_ok=True)
        if (out / PREDICTIONS).is_file():
            merge_records(d, [out])
    start = {d: _lines(d / PREDICTIONS) for d in dirs}
    procs = []
    for i, d in enumerate(dirs):
        log = open(d / "log.txt", "a", encoding="utf-8")
        procs.append((subprocess.Popen(worker_command(argv, i, n, d, threads), stdout=log,
                                       stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL), log, d))
    print(f"{n} workers of {threads} thread(s) each; logs in {out / 'workers'}", flush=True)
    bar = tqdm(desc="eval (answers of this run)", unit="answer", dynamic_ncols=True)
    try:
        while any(p.poll() is None for p, _, _ in procs):
            _show(bar, start)
            time.sleep(POLL_S)
    except KeyboardInterrupt:
        for p, _, _ in procs:
            p.terminate()
        for p, _, _ in procs:
            p.wait()
        raise
    finally:
        _show(bar, start)
        bar.close()
        for _, log, _ in procs:
            log.close()
        merge_records(out, [d for d in dirs if (d / PREDICTIONS).is_file()])
    failed = [(d, p.returncode) for p, _, d in procs if p.returncode != 0]
    for d, rc in failed:
        print(f"worker {d.name} failed (exit {rc}); its log: {d / 'log.txt'}", file=sys.stderr)
    return 1 if failed else 0


def _show(bar, start: dict[Path, int]) -> None:
    done = sum(_lines(d / PREDICTIONS) - lines for d, lines in start.items())
    bar.update(max(0, done - bar.n))


def _lines(path: Path) -> int:
    try:
        with open(path, "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return 0
