"""The scheduler's policy (magicpig/serve/scheduler.py) on hand-built requests: no model, no
engine, no torch. A fake request has only what the scheduler reads (num_prompt_tokens,
num_tokens, params.max_new_tokens, tokens_to_prefill()); MemoryState is built by hand.

Block arithmetic used below (block_size 16): a waiting request is admitted with
blocks_for(len(tokens_to_prefill()) + 1) blocks (the +1 is its first decode's token); a running
request holds K/V of num_tokens - 1 tokens and its next decode opens a block when
(num_tokens - 1) % 16 == 0.
"""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest

from magicpig.serve.scheduler import MemoryState, Scheduler, blocks_for, reserved_cpu_bytes

BS = 16


class FakeRequest:
    """prompt tokens, generated tokens so far, max_new_tokens; named for readable failures."""

    def __init__(self, name: str, prompt: int, generated: int = 0, max_new_tokens: int = 8):
        self.name = name
        self.num_prompt_tokens = prompt
        self.generated = generated
        self.params = SimpleNamespace(max_new_tokens=max_new_tokens)

    @property
    def num_tokens(self) -> int:
        return self.num_prompt_tokens + self.generated

    def tokens_to_prefill(self) -> list[int]:
        return [0] * (self.num_prompt_tokens + max(0, self.generated - 1))

    def __repr__(self) -> str:
        return self.name


def mem(free_blocks=100, block_size=BS, free_slots=100, cpu_bytes_free=10**9, cpu_bytes_per_token=0):
    return MemoryState(free_blocks, block_size, free_slots, cpu_bytes_free, cpu_bytes_per_token)


def make(max_num_seqs=8, max_prefill_tokens=10_000, waiting=(), running=()):
    s = Scheduler(max_num_seqs, max_prefill_tokens)
    for r in waiting:
        s.add(r)
    s.running.extend(running)
    return s


def names(reqs) -> list[str]:
    return [r.name for r in reqs]


# --------------------------------------------------------------------------- admission
def test_admission_is_first_come_first_served():
    """Everything fits: all are admitted, in arrival order, and join the running list (after
    the requests already running) but not this step's decodes."""
    old = FakeRequest("old", 10, generated=3)
    reqs = [FakeRequest(n, p) for n, p in (("a", 30), ("b", 5), ("c", 17), ("d", 1))]
    s = make(waiting=reqs, running=[old])
    plan = s.schedule(mem())
    assert names(plan.prefills) == ["a", "b", "c", "d"]
    assert names(plan.decodes) == ["old"]
    assert plan.preempted == []
    assert names(s.running) == ["old", "a", "b", "c", "d"]
    assert not s.waiting


# Each case: memory / limits under which "a" fits and "b" (the second in line) does not, while
# "c" (behind "b", tiny) would fit on its own. FCFS: admission stops at "b"; "c" is not admitted
# past it.
@pytest.mark.parametrize(
    "case, prompts, memory, max_num_seqs",
    [
        # a: 20 tokens -> blocks_for(21) = 2; b: 40 -> 3 > 2 left; c: 1 -> 1 block.
        ("blocks", (20, 40, 1), dict(free_blocks=4), 8),
        # b: 32 tokens fill the 2 blocks left after a, but its first decode's token opens a
        # third: b must wait (31 would fit, see test_admission_boundaries_are_exact).
        ("blocks, first decode's token", (20, 32, 1), dict(free_blocks=4), 8),
        ("sequence slots", (20, 40, 1), dict(free_slots=1), 8),
        ("max_num_seqs", (20, 40, 1), dict(), 2),  # one already running (below)
        # cpu: reserved for prompt + max_new_tokens (8) - 1 (the last token is never fed) at
        # 10 bytes/token: a 270, b 470, c 80.
        ("cpu bytes", (20, 40, 1), dict(cpu_bytes_free=270 + 469, cpu_bytes_per_token=10), 8),
    ],
)
def test_admission_stops_at_the_first_request_that_does_not_fit(case, prompts, memory, max_num_seqs):
    a, b, c = (FakeRequest(n, p) for n, p in zip("abc", prompts))
    running = [FakeRequest("r", 5, generated=2)] if case == "max_num_seqs" else []
    s = make(max_num_seqs=max_num_seqs, waiting=[a, b, c], running=running)
    plan = s.schedule(mem(**memory))
    assert names(plan.prefills) == ["a"], case
    assert names(s.waiting) == ["b", "c"], case
    assert names(s.running) == names(running) + ["a"]


