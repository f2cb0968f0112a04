"""The scheduler's policy (magicpig/core/scheduler.py) and its ledger (core/kv_budget.py) on
hand-built requests: no model, no engine, no torch. Requests are real core Requests; a running
one is admitted through the ledger and holds K/V of num_tokens - 1 tokens; the pools' free
sizes are set by hand (blocks or CPU bytes held by others where a test needs them).
``advance`` plays the runner: a chunk's tokens become computed, a decode feeds one token.

Block arithmetic used below (block_size 16): a waiting request is admitted when
blocks_for(len(tokens_to_prefill()) + 1) blocks are free (the +1 is its first decode's token);
a running request holds K/V of num_tokens - 1 tokens and its next decode opens a block when
(num_tokens - 1) % 16 == 0.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from magicpig.core.kv_budget import KVBudget, KVLayout, blocks_for
from magicpig.core.request import Request, Status
from magicpig.core.sampling_params import SamplingParams
from magicpig.core.scheduler import PolicyConfig, Scheduler

BS = 16


def FakeRequest(name: str, prompt: int, generated: int = 0, max_new_tokens: int = 8, arrival: float = 0.0) -> Request:
    """A request of ``prompt`` tokens that has generated ``generated`` (named for failures)."""
    req = Request(name, [0] * prompt, SamplingParams(max_new_tokens=max(max_new_tokens, generated + 1)), arrival=arrival)
    req.output_ids.extend([0] * generated)
    return req


def make(max_num_seqs=8, max_prefill_tokens=10_000, waiting=(), running=(), policy="fcfs", chunked=False,
         cost=None, clock=None, free_blocks=100, block_size=BS, free_slots=100, cpu_bytes_free=10**9,
         cpu_bytes_per_token=0, total_blocks=None, cpu_bytes_total=None) -> Scheduler:
    """A scheduler whose ledger has exactly these free blocks, slots and CPU bytes once the
    ``running`` requests hold theirs (the rest of ``total_blocks`` / ``cpu_bytes_total`` held
    by others)."""
    held = sum(blocks_for(r.prefill_length, block_size) for r in running)
    reserved = sum(cpu_bytes_per_token * r.max_tokens for r in running)
    num_blocks = total_blocks if total_blocks is not None else free_blocks + held
    cpu_total = cpu_bytes_total if cpu_bytes_total is not None else cpu_bytes_free + reserved
    kv = KVBudget(KVLayout(block_size, num_blocks, free_slots + len(running), cpu_total, cpu_bytes_per_token))
    s = Scheduler(kv, max_num_seqs, max_prefill_tokens, policy, chunked_prefill=chunked, cost=cost, clock=clock)
    for r in running:
        kv.admit(r)
        r.kv.length, r.status = r.prefill_length, Status.RUNNING
        s.running.append(r)
    kv.allocator.allocate(num_blocks - free_blocks - held)  # held by others
    kv._cpu_reserved[-1] = cpu_total - cpu_bytes_free - reserved  # reserved by others
    for r in waiting:
        s.add(r)
    return s


def advance(s: Scheduler, plan) -> None:
    """Play the runner and the engine for one step: chunks' tokens are computed (a completed
    prompt samples its first token), each decode feeds one token and samples the next."""
    for c in plan.chunks:
        c.request.kv.length += c.num_tokens
        if c.last and not c.request.output_ids:
            c.request.output_ids.append(0)
    for r in plan.decodes:
        r.kv.length += 1
        r.output_ids.append(0)


def step(s: Scheduler):
    plan = s.schedule()
    advance(s, plan)
    return plan


def names(reqs) -> list[str]:
    return [r.request_id for r in reqs]


# --------------------------------------------------------------------------- admission
def test_admission_is_first_come_first_served():
    """Everything fits: all are admitted, in arrival order, and join the running list (after
    the requests already running) but not this step's decodes."""
    old = FakeRequest("old", 10, generated=3)
    reqs = [FakeRequest(n, p) for n, p in (("a", 30), ("b", 5), ("c", 17), ("d", 1))]
    s = make(waiting=reqs, running=[old])
    plan = s.schedule()
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
    s = make(max_num_seqs=max_num_seqs, waiting=[a, b, c], running=running, **memory)
    plan = s.schedule()
    assert names(plan.prefills) == ["a"], case
    assert names(s.waiting) == ["b", "c"], case
    assert names(s.running) == names(running) + ["a"]


