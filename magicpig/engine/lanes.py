"""Lanes: where a step's prefill and decode work run, each on its share of the device
(DESIGN.md §4 "Lanes").

* :class:`GreenContextLanes` (CUDA): green-context partitions created once at start-up, one
  (prefill, decode) pair per split on the 8-SM grid of Hopper (the driver may grant fewer SMs
  than asked: the grant is read back by a kernel that records the SM each block ran on), one
  stream per lane, the lanes ordered after the current stream by events. Each lane's Python
  runs on its own thread, so that a lane's host-side waits (the CPU store's attend in the
  ping-pong) do not hold the other lane's launches back.
* :class:`ThreadLanes` (CPU): the two lanes on two threads, each with its own torch thread
  count (its share of the cores). Used only where torch honours a per-thread count, which
  :func:`per_thread_counts_honoured` measures.
* :class:`InterleavedLanes`: one lane after the other on the calling thread (the fallback, and
  a CPU whose torch has one thread pool for the process).

:func:`make_lanes` picks one and says which in ``lanes.description``. The worker thread and the
per-thread torch counts are :mod:`magicpig.runtime.cores`' (the host's cores, as the decode
benchmark's store lane uses them).
"""

from __future__ import annotations

import functools
import os
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

from magicpig.runtime.cores import WorkerLane, split_threads, with_threads

HOPPER_SM_GRANULARITY = 8


@dataclass
class LaneTimes:
    """Wall seconds of each lane in one step (0 for a lane with nothing to do) and of the step."""

    prefill_s: float = 0.0
    decode_s: float = 0.0
    step_s: float = 0.0


Work = Optional[Callable[[], Any]]


class InterleavedLanes:
    """Decode, then prefill, on the calling thread: no concurrency, the same results."""

    kind = "interleaved"

    def __init__(self, reason: str = ""):
        self.description = "lanes interleaved on one thread" + (f" ({reason})" if reason else "")

    def run(self, prefill: Work, decode: Work, prefill_share: Optional[float]) -> tuple[Any, Any, LaneTimes]:
        t0 = time.perf_counter()
        d = decode() if decode else None
        t1 = time.perf_counter()
        p = prefill() if prefill else None
        t2 = time.perf_counter()
        return p, d, LaneTimes(t2 - t1, t1 - t0, t2 - t0)

    def close(self) -> None:
        pass


class _TwoThreads:
    """Runs the two lanes concurrently: prefill on a long-lived worker thread, decode on the
    calling thread (the engine's), so that both always run at once."""

    def __init__(self) -> None:
        self._pool = WorkerLane("magicpig-prefill-lane")

    def _both(self, prefill: Callable[[], Any], decode: Callable[[], Any]) -> tuple[Any, Any, LaneTimes]:
        t0 = time.perf_counter()
        fp = self._pool.submit(_timed, prefill)
        try:
            d, td = _timed(decode)
        finally:
            p, tp = fp.result()  # waits for the prefill lane; re-raises its exception here
        return p, d, LaneTimes(tp, td, time.perf_counter() - t0)

    def close(self) -> None:
        self._pool.close()


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


class ThreadLanes(_TwoThreads):
    """CPU: each lane on its own thread with ``round(share * cores)`` torch threads (at least 1)."""

    kind = "threads"

    def __init__(self, cores: Optional[int] = None):
        super().__init__()
        self.cores = cores or os.cpu_count() or 1
        self.description = f"lanes on two threads sharing {self.cores} cores by torch thread counts"

    def run(self, prefill: Work, decode: Work, prefill_share: Optional[float]) -> tuple[Any, Any, LaneTimes]:
        if not (prefill and decode) or prefill_share is None:
            return InterleavedLanes().run(prefill, decode, prefill_share)
        k, rest = split_threads(prefill_share, self.cores)
        # each count is its thread's own (see per_thread_counts_honoured)
        return self._both(with_threads(prefill, k), with_threads(decode, rest))


class GreenContextLanes(_TwoThreads):
    """CUDA: one green-context pair per split, made once; each lane on its partition's stream."""

    kind = "green-contexts"

    def __init__(self, device: torch.device, granularity: int = HOPPER_SM_GRANULARITY):
        super().__init__()
        from torch.cuda.green_contexts import GreenContext

        self.device = device
        index = device.index if device.index is not None else torch.cuda.current_device()
        total = torch.cuda.get_device_properties(index).multi_processor_count
        self.splits: dict[int, tuple[Any, Any]] = {}  # prefill SMs asked -> (prefill ctx, decode ctx)
        self.granted: dict[int, tuple[int, int]] = {}
        for sms in range(granularity, total - granularity + 1, granularity):
            pair = (GreenContext.create(num_sms=sms, device_id=index),
                    GreenContext.create(num_sms=total - sms, device_id=index))
            self.splits[sms] = pair
            self.granted[sms] = (count_sms(pair[0].Stream()), count_sms(pair[1].Stream()))
        self.total_sms = total
        self.description = (f"green contexts on {total} SMs, splits of {granularity}: "
                            + ", ".join(f"{a}+{b}" for a, b in self.granted.values()))

    def run(self, prefill: Work, decode: Work, prefill_share: Optional[float]) -> tuple[Any, Any, LaneTimes]:
        if not (prefill and decode) or prefill_share is None:
            return InterleavedLanes().run(prefill, decode, prefill_share)
        asked = min(self.splits, key=lambda sms: abs(sms - prefill_share * self.total_sms))
        pctx, dctx = self.splits[asked]
        ready = torch.cuda.current_stream(self.device).record_event()
        return self._both(_on_stream(prefill, pctx.Stream(), ready), _on_stream(decode, dctx.Stream(), ready))

    def close(self) -> None:
        super().close()
        self.splits.clear()


