"""Prometheus metrics of the server (prometheus_client), one registry per server.

Latencies are measured where the HTTP layer sees them: from the moment a request's body was
parsed to its first output (TTFT), between consecutive outputs that carry tokens (inter-token
latency), and to its last output (end-to-end). Gauges of the engine's state are read from the
snapshot the engine thread publishes, at scrape time.
"""

from __future__ import annotations

from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from magicpig.serve.async_engine import EngineSnapshot
from magicpig.engine.engine import RequestOutput

# Long prompts on a CPU take minutes to prefill; the buckets reach that far.
_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)
_ITL_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)

CONTENT_TYPE = CONTENT_TYPE_LATEST


class _SnapshotCounter:
    """A counter whose value is read from the engine's snapshot at scrape time."""

    def __init__(self, name: str, doc: str, read: Callable[[], int], registry: CollectorRegistry):
        self.name, self.doc, self.read = name, doc, read
        registry.register(self)

    def collect(self):
        family = CounterMetricFamily(self.name, self.doc)
        family.add_metric([], float(self.read()))
        yield family

    def describe(self):
        return [CounterMetricFamily(self.name, self.doc)]


class ServerMetrics:
    """The server's metrics; ``snapshot`` returns the engine's latest state."""

    def __init__(self, snapshot: Callable[[], EngineSnapshot]):
        self.registry = r = CollectorRegistry()
        gauge = lambda name, doc, field: Gauge(name, doc, registry=r).set_function(  # noqa: E731
            lambda: getattr(snapshot(), field))
        gauge("magicpig_requests_running", "Requests in the decode batch (prefilled, not finished).", "running")
        gauge("magicpig_requests_waiting", "Requests queued for admission.", "waiting")
        gauge("magicpig_device_kv_blocks_in_use", "Dense-layer KV blocks held on the device.", "blocks_in_use")
        gauge("magicpig_cpu_store_bytes", "Bytes the CPU stores hold (running requests and cached prefixes, "
              "shared blocks once).", "cpu_store_bytes")
        gauge("magicpig_prefix_cache_device_bytes", "Device bytes of the dense-layer blocks the prefix cache holds.",
              "prefix_cache_device_bytes")
        gauge("magicpig_prefix_cache_cpu_bytes", "CPU-store bytes of the cached prefixes' own tokens.",
              "prefix_cache_cpu_bytes")
        # Counters the engine keeps (since start), exposed as counters: prometheus_client's
        # custom-collector form would do the same; a counter set from a snapshot cannot be.
        counter = lambda name, doc, field: _SnapshotCounter(name, doc, lambda: getattr(snapshot(), field), r)  # noqa: E731
        counter("magicpig_prefix_cache_queries", "Prompt tokens looked up in the prefix cache (vLLM's "
                "prefix_cache_queries).", "prefix_cache_queries")
        counter("magicpig_prefix_cache_hits", "Prompt tokens found in the prefix cache, not prefilled again.",
                "prefix_cache_hits")
        counter("magicpig_prefix_cache_evictions", "Cached prefixes evicted to make room.", "prefix_cache_evictions")
        self.ttft = Histogram("magicpig_time_to_first_token_seconds", "Time to first token.",
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.itl = Histogram("magicpig_inter_token_latency_seconds", "Time between outputs of one request.",
                             buckets=_ITL_BUCKETS, registry=r)
        self.e2e = Histogram("magicpig_e2e_request_latency_seconds", "Request latency, first byte in to last token out.",
                             buckets=_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("magicpig_prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter("magicpig_generation_tokens", "Generated tokens.", registry=r)
        self.finished = Counter("magicpig_requests_finished", "Requests that ended, by finish reason.",
                                ["finish_reason"], registry=r)

    def request_finished(self, out: RequestOutput) -> None:
        self.finished.labels(finish_reason=out.finish_reason or "unknown").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
