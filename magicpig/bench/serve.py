"""``magicpig bench serve``: a load generator for an OpenAI-compatible completions server.

It measures a server the way vLLM's ``benchmarks/benchmark_serving.py`` does: requests are sent
at arrival times drawn from a gamma process (Poisson when burstiness is 1), optionally capped
at a number in flight, each streamed over server-sent events and timed on the client with
``time.perf_counter``. The metrics keep vLLM's definitions and names:

* TTFT: first chunk with non-empty text - request start;
* E2EL: end of the stream (``[DONE]``) - request start;
* TPOT: (E2EL - TTFT) / (output tokens - 1), for requests with more than one output token;
* ITL: the gaps between consecutive non-empty chunks, pooled over all requests;

each as mean / median / std / p95 / p99 in milliseconds over the successful requests, plus
throughputs and goodput (requests meeting every given latency limit, per second).

Layering: this module talks HTTP only (stdlib, httpx, :mod:`magicpig.perf.metrics`, :mod:`magicpig.perf.workloads`). RULER
prompts need the tokenizer and the eval package, so the CLI builds them and passes them in
(``main(ruler_source=...)``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import httpx

from magicpig.config import check_float, check_int
from magicpig.core.argtypes import NONNEGATIVE_INT, POSITIVE_FLOAT, POSITIVE_INT, OneLineParser, argtype
from magicpig.perf.metrics import GOODPUT_METRICS, LATENCY_METRICS, check_slos, serving_metrics, tpot
from magicpig.perf.workloads import (  # noqa: F401 - the workload vocabulary this CLI speaks
    Prompt, WorkItem, arrival_times, choose_arrivals, load_work, random_workload, short_repr,
)


DEFAULT_BASE_URL = "http://127.0.0.1:8000"
DEFAULT_TIMEOUT_S = 600.0
DEFAULT_NUM_PROMPTS = 8
MAX_ERRORS_REPORTED = 5


@dataclass
class RequestRecord:
    """What the client saw of one request. Times are ``time.perf_counter()`` values.

    ``first_chunk_s``: the first chunk with choices (its text may be empty);
    ``token_times_s``: the arrival of every chunk with non-empty text; ``end_s``: when
    ``[DONE]`` came (or the stream stopped). ``output_tokens`` comes from the usage chunk when
    ``usage_seen``, else it is the number of non-empty chunks (a fallback: a chunk may hold
    several tokens). ``status``: the HTTP status (None when no response came).
    """

    success: bool = False
    start_s: float = 0.0
    end_s: Optional[float] = None
    first_chunk_s: Optional[float] = None
    token_times_s: list[float] = field(default_factory=list)
    output_tokens: int = 0
    prompt_tokens: Optional[int] = None
    usage_seen: bool = False
    saw_done: bool = False
    status: Optional[int] = None
    error: str = ""
    generated_text: str = ""

    @property
    def ttft_s(self) -> Optional[float]:
        """Time to the first non-empty chunk; to the first chunk when every text was empty."""
        first = self.token_times_s[0] if self.token_times_s else self.first_chunk_s
        return None if first is None else first - self.start_s

    @property
    def e2el_s(self) -> Optional[float]:
        return None if self.end_s is None else self.end_s - self.start_s

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in zip(self.token_times_s, self.token_times_s[1:])]

    @property
    def tpot_s(self) -> Optional[float]:
        """vLLM's time per output token after the first; None for fewer than two tokens."""
        return tpot(self.ttft_s, self.e2el_s, self.output_tokens)


# ----------------------------------------------------------------------------- workloads


# ----------------------------------------------------------------------------- arrivals


# ----------------------------------------------------------------------------- the stream


@dataclass(frozen=True)
class StreamEvent:
    """One ``data:`` payload of a completion stream. ``text`` is None when the chunk has no
    choices (the usage chunk); ``error`` is set when the server sent an error object."""

    done: bool = False
    text: Optional[str] = None
    finish_reason: Optional[str] = None
    usage: Optional[dict[str, Any]] = None
    error: Optional[str] = None


