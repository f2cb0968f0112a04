"""One interface for every way of attending over the offloaded middle of the context.

DESIGN.md §3: the methods compared by the evaluation (dense, magicpig, topk, quest,
oracle_sampling, streaming, retrieval) differ only in which middle keys a decode query reads
and how it weights them. Sinks, the local window and the merge by log-sum-exp are the same for
all of them and live in the model runtime. A method holds the middle K/V of one attention
layer for many sequences and answers "given q, return (out, lse) over the keys you chose".
The methods themselves and the registry of their names (``make_method``) are in
:mod:`magicpig.attention.registry`; this module imports none of them.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Callable

import torch

from magicpig.config import MagicPIGConfig


class PendingAttention:
    """Result of :meth:`MiddleAttention.attend_async`; ``wait()`` returns attend's tuple."""

    def __init__(self, fn: Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]):
        self._fn = fn

    def wait(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self._fn()


class PendingAppend:
    """Result of :meth:`MiddleAttention.append_async`; ``wait()`` returns once the tokens are
    held (and re-raises an error of the append)."""

    def __init__(self, wait: Callable[[], None] | None = None):
        self._wait = wait

    def wait(self) -> None:
        if self._wait is not None:
            self._wait()


class MiddleAttention(ABC):
    """Attention over the middle keys ``[S, n - W)`` of one layer, for many sequences.

    Keys passed in are already centred (``k - mu``). Tensors may live on any device; results
    come back on the device of the queries.
    """

    def __init__(self, config: MagicPIGConfig, layer: int, num_kv_heads: int, head_dim: int):
        self.config = config
        self.layer = layer
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim

    def check_kv(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Raise a ValueError unless keys and values are both [Hkv, t, d] of this layer."""
        if keys.dim() != 3 or keys.shape[0] != self.num_kv_heads or keys.shape[2] != self.head_dim:
            raise ValueError(
                f"keys has shape {tuple(keys.shape)}; expected [Hkv={self.num_kv_heads}, t, d={self.head_dim}]"
            )
        if values.shape != keys.shape:
            raise ValueError(f"values has shape {tuple(values.shape)}; expected the keys' shape {tuple(keys.shape)}")

    def check_queries(self, seq_ids: list[int], queries: torch.Tensor) -> None:
        """Raise a ValueError unless queries is [B=len(seq_ids), Hq, d] with Hq a multiple of Hkv."""
        if queries.dim() != 3 or queries.shape[0] != len(seq_ids) or queries.shape[2] != self.head_dim:
            raise ValueError(
                f"queries has shape {tuple(queries.shape)}; expected [B={len(seq_ids)}, Hq, d={self.head_dim}]"
            )
        if queries.shape[1] == 0 or queries.shape[1] % self.num_kv_heads:
            raise ValueError(
                f"queries have {queries.shape[1]} heads, not a positive multiple of num_kv_heads={self.num_kv_heads}"
            )

    @abstractmethod
    def add_sequence(self) -> int:
        """Register an empty sequence and return its id."""

    @abstractmethod
    def remove_sequence(self, seq_id: int) -> None:
        """Forget a sequence and free its memory; attends already started on it finish first
        (their ``wait()`` still gives a result)."""

    @abstractmethod
    def append(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Add middle tokens. keys, values: [Hkv, t, d] (keys centred)."""

    def append_async(self, seq_id: int, keys: torch.Tensor, values: torch.Tensor) -> PendingAppend:
        """Start :meth:`append`; the tokens are retrievable once ``wait()`` returns. Methods with
        a CPU backend build their index on a worker thread while the caller goes on (the
        runner's prefill: layer l's tables are built while layer l + 1 is computed). By
        default the append runs here."""
        self.append(seq_id, keys, values)
        return PendingAppend()

    @abstractmethod
    def length(self, seq_id: int) -> int:
        """Number of middle tokens held for ``seq_id``."""

    def fork(self, seq_id: int, tokens: int) -> int:
        """A new sequence holding the first ``tokens`` middle tokens of ``seq_id`` (0 <= tokens
        <= length(seq_id)), then whatever is appended to it; returns its id. Appends to either
        sequence afterwards leave the other unchanged, and removing either leaves the other
        intact. For prefix caching: requests sharing a prompt prefix fork the sequence that holds
        its middle. A method that cannot serve it raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__}.fork: this method cannot fork a sequence")

    def read(self, seq_id: int, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The held keys and values of middle tokens [start, end) of ``seq_id`` (0 <= start <=
        end <= length(seq_id)), two CPU tensors [Hkv, end - start, d] as the method holds them
        (its dtype). For streaming a cached prefix's middle back to the device. A method that
        does not keep the middle's K/V raises NotImplementedError."""
        raise NotImplementedError(f"{type(self).__name__}.read: this method does not keep the middle's K/V")

    @abstractmethod
    def attend(
        self, seq_ids: list[int], queries: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Attend one decode query per head.

        queries: [B, Hq, d]. Returns out [B, Hq, d] float32, lse [B, Hq] float32 (-inf and
        out = 0 where no key was chosen) and num_read [B, Hq] int32, the number of middle keys
        whose K/V were read (the computation cost is num_read / length).
        """

    def attend_async(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        """Start :meth:`attend`; methods with a CPU backend overlap it with device work."""
        result = self.attend(seq_ids, queries)
        return PendingAttention(lambda: result)

    def attend_trusted(self, seq_ids: list[int], queries: torch.Tensor) -> PendingAttention:
        """:meth:`attend_async` for a caller that has validated the sequence ids and the
        queries' shape once (the runner's decode step, per layer): a method may skip its
        per-call checks here. By default it is attend_async."""
        return self.attend_async(seq_ids, queries)

    def nbytes(self, seq_id: int | None = None) -> int:
        """Bytes held (for one sequence, or all)."""
        return 0
