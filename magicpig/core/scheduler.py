"""The scheduler: which requests prefill and decode this step, and how the device is split
between the two lanes (DESIGN.md §4). Pure: no torch, no tensors. It owns the ledger
(:class:`KVBudget`) and asks it, as nano-vllm's scheduler owns its block manager; the engine
(or the simulator) runs the plan and reports back with ``update_from_output``.

Shared by every policy (the mechanism of admission, :meth:`Scheduler.admit_chunks`):
* decodes: running requests whose prompt is fully prefilled, oldest first. When the
  dense-layer blocks their next tokens need are not free, the newest running request is
  preempted (its state dropped; it goes back to the front of the queue and is prefilled again,
  generated tokens included) until the rest fit. Nothing crashes for lack of memory.
* admission: a waiting request is admitted while a sequence slot, the blocks of its prompt
  (+ its first decode's token) and its CPU-store reservation fit. A request's CPU-store bytes
  are reserved for its whole length (prompt + max_new_tokens) at admission, so the store never
  outgrows its budget mid-decode; device blocks grow step by step (preemption handles them).
* chunks: with ``chunked_prefill`` (the engine's default) a prompt may be prefilled over
  several steps (a request partly prefilled is running but does not decode yet); without it a
  prompt is prefilled whole in the step that admits it.

The policies themselves are in :mod:`magicpig.core.policies`.
"""

from __future__ import annotations

from collections import deque
from typing import Callable, Iterable, Optional

from magicpig.core.kv_budget import KVBudget
from magicpig.core.prefix_cache import CacheNode, PrefixMatch
from magicpig.core.policies import (  # noqa: F401 - the scheduler's vocabulary, re-exported
    POLICIES, SPLIT_POLICIES, DecodeCost, PolicyConfig, PrefillChunk, SchedulePlan, make_policy,
)
from magicpig.core.request import Request, SequenceKV, Status


