"""CPUStore: the middle K/V and LSH bucket lists of one attention layer, in CPU memory.

The store answers decode queries with the LSH-sampled estimator of DESIGN.md §2 over the keys
that collide with the query in at least ``min_collisions`` of the L tables. The work is done by
the C++/OpenMP extension ``magicpig._C`` (csrc/store.cpp, csrc/kernels_impl.h) or, when it is
missing or asked for, by the numba implementation of the same algorithm (magicpig.store._numba).
Every input is validated here, before any native call, so errors name the argument and what was
expected (the extension checks sizes and ranges again, for direct callers, but cannot say as
much). Arrays may be numpy arrays or CPU torch tensors; results are torch tensors.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from magicpig.config import KV_DTYPES, MAX_EXACT_KEYS, MAX_K, MAX_L, check_carry_head, check_int, max_cpu_threads
from magicpig.store.weights import log_u_table

try:  # the extension is optional: the numba backend runs the same algorithm
    from magicpig import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

from magicpig.store.sizes import (  # noqa: E402,F401 - the store's sizes, re-exported
    LOW_BITS, STORE_BLOCK_TOKENS, index_bytes_per_token_head, store_bytes_per_token_head,
)

BACKENDS = ("auto", "cpp", "numba")
MAX_HEAD_DIM = 4096
_DTYPE_CODE = {"bf16": 0, "fp16": 1, "fp32": 2}
_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

ArrayLike = Union[np.ndarray, torch.Tensor]
AttendResult = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
TimingHook = Callable[[str, float, dict], None]


def extension_available() -> bool:
    """True when the C++ extension magicpig._C is importable."""
    return _C is not None


def _as_tensor(name: str, x: object) -> torch.Tensor:
    """A CPU torch view of a numpy array or CPU tensor (no copy)."""
    if isinstance(x, torch.Tensor):
        if x.device.type != "cpu":
            raise ValueError(f"{name}: expected a CPU tensor, got device {x.device}")
        return x
    if isinstance(x, np.ndarray):
        if x.dtype == np.float16 or x.dtype.kind in "fiu":
            return torch.from_numpy(np.ascontiguousarray(x))
        raise TypeError(f"{name}: unsupported numpy dtype {x.dtype}")
    raise TypeError(f"{name}: expected a numpy array or a torch tensor, got {type(x).__name__}")


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN or inf in the float tensor t. min and max propagate NaN, and aminmax reads t once
    without a temporary (isfinite(t).all() writes a bool per element: ~20x slower)."""
    if t.numel() == 0:
        return True
    lo, hi = torch.aminmax(t)
    return bool(torch.isfinite(lo)) and bool(torch.isfinite(hi))


def _check_shape(name: str, t: torch.Tensor, expected: tuple[Optional[int], ...], meaning: str) -> None:
    ok = t.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, t.shape))
    if not ok:
        want = ", ".join("*" if e is None else str(e) for e in expected)
        raise ValueError(f"{name}: expected shape {meaning} = [{want}], got {list(t.shape)}")


def _float_input(name: str, x: object, shape: tuple[Optional[int], ...], meaning: str) -> torch.Tensor:
    t = _as_tensor(name, x)
    if not t.is_floating_point():
        raise TypeError(f"{name}: expected a floating-point array (fp32/bf16/fp16/fp64), got {t.dtype}")
    _check_shape(name, t, shape, meaning)
    return t


def _code_input(name: str, x: object, shape: tuple[Optional[int], ...], meaning: str, K: int) -> np.ndarray:
    t = _as_tensor(name, x)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name}: expected an integer array of hash codes, got {t.dtype}")
    _check_shape(name, t, shape, meaning)
    if t.numel():
        lo, hi = (int(x) for x in torch.aminmax(t))
        if lo < 0 or hi >= 1 << K:
            raise ValueError(f"{name}: codes must be in [0, 2^K = {1 << K}) for K={K}, got range [{lo}, {hi}]")
    return t.to(torch.int32).contiguous().numpy()