def parse_sse_line(line: str) -> Optional[StreamEvent]:
    """The event one line of a server-sent-event stream carries: None for blank separators,
    comments (``:...``) and other fields (``event:``, ``id:``). Each ``data:`` line is taken as
    a whole payload, as OpenAI-compatible servers send them. ValueError when it is not JSON."""
    line = line.strip()
    if not line or line.startswith(":"):
        return None
    name, _, value = line.partition(":")
    if name != "data":
        return None
    value = value.strip()
    if value == "[DONE]":
        return StreamEvent(done=True)
    try:
        obj = json.loads(value)
    except json.JSONDecodeError as err:
        raise ValueError(f"stream data is not JSON: {short_repr(value)}") from err
    return event_from_chunk(obj)


def parse_sse_lines(lines: Iterable[str]) -> list[StreamEvent]:
    """The events of a whole captured stream (see :func:`parse_sse_line`)."""
    return [event for event in map(parse_sse_line, lines) if event is not None]


def event_from_chunk(obj: Any) -> StreamEvent:
    """A parsed chunk as an event; ValueError when its shape is not a completion chunk."""
    if not isinstance(obj, dict):
        raise ValueError(f"stream chunk is not a JSON object: {short_repr(obj)}")
    if obj.get("error") is not None:  # vLLM-style servers report a mid-stream failure so
        return StreamEvent(error=format_error(obj["error"]))
    usage = obj.get("usage")
    if usage is not None and not isinstance(usage, dict):
        raise ValueError(f"stream chunk has a bad usage: {short_repr(usage)}")
    choices = obj.get("choices") or []
    if not isinstance(choices, list) or (choices and not isinstance(choices[0], dict)):
        raise ValueError(f"stream chunk has bad choices: {short_repr(choices)}")
    if not choices:
        return StreamEvent(usage=usage)
    text = choices[0].get("text") or ""  # null text reads as empty, like vLLM's client
    if not isinstance(text, str):
        raise ValueError(f"stream chunk has a non-string text: {short_repr(text)}")
    return StreamEvent(text=text, finish_reason=choices[0].get("finish_reason"), usage=usage)


def format_error(error: Any) -> str:
    """``type (code): message`` of an OpenAI error object (or its repr when it is not one)."""
    if not isinstance(error, dict):
        return short_repr(error)
    kind, code = error.get("type"), error.get("code")
    label = " ".join(str(x) for x in (kind, f"({code})" if code is not None else None) if x is not None)
    message = str(error.get("message", "")) or short_repr(error)
    return f"{label}: {message}" if label else message


