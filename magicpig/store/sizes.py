"""What the CPU store holds per token: the one home of its sizes (pure Python, no torch, so the
ledger's callers and the simulator can ask it). The figures are the C++ store's layout
(csrc/store.h): per (sequence, KV head), blocks of up to ``STORE_BLOCK_TOKENS`` tokens, each
token's K and V rows in the store's dtype, an fp32 key norm, and per hash table a uint16 token id
in its bucket list plus a byte of high code bits when K > ``LOW_BITS`` (the lists' offsets are
per block, not per token). ``tests/store`` checks them against the extension and against the
bytes a real store grows by."""

from __future__ import annotations

STORE_BLOCK_TOKENS = 65535  # kBlockTokens: token ids and bucket offsets both fit uint16
LOW_BITS = 12  # kMaxLowBits: codes' bits kept in the bucket lists' uint16 offsets; the rest in a byte
KV_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}


def index_bytes_per_token_head(K: int, L: int) -> int:
    """CPU bytes per middle token and KV head beside its K/V: a uint16 id in each of the L
    bucket lists, a byte of high code bits per table when K > 12, and an fp32 key norm."""
    return 2 * L + (L if K > LOW_BITS else 0) + 4


def store_bytes_per_token_head(K: int, L: int, head_dim: int, kv_dtype: str, method: str = "magicpig") -> int:
    """CPU bytes one middle token takes per KV head: its K and V rows in ``kv_dtype``, plus the
    LSH index and key norm for ``method`` "magicpig" (the other methods keep K/V only)."""
    kv = 2 * head_dim * KV_DTYPE_BYTES[kv_dtype]
    return kv + (index_bytes_per_token_head(K, L) if method == "magicpig" else 0)