def test_admission_boundaries_are_exact():
    """What exactly fits is admitted: 31 prompt tokens + the first decode's token fill 2 blocks
    exactly; cpu bytes equal to the reservation fit; the last slot is used."""
    assert blocks_for(31 + 1, BS) == 2 and blocks_for(32 + 1, BS) == 3
    s = make(waiting=[FakeRequest("a", 31)])
    assert names(s.schedule(mem(free_blocks=2)).prefills) == ["a"]
    s = make(waiting=[FakeRequest("a", 32)])
    assert s.schedule(mem(free_blocks=2)).prefills == []
    r = FakeRequest("a", 20, max_new_tokens=8)
    assert reserved_cpu_bytes(r, 10) == 270
    s = make(waiting=[r])
    assert names(s.schedule(mem(cpu_bytes_free=270, cpu_bytes_per_token=10)).prefills) == ["a"]
    s = make(waiting=[FakeRequest("a", 20)])
    assert s.schedule(mem(cpu_bytes_free=269, cpu_bytes_per_token=10)).prefills == []
    s = make(waiting=[FakeRequest("a", 1), FakeRequest("b", 1)])
    assert names(s.schedule(mem(free_slots=1)).prefills) == ["a"]


def test_no_dense_layers_means_no_block_limit():
    """block_size 0 (the model has no dense layer): blocks never limit admission or decodes."""
    s = make(waiting=[FakeRequest("a", 5000)], running=[FakeRequest("r", 16, generated=1)])
    plan = s.schedule(mem(free_blocks=0, block_size=0))
    assert names(plan.prefills) == ["a"] and names(plan.decodes) == ["r"] and plan.preempted == []


def test_max_prefill_tokens_budget_admits_at_least_one():
    """The per-step prefill budget stops admission once spent, but a request longer than the
    whole budget is still admitted when it is the first of the step (else it would wait
    forever), also while others are decoding."""
    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 40), FakeRequest("b", 20), FakeRequest("c", 1)])
    assert names(s.schedule(mem()).prefills) == ["a"]  # 40 + 20 > 50: b waits, and c behind it
    assert names(s.waiting) == ["b", "c"]
    assert names(s.schedule(mem()).prefills) == ["b", "c"]  # the next step has a fresh budget

    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 30), FakeRequest("b", 20)])
    assert names(s.schedule(mem()).prefills) == ["a", "b"]  # exactly the budget

    s = make(max_prefill_tokens=50, waiting=[FakeRequest("big", 500), FakeRequest("b", 1)],
             running=[FakeRequest("r", 5, generated=1)])
    plan = s.schedule(mem())
    assert names(plan.prefills) == ["big"] and names(plan.decodes) == ["r"]

    # a preempted request re-prefills its generated tokens too: they count against the budget
    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 30), FakeRequest("p", 10, generated=12)])
    assert len(s.waiting[1].tokens_to_prefill()) == 21
    assert names(s.schedule(mem()).prefills) == ["a"]


