"""The "magicpig" middle attention: LSH sampling on the CPU store (DESIGN.md §2).

Hashing happens where the vectors are (the device): keys are hashed when they enter the
middle, queries at each decode step, with the per-(layer, KV head) projections of
:func:`magicpig.lsh.layer_projection`. The K/V, the codes' bucket tables and the sampled
attention itself live in :class:`magicpig.store.CPUStore` (C++, numba fallback); this class
only hashes, moves tensors and keeps per-sequence lengths.
"""

from __future__ import annotations

import numpy as np
import torch

from magicpig.attention.base import MiddleAttention, PendingAppend, PendingAttention
from magicpig.config import MagicPIGConfig, max_cpu_threads
from magicpig.lsh import hash_codes, layer_projection
from magicpig.store import CPUStore

try:  # the trusted path calls the hash kernel directly; without the extension it is not taken
    from magicpig import _C
except ImportError:  # pragma: no cover - depends on the build
    _C = None

APPEND_BLOCK = 4096


def _make_store(config: MagicPIGConfig, num_kv_heads: int, head_dim: int) -> CPUStore:
    return CPUStore(
        num_kv_heads,
        head_dim,
        config.K,
        config.L,
        min_collisions=config.min_collisions,
        kv_dtype=config.kv_dtype,
        num_threads=config.cpu_threads,
        backend=config.cpu_backend,
        exact_keys=config.exact_keys,
        carry_head=config.carry_head,
    )


