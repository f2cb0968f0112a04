"""Workloads, pure (stdlib + numpy; no torch, no HTTP): what the load generator sends and what
the simulator replays. Arrival processes (:func:`arrival_times`: vLLM's gamma process, Poisson
at burstiness 1), request lists (:class:`WorkItem`: vLLM's random dataset, JSONL traces), and
length distributions and traces of lengths (:class:`TraceItem`: the Nexus workloads of
DESIGN.md §7, lognormal lengths: mu = ln(mean) - sigma^2 / 2, so the unclipped mean is the
target; prompts clipped to [1, max_context - 1], outputs to [1, max_context - prompt]; the
sigmas are choices, not fits: long_data prompt 0.8 / output 0.6, arxiv 0.5 / 0.5, ShareGPT
1.0 / 1.0; ``mixed`` draws ShareGPT with probability 0.6, else long_data). Lengths and
arrivals use separate random streams, so the same seed gives the same requests at every rate.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from magicpig.config import check_float, check_int

Prompt = Union[str, list[int]]
CHARS_PER_TOKEN = 4.0  # a text prompt without "prompt_tokens": ~4 characters per token (English, BPE)
DEFAULT_MAX_CONTEXT = 131072  # Llama-3.1-8B's positions


# ----------------------------------------------------------------------------- arrivals
def arrival_times(n: int, request_rate: float, burstiness: float, seed: int) -> list[float]:
    """Send offsets in seconds from the start, as vLLM: the first request at 0, then gaps drawn
    from a gamma distribution of shape ``burstiness`` and scale ``1 / (request_rate *
    burstiness)`` (mean gap 1/rate; coefficient of variation 1/sqrt(burstiness); burstiness 1
    is a Poisson process). ``request_rate`` inf sends everything at 0."""
    n = check_int("n", n, 0)
    rate = _check_rate("request_rate", request_rate)
    burstiness = check_float("burstiness", burstiness, 0.0, math.inf, low_open=True, high_open=True)
    seed = check_int("seed", seed, 0)
    if n == 0:
        return []
    if math.isinf(rate):
        return [0.0] * n
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=burstiness, scale=1.0 / (rate * burstiness), size=n - 1)
    return [0.0] + np.cumsum(gaps).tolist()


def _check_rate(name: str, value: object) -> float:
    # check_float refuses infinities, and inf is this argument's "no pacing" value.
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value == math.inf:
        return math.inf
    return check_float(name, value, 0.0, math.inf, low_open=True, high_open=True)


def choose_arrivals(items: list[WorkItem], request_rate: float, burstiness: float, seed: int,
                    ignore_trace_arrivals: bool = False) -> tuple[list[float], str]:
    """The items' own ``arrival_s`` when every item has one (and they are not ignored), else
    :func:`arrival_times`; with a line saying which was used."""
    own = [item.arrival_s for item in items]
    if items and not ignore_trace_arrivals and all(a is not None for a in own):
        return [float(a) for a in own], "the trace's arrival_s"
    pacing = "all at once" if math.isinf(request_rate) else f"{request_rate:g} req/s, burstiness {burstiness:g}"
    note = " (some trace lines lack arrival_s)" if any(a is not None for a in own) and not ignore_trace_arrivals else ""
    return arrival_times(len(items), request_rate, burstiness, seed), pacing + note


# ----------------------------------------------------------------------------- requests to send
@dataclass
class WorkItem:
    """One request to send: the prompt (text, or token ids the server takes as they are), how
    many tokens to generate, optionally its own arrival time (seconds from the start) and, for
    a text prompt, its length in tokens when a trace states it (the simulator reads it)."""

    prompt: Prompt
    max_tokens: int
    arrival_s: Optional[float] = None
    prompt_tokens: Optional[int] = None


def random_workload(num_requests: int, input_len: int, output_len: int, range_ratio: float, seed: int,
                    vocab_low: int = 1000, vocab_high: int = 30000) -> list[WorkItem]:
    """vLLM's random dataset, as token ids (no tokenizer needed): input and output lengths drawn
    uniformly among the integers in ``[len * (1 - range_ratio), len * (1 + range_ratio)]`` (at
    least 1), prompt ids uniform in ``[vocab_low, vocab_high)``."""
    num_requests = check_int("num_requests", num_requests, 0)
    input_len = check_int("input_len", input_len, 1)
    output_len = check_int("output_len", output_len, 1)
    range_ratio = check_float("range_ratio", range_ratio, 0.0, 1.0, high_open=True)
    vocab_low = check_int("vocab_low", vocab_low, 0)
    vocab_high = check_int("vocab_high", vocab_high, vocab_low + 1)
    rng = np.random.default_rng(check_int("seed", seed, 0))
    in_lens = rng.integers(*_length_bounds(input_len, range_ratio), size=num_requests, endpoint=True)
    out_lens = rng.integers(*_length_bounds(output_len, range_ratio), size=num_requests, endpoint=True)
    return [WorkItem(prompt=rng.integers(vocab_low, vocab_high, size=int(n)).tolist(), max_tokens=int(m))
            for n, m in zip(in_lens, out_lens)]


def _length_bounds(length: int, ratio: float) -> tuple[int, int]:
    # Integers inside the real interval; the epsilon keeps 100 * 0.9 = 90.00000000000001 at 90.
    low = max(1, math.ceil(length * (1 - ratio) - 1e-9))
    high = max(low, math.floor(length * (1 + ratio) + 1e-9))
    return low, high


def load_work(path: Union[str, Path]) -> list[WorkItem]:
    """Requests from a JSONL file: one object a line with ``prompt`` (a non-empty string or
    list of token ids), ``max_tokens`` (int >= 1) and optionally ``arrival_s`` (seconds >= 0)
    and ``prompt_tokens`` (int >= 1, the length of a text prompt).
    Blank lines are skipped; other keys are ignored. A bad line raises ValueError naming the
    file, the line number and the field."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"trace {path}: cannot read it ({err})") from err
    items = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            items.append(_trace_item(line, f"trace {path}, line {lineno}"))
    if not items:
        raise ValueError(f"trace {path}: no requests in it")
    return items