# ------------------------------------------------------------------------- preemption
def test_decodes_without_a_free_block_preempt_the_newest():
    """Running oldest-first [A, B, C, D]; A, B and C's next tokens each open a block (D's does
    not) and no block is free. Victims are taken newest first whether or not they need a
    block: D (frees its 2 blocks; 3 still asked), then C (frees 1; A and B now need 2 of 3).
    The victims go to the FRONT of the waiting queue in their original order (C before D, both
    before W, which arrived later), and nothing is admitted this step although W would fit in
    the block left over. (Under FCFS the head of the queue is then the oldest victim, whose
    re-prefill needs one block more than it freed, so it cannot fit either: the "admit
    nothing after a preemption" rule and head-of-line blocking both give this result.)"""
    A = FakeRequest("A", 30, generated=3)  # holds 32 tokens: the next opens block 3
    B = FakeRequest("B", 16, generated=1)  # holds 16
    C = FakeRequest("C", 10, generated=7)  # holds 16
    D = FakeRequest("D", 18, generated=2)  # holds 19 (2 blocks): no new block
    W = FakeRequest("W", 1)
    s = make(waiting=[W], running=[A, B, C, D])
    plan = s.schedule(mem(free_blocks=0))
    assert names(plan.preempted) == ["D", "C"]
    assert names(plan.decodes) == ["A", "B"]
    assert plan.prefills == []
    assert names(s.running) == ["A", "B"]
    assert names(s.waiting) == ["C", "D", "W"]


def test_preemption_frees_no_more_than_needed():
    """One block short: exactly one victim (the newest), and no victim when the blocks
    suffice or when no decode opens a block."""
    reqs = [FakeRequest("A", 16, generated=1), FakeRequest("B", 32, generated=1), FakeRequest("C", 5, generated=1)]
    s = make(running=list(reqs))
    plan = s.schedule(mem(free_blocks=1))  # A and B need 2, 1 free; C holds 5 tokens (1 block)
    assert names(plan.preempted) == ["C"] and names(plan.decodes) == ["A", "B"]

    s = make(running=list(reqs))
    plan = s.schedule(mem(free_blocks=2))
    assert plan.preempted == [] and names(plan.decodes) == ["A", "B", "C"]

    s = make(running=[FakeRequest("A", 5, generated=3), FakeRequest("B", 20, generated=1)])
    plan = s.schedule(mem(free_blocks=0))  # nobody opens a block
    assert plan.preempted == [] and names(plan.decodes) == ["A", "B"]


def test_a_lone_request_without_a_block_is_preempted_and_readmitted_first():
    """The only running request needs a block, none is free: it is preempted too (the engine's
    add-time check guarantees it fits alone later); next step, with blocks back, it is
    re-admitted before the request that arrived after it, re-prefilling prompt + generated
    tokens but the last, with a block for its next token."""
    A = FakeRequest("A", 16, generated=1)
    W = FakeRequest("W", 3)
    s = make(waiting=[W], running=[A])
    plan = s.schedule(mem(free_blocks=0))
    assert names(plan.preempted) == ["A"] and plan.decodes == [] and plan.prefills == []
    assert names(s.waiting) == ["A", "W"] and s.running == []
    # A re-prefills 16 tokens + 1 for its next token: 2 blocks; W then needs 1.
    plan = s.schedule(mem(free_blocks=2))
    assert names(plan.prefills) == ["A"] and names(s.waiting) == ["W"]
    s = make(waiting=[A, W])
    assert names(s.schedule(mem(free_blocks=3)).prefills) == ["A", "W"]


def test_scheduler_remove_and_has_unfinished():
    a, b = FakeRequest("a", 1), FakeRequest("b", 1, generated=1)
    s = make(waiting=[a], running=[b])
    assert s.has_unfinished()
    s.remove(b)
    s.remove(FakeRequest("unknown", 1))  # no-op
    assert s.running == [] and s.has_unfinished()
    s.remove(a)
    assert not s.has_unfinished()


# ----------------------------------------------------------------------------- purity
def test_scheduler_module_does_not_import_torch():
    """DESIGN.md §4: the scheduler is pure Python; the simulator runs it without torch."""
    code = "import sys, magicpig.serve.scheduler; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout + out.stderr
