"""The prefix cache (magicpig/core/prefix_cache.py) and its memory in the ledger
(core/kv_budget.py), driven by the real scheduler: no model, no torch. ``step`` plays the
runner and the engine: chunks' tokens become computed (a completed prompt is offered to the
cache), decodes feed one token, finished requests are offered to the cache and retired."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from magicpig.core.kv_budget import KVBudget, KVLayout
from magicpig.core.prefix_cache import PrefixCache, block_hashes
from magicpig.core.request import Request, Status
from magicpig.core.sampling_params import SamplingParams
from magicpig.core.scheduler import Scheduler

BS = 4
PER_TOKEN = 10  # CPU-store bytes per token


# ------------------------------------------------------------------------------ hash chain
def test_the_same_prefix_gives_the_same_chain_and_a_changed_token_a_new_one_from_its_block():
    tokens = list(range(40))
    a = block_hashes(tokens, 8, b"salt")
    assert len(a) == 5 and len(set(a)) == 5
    assert block_hashes(tokens + [99, 98], 8, b"salt") == a  # a partial block adds no key
    assert block_hashes(tokens[:24], 8, b"salt") == a[:3]
    changed = list(tokens)
    changed[17] = 1000  # in block 2
    b = block_hashes(changed, 8, b"salt")
    assert b[:2] == a[:2] and all(x != y for x, y in zip(b[2:], a[2:]))
    # Same tokens in block 3 but a different block 2: block 3's key differs too (chained).
    assert b[3] != a[3]
    assert block_hashes(tokens, 8, b"salt", known=a[:2]) == a  # extended, not redone


def test_a_different_salt_shares_nothing():
    tokens = list(range(32))
    assert not set(block_hashes(tokens, 8, b"model-a|K=10")) & set(block_hashes(tokens, 8, b"model-a|K=11"))
    cache = PrefixCache(8, b"one")
    cache.insert(cache.hashes(tokens), [], 1)
    other = PrefixCache(8, b"two")
    assert cache.match(cache.hashes(tokens + [1]), 33).tokens == 32
    assert cache.match(other.hashes(tokens + [1]), 33).tokens == 0


def test_match_leaves_one_token_to_prefill_and_finds_the_node_of_the_last_block():
    cache = PrefixCache(4)
    first = cache.insert(cache.hashes(list(range(12))), [], 1)  # blocks 0-2
    second = cache.insert(cache.hashes(list(range(12)) + [50, 51, 52, 53]), [], 1)  # block 3, after first
    assert second.parent is first and second.start == 12 and first.children == 1
    ids = list(range(12)) + [50, 51, 52, 53, 7]
    m = cache.match(cache.hashes(ids), len(ids))
    assert m.node is second and m.tokens == 16
    m = cache.match(cache.hashes(ids[:16]), 16)  # whole prompt cached: the last block is prefilled again
    assert m.node is first and m.tokens == 12
    m = cache.match(cache.hashes(list(range(9)) + [77, 78, 79]), 12)
    assert m.node is first and m.tokens == 8  # branches inside first's blocks


def test_lru_evicts_leaves_nobody_uses_oldest_first_and_never_what_is_kept():
    now = [0.0]
    cache = PrefixCache(2, clock=lambda: now[0])
    a = cache.insert(cache.hashes([1, 2, 3, 4]), [], 1)
    now[0] = 1
    b = cache.insert(cache.hashes([1, 2, 3, 4, 5, 6]), [], 1)  # child of a
    now[0] = 2
    c = cache.insert(cache.hashes([9, 9, 9, 9]), [], 1)
    assert cache.lru() is b  # a has a child; b is older than c
    assert cache.lru(keep=b) is c  # b and its ancestors are kept
    cache.acquire(c)
    assert cache.lru(keep=b) is None
    cache.remove(b)
    assert cache.lru() is a and a.children == 0
    with pytest.raises(AssertionError):
        cache.remove(c)  # in use


# ------------------------------------------------------------------- the ledger's sharing
def make(num_blocks=64, cpu_total=10**6, max_num_seqs=8, chunked=True, max_prefill=10_000, slots=8) -> Scheduler:
    kv = KVBudget(KVLayout(BS, num_blocks, slots, cpu_total, PER_TOKEN), PrefixCache(BS, b"test"))
    return Scheduler(kv, max_num_seqs, max_prefill, "fcfs", chunked_prefill=chunked)


def request(name: str, prompt: list[int], new: int = 3) -> Request:
    return Request(name, list(prompt), SamplingParams(max_new_tokens=new))


def step(s: Scheduler) -> list[Request]:
    """One engine step without a model; returns the requests that finished."""
    plan = s.schedule()
    finished = []
    for chunk in plan.chunks:
        req = chunk.request
        assert chunk.start == req.num_computed_tokens
        req.kv.length = chunk.start + chunk.num_tokens
        if chunk.last:
            s.cache(req)
            if not req.output_ids:
                req.output_ids.append(7)
    for req in plan.decodes:
        req.kv.length += 1
        req.output_ids.append(len(req.output_ids) % 5)
    for req in s.running:
        if len(req.output_ids) >= req.params.max_new_tokens and not req.is_prefilling:
            finished.append(req)
    for req in finished:
        s.cache(req)
    s.update_from_output(finished)
    check_ledger(s)
    return finished


def check_ledger(s: Scheduler) -> None:
    """Every block's holders are exactly the running requests and cache nodes holding it; node
    references are exactly the running requests' ones; nothing in use was evicted; the CPU
    budget adds up."""
    kv = s.kv
    holders = {}
    for req in s.running:
        for b in req.kv.blocks:
            holders[b] = holders.get(b, 0) + 1
    for node in kv.cache.nodes.values():
        for b in node.own_blocks:
            holders[b] = holders.get(b, 0) + 1
    for b in range(kv.layout.num_blocks):
        assert kv.allocator.holders(b) == holders.get(b, 0), f"block {b}"
    assert kv.allocator.num_used == len(holders)
    refs = {}
    for req in s.running:
        for node in req.kv.cache_refs:
            refs[node.node_id] = refs.get(node.node_id, 0) + 1
            assert node.node_id in kv.cache.nodes, "a node in use was evicted"
        if req.kv.prefix is not None:
            assert req.kv.prefix in req.kv.cache_refs
    for node in kv.cache.nodes.values():
        assert node.refs == refs.get(node.node_id, 0)
        assert node.children == sum(1 for n in kv.cache.nodes.values() if n.parent is node)
    assert kv.cached_cpu_bytes == sum(n.cpu_bytes for n in kv.cache.nodes.values())
    assert 0 <= kv.cpu_bytes_free or kv.cached_cpu_bytes > 0


def run_all(s: Scheduler, limit: int = 500) -> None:
    for _ in range(limit):
        if not s.has_unfinished():
            return
        step(s)
    raise AssertionError("requests did not finish")


def test_a_second_request_shares_the_first_ones_blocks_and_prefills_only_the_rest():
    s = make()
    doc = list(range(100, 140))  # 10 blocks
    a = request("a", doc + [1, 2])
    s.add(a)
    run_all(s)
    b = request("b", doc + [3, 4, 5])
    s.add(b)
    plan = s.schedule()
    assert [c.request for c in plan.chunks] == [b]
    assert plan.chunks[0].start == 40 and plan.chunks[0].num_tokens == 3  # only its own tokens
    assert b.num_cached_tokens == 40 and b.kv.cached == 40
    node = b.kv.prefix
    assert b.kv.blocks[:10] == node.block_table[:10]
    assert all(s.kv.allocator.holders(x) == 2 for x in b.kv.blocks[:10])
    assert s.kv.cache.stats.hit_tokens == 40 and s.kv.cache.stats.query_tokens == 42 + 43


def test_a_chats_second_turn_reuses_the_whole_first_turn():
    s = make()
    turn1 = list(range(200, 230))
    a = request("a", turn1, new=6)
    s.add(a)
    run_all(s)
    held = a.prompt_ids + a.output_ids[:-1]  # K/V of all but the last generated token
    turn2 = a.prompt_ids + a.output_ids + [5, 6, 7]
    b = request("b", turn2)
    s.add(b)
    s.schedule()
    assert b.num_cached_tokens == len(held) // BS * BS and b.num_cached_tokens > len(turn1)


def test_shared_memory_is_counted_once_and_released_only_by_its_last_holder():
    s = make(num_blocks=40)
    doc = list(range(64))  # 16 blocks
    first = request("first", doc + [1])
    s.add(first)
    step(s)  # prefilled and cached: 16 blocks + its own
    used = s.kv.allocator.num_used
    others = [request(f"q{i}", doc + [2 + i]) for i in range(3)]
    for r in others:
        s.add(r)
    step(s)
    assert all(r.num_cached_tokens == 64 for r in others)
    assert s.kv.allocator.num_used - used <= 3 * 2  # each only its own block (+ its first decode's)
    s.finish(others[0])  # an abort releases only what it alone held
    check_ledger(s)
    assert all(s.kv.allocator.holders(b) >= 2 for b in others[1].kv.blocks[:16])


def test_a_tiny_budget_evicts_unused_prefixes_and_still_completes_every_request():
    s = make(num_blocks=14, cpu_total=PER_TOKEN * 60, max_num_seqs=2)
    rng = random.Random(0)
    docs = [[rng.randrange(1000) for _ in range(24)] for _ in range(4)]
    reqs = [request(f"r{i}", docs[i % 4] + [i], new=2) for i in range(12)]
    for r in reqs:
        s.add(r)
    run_all(s)
    assert all(r.finished for r in reqs)
    assert s.kv.cache.stats.evictions > 0
    s.kv.clear_cache()
    assert not s.kv.cache.nodes and s.kv.free_blocks == 14 and s.kv.cpu_bytes_free == PER_TOKEN * 60


def test_eviction_never_takes_the_prefix_an_admission_is_about_to_use():
    s = make(num_blocks=12, max_num_seqs=1)
    doc = list(range(32))  # 8 blocks
    a = request("a", doc + [1], new=1)
    s.add(a)
    run_all(s)
    assert s.kv.free_blocks == 12 - 8
    b = request("b", doc + [2], new=1)  # needs its own block, and the cached 8 kept
    s.add(b)
    s.schedule()
    assert b.num_cached_tokens == 32 and not s.kv.cache.stats.evictions


ACTIONS = st.lists(st.tuples(st.sampled_from(["add", "step", "abort"]), st.integers(0, 10**6)), min_size=1, max_size=60)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=ACTIONS, num_blocks=st.integers(8, 40), chunked=st.booleans(), budget=st.integers(3, 40))
def test_random_adds_steps_aborts_and_finishes_leak_nothing_and_never_evict_what_is_in_use(
        actions, num_blocks, chunked, budget):
    s = make(num_blocks=num_blocks, cpu_total=PER_TOKEN * num_blocks * BS, max_num_seqs=3, chunked=chunked,
             max_prefill=budget)
    prefixes = [[p * 100 + t for t in range(12)] for p in range(3)]  # 3 blocks each
    live: list[Request] = []
    for i, (action, x) in enumerate(actions):
        if action == "add":
            prompt = prefixes[x % 3][: 4 + x % 9] + [x % 7] * (x % 6)
            req = request(f"r{i}", prompt, new=1 + x % 4)
            if s.kv.never_fits(req) is None:
                s.add(req)
                live.append(req)
        elif action == "abort" and live:
            victim = live[x % len(live)]
            if not victim.finished:
                s.finish(victim)
                check_ledger(s)
        else:
            step(s)
    run_all(s)
    assert all(n.refs == 0 for n in s.kv.cache.nodes.values())
    s.kv.clear_cache()
    assert not s.kv.cache.nodes
    assert s.kv.free_blocks == num_blocks and s.kv.allocator.num_used == 0
    assert s.kv.cpu_bytes_free == PER_TOKEN * num_blocks * BS
    assert all(r.status is Status.FINISHED for r in live)


def test_a_request_on_a_cached_prefix_goes_before_whole_prompts_and_one_being_prefilled_is_awaited():
    """Questions about a document the cache holds cost only their own tokens: they are planned
    before a new document that arrived earlier (which still gets the rest of the budget). A
    question whose document is being prefilled right now waits for it instead of prefilling
    it a second time."""
    s = make(max_prefill=20)
    doc = list(range(500, 540))  # 10 blocks
    s.add(request("first", doc + [1]))
    step(s)
    step(s)  # 20 + 20 + 1 tokens: prefilled and cached after the third step
    waiting_for_it = request("same-doc", doc + [2])
    s.add(waiting_for_it)
    plan = s.schedule()
    assert [c.request.request_id for c in plan.chunks] == ["first"] and waiting_for_it in s.waiting
    step_plan_done(s, plan)
    new_doc = request("new-doc", list(range(900, 940)))
    s.add(new_doc)
    hit = request("hit", doc + [3])
    s.add(hit)
    plan = s.schedule()
    order = [c.request.request_id for c in plan.chunks]
    assert order[:2] == ["same-doc", "hit"] and order[2] == "new-doc"  # the hits first, then the rest of the budget
    assert [c.num_tokens for c in plan.chunks] == [1, 1, 18]


def step_plan_done(s: Scheduler, plan) -> None:
    """Finish a plan made by ``s.schedule()`` as ``step`` would."""
    for chunk in plan.chunks:
        chunk.request.kv.length = chunk.start + chunk.num_tokens
        if chunk.last:
            s.cache(chunk.request)
            chunk.request.output_ids.append(7)
    for req in plan.decodes:
        req.kv.length += 1
        req.output_ids.append(1)