def test_admission_boundaries_are_exact():
    """What exactly fits is admitted: 31 prompt tokens + the first decode's token fill 2 blocks
    exactly; cpu bytes equal to the reservation fit; the last slot is used."""
    assert blocks_for(31 + 1, BS) == 2 and blocks_for(32 + 1, BS) == 3
    s = make(waiting=[FakeRequest("a", 31)], free_blocks=2)
    assert names(s.schedule().prefills) == ["a"]
    s = make(waiting=[FakeRequest("a", 32)], free_blocks=2)
    assert s.schedule().prefills == []
    r = FakeRequest("a", 20, max_new_tokens=8)
    s = make(waiting=[r], cpu_bytes_free=270, cpu_bytes_per_token=10)
    assert s.kv.cpu_bytes(r) == 270
    assert names(s.schedule().prefills) == ["a"]
    assert s.kv.cpu_bytes_free == 0  # the reservation is held from admission
    s = make(waiting=[FakeRequest("a", 20)], cpu_bytes_free=269, cpu_bytes_per_token=10)
    assert s.schedule().prefills == []
    s = make(waiting=[FakeRequest("a", 1), FakeRequest("b", 1)], free_slots=1)
    assert names(s.schedule().prefills) == ["a"]


def test_no_dense_layers_means_no_block_limit():
    """block_size 0 (the model has no dense layer): blocks never limit admission or decodes."""
    s = make(waiting=[FakeRequest("a", 5000)], running=[FakeRequest("r", 16, generated=1)], free_blocks=0,
             block_size=0)
    plan = s.schedule()
    assert names(plan.prefills) == ["a"] and names(plan.decodes) == ["r"] and plan.preempted == []


def test_max_prefill_tokens_budget_admits_at_least_one():
    """The per-step prefill budget stops admission once spent, but a request longer than the
    whole budget is still admitted when it is the first of the step (else it would wait
    forever), also while others are decoding."""
    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 40), FakeRequest("b", 20), FakeRequest("c", 1)])
    assert names(step(s).prefills) == ["a"]  # 40 + 20 > 50: b waits, and c behind it
    assert names(s.waiting) == ["b", "c"]
    assert names(step(s).prefills) == ["b", "c"]  # the next step has a fresh budget

    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 30), FakeRequest("b", 20)])
    assert names(s.schedule().prefills) == ["a", "b"]  # exactly the budget

    s = make(max_prefill_tokens=50, waiting=[FakeRequest("big", 500), FakeRequest("b", 1)],
             running=[FakeRequest("r", 5, generated=1)])
    plan = s.schedule()
    assert names(plan.prefills) == ["big"] and names(plan.decodes) == ["r"]

    # a preempted request re-prefills its generated tokens too: they count against the budget
    s = make(max_prefill_tokens=50, waiting=[FakeRequest("a", 30), FakeRequest("p", 10, generated=12)])
    assert len(s.waiting[1].tokens_to_prefill()) == 21
    assert names(s.schedule().prefills) == ["a"]


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
    s = make(waiting=[W], running=[A, B, C, D], free_blocks=0)
    plan = s.schedule()
    assert names(plan.preempted) == ["D", "C"]
    assert names(plan.decodes) == ["A", "B"]
    assert plan.prefills == []
    assert names(s.running) == ["A", "B"]
    assert names(s.waiting) == ["C", "D", "W"]


