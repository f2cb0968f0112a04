"""The "magicpig" middle attention: LSH sampling on the CPU store (DESIGN.md §2).

Hashing happens where the vectors are (the device): keys are hashed when they enter the
middle, queries at each decode step, with the per-(layer, KV head) projections of
:func:`magicpig.lsh.layer_projection`. The K/V, the codes' bucket tables and the sampled
attention itself live in :class:`magicpig.store.CPUStore` (C++, numba fallback); this class
only hashes, moves tensors and keeps per-sequence lengths.
"""

from __future__ import annotations

import warnings

import torch

from magicpig.attention.base import MiddleAttention, PendingAttention, register_method
from magicpig.config import MagicPIGConfig
from magicpig.lsh import hash_codes, layer_projection


def _make_store(config: MagicPIGConfig, num_kv_heads: int, head_dim: int):
    try:
        from magicpig.store import CPUStore
    except ImportError as err:
        # Only while the store package is missing (a partial checkout): fall back to the torch
        # oracle, which is exact but reads every key.
        warnings.warn(f"magicpig.store.CPUStore unavailable ({err}); using the slow torch reference")
        return _ReferenceStore(num_kv_heads, head_dim, config.K, config.L, config.min_collisions)
    return CPUStore(
        num_kv_heads,
        head_dim,
        config.K,
        config.L,
        min_collisions=config.min_collisions,
        kv_dtype=config.kv_dtype,
        num_threads=config.cpu_threads,
        backend=config.cpu_backend,
    )


@register_method("magicpig")
class SampledMiddle(MiddleAttention):
    """LSH-sampled attention over the centred middle keys of one layer."""

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        super().__init__(config, layer, num_kv_heads, head_dim)
        self.projection = layer_projection(config.seed, layer, num_kv_heads, head_dim, config.K, config.L)
        self._on_device: dict[tuple[torch.device, int], torch.Tensor] = {}
        self.store = _make_store(config, num_kv_heads, head_dim)
        self._lengths: dict[int, int] = {}

    def _projection(self, device: torch.device, num_heads: int) -> torch.Tensor:
        """[num_heads, d, K*L] on ``device``: per KV head, or per query head (GQA mapping)."""
        key = (device, num_heads)
        if key not in self._on_device:
            proj = self.projection
            if num_heads != self.num_kv_heads:
                if num_heads % self.num_kv_heads:
                    raise ValueError(
                        f"queries have {num_heads} heads, not a multiple of num_kv_heads={self.num_kv_heads}"
                    )
                kv_of = torch.arange(num_heads) // (num_heads // self.num_kv_heads)
                proj = proj[kv_of]
            self._on_device[key] = proj.to(device)
        return self._on_device[key]

    def add_sequence(self) -> int:
        seq_id = self.store.add_sequence()
        self._lengths[seq_id] = 0
        return seq_id

    def remove_sequence(self, seq_id: int) -> None:
        self.store.remove_sequence(seq_id)
        self._lengths.pop(seq_id, None)

    def length(self, seq_id: int) -> int:
        if seq_id not in self._lengths:
            raise KeyError(f"seq_id={seq_id!r} is not a registered sequence of this layer")
        return self._lengths[seq_id]

    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """keys, values [Hkv, t, d] (keys centred), any device; hashed where they are."""
        if keys.dim() != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(
                f"keys has shape {tuple(keys.shape)}; expected [Hkv={self.num_kv_heads}, t, d={self.head_dim}]"
            )
        if values.shape != keys.shape:
            raise ValueError(f"values has shape {tuple(values.shape)}; expected {tuple(keys.shape)}")
        codes = hash_codes(keys, self._projection(keys.device, self.num_kv_heads), self.config.K)
        self.store.append(
            seq_id,
            keys.detach().to("cpu", torch.float32).contiguous(),
            values.detach().to("cpu", torch.float32).contiguous(),
            codes.to("cpu").contiguous(),
        )
        self._lengths[seq_id] = self.length(seq_id) + keys.shape[1]

    def _query_args(self, queries: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if queries.dim() != 3 or queries.shape[2] != self.head_dim:
            raise ValueError(f"queries has shape {tuple(queries.shape)}; expected [B, Hq, d={self.head_dim}]")
        proj = self._projection(queries.device, queries.shape[1])  # [Hq, d, K*L]
        codes = hash_codes(queries.unsqueeze(2), proj, self.config.K).squeeze(2)  # [B, Hq, L]
        return queries.detach().to("cpu", torch.float32).contiguous(), codes.to("cpu").contiguous()

    def attend(self, seq_ids: list[int], queries: torch.Tensor):
        return self.attend_async(seq_ids, queries).wait()

    def attend_async(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        q, codes = self._query_args(queries)
        handle = self.store.attend_async(list(seq_ids), q, codes)
        device = queries.device

        def finish():
            out, lse, num = handle.wait()
            return out.to(device), lse.to(device), num.to(device)

        return PendingAttention(finish)

    def nbytes(self, seq_id: int | None = None) -> int:
        return int(self.store.nbytes(seq_id))


class _ReferenceStore:
    """CPUStore's interface over the torch oracle (magicpig.attention.reference); slow."""

    def __init__(self, num_kv_heads: int, head_dim: int, K: int, L: int, min_collisions: int):
        self.K, self.L, self.m = K, L, min_collisions
        self.data: dict[int, list[torch.Tensor]] = {}
        self.next_id = 0

    def add_sequence(self) -> int:
        self.next_id += 1
        self.data[self.next_id - 1] = []
        return self.next_id - 1

    def remove_sequence(self, seq_id: int) -> None:
        del self.data[seq_id]

    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor, codes: torch.Tensor) -> None:
        parts = self.data[seq_id]
        new = [keys, values, codes]
        self.data[seq_id] = [torch.cat([a, b], dim=1) for a, b in zip(parts, new)] if parts else new

    def attend_async(self, seq_ids: list[int], q: torch.Tensor, codes: torch.Tensor) -> PendingAttention:
        from magicpig.attention.reference import candidate_mask, sampled_attention

        outs, lses, nums = [], [], []
        for b, sid in enumerate(seq_ids):
            hq, d = q.shape[1], q.shape[2]
            if not self.data[sid]:
                outs.append(torch.zeros(1, hq, d))
                lses.append(torch.full((1, hq), float("-inf")))
                nums.append(torch.zeros(1, hq, dtype=torch.int32))
                continue
            k, v, kc = (t[None] for t in self.data[sid])
            mask = candidate_mask(codes[b : b + 1], kc, self.m)
            out, lse = sampled_attention(q[b : b + 1], k, v, mask, self.K, self.L, self.m)
            outs.append(out)
            lses.append(lse)
            nums.append(mask.sum(-1).to(torch.int32))
        result = (torch.cat(outs), torch.cat(lses), torch.cat(nums))
        return PendingAttention(lambda: result)

    def nbytes(self, seq_id: int | None = None) -> int:
        ids = list(self.data) if seq_id is None else [seq_id]
        return sum(t.numel() * t.element_size() for i in ids for t in self.data[i])
