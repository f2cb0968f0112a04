"""A fixed CPU-store attend workload (``scripts/callgrind_attend.py``), for instruction counts
under callgrind: the store's work must not change when its code is reshaped."""

from __future__ import annotations

import torch

from magicpig.lsh import SimHash
from magicpig.store.cpu_store import CPUStore


def callgrind_workload(attends: int = 20, tokens: int = 3000, batch: int = 4) -> float:
    """``attends`` attends of ``batch`` sequences of ``tokens`` middle tokens (Llama-3.1-8B
    heads: 8 KV, 32 query, d=128; K=10, L=40), plain and with a carried exact head of 16;
    returns a checksum of the outputs (the same before and after a change that keeps results)."""
    torch.manual_seed(0)
    H, Hq, d, K, L = 8, 32, 128, 10, 40
    total = 0.0
    for exact, carry in ((0, False), (16, True)):
        store = CPUStore(H, d, K, L, min_collisions=2, kv_dtype="bf16", num_threads=1, backend="cpp",
                         exact_keys=exact, carry_head=carry)
        proj = SimHash(d, K, L, seed=0)
        ids = []
        for _ in range(batch):
            keys, values = torch.randn(H, tokens, d), torch.randn(H, tokens, d)
            sid = store.add_sequence()
            store.append(sid, keys, values, proj.hash(keys))
            ids.append(sid)
        for _ in range(attends):
            q = torch.randn(batch, Hq, d)
            out, lse, _ = store.attend(ids, q, proj.hash(q))
            total += float(out.double().sum()) + float(lse[torch.isfinite(lse)].double().sum())
        store.close()
    return total