def parse_error_body(status: int, body: Union[bytes, str]) -> str:
    """The message of a non-200 response: ``HTTP status: type (code): message`` from an
    OpenAI error body, else the start of the body."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        obj = None
    if isinstance(obj, dict) and "error" in obj:
        return f"HTTP {status}: {format_error(obj['error'])}"
    snippet = " ".join(text.split())[:200]
    return f"HTTP {status}: {snippet}" if snippet else f"HTTP {status}"


def consume_line(record: RequestRecord, line: str, now: float) -> bool:
    """Fold one stream line received at ``now`` into ``record``; True when reading should stop
    because the stream failed (a bad chunk or an error event)."""
    try:
        event = parse_sse_line(line)
    except ValueError as err:
        record.error = str(err)
        return True
    if event is None:
        return False
    if event.error is not None:
        record.error = f"stream error: {event.error}"
        return True
    if event.done:
        record.saw_done, record.end_s = True, now
    if event.text is not None:
        record.first_chunk_s = now if record.first_chunk_s is None else record.first_chunk_s
        if event.text:
            record.token_times_s.append(now)
            record.generated_text += event.text
    if event.usage is not None:
        record.usage_seen = _take_usage(record, event.usage) or record.usage_seen
    return False


def _take_usage(record: RequestRecord, usage: dict[str, Any]) -> bool:
    completion, prompt = usage.get("completion_tokens"), usage.get("prompt_tokens")
    if isinstance(prompt, int) and not isinstance(prompt, bool):
        record.prompt_tokens = prompt
    if isinstance(completion, int) and not isinstance(completion, bool):
        record.output_tokens = completion
        return True
    return False


def finish_record(record: RequestRecord, prompt: Prompt, now: float) -> RequestRecord:
    """Settle a record after its stream closed at ``now``: end time, success, token counts."""
    if record.end_s is None:
        record.end_s = now
    if not record.error and record.status == 200:
        if record.first_chunk_s is None:
            record.error = "the stream held no completion chunk"
        elif not record.saw_done:
            record.error = "the stream ended without [DONE]"
    record.success = not record.error and record.status == 200
    if not record.usage_seen:
        record.output_tokens = len(record.token_times_s)
    if record.prompt_tokens is None and isinstance(prompt, list):
        record.prompt_tokens = len(prompt)
    return record


def record_from_stream(timed_lines: Iterable[tuple[float, str]], prompt: Prompt, start_s: float = 0.0,
                       status: int = 200) -> RequestRecord:
    """The record of a captured stream: ``(time, line)`` pairs read as :func:`send_request`
    reads a live one. For tests and for replaying saved streams."""
    record = RequestRecord(start_s=start_s, status=status)
    now = start_s
    for now, line in timed_lines:
        if consume_line(record, line, now):
            break
    return finish_record(record, prompt, now)


# ----------------------------------------------------------------------------- the client


def request_body(model: str, item: WorkItem) -> dict[str, Any]:
    """The JSON body of one streamed, greedy completion request."""
    return {"model": model, "prompt": item.prompt, "max_tokens": item.max_tokens, "temperature": 0.0,
            "stream": True, "stream_options": {"include_usage": True}}


def _headers(api_key: Optional[str]) -> dict[str, str]:
    return {"Authorization": f"Bearer {api_key}"} if api_key else {}


async def send_request(client: httpx.AsyncClient, base_url: str, model: str, item: WorkItem,
                       api_key: Optional[str] = None) -> RequestRecord:
    """Send one streamed completion and time it. Never raises for a failed request: a non-200
    status, a transport error, a timeout or a malformed stream end in ``success=False`` with
    ``error`` saying why."""
    url = f"{base_url.rstrip('/')}/v1/completions"
    record = RequestRecord(start_s=time.perf_counter())
    try:
        async with client.stream("POST", url, json=request_body(model, item), headers=_headers(api_key)) as resp:
            record.status = resp.status_code
            if resp.status_code != 200:
                record.error = parse_error_body(resp.status_code, await resp.aread())
            else:
                async for line in resp.aiter_lines():
                    if consume_line(record, line, time.perf_counter()):
                        break
    except (httpx.HTTPError, OSError) as err:  # connection refused, reset, timeouts, bad framing
        record.error = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return finish_record(record, item.prompt, time.perf_counter())


async def run_benchmark(base_url: str, model: str, items: list[WorkItem], arrivals: list[float],
                        api_key: Optional[str] = None, max_concurrency: Optional[int] = None,
                        timeout_s: float = DEFAULT_TIMEOUT_S) -> tuple[list[RequestRecord], float]:
    """Send every item at its arrival offset (seconds from the start) through one shared
    client; at most ``max_concurrency`` in flight when given (a request past its arrival waits
    for a slot, and its timing starts when it is sent, as in vLLM). ``timeout_s`` bounds each
    connect / read / write, not a whole request. Returns the records in submission order and
    the wall time from the start to the last request's end."""
    if len(arrivals) != len(items):
        raise ValueError(f"arrivals: {len(arrivals)} offsets for {len(items)} items")
    if max_concurrency is not None:
        max_concurrency = check_int("max_concurrency", max_concurrency, 1)
    timeout_s = check_float("timeout_s", timeout_s, 0.0, math.inf, low_open=True, high_open=True)
    slots = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    # Enough connections that the pool never queues a request the semaphore let through.
    width = max(1, max_concurrency or len(items))
    limits = httpx.Limits(max_connections=width, max_keepalive_connections=width)
    async with httpx.AsyncClient(limits=limits, timeout=httpx.Timeout(timeout_s, pool=None)) as client:
        start = time.perf_counter()

        async def one(item: WorkItem, offset: float) -> RequestRecord:
            delay = start + offset - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            if slots is None:
                return await send_request(client, base_url, model, item, api_key)
            async with slots:
                return await send_request(client, base_url, model, item, api_key)

        records = await asyncio.gather(*(one(item, offset) for item, offset in zip(items, arrivals)))
        return list(records), time.perf_counter() - start