class Scheduler:
    """Queues, the ledger and the policy; ``schedule`` plans a step.

    kv: the ledger. max_num_seqs: most running requests. max_prefill_tokens: ``fcfs``'s prefill
    tokens per step. cost: the cost model ``nexus`` prices decode shares with. clock: the time
    ``nexus`` ages requests by (the engine's perf_counter, or the simulator's time) — requests
    need an ``arrival`` on that clock.
    """

    def __init__(self, kv: KVBudget, max_num_seqs: int, max_prefill_tokens: int,
                 policy: PolicyConfig | str = "fcfs", chunked_prefill: bool = False,
                 cost: Optional[DecodeCost] = None, clock: Optional[Callable[[], float]] = None):
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.policy = PolicyConfig(policy) if isinstance(policy, str) else policy
        self.policy_impl = make_policy(self.policy, cost, clock)
        self.chunked_prefill = chunked_prefill
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._headroom = 0  # blocks admissions may still take this step (set by schedule)

    def add(self, req: Request) -> None:
        self.waiting.append(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def queue_len(self) -> int:
        return len(self.waiting)

    # ------------------------------------------------------------------ the step
    def schedule(self) -> SchedulePlan:
        plan = SchedulePlan()
        self._headroom = self._make_room_for_decodes(plan)
        ready = [r for r in self.running if not r.is_prefilling]
        self.policy_impl.plan(self, plan, ready)
        for req in plan.decodes:  # the decodes' next tokens get their blocks now
            self.kv.grow(req.kv, req.num_computed_tokens + 1)
        plan.evicted, self.kv.evicted = self.kv.evicted, []
        return plan

    def cache(self, req: Request) -> Optional[CacheNode]:
        """Offer a request's computed full blocks to the prefix cache (its prompt once
        prefilled, its whole sequence when it finishes): the new node, or None."""
        return self.kv.cache_request(req)

    def update_from_output(self, finished: Iterable[Request]) -> list[SequenceKV]:
        """After a step: the finished requests leave the queues and the ledger; returns their
        KV states, whose store entries the runner frees."""
        return [self.finish(req) for req in finished]

    def finish(self, req: Request) -> SequenceKV:
        """Forget a finished or aborted request wherever it is; its memory goes back to the
        ledger. Returns its KV state (for the runner's store entries)."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)
        self.kv.free(req)
        req.status = Status.FINISHED
        return req.kv

    # ------------------------------------------------------------- the orders
    def fcfs_order(self) -> list[Request]:
        """Part-way prefills first (they hold memory), then the queue in order. With the prefix
        cache, waiting requests that find a cached prefix go first, before part-way prefills
        too, and those that find none last (each group in order: SGLang's longest-prefix-match
        idea, coarsened). A hit costs only its own tokens, so it takes little of the step's
        budget, which the others still share; first come, first served would make it wait behind
        whole prompts it does not need (measured: the questions about a just-cached document
        waited for the next document's whole prefill)."""
        part_way, waiting = [r for r in self.running if r.is_prefilling], list(self.waiting)
        if self.kv.cache is None:
            return part_way + waiting
        hit = [r.num_preemptions > 0 or self.kv.match(r).tokens > 0 for r in waiting]
        return [r for r, h in zip(waiting, hit) if h] + part_way + [r for r, h in zip(waiting, hit) if not h]

    # ----------------------------------------------------------- the mechanism
    def _make_room_for_decodes(self, plan: SchedulePlan) -> int:
        """Preempt the newest running requests until every other decode's next token has a
        block; returns the blocks left free once those decodes have theirs (admissions' headroom)."""
        while self.running:
            need = sum(self.kv.growth(r.kv, r.num_computed_tokens + 1) for r in self.running if not r.is_prefilling)
            if need <= self.kv.free_blocks:
                return self.kv.free_blocks - need
            self._preempt(self.running.pop(), plan)
        return self.kv.free_blocks

    def _preempt(self, req: Request, plan: SchedulePlan) -> None:
        """Back to the front of the queue with nothing held: its KV state is dropped (the next
        admission prefills it again) and its memory goes back to the ledger."""
        self.kv.free(req)
        old = req.kv
        req.released_cost = (req.released_cost[0] + old.cost_sum, req.released_cost[1] + old.cost_steps)
        req.kv, req.status = SequenceKV(), Status.WAITING
        req.num_preemptions += 1
        plan.preempted.append(req)
        plan.released.append(old)
        self.waiting.appendleft(req)

    def admit_chunks(self, plan: SchedulePlan, budget: int, order: list[Request], one: bool = False) -> None:
        """Prefill chunks in ``order`` while they fit: a waiting request is admitted only when
        its slot, blocks and CPU reservation fit; stops at the first that does not (no
        overtaking within an order). Whole prompts without chunked prefill (the first of a
        step may exceed the budget, else it would wait forever). ``one``: a single chunk.

        With the prefix cache, a waiting request whose next uncached block is being prefilled
        by another request right now waits for it (and is passed over this step): once that
        prefill completes, its blocks are cached and this one prefills only its own tokens
        (SGLang's in-batch prefix sharing; without it, questions about one document arriving
        together would all prefill the document)."""
        in_flight = self._in_flight_blocks()
        for req in order:
            if budget <= 0 or (one and plan.chunks):
                return
            match = self.kv.match(req) if req.status is Status.WAITING else PrefixMatch()
            if req.status is Status.WAITING and self._waits_for(req, match, in_flight):
                continue
            done = req.num_computed_tokens + match.tokens  # a cached prefix is not prefilled again
            left = req.prefill_length - done
            if self.chunked_prefill:
                n = min(left, budget)
            elif plan.chunks and left > budget:
                return
            else:
                n = left
            if req.status is Status.WAITING and not self._admit(req, match):
                return
            plan.chunks.append(PrefillChunk(req, done, n, done + n == req.prefill_length))
            budget -= n
            in_flight.update(self._prompt_blocks(req))

    def _prompt_blocks(self, req: Request) -> list[bytes]:
        """Keys of the full blocks a request's prefill computes (none without a cache)."""
        if self.kv.cache is None or not req.cacheable:
            return []
        return self.kv.block_hashes(req, req.prefill_length)

    def _in_flight_blocks(self) -> set[bytes]:
        """Blocks running prefills are computing (cached once their prompts complete)."""
        return {key for r in self.running if r.is_prefilling for key in self._prompt_blocks(r)}

    def _waits_for(self, req: Request, match: PrefixMatch, in_flight: set[bytes]) -> bool:
        if not in_flight:
            return False
        nxt = match.tokens // self.kv.cache.block_size
        return nxt < len(req.block_hashes) and (nxt + 1) * self.kv.cache.block_size < req.prefill_length \
            and req.block_hashes[nxt] in in_flight

    def _admit(self, req: Request, match: PrefixMatch) -> bool:
        """Grant a waiting request its memory if it fits beside what this step holds back,
        evicting cached prefixes nobody uses (least recently used first) when it does not.
        A cached prefix's blocks and bytes are shared, so they are not asked for again."""
        if self.kv.free_slots <= 0 or len(self.running) >= self.max_num_seqs:
            return False
        blocks = self.kv.admission_blocks(req, match.tokens)
        cpu = self.kv.cpu_bytes(req, match.tokens)
        while blocks > self._headroom or cpu > self.kv.cpu_bytes_free:
            freed = self.kv.evict_one(keep=match.node)
            if freed is None:
                return False
            self._headroom += freed
        self._headroom -= blocks
        self.kv.admit(req, match)
        self.waiting.remove(req)
        self.running.append(req)
        req.status = Status.RUNNING
        return True
