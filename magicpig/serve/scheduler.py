"""The scheduler: which requests prefill and decode this step, and how the device is split
between the two lanes (DESIGN.md §4). Pure policy: no torch, no tensors; it sees requests'
sizes, the memory the engine (or the simulator) reports, and the clock it is given.

Shared by every policy (the mechanism of admission):
* decodes: running requests whose prompt is fully prefilled, oldest first. When the
  dense-layer blocks their next tokens need are not free, the newest running request is
  preempted (its state dropped; it goes back to the front of the queue and is prefilled again,
  generated tokens included) until the rest fit. Nothing crashes for lack of memory.
* admission: a waiting request is admitted while a sequence slot, the blocks of its prompt
  (+ its first decode's token) and its CPU-store reservation fit. A request's CPU-store bytes
  are reserved for its whole length (prompt + max_new_tokens) at admission, so the store never
  outgrows its budget mid-decode; device blocks are not reserved (preemption handles them).
* chunks: with ``chunked_prefill`` (the engine's default) a prompt may be prefilled over
  several steps (a request partly prefilled is running but does not decode yet); without it a
  prompt is prefilled whole in the step that admits it.

The policies (``POLICIES``), as in vLLM, Sarathi and Nexus (arXiv 2507.06608):
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

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Optional, Protocol, Sequence

from magicpig.config import check_float, check_int

if TYPE_CHECKING:  # no import at run time: requests are only read here
    from magicpig.serve.request import Request

POLICIES = ("fcfs", "chunked", "prefill_first", "static", "nexus")
SPLIT_POLICIES = ("static", "nexus")


@dataclass
class MemoryState:
    """What the engine reports before each step. free_blocks / block_size: the dense-layer
    block pool (block_size 0: the model has no dense layer). free_slots: sequence slots.
    cpu_bytes_free: the CPU-store budget not yet reserved. cpu_bytes_per_token: the reservation
    per token of a request. total_blocks / cpu_bytes_total: the pools' sizes (0: unknown),
    for the memory threshold of ``nexus``."""

    free_blocks: int
    block_size: int
    free_slots: int
    cpu_bytes_free: int
    cpu_bytes_per_token: int
    total_blocks: int = 0
    cpu_bytes_total: int = 0

    def pressure(self) -> float:
        """The larger used fraction of the two pools (0 when their sizes are unknown)."""
        used = [1 - self.free_blocks / self.total_blocks if self.total_blocks else 0.0,
                1 - self.cpu_bytes_free / self.cpu_bytes_total if self.cpu_bytes_total else 0.0]
        return max(used)


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
    (decode gets the rest), None for one mixed batch."""

    chunks: list[PrefillChunk] = field(default_factory=list)
    decodes: list["Request"] = field(default_factory=list)
    preempted: list["Request"] = field(default_factory=list)
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


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size) if block_size else 0


def prefill_length(req: "Request") -> int:
    """Tokens a (re)admission prefills: the prompt and, after a preemption, every generated
    token but the last (which the next decode step feeds)."""
    return req.num_prompt_tokens + max(0, req.num_tokens - req.num_prompt_tokens - 1)


def reserved_cpu_bytes(req: "Request", per_token: int) -> int:
    """CPU-store bytes held back for a request from admission to finish."""
    return per_token * (req.num_prompt_tokens + req.params.max_new_tokens - 1)  # the last token is never fed