def fetch_model_id(base_url: str, api_key: Optional[str] = None, timeout_s: float = 30.0) -> str:
    """The first model id ``GET /v1/models`` lists; ValueError naming --base-url when the
    server cannot be asked or lists none."""
    url = f"{base_url.rstrip('/')}/v1/models"
    try:
        resp = httpx.get(url, headers=_headers(api_key), timeout=timeout_s)
    except httpx.HTTPError as err:
        raise ValueError(f"--base-url {base_url}: GET /v1/models failed ({type(err).__name__}: {err}); "
                         "is the server running?") from err
    if resp.status_code != 200:
        raise ValueError(f"--base-url {base_url}: GET /v1/models: {parse_error_body(resp.status_code, resp.content)}")
    try:
        return str(resp.json()["data"][0]["id"])
    except (ValueError, KeyError, IndexError, TypeError) as err:
        raise ValueError(f"--base-url {base_url}: GET /v1/models listed no model id; pass --model") from err


# ----------------------------------------------------------------------------- metrics


def compute_metrics(records: list[RequestRecord], duration_s: float,
                    goodput_slos: Optional[dict[str, float]] = None) -> dict[str, Any]:
    """vLLM's serving metrics of a run (:func:`magicpig.perf.metrics.serving_metrics` over the
    successful requests; latencies in ms, a statistic with no sample None), with what only a
    client sees: failures, responses without a usage chunk, the first distinct errors.
    ``goodput_slos``: limits in ms for any of ttft / tpot / e2el."""
    duration_s = check_float("duration_s", duration_s, 0.0, math.inf, low_open=True, high_open=True)
    slos = check_slos(goodput_slos)
    done = [r for r in records if r.success]
    metrics = serving_metrics(done, duration_s, slos, [r.prompt_tokens or 0 for r in done])
    metrics.update({"failed": len(records) - len(done), "usage_missing": sum(not r.usage_seen for r in done),
                    "errors": _first_errors(records)})
    return metrics


def _first_errors(records: list[RequestRecord]) -> list[str]:
    # Distinct messages, so one repeated failure does not hide a second kind.
    seen: list[str] = []
    for record in records:
        if not record.success and record.error and record.error not in seen:
            seen.append(record.error)
            if len(seen) == MAX_ERRORS_REPORTED:
                break
    return seen


def parse_goodput(specs: list[str]) -> dict[str, float]:
    """``["ttft:500", "e2el:3000"]`` as ``{"ttft": 500.0, "e2el": 3000.0}`` (limits in ms);
    ValueError naming the spec that is not ``KEY:MS`` with KEY one of ttft / tpot / e2el and MS
    a number >= 0, or a KEY given twice."""
    slos: dict[str, float] = {}
    for spec in specs:
        key, sep, value = spec.partition(":")
        if not sep or key not in GOODPUT_METRICS:
            raise ValueError(f"--goodput {spec!r}: expected KEY:MS with KEY one of {', '.join(GOODPUT_METRICS)}")
        if key in slos:
            raise ValueError(f"--goodput {spec!r}: {key} given twice")
        try:
            limit = float(value)
        except ValueError:
            limit = math.nan
        if not (math.isfinite(limit) and limit >= 0):
            raise ValueError(f"--goodput {spec!r}: MS must be a number of milliseconds >= 0")
        slos[key] = limit
    return slos


# ----------------------------------------------------------------------------- the report


