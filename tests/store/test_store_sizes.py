"""The store's sizes (magicpig/store/sizes.py), which the ledger reserves CPU memory by, against
what a real C++ store grows by, and the sizes module stays pure (the simulator imports it)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from magicpig.store.cpu_store import CPUStore, extension_available
from magicpig.store.sizes import LOW_BITS, STORE_BLOCK_TOKENS, store_bytes_per_token_head


@pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
@pytest.mark.parametrize("K, L, kv_dtype", [(10, 20, "bf16"), (LOW_BITS + 2, 8, "fp32"), (6, 30, "fp16"),
                                            (LOW_BITS, 3, "bf16")])
def test_bytes_per_token_are_what_the_store_grows_by(K, L, kv_dtype):
    """Two sequences of 2,000 and 6,000 tokens, each appended at once: the store's bytes differ
    by exactly 4,000 tokens' worth per KV head (the per-block offsets cancel; K > 12 adds a
    byte of high code bits per table, which the simulator's copy of the formula had dropped)."""
    store = CPUStore(2, 16, K, L, kv_dtype=kv_dtype, backend="cpp")
    grown = []
    for n in (2000, 6000):
        sid = store.add_sequence()
        base = store.nbytes(sid)
        g = torch.Generator().manual_seed(n)
        store.append(sid, torch.randn(2, n, 16, generator=g), torch.randn(2, n, 16, generator=g),
                     torch.randint(0, 2**K, (2, n, L), dtype=torch.int32, generator=g))
        grown.append(store.nbytes(sid) - base)
    assert grown[1] - grown[0] == 2 * 4000 * store_bytes_per_token_head(K, L, 16, kv_dtype)
    store.close()


def test_sizes_follow_the_methods_and_stay_pure():
    assert store_bytes_per_token_head(10, 150, 128, "bf16") == 2 * 128 * 2 + 2 * 150 + 4
    assert store_bytes_per_token_head(13, 150, 128, "bf16") == 2 * 128 * 2 + 3 * 150 + 4
    assert store_bytes_per_token_head(10, 150, 128, "fp32", method="topk") == 2 * 128 * 4  # K/V only
    assert STORE_BLOCK_TOKENS == 65535 and LOW_BITS == 12
    code = "import sys, magicpig.store.sizes; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "False", out.stdout + out.stderr
