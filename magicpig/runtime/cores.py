"""The host's cores: how they are split between the device side and the CPU store, a thread's
placement (its cores, its torch thread count), and worker lanes (one long-lived thread each).

* :func:`assign_cores` splits the cores this process may use into the device lane's (the
  calling thread: model ops, hashing of queries, window attention) and the store's (its worker
  thread with that many OpenMP threads): a :class:`Cores`. Thread counts are never fixed: by
  default each side gets half of the cores.
* :func:`pin_thread` pins the calling thread to cores; :func:`with_threads` runs work with a
  torch thread count of the calling thread's own; :func:`split_threads` divides ``total``
  threads between two lanes by a share; :func:`kept_placement` gives the calling thread back
  its cores and thread count.
* :class:`WorkerLane`: one long-lived worker thread (optionally pinned) that runs what is
  submitted to it, in order (the engine's prefill lane, the store lane).
* :class:`StoreLane`: the CPU store's lane on a :class:`WorkerLane` pinned to the store's cores;
  it runs every sparse layer's ``CPUStore.attend`` (as ``CPUStore.attend_async`` does on a GPU
  machine) and counts the store's and the waiting side's seconds. :meth:`StoreLane.method_factory`
  gives a ``ModelRunner`` sparse layers (:class:`LaneSampledMiddle`) that attend on it.
"""

from __future__ import annotations

import contextlib
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional

import torch

from magicpig.attention.base import MiddleAttention, PendingAttention
from magicpig.attention.sampled import SampledMiddle
from magicpig.config import MagicPIGConfig


# ---------------------------------------------------------------------- one thread's placement
def available_cores() -> list[int]:
    """The cores this process may use (its affinity; every core where there is none)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return list(range(os.cpu_count() or 1))


def pin_thread(cores: list[int]) -> bool:
    """Pin the calling thread (Linux: pid 0 is the thread) to ``cores``; False where impossible."""
    try:
        os.sched_setaffinity(0, cores)
        return True
    except (AttributeError, OSError):
        return False


def with_threads(fn: Callable[[], Any], threads: int) -> Callable[[], Any]:
    """``fn`` run with ``threads`` torch threads on the thread that runs it (its own count where
    torch keeps one per thread, see ``engine.lanes.per_thread_counts_honoured``), the count
    before restored afterwards."""

    def run() -> Any:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return fn()
        finally:
            torch.set_num_threads(before)

    return run


def split_threads(share: float, total: int) -> tuple[int, int]:
    """``total`` threads between two lanes: ``round(share * total)`` to the first, the rest to
    the second, each at least 1."""
    first = min(total - 1, max(1, round(share * total)))
    return first, total - first


@contextlib.contextmanager
def kept_placement() -> Iterator[None]:
    """Give the calling thread back its cores and torch thread count when the block ends."""
    cores = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    threads = torch.get_num_threads()
    try:
        yield
    finally:
        if cores is not None:
            pin_thread(sorted(cores))
        torch.set_num_threads(threads)


# --------------------------------------------------------------------- device side and store
@dataclass
class Cores:
    """Which cores each lane runs on. shared: the lanes share cores (the overlap is not real)."""

    available: list[int]
    device: list[int]
    store: list[int]
    device_threads: int
    store_threads: int
    shared: bool

    def describe(self, pinned: bool) -> str:
        how = "pinned" if pinned else "NOT pinned (no sched_setaffinity)"
        text = (f"device lane: main thread on cores {self.device}, {self.device_threads} torch thread(s); "
                f"CPU store: worker thread on cores {self.store}, {self.store_threads} OpenMP thread(s); {how}")
        return text + ("; WARNING: the lanes share cores, so the overlap is not real" if self.shared else "")

    def setup_phase(self) -> None:
        """Setup work on the calling thread (filling caches): every core when the device lane
        has one thread (the OpenMP helpers this makes stay idle while measuring), else the
        device lane's cores."""
        wide = self.device_threads == 1
        pin_thread(self.available if wide else self.device)
        torch.set_num_threads(len(self.available) if wide else self.device_threads)

    def device_phase(self) -> bool:
        """The calling thread as the device lane: on its cores with its thread count. True when pinned."""
        torch.set_num_threads(self.device_threads)
        return pin_thread(self.device)