def _trace_item(line: str, where: str) -> WorkItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from err
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    if "prompt" not in obj:
        raise ValueError(f"{where}: field 'prompt' is missing")
    prompt = obj["prompt"]
    ids_ok = isinstance(prompt, list) and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0
                                              for t in prompt)
    if not ((isinstance(prompt, str) or ids_ok) and prompt):
        raise ValueError(f"{where}: field 'prompt' must be a non-empty string or list of token ids "
                         f"(ints >= 0), got {short_repr(prompt)}")
    if "max_tokens" not in obj:
        raise ValueError(f"{where}: field 'max_tokens' is missing")
    max_tokens = obj["max_tokens"]
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"{where}: field 'max_tokens' must be an integer >= 1, got {short_repr(max_tokens)}")
    arrival = obj.get("arrival_s")
    if arrival is not None and (isinstance(arrival, bool) or not isinstance(arrival, (int, float))
                                or not math.isfinite(arrival) or arrival < 0):
        raise ValueError(f"{where}: field 'arrival_s' must be a number >= 0, got {short_repr(arrival)}")
    known = obj.get("prompt_tokens")
    if known is not None and (isinstance(known, bool) or not isinstance(known, int) or known < 1):
        raise ValueError(f"{where}: field 'prompt_tokens' must be an integer >= 1, got {short_repr(known)}")
    return WorkItem(prompt=prompt, max_tokens=max_tokens, arrival_s=None if arrival is None else float(arrival),
                    prompt_tokens=known)