def test_preemption_frees_no_more_than_needed():
    """One block short: exactly one victim (the newest), and no victim when the blocks
    suffice or when no decode opens a block."""
    reqs = [FakeRequest("A", 16, generated=1), FakeRequest("B", 32, generated=1), FakeRequest("C", 5, generated=1)]
    s = make(running=list(reqs), free_blocks=1)
    plan = s.schedule()  # A and B need 2, 1 free; C holds 5 tokens (1 block)
    assert names(plan.preempted) == ["C"] and names(plan.decodes) == ["A", "B"]
    assert plan.released[0].blocks == [] and reqs[2].kv.length == 0  # C holds nothing now

    reqs = [FakeRequest("A", 16, generated=1), FakeRequest("B", 32, generated=1), FakeRequest("C", 5, generated=1)]
    s = make(running=list(reqs), free_blocks=2)
    plan = s.schedule()
    assert plan.preempted == [] and names(plan.decodes) == ["A", "B", "C"]
    assert s.kv.free_blocks == 0  # the decodes' next tokens got their blocks

    s = make(running=[FakeRequest("A", 5, generated=3), FakeRequest("B", 20, generated=1)], free_blocks=0)
    plan = s.schedule()  # nobody opens a block
    assert plan.preempted == [] and names(plan.decodes) == ["A", "B"]


def test_a_lone_request_without_a_block_is_preempted_and_readmitted_first():
    """The only running request needs a block, none is free: it is preempted too (the engine's
    add-time check guarantees it fits alone later); next step, with blocks back, it is
    re-admitted before the request that arrived after it, re-prefilling prompt + generated
    tokens but the last, with a block for its next token."""
    A = FakeRequest("A", 16, generated=1)
    W = FakeRequest("W", 3)
    s = make(waiting=[W], running=[A], free_blocks=0, total_blocks=2)  # one block held by another
    plan = s.schedule()
    assert names(plan.preempted) == ["A"] and plan.decodes == [] and plan.prefills == []
    assert names(s.waiting) == ["A", "W"] and s.running == [] and A.num_preemptions == 1
    # A re-prefills 16 tokens + 1 for its next token: 2 blocks; W then needs 1.
    s.kv.allocator.free([b for b in range(2) if s.kv.allocator.holders(b)])  # the other's block comes back
    assert s.kv.free_blocks == 2
    plan = s.schedule()
    assert names(plan.prefills) == ["A"] and names(s.waiting) == ["W"]
    assert plan.chunks[0].num_tokens == 16 and len(A.kv.blocks) == 1  # its prefill's block
    A2, W2 = FakeRequest("A", 16, generated=1), FakeRequest("W", 3)
    s = make(waiting=[A2, W2], free_blocks=3)
    assert names(s.schedule().prefills) == ["A", "W"]


def test_scheduler_remove_and_has_unfinished():
    a, b = FakeRequest("a", 1), FakeRequest("b", 1, generated=1)
    s = make(waiting=[a], running=[b])
    assert s.has_unfinished()
    free = s.kv.free_blocks
    s.finish(b)
    assert s.kv.free_blocks == free + 1 and b.kv.blocks == [] and b.finished  # its memory is back
    s.finish(FakeRequest("unknown", 1))  # no-op
    assert s.running == [] and s.has_unfinished()
    s.finish(a)
    assert not s.has_unfinished()


# --------------------------------------------------------------------------- policies
def policy_scheduler(name, waiting=(), running=(), chunked=True, clock=lambda: 0.0, cost=None, free_blocks=100,
                     **knobs):
    return make(64, 10_000, waiting, running, PolicyConfig(name, **knobs), chunked, cost, clock, free_blocks)


