"""Answer-by-answer comparison of methods against a reference method (usually dense).

Two methods scored on the same prompts differ by a few answers each way; whether a difference
of averages is more than the draw is what the paired counts and the sign test say. Every
method decodes from the same prefill of the same prompt, so answers pair up by (benchmark,
task, length, index).
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any, Sequence


def sign_test_p(up: int, down: int) -> float:
    """Two-sided exact sign test: the probability, if up and down were equally likely, of a
    split at least as uneven as (up, down). 1.0 when there is nothing to split."""
    for name, v in (("up", up), ("down", down)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ValueError(f"{name}={v!r}: expected a count >= 0")
    n = up + down
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(up, down) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def paired_counts(records: Sequence[dict[str, Any]], reference: str) -> list[dict[str, Any]]:
    """Per (benchmark, length, method other than ``reference``): over the prompts both answered,
    ``pairs``, ``identical`` (the same text), ``up`` / ``down`` (a higher / lower score than the
    reference's) and ``p``, the sign test of up against down."""
    ref = {_prompt(r): r for r in records if r["method"] == reference}
    counts: dict[tuple, dict[str, Any]] = defaultdict(lambda: {"pairs": 0, "identical": 0, "up": 0, "down": 0})
    for r in records:
        other = ref.get(_prompt(r))
        if r["method"] == reference or other is None:
            continue
        c = counts[(r["benchmark"], r["length"], r["method"])]
        c["pairs"] += 1
        text = r.get("prediction")
        c["identical"] += text is not None and text == other.get("prediction")
        c["up"] += r["score"] > other["score"]
        c["down"] += r["score"] < other["score"]
    return [{"benchmark": b, "length": n, "method": m, **c, "p": sign_test_p(c["up"], c["down"])}
            for (b, n, m), c in counts.items()]


def paired_markdown(records: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    """One table per (benchmark, length): each of ``methods[1:]`` answer by answer against
    ``methods[0]``. Empty when there is no reference or nothing pairs."""
    if not methods:
        return ""
    reference = methods[0]
    rows = paired_counts(records, reference)
    parts = []
    for bench, length in sorted({(r["benchmark"], r["length"]) for r in rows}, key=lambda x: (x[0], x[1])):
        cell = {r["method"]: r for r in rows if r["benchmark"] == bench and r["length"] == length}
        lines = [f"### {bench} @ {length} tokens, answer by answer against {reference}", "",
                 "| method | answers | identical text | score up | score down | sign test p |",
                 "|---|---:|---:|---:|---:|---:|"]
        for m in [m for m in methods[1:] if m in cell] + sorted(set(cell) - set(methods)):
            c = cell[m]
            lines.append(f"| {m} | {c['pairs']} | {c['identical']} | {c['up']} | {c['down']} | {c['p']:.2f} |")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n" if parts else ""


def _prompt(record: dict[str, Any]) -> tuple:
    return (record["benchmark"], record["task"], record["length"], record["index"])
