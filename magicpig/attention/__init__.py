"""Attention: the exact torch reference and the middle-attention methods (DESIGN.md §2-§3)."""

from magicpig.attention.reference import (
    candidate_mask,
    dense_attention,
    hybrid_attention,
    merge_by_lse,
    sampled_attention,
    top_candidates,
)

__all__ = [
    "candidate_mask", "dense_attention", "hybrid_attention", "merge_by_lse", "sampled_attention", "top_candidates",
]