def test_chunked_splits_a_long_prompt_under_the_token_budget():
    """Budget 100, two decodes: 98 tokens of prefill per step. The 250-token prompt runs as
    98 + 98 + 54; it is running but does not decode until its last chunk is done; a prompt
    behind it gets what the last chunk leaves."""
    d1, d2 = FakeRequest("d1", 10, generated=1), FakeRequest("d2", 10, generated=1)
    long, short = FakeRequest("long", 250), FakeRequest("short", 30)
    s = policy_scheduler("chunked", waiting=[long, short], running=[d1, d2], token_budget=100)
    sizes = []
    for _ in range(3):
        plan = step(s)
        assert names(plan.decodes) == ["d1", "d2"]  # never the part-way one
        sizes.append([(c.request.request_id, c.start, c.num_tokens, c.last) for c in plan.chunks])
    assert sizes == [[("long", 0, 98, False)], [("long", 98, 98, False)],
                     [("long", 196, 54, True), ("short", 0, 30, True)]]
    assert names(s.schedule().decodes) == ["d1", "d2", "long", "short"]


def test_prefill_first_stops_decodes_while_anything_prefills():
    r = FakeRequest("r", 10, generated=1)
    s = policy_scheduler("prefill_first", waiting=[FakeRequest("a", 300)], running=[r], token_budget=200)
    plan = step(s)
    assert plan.decodes == [] and [(c.num_tokens, c.last) for c in plan.chunks] == [(200, False)]
    plan = step(s)
    assert plan.decodes == [] and [(c.num_tokens, c.last) for c in plan.chunks] == [(100, True)]
    assert names(s.schedule().decodes) == ["r", "a"]
    # nothing admissible (no slot): decode instead of waiting
    r = FakeRequest("r", 10, generated=1)
    s = make(waiting=[FakeRequest("b", 5)], running=[r], policy=PolicyConfig("prefill_first"), free_slots=0)
    plan = s.schedule()
    assert plan.chunks == [] and names(plan.decodes) == ["r"]


def test_static_split_runs_one_chunk_at_its_fixed_share():
    r = FakeRequest("r", 10, generated=1)
    s = policy_scheduler("static", waiting=[FakeRequest("a", 50), FakeRequest("b", 5)], running=[r],
                         static_prefill_share=0.25, chunk_tokens=40)
    plan = s.schedule()
    assert names(plan.prefills) == ["a"] and plan.chunks[0].num_tokens == 40 and plan.prefill_share == 0.25
    assert names(plan.decodes) == ["r"]
    s2 = policy_scheduler("static", running=[FakeRequest("r", 10, generated=1)], static_prefill_share=0.25)
    assert s2.schedule().prefill_share == 0.0  # nothing to prefill: decode has it all
    s3 = policy_scheduler("static", waiting=[FakeRequest("a", 5)], static_prefill_share=0.25)
    assert s3.schedule().prefill_share == 1.0  # nothing to decode: prefill has it all


@pytest.fixture(scope="module")
def h100():
    from magicpig.perf.cost_model import CostModel
    from magicpig.perf.profile import load_profile

    profile = load_profile("h100_llama31_8b")
    return CostModel(profile, profile.model)


def test_nexus_gives_decode_the_smallest_share_that_meets_its_target(h100):
    running = [FakeRequest(f"r{i}", 32_000, generated=1) for i in range(8)]
    lens = [r.num_tokens for r in running]
    target, slack = 0.03, 0.9
    s = policy_scheduler("nexus", waiting=[FakeRequest("p", 4000)], running=running, cost=h100,
                         tbt_target_s=target, slack=slack, method="dense", hysteresis_steps=0, free_blocks=10**5)
    plan = s.schedule()
    decode_share = 1.0 - plan.prefill_share
    assert 0 < decode_share < 1 and names(plan.prefills) == ["p"]
    assert h100.decode_time(lens, "dense", decode_share) <= target * slack
    smaller = decode_share - 8 / 132  # one green-context step down
    assert h100.decode_time(lens, "dense", smaller) > target * slack