def assign_cores(device_threads: Optional[int] = None, store_threads: Optional[int] = None) -> Cores:
    """Split the cores this process may use: the device lane first, the store next. Defaults:
    half of them to the device lane (at least 1), the others to the store (at least 1)."""
    cores = available_cores()
    n = len(cores)
    dt = device_threads or max(1, n // 2)
    st = store_threads or max(1, n - dt)
    if dt + st <= n:
        return Cores(cores, cores[:dt], cores[dt : dt + st], dt, st, False)
    return Cores(cores, cores[: min(dt, n)], cores[-min(st, n):], dt, st, True)


# ------------------------------------------------------------------------------ worker lanes
class WorkerLane:
    """One long-lived worker thread that runs submitted work in order. With ``cores`` it is
    started and pinned to them at once (``pinned`` says whether that worked); without, it
    starts on the first submission."""

    def __init__(self, name: str, cores: Optional[list[int]] = None):
        self.pinned = False
        if cores is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)
            return
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name,
                                        initializer=self._pin, initargs=(cores,))
        self._pool.submit(lambda: None).result()  # start (and pin) the worker now

    def _pin(self, cores: list[int]) -> None:
        self.pinned = pin_thread(cores)

    def submit(self, fn: Callable[..., Any], *args: Any) -> Future:
        return self._pool.submit(fn, *args)

    def close(self) -> None:
        self._pool.shutdown(wait=True)


class StoreLane:
    """The CPU store's lane: one worker thread, pinned to ``cores``, runs every sparse layer's
    CPUStore.attend (as CPUStore.attend_async does on a GPU machine). mode "overlap": the
    device lane waits when it needs the result; "serial": it waits right after starting.
    Counters (read and reset by the device lane): store_s (worker seconds inside attend),
    wait_s (device-lane seconds blocked on the store), calls."""

    def __init__(self, cores: list[int], name: str = "magicpig-store-lane"):
        self.mode = "overlap"
        self._worker = WorkerLane(name, cores)
        self.reset()

    @property
    def pinned(self) -> bool:
        return self._worker.pinned

    def reset(self) -> None:
        self.store_s = self.wait_s = 0.0
        self.calls = 0

    def attend(self, store: Any, seq_ids: list[int], queries: torch.Tensor, codes: torch.Tensor) -> PendingAttention:
        """Start ``store.attend(seq_ids, queries, codes)`` on the worker."""

        def run() -> tuple[tuple[torch.Tensor, torch.Tensor, torch.Tensor], float]:
            t0 = time.perf_counter()
            result = store.attend(seq_ids, queries, codes)
            return result, time.perf_counter() - t0

        future = self._worker.submit(run)

        def wait() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
            t0 = time.perf_counter()
            result, busy = future.result()
            self.wait_s += time.perf_counter() - t0
            self.store_s += busy
            self.calls += 1
            return result

        if self.mode == "serial":
            result = wait()
            return PendingAttention(lambda: result)
        return PendingAttention(wait)

    def method_factory(self) -> Callable[[MagicPIGConfig, int, int, int], MiddleAttention]:
        """A ``ModelRunner`` method_factory whose sparse layers attend on this lane."""
        return lambda config, layer, num_kv_heads, head_dim: LaneSampledMiddle(config, layer, num_kv_heads,
                                                                               head_dim, self)

    def close(self) -> None:
        self._worker.close()


class LaneSampledMiddle(SampledMiddle):
    """The runtime's magicpig middle attention, with attends run on a :class:`StoreLane`
    (queries hashed on the device lane, as in SampledMiddle)."""

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int, lane: StoreLane):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self.lane = lane

    def attend_async(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        q, codes = self._query_args(seq_ids, queries)
        return self.lane.attend(self.store, list(seq_ids), q, codes)

    def attend_trusted(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        # The runner's decode step calls this (checks skipped); SampledMiddle's runs the store
        # inline for CPU queries. Here it takes the lane like attend_async, which is also what
        # SampledMiddle.attend_trusted does off the CPU (the store's checks count in t_cpu).
        return self.attend_async(seq_ids, queries)