def short_repr(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


# ----------------------------------------------------------------------------- lengths
@dataclass(frozen=True)
class LengthDist:
    """Lognormal prompt and output lengths (tokens): means and sigmas of the log."""

    prompt_mean: float
    prompt_sigma: float
    output_mean: float
    output_sigma: float


LONG_DATA = LengthDist(5905, 0.8, 180, 0.6)  # Long Data Collections (Nexus)
ARXIV = LengthDist(3832, 0.5, 200, 0.5)  # ArXiv summarization (Nexus)
SHAREGPT = LengthDist(496, 1.0, 97, 1.0)  # ShareGPT (Nexus's Mixed)
# workload -> ((probability, lengths), ...)
WORKLOADS: dict[str, tuple[tuple[float, LengthDist], ...]] = {
    "long_data": ((1.0, LONG_DATA),),
    "arxiv": ((1.0, ARXIV),),
    "mixed": ((0.6, SHAREGPT), (0.4, LONG_DATA)),
}


@dataclass(frozen=True)
class TraceItem:
    """One request of a trace: prompt and output lengths (tokens), arrival (seconds from the
    start; None when the trace has none and a rate paces it)."""

    prompt_tokens: int
    output_tokens: int
    arrival_s: Optional[float] = None


def _lognormal(rng: np.random.Generator, mean: float, sigma: float, n: int) -> np.ndarray:
    return rng.lognormal(math.log(mean) - sigma**2 / 2.0, sigma, size=n)


def draw_lengths(workload: str, n: int, seed: int = 0,
                 max_context: int = DEFAULT_MAX_CONTEXT) -> list[tuple[int, int]]:
    """``n`` (prompt, output) token lengths of ``workload`` (module docstring), seeded."""
    if workload not in WORKLOADS:
        raise ValueError(f"workload={workload!r}: expected one of {sorted(WORKLOADS)}")
    n, max_context = check_int("n", n, 0), check_int("max_context", max_context, 2)
    rng = np.random.default_rng([check_int("seed", seed, 0), 1])
    parts = WORKLOADS[workload]
    pick = rng.choice(len(parts), size=n, p=[p for p, _ in parts])
    out = []
    for k in pick:
        d = parts[int(k)][1]
        prompt = int(np.clip(np.rint(_lognormal(rng, d.prompt_mean, d.prompt_sigma, 1)[0]), 1, max_context - 1))
        output = int(np.clip(np.rint(_lognormal(rng, d.output_mean, d.output_sigma, 1)[0]), 1, max_context - prompt))
        out.append((prompt, output))
    return out


def synthetic_trace(workload: str, num_requests: int, request_rate: float, burstiness: float = 1.0,
                    seed: int = 0, max_context: int = DEFAULT_MAX_CONTEXT) -> list[TraceItem]:
    """``num_requests`` requests of ``workload`` arriving by a gamma process at
    ``request_rate`` requests/s (``burstiness`` its shape; 1 = Poisson)."""
    lengths = draw_lengths(workload, num_requests, seed, max_context)
    arrivals = arrival_times(len(lengths), request_rate, burstiness, seed)
    return [TraceItem(p, o, a) for (p, o), a in zip(lengths, arrivals)]


def load_trace(path: Union[str, Path], chars_per_token: float = CHARS_PER_TOKEN) -> list[TraceItem]:
    """A bench-serve JSONL trace (read and checked by :func:`load_work`)
    as lengths: ``prompt`` a token-id list (its length) or a string (its ``prompt_tokens``
    when given, else ceil(characters / ``chars_per_token``)); ``max_tokens`` the output length;
    ``arrival_s`` kept when present."""
    return [TraceItem(_prompt_length(w, chars_per_token), w.max_tokens, w.arrival_s) for w in load_work(path)]


def _prompt_length(item: Any, chars_per_token: float) -> int:
    if isinstance(item.prompt, list):
        return len(item.prompt)
    if item.prompt_tokens is not None:
        return item.prompt_tokens
    return max(1, math.ceil(len(item.prompt) / chars_per_token))


def paced(items: Sequence[TraceItem], request_rate: float, burstiness: float = 1.0, seed: int = 0,
          ignore_trace_arrivals: bool = False) -> list[TraceItem]:
    """The items with their own arrivals when all have one (and they are not ignored), else
    with gamma arrivals at ``request_rate`` requests/s."""
    if not ignore_trace_arrivals and all(it.arrival_s is not None for it in items):
        return list(items)
    arrivals = arrival_times(len(items), request_rate, burstiness, seed)
    return [TraceItem(it.prompt_tokens, it.output_tokens, a) for it, a in zip(items, arrivals)]
