"""Request: everything the engine knows about one request, in one object (DESIGN.md §4, §5).

Its id, prompt ids, sampling parameters, status, generated ids, timings, preemption count and
where its KV state lives (``kv``: its dense-layer block table, its sinks+window slot, its id in
every sparse layer's store). ``num_computed_tokens`` is the one progress counter (vLLM v1's):
the tokens whose K/V the request holds, prefill chunks and decode steps alike. The ledger
(:mod:`magicpig.core.kv_budget`) grants ``kv.blocks`` and ``kv.slot``; the runner fills them
and advances ``kv.length``; the scheduler reads the sizes. Pure data: no torch.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from magicpig.core.sampling_params import SamplingParams

if TYPE_CHECKING:  # only read here
    from magicpig.core.prefix_cache import CacheNode

_ids = itertools.count()  # the one request-id counter


def next_request_id() -> str:
    return f"req-{next(_ids)}"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)
class SequenceKV:
    """Where one sequence's KV state lives. length: tokens whose K/V are held (computed so far:
    prefilled, then one more per decode step). blocks: its dense-layer block table (granted by
    the ledger). slot: its sinks+window slot (granted by the ledger; -1: none). fill / middle:
    tokens in the slot / in the middle once its prompt is complete (fill + middle == length on
    sparse layers). store_ids: its id in each sparse layer's middle attention (the runner's).
    cost_sum / cost_steps: fraction of middle keys read, summed over the decode steps that had
    a middle. prefix / cached: the cached prefix it starts from (its first ``cached`` tokens are
    ``prefix``'s; the runner forks its store entries from it), None / 0 without one.
    cache_refs: the cache nodes it holds a reference on (its prefix and the nodes it cached)."""

    length: int = 0
    blocks: list[int] = field(default_factory=list)
    slot: int = -1
    fill: int = 0
    middle: int = 0
    store_ids: dict[int, int] = field(default_factory=dict)
    cost_sum: float = 0.0
    cost_steps: int = 0
    prefix: Optional["CacheNode"] = None
    cached: int = 0
    cache_refs: list["CacheNode"] = field(default_factory=list)

    @property
    def computation_cost(self) -> float:
        return self.cost_sum / self.cost_steps if self.cost_steps else 0.0


@dataclass(eq=False)
class Request:
    """One generation request. ``prompt_ids``: the encoded prompt; ``output_ids``: the
    generated ids; ``kv``: where its KV state lives (empty while it waits). cacheable: whether
    it reads and feeds the prefix cache; block_hashes: the keys of its full blocks computed so
    far (prefix_cache.block_hashes); num_cached_tokens: prompt tokens its last admission found
    cached (not prefilled again)."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    finish_reason: Optional[str] = None
    kv: SequenceKV = field(default_factory=SequenceKV)
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    num_preemptions: int = 0
    # Middle reads of the KV states dropped by preemptions (the re-prefilled state starts at 0).
    released_cost: tuple[float, int] = (0.0, 0)
    cacheable: bool = True
    block_hashes: list[bytes] = field(default_factory=list)
    num_cached_tokens: int = 0

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Prompt and generated tokens (a running request holds K/V of all but the last)."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def num_computed_tokens(self) -> int:
        """Tokens whose K/V the request holds: the one progress counter."""
        return self.kv.length

    @property
    def max_tokens(self) -> int:
        """The most tokens of K/V it can ever hold: the last generated token is never fed."""
        return self.num_prompt_tokens + self.params.max_new_tokens - 1

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def all_token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def tokens_to_prefill(self) -> list[int]:
        """What a (re)admission prefills: the prompt and, after a preemption, every generated
        token but the last (which the next decode step feeds)."""
        return self.prompt_ids + self.output_ids[:-1]

    @property
    def prefill_length(self) -> int:
        return self.num_prompt_tokens + max(0, len(self.output_ids) - 1)

    @property
    def is_prefilling(self) -> bool:
        """Admitted, its prefill part-way (it does not decode yet)."""
        return self.status is Status.RUNNING and self.num_computed_tokens < self.prefill_length

    def middle_reads(self) -> tuple[float, int]:
        """(sum, steps) of the fraction of middle keys read, over all its KV states."""
        return self.released_cost[0] + self.kv.cost_sum, self.released_cost[1] + self.kv.cost_steps