class AttendHandle:
    """A pending :meth:`CPUStore.attend_async` (``wait()`` returns (out, lse, num_candidates))
    or :meth:`CPUStore.append_async` (``wait()`` returns None); ``wait()`` re-raises its error."""

    def __init__(self, future: "concurrent.futures.Future[AttendResult]"):
        self._future = future

    def done(self) -> bool:
        return self._future.done()

    def wait(self) -> AttendResult:
        return self._future.result()


class CPUStore:
    """Middle K/V + LSH tables of one attention layer for many sequences, held in CPU memory.

    num_kv_heads, head_dim: the layer's KV heads and head size. K, L: bits per table and
    tables; min_collisions (m): a key is a candidate when it collides with the query in at
    least m tables. kv_dtype: "bf16" | "fp16" | "fp32", how K/V are held. num_threads: OpenMP
    threads (None = all cores). backend: "cpp" (the extension), "numba", or "auto" (cpp when
    built). exact_keys: per query head, the candidates of highest q.k attended exactly (weight
    1 instead of 1/u; ties to the earlier token), as :func:`magicpig.attention.reference.
    hybrid_attention` with ``top_candidates``; 0 = plain sampling. carry_head (needs exact_keys >
    0): the head is the best exact_keys among the candidates and the last attend's head of the
    same sequence and query head (read even when not a candidate); num_candidates then counts
    the keys read, candidates plus the carried keys outside the blocks' kept candidates. Query
    head h uses KV head h // (Hq // num_kv_heads) (GQA).
    """

    def __init__(
        self,
        num_kv_heads: int,
        head_dim: int,
        K: int,
        L: int,
        min_collisions: int = 2,
        kv_dtype: str = "bf16",
        num_threads: Optional[int] = None,
        backend: str = "auto",
        exact_keys: int = 0,
        carry_head: bool = False,
    ) -> None:
        self.num_kv_heads = check_int("num_kv_heads", num_kv_heads, 1)
        self.head_dim = check_int("head_dim", head_dim, 1, MAX_HEAD_DIM)
        self.K = check_int("K", K, 1, MAX_K)
        self.L = check_int("L", L, 1, MAX_L)
        self.min_collisions = check_int("min_collisions", min_collisions, 1, self.L)
        self.exact_keys = check_int("exact_keys", exact_keys, 0, MAX_EXACT_KEYS)
        self.carry_head = check_carry_head("carry_head", carry_head, self.exact_keys)
        if kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype={kv_dtype!r}: expected one of {KV_DTYPES}")
        self.kv_dtype = kv_dtype
        if num_threads is not None:
            # Bounded: OpenMP asked for tens of thousands of threads aborts the process.
            num_threads = check_int("num_threads", num_threads, 1, max_cpu_threads())
        self.num_threads = num_threads
        if backend not in BACKENDS:
            raise ValueError(f"backend={backend!r}: expected one of {BACKENDS}")
        if backend == "cpp" and _C is None:
            raise RuntimeError("backend='cpp' but the C++ extension magicpig._C is not built (pip install -e .)")
        self.backend = ("cpp" if _C is not None else "numba") if backend == "auto" else backend
        table = log_u_table(self.K, self.L, self.min_collisions)
        args = (
            self.num_kv_heads,
            self.head_dim,
            self.K,
            self.L,
            self.min_collisions,
            _DTYPE_CODE[kv_dtype],
            num_threads or 0,
            table.values,
            table.t_lo,
            table.h,
            table.log_u_floor,
            self.exact_keys,
            self.carry_head,
        )
        if self.backend == "cpp":
            self._impl = _C.Store(*args)
        else:
            from magicpig.store._numba import NumbaStore

            self._impl = NumbaStore(*args)
        self._live: set[int] = set()
        self._executor: Optional[concurrent.futures.ThreadPoolExecutor] = None
        # attend_async / append_async calls not yet finished -> the sequence ids they use (remove_sequence
        # waits for them); the lock guards the dict against the worker's done-callbacks.
        self._pending: dict[concurrent.futures.Future, frozenset[int]] = {}
        self._pending_lock = threading.Lock()
        self._timing_hook: Optional[TimingHook] = None

    def set_timing_hook(self, hook: Optional["TimingHook"]) -> None:
        """Call ``hook(kind, seconds, info)`` after every synchronous ``attend``,
        ``attend_trusted`` (kind "attend"; info: "rows" candidate rows read and "entries"
        bucket entries walked, as the C++ store counts them (the numba store counts no entries:
        its rows are the largest head of each group, a lower bound), and "seq_ids") and
        ``append`` (kind "append"; info: "tokens", "heads"). None removes it. The profiler
        times the stores this way; unset, a call costs one ``is None`` check."""
        self._timing_hook = hook

    def _timed_attend(self, t0: float, seq_ids: object, ncand: torch.Tensor) -> None:
        stats = getattr(self._impl, "last_attend_stats", None)
        if stats is not None:
            entries, rows = (float(v) for v in stats()[:2])
        else:
            g = ncand.shape[1] // self.num_kv_heads
            rows, entries = float(ncand.view(ncand.shape[0], -1, g).amax(-1).sum()), 0.0
        self._timing_hook("attend", time.perf_counter() - t0, {"rows": rows, "entries": entries, "seq_ids": seq_ids})

    # -- sequences ---------------------------------------------------------------------------
    def add_sequence(self) -> int:
        """Register an empty sequence and return its id."""
        seq_id = int(self._impl.add_sequence())
        self._live.add(seq_id)
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        """Forget a sequence; its memory is returned. Pending :meth:`attend_async` and
        :meth:`append_async` calls that use it finish first (their ``wait()`` gives their results); later ones are refused."""
        self._check_seq("seq_id", seq_id)
        sid = int(seq_id)
        self._live.discard(sid)  # from here on, attends naming it raise "unknown sequence id"
        with self._pending_lock:
            readers = [f for f, ids in self._pending.items() if sid in ids]
        try:
            # Without this the worker could find the id gone and wait() would raise a bare
            # IndexError/KeyError about a sequence the caller had asked to read.
            concurrent.futures.wait(readers)
        finally:  # interrupted or not, the id is gone from _live: free it (C++ attends hold a lock)
            self._impl.remove_sequence(sid)

    def fork(self, seq_id: int, tokens: int) -> int:
        """A new sequence holding the first ``tokens`` tokens of ``seq_id`` (0 <= tokens <=
        length(seq_id)), then whatever is appended to it; returns its id. The two are
        independent from here on: appends to either leave what the other sees unchanged, and
        removing either leaves the other intact. For prefix caching: requests that share a
        prompt prefix fork the sequence holding it. The C++ backend shares the prefix's memory
        (zero copy, reference-counted blocks; copy-on-write at block granularity, so appends to
        the source after the fork start a new block); the numba backend copies it. Pending
        :meth:`append_async` / :meth:`attend_async` calls on ``seq_id`` finish first."""
        sid = self._settled("seq_id", seq_id)
        tokens = check_int("tokens", tokens, 0, int(self._impl.length(sid)))
        new = int(self._impl.fork(sid, tokens))
        self._live.add(new)
        return new

    def read(self, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The stored keys and values of tokens [start, end) of ``seq_id``: two CPU tensors
        [num_kv_heads, end - start, head_dim] in the store's dtype (bf16 / fp16 / fp32), the
        values exactly as held (the appended ones rounded to kv_dtype). 0 <= start <= end <=
        length(seq_id). For streaming a cached prefix's middle back to the device (an exact
        prefill over it). Pending async calls on ``seq_id`` finish first."""
        sid = self._settled("seq_id", seq_id)
        length = int(self._impl.length(sid))
        start = check_int("start", start, 0, length)
        end = check_int("end", end, start, length)
        shape = (self.num_kv_heads, end - start, self.head_dim)
        keys = torch.empty(shape, dtype=_TORCH_DTYPE[self.kv_dtype])
        values = torch.empty(shape, dtype=_TORCH_DTYPE[self.kv_dtype])
        self._impl.read(sid, start, end, self._raw(keys), self._raw(values))
        return keys, values

    def _raw(self, t: torch.Tensor) -> np.ndarray:
        """A numpy view of a contiguous store-dtype tensor (bf16 as its uint16 bits)."""
        return t.view(torch.int16).numpy().view(np.uint16) if t.dtype == torch.bfloat16 else t.numpy()

    def _settled(self, name: str, seq_id: object) -> int:
        """seq_id checked, once its pending async calls are done (so its length is the
        caller's: an append_async started before counts)."""
        self._check_seq(name, seq_id)
        sid = int(seq_id)
        with self._pending_lock:
            pending = [f for f, ids in self._pending.items() if sid in ids]
        concurrent.futures.wait(pending)
        return sid

    def length(self, seq_id: int) -> int:
        """Tokens held for ``seq_id``."""
        self._check_seq("seq_id", seq_id)
        return int(self._impl.length(int(seq_id)))

    def nbytes(self, seq_id: Optional[int] = None) -> int:
        """Bytes actually held (K/V, norms, bucket lists, tails), for one sequence or in total.
        With forks (C++ backend): the total counts each shared block once; one sequence's figure
        counts every block it references, shared ones in full (so per-sequence figures may add
        up to more than the total). The numba backend copies on fork: nothing is shared."""
        if seq_id is None:
            return int(self._impl.nbytes())
        self._check_seq("seq_id", seq_id)
        return int(self._impl.nbytes_of(int(seq_id)))

    def _check_seq(self, name: str, seq_id: object) -> None:
        if isinstance(seq_id, bool) or not isinstance(seq_id, (int, np.integer)):
            raise TypeError(f"{name}={seq_id!r}: expected an integer sequence id")
        if int(seq_id) not in self._live:
            raise ValueError(f"{name}={seq_id!r}: unknown sequence id (live: {sorted(self._live)[:8]}...)")

    # -- append ------------------------------------------------------------------------------
    def append(self, seq_id: int, keys: ArrayLike, values: ArrayLike, key_codes: ArrayLike) -> None:
        """Add tokens to a sequence; they are retrievable at once.

        keys, values: float [Hkv, t, d] (keys already centred), converted to kv_dtype;
        key_codes: integer [Hkv, t, L] in [0, 2^K) (SimHash codes of the keys).
        """
        args = self._append_args(seq_id, keys, values, key_codes)
        if args is not None:
            t0 = time.perf_counter() if self._timing_hook is not None else 0.0
            self._impl.append(*args)
            if self._timing_hook is not None:
                self._timing_hook("append", time.perf_counter() - t0, {"tokens": args[-1], "heads": self.num_kv_heads})

    def append_async(self, seq_id: int, keys: ArrayLike, values: ArrayLike, key_codes: ArrayLike) -> AttendHandle:
        """:meth:`append` on the worker thread (the native call releases the GIL; appends and
        attends of this store run in the order they were started). Inputs are validated before
        this returns; ``wait()`` returns None once the tokens are held. The store may read the
        caller's arrays until then (no copy when they already are contiguous in kv_dtype):
        do not write them before ``wait()``."""
        args = self._append_args(seq_id, keys, values, key_codes)
        if args is None:
            done: concurrent.futures.Future = concurrent.futures.Future()
            done.set_result(None)
            return AttendHandle(done)
        return self._run_on_worker(lambda: self._impl.append(*args), [args[0]])

    def _append_args(self, seq_id: int, keys: ArrayLike, values: ArrayLike, key_codes: ArrayLike):
        """The native append's arguments, validated; None for zero tokens."""
        self._check_seq("seq_id", seq_id)
        H, d, L = self.num_kv_heads, self.head_dim, self.L
        k = _float_input("keys", keys, (H, None, d), "[num_kv_heads, t, head_dim]")
        t = k.shape[1]
        v = _float_input("values", values, (H, t, d), "[num_kv_heads, t, head_dim]")
        codes = _code_input("key_codes", key_codes, (H, t, L), "[num_kv_heads, t, L]", self.K)
        if t == 0:
            return None
        return int(seq_id), self._kv_buffer("keys", k), self._kv_buffer("values", v), codes, t

    def _kv_buffer(self, name: str, x: torch.Tensor) -> np.ndarray:
        """Contiguous numpy view of x in the store dtype (bf16 as its uint16 bits); no copy when
        x already is contiguous and of that dtype. Raises ValueError unless every stored value is
        finite: checked after the conversion, since that is what attends read, and a value
        finite in fp32 can overflow fp16. (Unchecked, a NaN key makes the C++ backend drop its
        row and the numba backend return NaN for the whole head.)"""
        stored = x.to(_TORCH_DTYPE[self.kv_dtype]).contiguous()
        if not _all_finite(stored):
            if _all_finite(x):
                limit = torch.finfo(stored.dtype).max
                raise ValueError(f"{name}: non-finite after conversion to {self.kv_dtype} (|x| > {limit:g}?)")
            raise ValueError(f"{name}: expected finite values, got nan or inf")
        if self.kv_dtype == "bf16":
            return stored.view(torch.int16).numpy().view(np.uint16)
        return stored.numpy()

    # -- attend ------------------------------------------------------------------------------
    def _prepare(self, seq_ids: object, queries: ArrayLike, query_codes: ArrayLike):
        ids_t = _as_tensor("seq_ids", seq_ids) if not isinstance(seq_ids, (list, tuple)) else None
        if ids_t is not None:
            if ids_t.dim() != 1 or ids_t.is_floating_point():
                raise ValueError(f"seq_ids: expected a 1-d integer array, got {ids_t.dtype} {list(ids_t.shape)}")
            ids_list = [int(i) for i in ids_t.tolist()]
        else:
            ids_list = list(seq_ids)  # type: ignore[arg-type]
        for i in ids_list:
            self._check_seq("seq_ids", i)
        B = len(ids_list)
        H, d, L = self.num_kv_heads, self.head_dim, self.L
        q = _float_input("queries", queries, (B, None, d), f"[B={B}, Hq, head_dim]")
        Hq = q.shape[1]
        if Hq == 0 or Hq % H:
            raise ValueError(f"queries: Hq={Hq} query heads must be a positive multiple of num_kv_heads={H}")
        qc = _code_input("query_codes", query_codes, (B, Hq, L), "[B, Hq, L]", self.K)
        q32 = q.to(torch.float32).contiguous()
        if not _all_finite(q32):
            raise ValueError("queries: expected finite values, got nan or inf")
        out, lse, ncand = self._outputs(B, Hq)
        ids = np.asarray(ids_list, dtype=np.int64)
        return ids, B, Hq, q32.numpy(), qc, out, lse, ncand

    def attend(self, seq_ids: Sequence[int], queries: ArrayLike, query_codes: ArrayLike) -> AttendResult:
        """Sampled attention of one query per head over each sequence's keys.

        seq_ids: B ids (a sequence may repeat); queries: float [B, Hq, d] (upcast to fp32);
        query_codes: integer [B, Hq, L]. Returns out float32 [B, Hq, d], lse float32 [B, Hq]
        (natural log; -inf with out = 0 where a head has no candidate) and num_candidates int32
        [B, Hq].
        """
        ids, B, Hq, q, qc, out, lse, ncand = self._prepare(seq_ids, queries, query_codes)
        t0 = time.perf_counter() if self._timing_hook is not None else 0.0
        self._impl.attend(ids, B, Hq, q, qc, out.numpy(), lse.numpy(), ncand.numpy())
        if self._timing_hook is not None:
            self._timed_attend(t0, ids, ncand)
        return out, lse, ncand

    def attend_async(self, seq_ids: Sequence[int], queries: ArrayLike, query_codes: ArrayLike) -> AttendHandle:
        """:meth:`attend` on a worker thread (the native call releases the GIL); returns a handle
        whose ``wait()`` gives the same tuple. Inputs are validated and copied before this
        returns, so errors raise here (not in ``wait()``) and the caller may reuse its buffers."""
        ids, B, Hq, q, qc, out, lse, ncand = self._prepare(seq_ids, queries, query_codes)
        return self._submit(ids, q.copy(), qc.copy())  # the caller may reuse its buffers before wait()

    def attend_trusted(self, seq_ids: np.ndarray, queries: np.ndarray, query_codes: np.ndarray,
                       wait: bool = True) -> Union[AttendResult, AttendHandle]:
        """:meth:`attend` (``wait``) or :meth:`attend_async` without the per-call checks, for a
        caller that has validated once what the checks would: seq_ids int64 [B] of live
        sequences, queries float32 [B, Hq, d] C-contiguous, Hq a multiple of num_kv_heads,
        query_codes int32 [B, Hq, L] C-contiguous in [0, 2^K) (its own hash kernel's output).
        The runner's decode step calls this once per sparse layer (its sequence ids are the
        store's own, its shapes the model's): the checks cost several times the native attend of
        a short middle. Only a non-finite query gets past them; the kernel then returns NaN for
        that head (it never indexes by a score). Async: the caller must not write the arrays
        before ``wait()``."""
        if not wait:
            return self._submit(seq_ids, queries, query_codes)
        out, lse, ncand = self._outputs(queries.shape[0], queries.shape[1])
        t0 = time.perf_counter() if self._timing_hook is not None else 0.0
        self._impl.attend(seq_ids, queries.shape[0], queries.shape[1], queries, query_codes,
                          out.numpy(), lse.numpy(), ncand.numpy())
        if self._timing_hook is not None:
            self._timed_attend(t0, seq_ids, ncand)
        return out, lse, ncand

    def _outputs(self, B: int, Hq: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return (torch.empty(B, Hq, self.head_dim, dtype=torch.float32), torch.empty(B, Hq, dtype=torch.float32),
                torch.empty(B, Hq, dtype=torch.int32))

    def _submit(self, ids: np.ndarray, q: np.ndarray, qc: np.ndarray) -> AttendHandle:
        """The native attend of validated arrays on the worker thread."""
        B, Hq = q.shape[0], q.shape[1]
        out, lse, ncand = self._outputs(B, Hq)

        def run() -> AttendResult:
            self._impl.attend(ids, B, Hq, q, qc, out.numpy(), lse.numpy(), ncand.numpy())
            return out, lse, ncand

        return self._run_on_worker(run, ids)

    def _run_on_worker(self, fn, seq_ids) -> AttendHandle:
        """``fn()`` on the store's one worker thread; remove_sequence of any of ``seq_ids``
        waits for it."""
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="magicpig-store")
        future = self._executor.submit(fn)
        with self._pending_lock:
            self._pending[future] = frozenset(int(i) for i in seq_ids)
        future.add_done_callback(self._forget_pending)  # runs at once if already done
        return AttendHandle(future)

    def _forget_pending(self, future: "concurrent.futures.Future[AttendResult]") -> None:
        with self._pending_lock:
            self._pending.pop(future, None)

    def close(self) -> None:
        """Stop the worker thread of attend_async (the store stays usable)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return (
            f"CPUStore(num_kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, K={self.K}, L={self.L}, "
            f"min_collisions={self.min_collisions}, kv_dtype={self.kv_dtype!r}, backend={self.backend!r}, "
            f"sequences={len(self._live)})"
        )

