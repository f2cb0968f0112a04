"""The scheduling policies (DESIGN.md §4), as in vLLM, Sarathi and Nexus (arXiv 2507.06608).
Each is a small object whose ``plan`` fills a :class:`SchedulePlan` from the scheduler's
queues, using the mechanism the scheduler shares with all of them (``admit_chunks``).

* ``fcfs``: one batch per step: every decode, then waiting prompts in arrival order up to
  ``max_prefill_tokens`` (at least one). The engine's default.
* ``chunked``: one mixed batch under a token budget (Sarathi / vLLM's chunked prefill):
  decodes first, one token each; the rest of ``token_budget`` goes to prefill chunks, partial
  prefills first, then waiting prompts in arrival order.
* ``prefill_first``: a step either prefills (while anything can be admitted or is part-way)
  or decodes; prefills win (vLLM's original scheduler).
* ``static``: two lanes at a fixed split: decode gets ``1 - static_prefill_share`` of the
  device, prefill the rest (one chunk of up to ``chunk_tokens`` per step).
* ``nexus``: two lanes; decode gets the smallest share whose modelled step meets
  ``tbt_target_s * slack`` (the cost model), prefill the rest (at least
  ``min_prefill_share`` while it has a chunk); a smaller share is taken only
  after it has sufficed for ``hysteresis_steps`` steps in a row (no flapping); when device blocks
  or CPU-store bytes pass ``memory_threshold`` of their totals, decode-first (no new prefill,
  decode gets the whole device) until they drop below; prefills shortest-first, except that a
  request waiting longer than ``max_wait_s`` goes first (aging: long prompts are not starved).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from magicpig.config import check_float, check_int

if TYPE_CHECKING:  # only read here
    from magicpig.core.prefix_cache import CacheNode
    from magicpig.core.request import Request, SequenceKV
    from magicpig.core.scheduler import Scheduler

POLICIES = ("fcfs", "chunked", "prefill_first", "static", "nexus")
SPLIT_POLICIES = ("static", "nexus")


@dataclass
class PrefillChunk:
    """``num_tokens`` more tokens of ``request``'s prefill, from token ``start``; ``last``: the
    chunk completes it (its first token is sampled after it)."""

    request: "Request"
    start: int
    num_tokens: int
    last: bool


@dataclass
class SchedulePlan:
    """One step. prefill_share: the prefill lane's fraction of the device for a split policy
    (decode gets the rest), None for one mixed batch. preempted: requests sent back to the
    queue this step; released: their dropped KV states (the runner frees their store entries);
    evicted: prefix-cache nodes evicted for this step's admissions (the runner drops their
    store state)."""

    chunks: list[PrefillChunk] = field(default_factory=list)
    decodes: list["Request"] = field(default_factory=list)
    preempted: list["Request"] = field(default_factory=list)
    released: list["SequenceKV"] = field(default_factory=list)
    evicted: list["CacheNode"] = field(default_factory=list)
    prefill_share: Optional[float] = None

    @property
    def prefills(self) -> list["Request"]:
        return [c.request for c in self.chunks]

    @property
    def prefill_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)


class DecodeCost(Protocol):
    """What ``nexus`` asks of a cost model: the smallest decode share meeting a step target."""

    def smallest_decode_share(self, context_lens: Sequence[int], method: str, tbt_target_s: float,
                              slack: float = 1.0, sampled_fraction: Optional[float] = None) -> Any: ...


@dataclass
class PolicyConfig:
    """The policy and its knobs (see the module docstring). Times in seconds."""

    name: str = "fcfs"
    token_budget: int = 2048
    chunk_tokens: int = 2048
    static_prefill_share: float = 0.5
    tbt_target_s: float = 0.1
    slack: float = 0.9
    memory_threshold: float = 0.9
    min_prefill_share: float = 0.06  # nexus: a planned chunk keeps at least this (8 of 132 SMs)
    hysteresis_steps: int = 8
    max_wait_s: float = 30.0
    method: str = "magicpig"  # what the cost model prices decode as

    def __post_init__(self) -> None:
        if self.name not in POLICIES:
            raise ValueError(f"policy={self.name!r}: expected one of {POLICIES}")
        check_int("token_budget", self.token_budget, 1)
        check_int("chunk_tokens", self.chunk_tokens, 1)
        check_float("static_prefill_share", self.static_prefill_share, 0.0, 1.0, low_open=True, high_open=True)
        check_float("tbt_target_s", self.tbt_target_s, 0.0, 3600.0, low_open=True)
        check_float("slack", self.slack, 0.0, 10.0, low_open=True)
        check_float("memory_threshold", self.memory_threshold, 0.0, 1.0, low_open=True)
        check_float("min_prefill_share", self.min_prefill_share, 0.0, 1.0, low_open=True, high_open=True)
        check_int("hysteresis_steps", self.hysteresis_steps, 0)
        check_float("max_wait_s", self.max_wait_s, 0.0, 1e9)


# ---------------------------------------------------------------------------------- policies
class Fcfs:
    """Every decode, then waiting prompts in arrival order up to ``max_prefill_tokens``."""

    def plan(self, s: "Scheduler", plan: SchedulePlan, ready: list["Request"]) -> None:
        plan.decodes = ready
        if not plan.preempted:  # just out of memory: admit nothing new this step
            s.admit_chunks(plan, s.max_prefill_tokens, s.fcfs_order())


class Chunked:
    """Decodes first, one token each; the rest of ``token_budget`` goes to prefill chunks."""

    def plan(self, s: "Scheduler", plan: SchedulePlan, ready: list["Request"]) -> None:
        plan.decodes = ready
        budget = s.policy.token_budget - len(ready)
        if not plan.preempted and budget > 0:
            s.admit_chunks(plan, budget, s.fcfs_order())


class PrefillFirst:
    """A step prefills while anything can be admitted or is part-way, else decodes."""

    def plan(self, s: "Scheduler", plan: SchedulePlan, ready: list["Request"]) -> None:
        if not plan.preempted:
            s.admit_chunks(plan, s.policy.token_budget, s.fcfs_order())
        plan.decodes = [] if plan.chunks else ready


class Static:
    """Two lanes at a fixed split; one prefill chunk per step, in arrival order."""

    def plan(self, s: "Scheduler", plan: SchedulePlan, ready: list["Request"]) -> None:
        plan.decodes = ready
        if not plan.preempted:
            s.admit_chunks(plan, s.policy.chunk_tokens, s.fcfs_order(), one=True)
        plan.prefill_share = _lane_share(plan, ready, lambda: s.policy.static_prefill_share)


class Nexus:
    """Two lanes; decode gets the smallest share meeting the step target (with hysteresis),
    decode-first under memory pressure, prefills shortest-first with aging."""

    def __init__(self, cost: DecodeCost, clock: Callable[[], float]):
        self.cost, self.clock = cost, clock
        self.decode_share: Optional[float] = None  # the share in force (hysteresis)
        self.smaller_for = 0  # steps a smaller share has sufficed in a row
        self.decode_first = False  # memory past the threshold

    def plan(self, s: "Scheduler", plan: SchedulePlan, ready: list["Request"]) -> None:
        pol = s.policy
        plan.decodes = ready
        # Decode-first frees memory only if something decodes: with none ready, the memory
        # is held by part-way prefills, which must go on (else nothing ever runs again).
        self.decode_first = bool(ready) and s.kv.pressure() >= pol.memory_threshold
        if self.decode_first:
            plan.prefill_share = 0.0
            return
        if not plan.preempted:
            s.admit_chunks(plan, pol.chunk_tokens, self.aged_shortest_first(s), one=True)
        # When decode needs (nearly) the whole device, a planned chunk still gets a lane: a
        # share of 0 would stall it (and no partition has 0 SMs).
        plan.prefill_share = _lane_share(
            plan, ready, lambda: max(1.0 - self.decode_share_for(s, ready), pol.min_prefill_share))

    def decode_share_for(self, s: "Scheduler", ready: list["Request"]) -> float:
        """The smallest share meeting the target; a smaller one than in force only after it
        sufficed ``hysteresis_steps`` times in a row, a larger one at once."""
        pol = s.policy
        cached = [r.num_computed_tokens for r in ready]  # K/V a decode step reads
        choice = self.cost.smallest_decode_share(cached, pol.method, pol.tbt_target_s, pol.slack)
        wanted = choice.share if choice.meets_target else 1.0
        if self.decode_share is None or wanted >= self.decode_share:
            self.decode_share, self.smaller_for = wanted, 0
        else:
            self.smaller_for += 1
            if self.smaller_for > pol.hysteresis_steps:
                self.decode_share, self.smaller_for = wanted, 0
        return self.decode_share

    def aged_shortest_first(self, s: "Scheduler") -> list["Request"]:
        """Part-way prefills, then requests past their wait limit (oldest first), then the rest
        by remaining prefill length (shortest first; ties by arrival)."""
        now, limit = self.clock(), s.policy.max_wait_s
        overdue = [r for r in s.waiting if now - r.arrival > limit]
        rest = sorted((r for r in s.waiting if now - r.arrival <= limit), key=lambda r: (r.prefill_length, r.arrival))
        partial = [r for r in s.running if r.is_prefilling]
        return partial + sorted(overdue, key=lambda r: r.arrival) + rest


def _lane_share(plan: SchedulePlan, ready: list["Request"], share: Callable[[], float]) -> float:
    """The prefill lane's share: 0 without a chunk, 1 without a decode, else ``share()``."""
    if not plan.chunks:
        return 0.0
    if not ready:
        return 1.0
    return share()


def make_policy(config: PolicyConfig, cost: Optional[DecodeCost], clock: Optional[Callable[[], float]]) -> Any:
    if config.name == "nexus":
        if cost is None or clock is None:
            raise ValueError("policy 'nexus' needs a cost model and a clock")
        return Nexus(cost, clock)
    return {"fcfs": Fcfs, "chunked": Chunked, "prefill_first": PrefillFirst, "static": Static}[config.name]()