def format_summary(metrics: dict[str, Any]) -> str:
    """vLLM's result table of ``metrics`` (from :func:`compute_metrics`)."""
    lines = ["{:=^50}".format(" Serving Benchmark Result ")]

    def row(label: str, value: Any, fmt: str = ".2f") -> None:
        shown = "n/a" if value is None else format(value, fmt)
        lines.append(f"{label:<40} {shown:<10}")

    row("Successful requests:", metrics["completed"], "d")
    row("Failed requests:", metrics["failed"], "d")
    row("Benchmark duration (s):", metrics["duration_s"])
    row("Total input tokens:", metrics["total_input_tokens"], "d")
    row("Total generated tokens:", metrics["total_output_tokens"], "d")
    row("Request throughput (req/s):", metrics["request_throughput"])
    if metrics.get("request_goodput") is not None:
        row("Request goodput (req/s):", metrics["request_goodput"])
    row("Output token throughput (tok/s):", metrics["output_throughput"])
    row("Total Token throughput (tok/s):", metrics["total_token_throughput"])
    titles = {"ttft": "Time to First Token", "tpot": "Time per Output Token (excl. 1st token)",
              "itl": "Inter-token Latency", "e2el": "End-to-end Latency"}
    for name in LATENCY_METRICS:
        lines.append("{:-^50}".format(titles[name]))
        for stat, label in (("mean", "Mean"), ("median", "Median"), ("p99", "P99")):
            row(f"{label} {name.upper()} (ms):", metrics[f"{stat}_{name}_ms"])
    lines.append("=" * 50)
    if metrics.get("usage_missing"):
        lines.append(f"note: {metrics['usage_missing']} responses had no usage chunk; their output "
                     "tokens were counted as non-empty chunks")
    lines += [f"error: {message}" for message in metrics.get("errors", [])]
    return "\n".join(lines)


def _jsonable(value: Any) -> Any:
    # JSON has no Infinity/NaN (json.dumps would write invalid JSON): such floats become strings.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def result_json(metrics: dict[str, Any], args: argparse.Namespace, model: str, arrivals_source: str,
                records: list[RequestRecord]) -> dict[str, Any]:
    """What ``--json`` writes: every metric, the arguments, and a line per request."""
    per_request = [{"success": r.success, "status": r.status, "prompt_tokens": r.prompt_tokens,
                    "output_tokens": r.output_tokens, "usage_seen": r.usage_seen,
                    "ttft_ms": _ms(r.ttft_s), "tpot_ms": _ms(r.tpot_s), "e2el_ms": _ms(r.e2el_s),
                    "error": r.error} for r in records]
    arguments = {k: v for k, v in vars(args).items() if k not in ("api_key",)}  # never store a secret
    result = {"date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": model, "arrivals": arrivals_source,
              "args": arguments, **metrics, "per_request": per_request}
    return _jsonable(result)


def _ms(seconds: Optional[float]) -> Optional[float]:
    return None if seconds is None else seconds * 1000.0


# ----------------------------------------------------------------------------- the command


_POS_INT, _NONNEG_INT, _POS_FLOAT = POSITIVE_INT, NONNEGATIVE_INT, POSITIVE_FLOAT
_RATE = argtype(float, lambda v: v > 0 and not math.isnan(v), "a number > 0 (requests/s) or inf")
_RATIO = argtype(float, lambda v: 0 <= v < 1, "a number in [0, 1)")


def build_parser(prog: str = "magicpig bench serve") -> argparse.ArgumentParser:
    """The options of ``magicpig bench serve`` (vLLM's benchmark_serving names where they exist)."""
    p = OneLineParser(prog=prog, description="Measure an OpenAI-compatible completions server "
                       "(TTFT, TPOT, ITL, E2E latency, throughput, goodput) as vLLM's benchmark_serving does.")
    p.add_argument("--base-url", default=DEFAULT_BASE_URL, help="server root; requests go to BASE/v1/completions")
    p.add_argument("--model", help="model name to send (default: the first id GET /v1/models lists)")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--dataset", choices=("random", "ruler", "trace"), default="random")
    p.add_argument("--num-prompts", type=_POS_INT, help=f"requests to send (default {DEFAULT_NUM_PROMPTS}; "
                   "trace: every line)")
    p.add_argument("--random-input-len", type=_POS_INT, default=1024, help="prompt tokens (random dataset)")
    p.add_argument("--random-output-len", type=_POS_INT, default=128, help="max_tokens (random dataset)")
    p.add_argument("--random-range-ratio", type=_RATIO, default=0.0,
                   help="lengths uniform in [len*(1-r), len*(1+r)]")
    p.add_argument("--ruler-task", default="niah_single_1", help="RULER task (ruler dataset)")
    p.add_argument("--ruler-length", type=_POS_INT, default=4096, help="RULER length in tokens: prompt + the task's tokens to generate")
    p.add_argument("--trace", metavar="PATH", help="JSONL of {prompt, max_tokens[, arrival_s]} (trace dataset)")
    p.add_argument("--ignore-trace-arrivals", action="store_true",
                   help="pace a trace by --request-rate even when its lines have arrival_s")
    p.add_argument("--request-rate", type=_RATE, default=math.inf, help="requests/s (default inf: all at once)")
    p.add_argument("--burstiness", type=_POS_FLOAT, default=1.0,
                   help="gamma shape of the gaps: 1 = Poisson, <1 burstier, >1 more regular")
    p.add_argument("--max-concurrency", type=_POS_INT, help="most requests in flight (default: no cap)")
    p.add_argument("--seed", type=_NONNEG_INT, default=0)
    p.add_argument("--goodput", nargs="+", metavar="KEY:MS",
                   help="latency limits in ms for goodput, any of ttft:MS tpot:MS e2el:MS")
    p.add_argument("--json", metavar="PATH", help="write every metric and the arguments here")
    p.add_argument("--timeout", type=_POS_FLOAT, default=DEFAULT_TIMEOUT_S,
                   help="seconds allowed for each connect / read / write (default %(default)s)")
    return p


