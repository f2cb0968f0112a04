"""Request: everything the engine knows about one request, in one object (DESIGN.md §4).

Its id, prompt ids, sampling parameters, status, generated ids and text, timings, and where its
KV state lives (``kv``: its dense blocks, its sinks+window slot, its id in every sparse layer's
store; None while it waits). The scheduler reads the sizes; the engine fills in the rest.
"""

from __future__ import annotations

import enum
import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from magicpig.runtime.outputs import GenerationStats, OutputText, SamplingParams

_ids = itertools.count()  # the one request-id counter


def next_request_id() -> str:
    return f"req-{next(_ids)}"


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Request:
    """One generation request. ``prompt_ids``: the encoded prompt; ``output``: generated ids,
    text and finish reason; ``kv``: the runner's :class:`SequenceKV` while running."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival: float = field(default_factory=time.perf_counter)
    status: Status = Status.WAITING
    output: OutputText = field(default_factory=OutputText)
    kv: Optional[Any] = None
    partial: Optional[Any] = None  # the runner's PartialPrefill while its prompt is part-way
    generator: Optional[Any] = None  # torch.Generator when params.seed is set
    first_token_time: Optional[float] = None
    finish_time: Optional[float] = None
    prefill_seconds: float = 0.0
    decode_steps: int = 0
    num_preemptions: int = 0
    carried_cost: tuple[float, int] = (0.0, 0)  # middle reads before a preemption (sum, steps)
    stats: Optional[GenerationStats] = None  # set when it finishes

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens whose K/V a running request holds once its last output is fed back."""
        return len(self.prompt_ids) + len(self.output.out_ids)

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def tokens_to_prefill(self) -> list[int]:
        """What a (re)admission prefills: the prompt and, after a preemption, every generated
        token but the last (which the next decode step feeds)."""
        return self.prompt_ids + self.output.out_ids[:-1]


@dataclass
class RequestOutput:
    """What ``Engine.step`` reports for one request it touched: the new token ids and text
    piece of this step, whether it finished, why ("eos", "stop", "length", "abort", or
    "error" with the exception in ``error``), and on finish the stats a
    :class:`GenerationResult` has."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str] = None
    stats: Optional[GenerationStats] = None
    error: Optional[BaseException] = None