class Scheduler:
    """Queues and memory bookkeeping shared by the policies; ``schedule`` runs the policy.

    max_num_seqs: most running requests. max_prefill_tokens: ``fcfs``'s prefill tokens per
    step. cost: the cost model ``nexus`` prices decode shares with. clock: the time ``nexus``
    ages requests by (the engine's perf_counter, or the simulator's time) — requests need an
    ``arrival`` on that clock.
    """

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int, policy: PolicyConfig | str = "fcfs",
                 chunked_prefill: bool = False, cost: Optional[DecodeCost] = None,
                 clock: Optional[Callable[[], float]] = None):
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.policy = PolicyConfig(policy) if isinstance(policy, str) else policy
        if self.policy.name == "nexus" and (cost is None or clock is None):
            raise ValueError("policy 'nexus' needs a cost model and a clock")
        self.chunked_prefill = chunked_prefill
        self.cost, self.clock = cost, clock
        self.waiting: deque["Request"] = deque()
        self.running: list["Request"] = []
        self._progress: dict[int, int] = {}  # id(request) -> tokens prefilled, while part-way
        self._decode_share: Optional[float] = None  # nexus: the share in force (hysteresis)
        self._smaller_for = 0  # nexus: steps a smaller share has sufficed in a row
        self._decode_first = False  # nexus: memory past the threshold

    def add(self, req: "Request") -> None:
        self.waiting.append(req)

    def remove(self, req: "Request") -> None:
        """Forget a finished or aborted request, wherever it is."""
        self._progress.pop(id(req), None)
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def is_prefilling(self, req: "Request") -> bool:
        return id(req) in self._progress

    # ------------------------------------------------------------------ the step
    def schedule(self, mem: MemoryState) -> SchedulePlan:
        plan = SchedulePlan()
        free_blocks = self._make_room_for_decodes(mem, plan)
        ready = [r for r in self.running if id(r) not in self._progress]
        name = self.policy.name
        if name == "fcfs":
            plan.decodes = ready
            if not plan.preempted:  # just out of memory: admit nothing new this step
                self._fill(mem, free_blocks, plan, self.max_prefill_tokens, self._fcfs_order())
        elif name == "chunked":
            plan.decodes = ready
            budget = self.policy.token_budget - len(ready)
            if not plan.preempted and budget > 0:
                self._fill(mem, free_blocks, plan, budget, self._fcfs_order())
        elif name == "prefill_first":
            if not plan.preempted:
                self._fill(mem, free_blocks, plan, self.policy.token_budget, self._fcfs_order())
            plan.decodes = [] if plan.chunks else ready
        else:
            self._split_step(mem, free_blocks, plan, ready)
        self._commit(plan)
        return plan

    def _split_step(self, mem: MemoryState, free_blocks: int, plan: SchedulePlan, ready: list["Request"]) -> None:
        """static / nexus: decodes on their lane, one prefill chunk on the other."""
        plan.decodes = ready
        pol = self.policy
        if pol.name == "nexus":
            # Decode-first frees memory only if something decodes: with none ready, the memory
            # is held by part-way prefills, which must go on (else nothing ever runs again).
            self._decode_first = bool(ready) and mem.pressure() >= pol.memory_threshold
            if self._decode_first:
                plan.prefill_share = 0.0
                return
        if not plan.preempted:
            order = self._fcfs_order() if pol.name == "static" else self._aged_shortest_first()
            self._fill(mem, free_blocks, plan, pol.chunk_tokens, order, one=True)
        if not plan.chunks:
            plan.prefill_share = 0.0
        elif not ready:
            plan.prefill_share = 1.0
        elif pol.name == "static":
            plan.prefill_share = pol.static_prefill_share
        else:
            # When decode needs (nearly) the whole device, a planned chunk still gets a lane: a
            # share of 0 would stall it (and no partition has 0 SMs).
            plan.prefill_share = max(1.0 - self._nexus_decode_share(ready), pol.min_prefill_share)

    def _nexus_decode_share(self, ready: list["Request"]) -> float:
        """The smallest share meeting the target; a smaller one than in force only after it
        sufficed ``hysteresis_steps`` times in a row, a larger one at once."""
        pol = self.policy
        cached = [r.num_tokens - 1 for r in ready]  # K/V a decode step reads (it feeds the last token)
        choice = self.cost.smallest_decode_share(cached, pol.method, pol.tbt_target_s, pol.slack)
        wanted = choice.share if choice.meets_target else 1.0
        if self._decode_share is None or wanted >= self._decode_share:
            self._decode_share, self._smaller_for = wanted, 0
        else:
            self._smaller_for += 1
            if self._smaller_for > pol.hysteresis_steps:
                self._decode_share, self._smaller_for = wanted, 0
        return self._decode_share

    # ------------------------------------------------------------- the orders
    def _fcfs_order(self) -> list["Request"]:
        """Part-way prefills first (they hold memory), then the queue in order."""
        return [r for r in self.running if id(r) in self._progress] + list(self.waiting)

    def _aged_shortest_first(self) -> list["Request"]:
        """Part-way prefills, then requests past their wait limit (oldest first), then the rest
        by remaining prefill length (shortest first; ties by arrival)."""
        now = self.clock()
        overdue = [r for r in self.waiting if now - r.arrival > self.policy.max_wait_s]
        rest = sorted((r for r in self.waiting if now - r.arrival <= self.policy.max_wait_s),
                      key=lambda r: (prefill_length(r), r.arrival))
        partial = [r for r in self.running if id(r) in self._progress]
        return partial + sorted(overdue, key=lambda r: r.arrival) + rest

    # ----------------------------------------------------------- the mechanism
    def _make_room_for_decodes(self, mem: MemoryState, plan: SchedulePlan) -> int:
        """Preempt the newest running requests until every other one's next token has a block;
        returns the blocks left free after the decodes."""
        free = mem.free_blocks
        while self.running:
            # A running request holds K/V of num_tokens - 1 tokens; this step feeds its last.
            need = sum(1 for r in self.running if mem.block_size and id(r) not in self._progress
                       and (r.num_tokens - 1) % mem.block_size == 0)
            if need <= free:
                return free - need
            victim = self.running.pop()
            free += self._held_blocks(victim, mem.block_size)
            self._progress.pop(id(victim), None)
            plan.preempted.append(victim)
            self.waiting.appendleft(victim)
        return free

    def _held_blocks(self, req: "Request", block_size: int) -> int:
        """Blocks a running request holds: those reserved at admission while part-way."""
        if id(req) in self._progress:
            return blocks_for(min(prefill_length(req) + 1, _max_total(req)), block_size)
        return blocks_for(req.num_tokens - 1, block_size)

    def _fill(self, mem: MemoryState, free_blocks: int, plan: SchedulePlan, budget: int,
              order: list["Request"], one: bool = False) -> None:
        """Prefill chunks in ``order`` while they fit: a waiting request is admitted only when
        its slot, blocks and CPU reservation fit; stops at the first that does not (no
        overtaking within an order). Whole prompts without chunked prefill (the first of a
        step may exceed the budget, else it would wait forever). ``one``: a single chunk."""
        slots, cpu_free = mem.free_slots, mem.cpu_bytes_free
        for req in order:
            if budget <= 0 or (one and plan.chunks):
                return
            done = self._progress.get(id(req), 0)
            left = prefill_length(req) - done
            if self.chunked_prefill:
                n = min(left, budget)
            elif plan.chunks and left > budget:
                return
            else:
                n = left
            if req in self.waiting:  # not yet admitted: it needs its memory now
                blocks = blocks_for(min(prefill_length(req) + 1, _max_total(req)), mem.block_size)
                cpu = reserved_cpu_bytes(req, mem.cpu_bytes_per_token)
                if (slots <= 0 or len(self.running) + _admitted(plan) >= self.max_num_seqs
                        or blocks > free_blocks or cpu > cpu_free):
                    return
                free_blocks, slots, cpu_free = free_blocks - blocks, slots - 1, cpu_free - cpu
            plan.chunks.append(PrefillChunk(req, done, n, done + n == prefill_length(req)))
            budget -= n

    def _commit(self, plan: SchedulePlan) -> None:
        """Move admitted requests to running; record chunk progress."""
        for c in plan.chunks:
            req = c.request
            if req in self.waiting:
                self.waiting.remove(req)
                self.running.append(req)
            if c.last:
                self._progress.pop(id(req), None)
            else:
                self._progress[id(req)] = c.start + c.num_tokens


def _max_total(req: "Request") -> int:
    return req.num_prompt_tokens + req.params.max_new_tokens - 1


def _admitted(plan: SchedulePlan) -> int:
    return sum(1 for c in plan.chunks if c.start == 0)