def _check_args(args: argparse.Namespace) -> None:
    # The cross-option checks, before any request: a mistake shows in a second, not after the run.
    if not args.base_url.startswith(("http://", "https://")):
        raise ValueError(f"--base-url {args.base_url!r}: expected an http:// or https:// URL")
    # Contract paths are BASE/v1/...; a base that already ends in /v1 is the same server.
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    if args.dataset == "trace" and not args.trace:
        raise ValueError("--dataset trace needs --trace PATH")
    if args.trace and args.dataset != "trace":
        raise ValueError(f"--trace is only read with --dataset trace (got --dataset {args.dataset})")
    if args.json:
        parent = Path(args.json).resolve().parent
        if not parent.is_dir():
            raise ValueError(f"--json {args.json}: folder {parent} does not exist")


RulerSource = Callable[[argparse.Namespace], list[WorkItem]]


def load_items(args: argparse.Namespace, ruler_source: Optional[RulerSource] = None) -> list[WorkItem]:
    """The work of ``args.dataset``; ``args.num_prompts`` None means the default (a trace: all)."""
    count = args.num_prompts
    if args.dataset == "trace":
        items = load_work(args.trace)
        return items if count is None else items[:count]
    if count is None:
        args.num_prompts = count = DEFAULT_NUM_PROMPTS
    if args.dataset == "random":
        return random_workload(count, args.random_input_len, args.random_output_len,
                               args.random_range_ratio, args.seed)
    if ruler_source is None:
        raise ValueError("--dataset ruler needs the RULER prompt builder, which only the `magicpig bench serve` "
                         "command passes in; use --dataset random or trace here")
    items = list(ruler_source(args))
    if not items or not all(isinstance(item, WorkItem) for item in items):
        raise ValueError(f"--dataset ruler: the prompt builder gave no usable requests for task {args.ruler_task!r}")
    return items


def main(argv: Optional[list[str]] = None, ruler_source: Optional[RulerSource] = None) -> int:
    """Entry point of ``magicpig bench serve``: 0 when at least one request succeeded, else 1.
    Argument mistakes raise ValueError naming the option (or exit 2 from argparse)."""
    args = build_parser().parse_args(argv)
    _check_args(args)
    slos = parse_goodput(args.goodput) if args.goodput else None
    items = load_items(args, ruler_source)
    arrivals, source = choose_arrivals(items, args.request_rate, args.burstiness, args.seed,
                                       args.ignore_trace_arrivals)
    model = args.model or fetch_model_id(args.base_url, args.api_key, min(args.timeout, 30.0))
    cap = args.max_concurrency or "none"
    print(f"Sending {len(items)} requests to {args.base_url} (model {model}; arrivals: {source}; "
          f"max concurrency: {cap})", flush=True)
    records, duration = asyncio.run(run_benchmark(args.base_url, model, items, arrivals, args.api_key,
                                                  args.max_concurrency, args.timeout))
    metrics = compute_metrics(records, duration, slos)
    print(format_summary(metrics))
    if args.json:
        result = result_json(metrics, args, model, source, records)
        Path(args.json).write_text(json.dumps(result, indent=2, allow_nan=False) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")
    return 0 if metrics["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
