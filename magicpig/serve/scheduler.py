"""The scheduler: which requests prefill and decode this step (DESIGN.md §4). Pure policy: no
torch, no tensors; it sees requests' sizes and the memory the engine reports.

Policy (first-come, first-served, as vLLM's default):
* decodes: every running request, oldest first. When the dense-layer blocks their next tokens
  need are not free, the newest running request is preempted (its state dropped; it goes back
  to the front of the queue and is prefilled again, generated tokens included) until the rest
  fit. Nothing crashes for lack of memory.
* prefills: waiting requests in arrival order while a sequence slot, the blocks of their prompt
  and their CPU-store reservation fit, up to ``max_prefill_tokens`` per step (at least one
  request when nothing else is prefilling). A request's CPU-store bytes are reserved for its
  whole length (prompt + max_new_tokens) at admission, so the store never outgrows its budget
  mid-decode; device blocks are not reserved (preemption handles them).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # no import at run time: requests are only read here
    from magicpig.serve.request import Request


@dataclass
class MemoryState:
    """What the engine reports before each step. free_blocks / block_size: the dense-layer
    block pool (block_size 0: the model has no dense layer). free_slots: sequence slots.
    cpu_bytes_free: the CPU-store budget not yet reserved. cpu_bytes_per_token: the reservation
    per token of a request."""

    free_blocks: int
    block_size: int
    free_slots: int
    cpu_bytes_free: int
    cpu_bytes_per_token: int


@dataclass
class SchedulePlan:
    prefills: list["Request"] = field(default_factory=list)
    decodes: list["Request"] = field(default_factory=list)
    preempted: list["Request"] = field(default_factory=list)


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size) if block_size else 0


def reserved_cpu_bytes(req: "Request", per_token: int) -> int:
    """CPU-store bytes held back for a request from admission to finish."""
    return per_token * (req.num_prompt_tokens + req.params.max_new_tokens - 1)  # the last token is never fed


class Scheduler:
    """FCFS continuous batching with preemption of the newest (see the module docstring)."""

    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque["Request"] = deque()
        self.running: list["Request"] = []

    def add(self, req: "Request") -> None:
        self.waiting.append(req)

    def remove(self, req: "Request") -> None:
        """Forget a finished or aborted request, wherever it is."""
        if req in self.running:
            self.running.remove(req)
        elif req in self.waiting:
            self.waiting.remove(req)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self, mem: MemoryState) -> SchedulePlan:
        plan = SchedulePlan()
        free_blocks = self._make_room_for_decodes(mem, plan)
        plan.decodes = list(self.running)
        if not plan.preempted:  # just out of memory: admit nothing new this step
            self._admit(mem, free_blocks, mem.free_slots, plan)
        self.running += plan.prefills
        return plan

    def _make_room_for_decodes(self, mem: MemoryState, plan: SchedulePlan) -> int:
        """Preempt the newest running requests until every other one's next token has a block;
        returns the blocks left free after the decodes."""
        free = mem.free_blocks
        while self.running:
            # A running request holds K/V of num_tokens - 1 tokens; this step feeds its last.
            need = sum(1 for r in self.running if mem.block_size and (r.num_tokens - 1) % mem.block_size == 0)
            if need <= free:
                return free - need
            victim = self.running.pop()
            free += blocks_for(victim.num_tokens - 1, mem.block_size)
            plan.preempted.append(victim)
            self.waiting.appendleft(victim)
        return free

    def _admit(self, mem: MemoryState, free_blocks: int, free_slots: int, plan: SchedulePlan) -> None:
        budget, cpu_free = self.max_prefill_tokens, mem.cpu_bytes_free
        while self.waiting and free_slots > 0 and len(self.running) + len(plan.prefills) < self.max_num_seqs:
            req = self.waiting[0]
            tokens = len(req.tokens_to_prefill())
            # +1: the next decode step's token may open a block (admitting without it would
            # preempt the request straight away), unless that token is never fed (the last).
            held_next = min(tokens + 1, req.num_prompt_tokens + req.params.max_new_tokens - 1)
            blocks = blocks_for(held_next, mem.block_size)
            cpu = reserved_cpu_bytes(req, mem.cpu_bytes_per_token)
            if blocks > free_blocks or cpu > cpu_free or (plan.prefills and tokens > budget):
                return
            self.waiting.popleft()
            plan.prefills.append(req)
            free_blocks, free_slots, cpu_free, budget = free_blocks - blocks, free_slots - 1, cpu_free - cpu, budget - tokens