def test_nexus_hysteresis_holds_the_split_under_small_load_changes(h100):
    """Decode's share goes up at once when the load needs it, and comes down only after the
    smaller share has sufficed for more than hysteresis_steps steps in a row (here 3: the load
    drops at step 1, the share follows at step 4)."""
    big = [FakeRequest(f"r{i}", 64_000, generated=1) for i in range(8)]
    s = policy_scheduler("nexus", running=list(big), cost=h100, tbt_target_s=0.04, method="dense", hysteresis_steps=3,
                         free_blocks=10**5)
    shares = []
    for i in range(8):
        if i == 1:  # the load drops: half the requests finish
            for r in big[4:]:
                s.finish(r)
        s.add(FakeRequest(f"p{i}", 100))
        plan = s.schedule()
        shares.append(1.0 - plan.prefill_share)
        for r in plan.prefills:  # the short prompts leave again: only the load of big counts
            s.finish(r)
    assert shares[0] == shares[1] == shares[2] == shares[3] < 1.0  # held
    assert shares[4] < shares[3] and shares[4] == shares[5] == shares[6] == shares[7]
    for r in big[:4]:
        r.kv.length += 1  # a small change of load does not move it either
        r.output_ids.append(0)
    s.add(FakeRequest("q", 100))
    assert 1.0 - s.schedule().prefill_share == shares[7]


def test_nexus_keeps_a_prefill_lane_when_decode_needs_the_whole_device(h100):
    """No decode share meets a target this tight: decode gets all but min_prefill_share, and the
    planned chunk still runs (a prefill share of 0 stalled it; the simulator refused it)."""
    running = [FakeRequest(f"r{i}", 64_000, generated=1) for i in range(8)]
    s = policy_scheduler("nexus", waiting=[FakeRequest("p", 100)], running=running, cost=h100,
                         tbt_target_s=0.001, method="dense", min_prefill_share=0.06, free_blocks=10**5)
    plan = s.schedule()
    assert names(plan.prefills) == ["p"] and plan.prefill_share == 0.06


def test_nexus_ages_a_long_prompt_past_its_wait_limit(h100):
    """Shortest first, until the long prompt has waited max_wait_s: then it goes first."""
    now = [0.0]
    long = FakeRequest("long", 5000, arrival=0.0)
    s = policy_scheduler("nexus", waiting=[long], cost=h100, clock=lambda: now[0], max_wait_s=10.0,
                         chunk_tokens=10_000, free_blocks=10**5)
    for t in range(0, 10, 2):
        now[0] = float(t)
        s.add(FakeRequest(f"s{t}", 100, arrival=float(t)))
        plan = s.schedule()
        assert names(plan.prefills) == [f"s{t}"], t  # the short one jumps ahead
        s.finish(plan.prefills[0])
    now[0] = 10.5
    s.add(FakeRequest("late", 100, arrival=10.5))
    assert names(s.schedule().prefills) == ["long"]


def test_nexus_memory_switch_fires_at_its_threshold(h100):
    for free, cpu_free, decode_first in ((11, 1000, False), (10, 1000, True), (50, 99, True), (50, 101, False)):
        r = FakeRequest("r", 100, generated=1)  # holds 7 of the 100 blocks
        s = make(64, 10_000, [FakeRequest("p", 10)], [r], PolicyConfig("nexus", memory_threshold=0.9), True, h100,
                 lambda: 0.0, free_blocks=free, total_blocks=100, cpu_bytes_free=cpu_free, cpu_bytes_total=1000)
        plan = s.schedule()
        assert (plan.chunks == [] and plan.prefill_share == 0.0) is decode_first, (free, cpu_free)
        assert names(plan.decodes) == ["r"]


def test_policy_config_checks_its_fields():
    with pytest.raises(ValueError, match="policy='fifo'"):
        PolicyConfig("fifo")
    with pytest.raises(ValueError, match="static_prefill_share"):
        PolicyConfig("static", static_prefill_share=1.0)
    with pytest.raises(ValueError, match="nexus"):
        make(policy="nexus")


# ----------------------------------------------------------------------------- purity
def test_scheduler_module_does_not_import_torch():
    """DESIGN.md §4: the scheduler is pure Python; the simulator runs it without torch."""
    code = "import sys, magicpig.core.scheduler, magicpig.core.kv_budget; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False", out.stdout + out.stderr
