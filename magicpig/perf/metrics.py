"""Serving metrics, once, in vLLM's vocabulary (DESIGN.md §7): used by the HTTP load generator
(``magicpig bench serve``), the simulator and the simulator check alike. Pure Python + numpy.

Per request (seconds): TTFT = first token - start; TPOT = (E2EL - TTFT) / (output tokens - 1)
(none for fewer than two tokens); ITL = the gaps between its consecutive token (chunk) times,
pooled over requests; E2EL = end - start. Each latency is reported in milliseconds as
``{stat}_{name}_ms`` for stat in :data:`STATS` (None without a sample). Goodput: requests per
second that meet every SLO given (limits in ms on any of ttft / tpot / e2el; as vLLM, a request
of one output token has TPOT 0 for this test).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Protocol, Sequence

import numpy as np

from magicpig.config import check_float

LATENCY_METRICS = ("ttft", "tpot", "itl", "e2el")
GOODPUT_METRICS = ("ttft", "tpot", "e2el")
STATS = ("mean", "median", "std", "p95", "p99")


class Timed(Protocol):
    """What the metrics read of a request (seconds; None where it has no such time)."""

    output_tokens: int

    @property
    def ttft_s(self) -> Optional[float]: ...

    @property
    def tpot_s(self) -> Optional[float]: ...

    @property
    def itls_s(self) -> list[float]: ...

    @property
    def e2el_s(self) -> Optional[float]: ...


@dataclass
class RequestTimes:
    """A request known by its start and the time of each of its tokens (the simulator's, the
    engine's): its end is its last token."""

    start_s: float
    token_times_s: list[float] = field(default_factory=list)
    prompt_tokens: int = 0

    @property
    def output_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def ttft_s(self) -> Optional[float]:
        return self.token_times_s[0] - self.start_s if self.token_times_s else None

    @property
    def e2el_s(self) -> Optional[float]:
        return self.token_times_s[-1] - self.start_s if self.token_times_s else None

    @property
    def itls_s(self) -> list[float]:
        t = self.token_times_s
        return [b - a for a, b in zip(t, t[1:])]

    @property
    def tpot_s(self) -> Optional[float]:
        return tpot(self.ttft_s, self.e2el_s, self.output_tokens)


def tpot(ttft_s: Optional[float], e2el_s: Optional[float], output_tokens: int) -> Optional[float]:
    """vLLM's time per output token after the first; None for fewer than two tokens."""
    if output_tokens <= 1 or ttft_s is None or e2el_s is None:
        return None
    return (e2el_s - ttft_s) / (output_tokens - 1)


def latency_samples(requests: Sequence[Timed]) -> dict[str, list[float]]:
    """Seconds per latency metric over ``requests`` (ITL pooled)."""
    return {
        "ttft": [r.ttft_s for r in requests if r.ttft_s is not None],
        "tpot": [r.tpot_s for r in requests if r.tpot_s is not None],
        "itl": [gap for r in requests for gap in r.itls_s],
        "e2el": [r.e2el_s for r in requests if r.e2el_s is not None],
    }


def stats_ms(name: str, values_s: Sequence[float]) -> dict[str, Optional[float]]:
    """``{stat}_{name}_ms`` for each of :data:`STATS` (None without a sample)."""
    keys = [f"{stat}_{name}_ms" for stat in STATS]
    if not len(values_s):
        return dict.fromkeys(keys)
    ms = np.asarray(values_s, dtype=np.float64) * 1000.0
    values = (np.mean(ms), np.median(ms), np.std(ms), np.percentile(ms, 95), np.percentile(ms, 99))
    return {key: float(v) for key, v in zip(keys, values)}


def latency_stats(requests: Sequence[Timed]) -> dict[str, Optional[float]]:
    """Every latency statistic of ``requests``, in ms."""
    out: dict[str, Optional[float]] = {}
    for name, values in latency_samples(requests).items():
        out.update(stats_ms(name, values))
    return out


def check_slos(slos: Optional[dict[str, float]]) -> Optional[dict[str, float]]:
    """SLO limits in ms on any of :data:`GOODPUT_METRICS`, checked (ValueError naming the key)."""
    if slos is None:
        return None
    checked = {}
    for key, limit in slos.items():
        if key not in GOODPUT_METRICS:
            raise ValueError(f"goodput_slos: unknown metric {key!r}; expected some of {list(GOODPUT_METRICS)}")
        checked[key] = check_float(f"goodput_slos[{key!r}]", limit, 0.0, math.inf, high_open=True)
    return checked


def is_good(request: Timed, slos_ms: dict[str, float]) -> bool:
    """The request meets every SLO (a one-token request has TPOT 0)."""
    tpot_s = request.tpot_s if request.output_tokens > 1 else 0.0
    measured = {"ttft": request.ttft_s, "tpot": tpot_s, "e2el": request.e2el_s}
    return all(measured[k] is not None and measured[k] * 1000.0 <= limit for k, limit in slos_ms.items())


def serving_metrics(done: Sequence[Timed], duration_s: float, slos_ms: Optional[dict[str, float]] = None,
                    prompt_tokens: Optional[Sequence[int]] = None) -> dict[str, Any]:
    """The run's metrics over its completed requests: counts, throughputs per second of
    ``duration_s`` (0 when it is 0), goodput against ``slos_ms`` (None without SLOs), and
    every latency statistic."""
    total_in = sum(prompt_tokens or ())
    total_out = sum(r.output_tokens for r in done)
    per_s = (lambda x: x / duration_s) if duration_s > 0 else (lambda x: 0.0)
    good = None if slos_ms is None else sum(is_good(r, slos_ms) for r in done)
    metrics: dict[str, Any] = {
        "completed": len(done), "duration_s": duration_s,
        "total_input_tokens": total_in, "total_output_tokens": total_out,
        "request_throughput": per_s(len(done)), "output_throughput": per_s(total_out),
        "total_token_throughput": per_s(total_in + total_out),
        "goodput_slos_ms": slos_ms, "good_requests": good, "request_goodput": None if good is None else per_s(good),
        "good_fraction": None if good is None else (good / len(done) if done else 0.0),
    }
    metrics.update(latency_stats(done))
    return metrics
