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


@pytest.mark.skipif(not extension_available(), reason="the C++ extension is not built")
def test_sizes_are_the_extensions_own():
    """The pure module's constants are the C++ store's (kBlockTokens, kMaxLowBits)."""
    from magicpig import _C

    info = _C.cpu_info()
    assert info["block_tokens"] == STORE_BLOCK_TOKENS


@pytest.mark.parametrize("backend", ["cpp", "numba"])
def test_timing_hook_sees_every_synchronous_call(backend):
    """set_timing_hook: one call per synchronous append and attend (attend_trusted too), with
    the tokens appended and the rows read (the numba store's rows: a lower bound); none for
    the asynchronous ones, none once removed."""
    if backend == "cpp" and not extension_available():
        pytest.skip("the C++ extension is not built")
    import numpy as np

    from magicpig.lsh import SimHash

    store = CPUStore(2, 16, 6, 8, kv_dtype="fp32", backend=backend)
    proj = SimHash(16, 6, 8, seed=1)
    calls = []
    store.set_timing_hook(lambda kind, seconds, info: calls.append((kind, seconds, info)))
    sid = store.add_sequence()
    keys = torch.randn(2, 300, 16)
    store.append(sid, keys, torch.randn(2, 300, 16), proj.hash(keys))
    q = keys[:, :2].transpose(0, 1).repeat_interleave(2, dim=1).contiguous()  # [2, 4, 16]: queries near keys
    out, lse, ncand = store.attend([sid, sid], q, proj.hash(q))
    store.attend_trusted(np.array([sid], dtype=np.int64), q[:1].numpy(), proj.hash(q[:1]).numpy())
    store.attend_async([sid], q[:1], proj.hash(q[:1])).wait()  # not timed: a handle
    assert [c[0] for c in calls] == ["append", "attend", "attend"]
    assert calls[0][2] == {"tokens": 300, "heads": 2} and all(c[1] > 0 for c in calls)
    assert calls[1][2]["rows"] > 0 and list(calls[1][2]["seq_ids"]) == [sid, sid]
    if backend == "cpp":
        assert calls[1][2]["entries"] > 0
    store.set_timing_hook(None)
    store.attend([sid], q[:1], proj.hash(q[:1]))
    assert len(calls) == 3
    store.close()