def _on_stream(fn: Callable[[], Any], stream: "torch.cuda.Stream", ready: "torch.cuda.Event") -> Callable[[], Any]:
    def run() -> Any:
        stream.wait_event(ready)  # the lane's inputs were written on the caller's stream
        with torch.cuda.stream(stream):
            out = fn()
        stream.synchronize()  # the step ends when both lanes have
        return out

    return run


@functools.cache
def _smid_kernel() -> Any:
    """The %smid-recording Triton kernel, made once (triton is imported only on CUDA, and a
    kernel defined per call would be compiled again for each of the ~30 start-up partitions)."""
    import triton
    import triton.language as tl

    @triton.jit
    def smid(out_ptr):
        sm = tl.inline_asm_elementwise("mov.u32 $0, %smid;", "=r", [], dtype=tl.int32, is_pure=False, pack=1)
        tl.store(out_ptr + tl.program_id(0), sm)

    return smid


def count_sms(stream: "torch.cuda.Stream", blocks: int = 4096) -> int:
    """SMs a stream's kernels actually run on: a Triton kernel of many blocks records each
    block's %smid; the distinct ids are the grant (the driver may round a request down)."""
    with torch.cuda.stream(stream):
        out = torch.full((blocks,), -1, dtype=torch.int32, device="cuda")
        _smid_kernel()[(blocks,)](out)
    stream.synchronize()
    return int(torch.unique(out).numel())


# ---------------------------------------------------------------------------- choice
_HONOURED: Optional[tuple[bool, str]] = None


def per_thread_counts_honoured(size: int = 384, reps: int = 20) -> tuple[bool, str]:
    """Does a torch thread count set on one thread stay that thread's own? Measured once: a
    matmul loop on a worker thread set to 1 thread, while the main thread keeps all cores; the
    worker's loop must run no faster than the same loop measured alone at 1 thread (+25%), and
    the main thread's count must be unchanged. Returns (answer, what was measured)."""
    global _HONOURED
    if _HONOURED is not None:
        return _HONOURED
    cores = os.cpu_count() or 1
    if cores < 2:
        _HONOURED = (False, "one core: nothing to share")
        return _HONOURED
    before = torch.get_num_threads()
    a = torch.randn(size, size)

    def loop() -> float:
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ a
        return time.perf_counter() - t0

    torch.set_num_threads(1)
    one = min(loop() for _ in range(3))
    torch.set_num_threads(cores)
    full = min(loop() for _ in range(3))
    result: dict[str, float] = {}
    worker = threading.Thread(target=lambda: (torch.set_num_threads(1), result.setdefault("t", min(loop() for _ in range(3)))))
    worker.start()
    worker.join()
    main_kept = torch.get_num_threads() == cores
    torch.set_num_threads(before)
    honoured = main_kept and result["t"] >= one / 1.25 and one > full * 1.2
    _HONOURED = (honoured, f"{reps} matmuls {size}^2: 1 thread {one * 1e3:.1f} ms, {cores} threads {full * 1e3:.1f} ms, "
                           f"worker set to 1 {result['t'] * 1e3:.1f} ms, main thread's count kept: {main_kept}")
    return _HONOURED


def make_lanes(device: torch.device, mode: str = "auto") -> Any:
    """Lanes for ``device``: green contexts on CUDA where torch has them, threads on a CPU
    where per-thread counts are honoured, else interleaved (the reason in the description).
    mode: "auto", "interleaved" (force the fallback)."""
    if mode not in ("auto", "interleaved"):
        raise ValueError(f"lanes={mode!r}: expected 'auto' or 'interleaved'")
    if mode == "interleaved":
        return InterleavedLanes("asked for")
    if device.type == "cuda":
        from torch.cuda import green_contexts

        if not green_contexts.SUPPORTED:
            return InterleavedLanes("this torch has no CUDA green contexts (needs CUDA 12.8+ builds)")
        try:
            return GreenContextLanes(device)
        except RuntimeError as err:  # an old driver: the partitions cannot be made
            return InterleavedLanes(f"green contexts unavailable: {err}")
    honoured, measured = per_thread_counts_honoured()
    if honoured:
        return ThreadLanes()
    return InterleavedLanes(f"torch thread counts are not per thread here: {measured}")