class SampledMiddle(MiddleAttention):
    """LSH-sampled attention over the centred middle keys of one layer."""

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        if not config.lsh_resolved:
            raise ValueError("config: K and L are unset; LongContextModel chooses them for its model "
                             "(resolve_lsh), or set MagicPIGConfig(K=..., L=...)")
        super().__init__(config, layer, num_kv_heads, head_dim)
        self.projection = layer_projection(config.seed, layer, num_kv_heads, head_dim, config.K, config.L)
        self._on_device: dict[torch.device, torch.Tensor] = {}
        self.store = _make_store(config, num_kv_heads, head_dim)
        self._lengths: dict[int, int] = {}
        self._projection_np: np.ndarray | None = None
        self._max_threads = max_cpu_threads()

    def _projection(self, device: torch.device) -> torch.Tensor:
        """[Hkv, d, K*L] float32 on ``device`` (cached per device)."""
        if device not in self._on_device:
            self._on_device[device] = self.projection.to(device)
        return self._on_device[device]

    def add_sequence(self) -> int:
        seq_id = self.store.add_sequence()
        self._lengths[seq_id] = 0
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self.store.remove_sequence(seq_id)
        self._lengths.pop(seq_id, None)

    def fork(self, seq_id: int, tokens: int) -> int:
        """The store's fork (C++: the prefix's blocks are shared, not copied). Pending async
        appends to ``seq_id`` are held by then (the store waits for them)."""
        self.length(seq_id)  # KeyError for a sequence of another layer, as every method here
        new = self.store.fork(seq_id, tokens)
        self._lengths[new] = int(tokens)
        return new

    def read(self, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The store's K/V of tokens [start, end), in its kv_dtype on the CPU."""
        self.length(seq_id)
        return self.store.read(seq_id, start, end)

    def length(self, seq_id: int) -> int:
        if seq_id not in self._lengths:
            raise KeyError(f"seq_id={seq_id!r} is not a registered sequence of this layer")
        return self._lengths[seq_id]

    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [Hkv, t, d] (keys centred), any device; hashed where they are."""
        self.append_async(seq_id, keys, values, overlap=False).wait()

    def append_async(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor,
                     overlap: bool = True) -> PendingAppend:
        """Hash the keys here (on their device), copy K/V and codes to the host, and build the
        store's tables on its worker thread (``overlap``) or at once. A prefill on a GPU hides
        the table build behind the next layers' compute this way."""
        self.check_kv(keys, values)
        proj = self._projection(keys.device)
        handles = []
        # Blocks bound the [Hkv, t, K*L] projection temporaries (t can be ~100k at prefill).
        for start in range(0, keys.shape[1], APPEND_BLOCK):
            k = keys[:, start : start + APPEND_BLOCK]
            v = values[:, start : start + APPEND_BLOCK]
            args = (seq_id, k.detach().to("cpu", torch.float32).contiguous(),
                    v.detach().to("cpu", torch.float32).contiguous(), hash_codes(k, proj, self.config.K).to("cpu"))
            if overlap:
                handles.append(self.store.append_async(*args))
            else:
                self.store.append(*args)
            self._lengths[seq_id] = self.length(seq_id) + k.shape[1]
        return PendingAppend(lambda: [h.wait() for h in handles] and None)

    def _query_args(self, seq_ids: list[int], queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_queries(seq_ids, queries)
        b, hq, d = queries.shape
        # GQA: query head h uses KV head h // G's projection; grouping the heads reads each
        # projection once instead of materialising it per query head.
        grouped = queries.reshape(b, self.num_kv_heads, hq // self.num_kv_heads, d)
        codes = hash_codes(grouped, self._projection(queries.device), self.config.K).reshape(b, hq, -1)
        return queries.detach().to("cpu", torch.float32).contiguous(), codes.to("cpu").contiguous()

    def attend(self, seq_ids: list[int], queries: torch.Tensor):
        return self.attend_async(seq_ids, queries).wait()

    def attend_async(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        q, codes = self._query_args(seq_ids, queries)
        if queries.device.type == "cpu":
            # No separate device: the "device" work would run on the same cores as the store,
            # so a worker thread overlaps nothing and only adds a hand-off (measured on 2
            # cores: ~1 ms per layer-step, 75 vs 45 ms per SmolLM2 decode step at 8k).
            result = self.store.attend(list(seq_ids), q, codes)
            return PendingAttention(lambda: result)
        handle = self.store.attend_async(list(seq_ids), q, codes)
        device = queries.device

        def finish():
            out, lse, num = handle.wait()
            return out.to(device), lse.to(device), num.to(device)

        return PendingAttention(finish)

    def attend_trusted(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        """:meth:`attend_async` for the runner's decode step, which validated once what the
        per-call checks would (its sequence ids are this layer's, its queries the model's
        [B, Hq, d]): hash with the extension's kernel straight into a buffer and call the store
        unchecked. On the CPU the checks, temporaries and reshapes cost several times the native
        attend of a short middle (measured: 0.56 ms per layer and step against 0.02 ms)."""
        if queries.device.type != "cpu" or self.store.backend != "cpp":
            return self.attend_async(seq_ids, queries)  # the GPU hashes with Triton; numba has no fast path
        b, hq, d = queries.shape
        hkv = self.num_kv_heads
        q = queries.detach().to(torch.float32).contiguous()
        rows = q.view(b, hkv, hq // hkv, d).transpose(0, 1).reshape(hkv, -1, d)  # each KV head's queries together
        codes = torch.empty(hkv, rows.shape[1], self.config.L, dtype=torch.int32)
        _C.simhash_codes(rows.numpy(), hkv, rows.shape[1], d, self._numpy_projection(), self.config.K,
                         self.config.L, codes.numpy(), min(torch.get_num_threads(), self._max_threads))
        codes = codes.view(hkv, b, hq // hkv, -1).transpose(0, 1).reshape(b, hq, -1)
        ids = np.fromiter(seq_ids, dtype=np.int64, count=b)
        result = self.store.attend_trusted(ids, q.numpy(), codes.numpy())
        return PendingAttention(lambda: result)

    def _numpy_projection(self) -> np.ndarray:
        """The projection [Hkv, d, K*L] float32 as the extension takes it (made once)."""
        if self._projection_np is None:
            self._projection_np = self.projection.to(torch.float32).contiguous().numpy()
        return self._projection_np

    def nbytes(self, seq_id: int | None = None) -> int:
        return int(self.store.nbytes(seq_id))
