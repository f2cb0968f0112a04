"""Automatic prefix caching in the engine, on the embedded SmolLM2: requests sharing a long
prefix against the same requests without the cache (dense: the same greedy tokens; magicpig:
the same prefill and the same stored split and centring as the reference computed on the
request's own exact prefill), a chat's second turn, eviction under a tiny budget."""

from __future__ import annotations

import pytest
import torch

from magicpig import Engine, LongContextModel, MagicPIGConfig, SamplingParams
from magicpig.runtime.prefill import prefill_sequence

DENSE = MagicPIGConfig(method="dense")
# An fp32 store holds the prefix's keys as computed (the suffix's prefill reads them back).
SPARSE = MagicPIGConfig(window_tokens=16, sink_tokens=4, K=8, L=60, min_collisions=2, kv_dtype="fp32")
NEAR_TIE = 1e-4
MiB = 1 << 20


@pytest.fixture(scope="module")
def model() -> LongContextModel:
    return LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)


def document(model, tokens: int) -> list[int]:
    text = " ".join(f"Line {i}: the lighthouse keeper wrote down the weather, ship {i % 17} and his dream."
                    for i in range(tokens // 10))
    ids = model.encode(text, chat=False)[0][0]
    assert len(ids) >= tokens
    return ids[:tokens]


def question(model, i: int) -> list[int]:
    return model.encode(f"\nQuestion {i}: which ship did the keeper see on line {7 * i + 3}?", chat=False)[0][0]


def run(engine: Engine, schedule: list[tuple[int, list[int]]], max_new_tokens: int = 8) -> dict[str, dict]:
    """Submit each prompt at its step (staggered), run to the end; per request its tokens and
    cached-token count."""
    got: dict[str, dict] = {}
    ids: list[str] = []
    step = 0
    pending = sorted(schedule, key=lambda s: s[0])
    while pending or engine.has_unfinished():
        while pending and pending[0][0] <= step:
            ids.append(engine.submit(pending.pop(0)[1], SamplingParams(max_new_tokens=max_new_tokens)))
        for out in engine.step().outputs:
            rec = got.setdefault(out.request_id, {"tokens": [], "cached": 0})
            rec["tokens"] += out.new_token_ids
            rec["cached"] = out.num_cached_tokens
        step += 1
    return {f"r{i}": got[rid] for i, rid in enumerate(ids)}


def engine(model, config, prefix_caching=True, **kw) -> Engine:
    kw.setdefault("device_memory_bytes", 256 * MiB)
    kw.setdefault("cpu_memory_bytes", 256 * MiB)
    return Engine(model.loaded, config, max_num_seqs=4, prefix_caching=prefix_caching, **kw)


def assert_same_greedy(model, prompt: list[int], got: list[int], want: list[int]) -> None:
    """Equal greedy tokens, or a divergence at a near-tie of the uncached run's logits."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    _, _, logits = prefill_sequence(model.model, prompt + want[:first], all_logits=False)
    top2 = torch.topk(logits, 2).values
    assert float(top2[0] - top2[1]) < NEAR_TIE, f"diverged at token {first}: {got} vs {want}"


def staggered(model, doc_tokens: int) -> tuple[list[list[int]], list[tuple[int, list[int]]]]:
    doc = document(model, doc_tokens)
    prompts = [doc + question(model, i) for i in range(3)]
    return prompts, [(0, prompts[0]), (3, prompts[1]), (40, prompts[2])]  # the third after the first finished


def test_dense_staggered_requests_sharing_a_prefix_equal_the_uncached_run(model):
    prompts, schedule = staggered(model, 1100)
    cached = run(engine(model, DENSE), schedule)
    plain = run(engine(model, DENSE, prefix_caching=False), schedule)
    block = 256
    assert cached["r0"]["cached"] == 0 and plain["r1"]["cached"] == plain["r2"]["cached"] == 0
    for name in ("r1", "r2"):  # the document's full blocks: 4 of 256 tokens
        assert cached[name]["cached"] == 1100 // block * block
    for i, name in enumerate(cached):
        assert_same_greedy(model, prompts[i], cached[name]["tokens"], plain[name]["tokens"])


@pytest.mark.slow
def test_dense_staggered_requests_sharing_a_3k_prefix_equal_the_uncached_run(model):
    prompts, schedule = staggered(model, 3000)
    cached = run(engine(model, DENSE), schedule)
    plain = run(engine(model, DENSE, prefix_caching=False), schedule)
    assert cached["r1"]["cached"] == cached["r2"]["cached"] == 2816
    for i, name in enumerate(cached):
        assert_same_greedy(model, prompts[i], cached[name]["tokens"], plain[name]["tokens"])


def test_a_chats_second_turn_reuses_the_first_turns_tokens(model):
    e = engine(model, DENSE)
    turn1 = model.encode([{"role": "user", "content": "Tell me about lighthouses. " * 40}])[0][0]
    first = run(e, [(0, turn1)], max_new_tokens=24)["r0"]
    messages = [{"role": "user", "content": "Tell me about lighthouses. " * 40},
                {"role": "assistant", "content": model.loaded.tokenizer.decode(first["tokens"], skip_special_tokens=True)},
                {"role": "user", "content": "And about harbours?"}]
    turn2 = model.encode(messages)[0][0]
    common = next((i for i, (a, b) in enumerate(zip(turn2, turn1 + first["tokens"])) if a != b), len(turn2))
    assert common > len(turn1)  # the template renders turn 1 and its answer as they were fed
    hits_before = e.cache_usage()["hit_tokens"]
    second = run(e, [(0, turn2)], max_new_tokens=4)["r0"]
    assert second["cached"] == min(common, len(turn1) + len(first["tokens"]) - 1) // 256 * 256
    assert second["cached"] > len(turn1) - 256  # more than turn 1's prompt blocks: its answer too
    assert e.cache_usage()["hit_tokens"] - hits_before == second["cached"]


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "magicpig"])
def test_a_tiny_budget_evicts_and_still_completes_every_request(model, config):
    """Room for a few blocks: documents' prefixes are cached, evicted LRU when admissions need
    the room, and every request completes; clearing the cache gives every byte back."""
    e = engine(model, config, block_size=64)
    slot, block = e.scheduler.kv.layout.slot_bytes, e.scheduler.kv.layout.block_bytes
    e.close()
    small = engine(model, config, device_memory_bytes=4 * slot + 9 * block, cpu_memory_bytes=64 * MiB, block_size=64)
    docs = [document(model, 200 + 30 * d)[30 * d :] for d in range(5)]  # 3 blocks each
    schedule = [(i, docs[i % 5] + question(model, i)) for i in range(10)]
    got = run(small, schedule, max_new_tokens=3)
    assert all(len(r["tokens"]) == 3 for r in got.values())
    assert small.cache_usage()["evictions"] > 0
    small.reset_prefix_cache()
    assert small.cache_usage()["nodes"] == 0 and small.blocks_in_use() == 0
    assert small.scheduler.kv.cpu_bytes_free == small.scheduler.kv.layout.cpu_bytes_total
    assert small.cpu_store_bytes() == 0
    assert not small.runner._nodes


@pytest.mark.parametrize("doc_tokens", [600, pytest.param(3000, marks=pytest.mark.slow)])
def test_magicpig_request_on_a_cached_prefix_holds_the_reference_split(model, doc_tokens):
    """The second request shares the first one's document through the store (a fork of its
    middle: no copy) and appends its own tokens: its slot and its middle equal its own exact
    prefill's keys, split at its own sinks and window and centred by the prefix's mu (the one
    difference by design: the shared middle keeps the centring it was hashed with). Its first
    token equals the uncached run's, whose prefill is exact too."""
    S, W = SPARSE.sink_tokens, SPARSE.window_tokens
    doc = document(model, doc_tokens)
    a_ids, b_ids = doc + question(model, 1), doc + question(model, 2)
    e = engine(model, SPARSE)
    a = e.submit(a_ids, SamplingParams(max_new_tokens=2))
    while e.has_unfinished():
        e.step()
    b = e.submit(b_ids, SamplingParams(max_new_tokens=40))
    first = []
    while not first:
        first = [t for o in e.step().outputs for t in o.new_token_ids]
    req = e.requests[b]
    assert req.num_cached_tokens == doc_tokens // 256 * 256 and req.kv.middle == len(b_ids) - S - W
    keys_a, _, _ = prefill_sequence(model.model, a_ids)
    keys_b, values_b, logits_b = prefill_sequence(model.model, b_ids)
    assert first[0] == int(logits_b.argmax()) or float(torch.topk(logits_b, 2).values.diff().abs()) < NEAR_TIE
    n, n_a = len(b_ids), len(a_ids)
    for layer, sp in e.runner.sparse.items():
        mu = keys_a[layer][:, S : n_a - W].float().mean(dim=1).to(keys_a[layer].dtype)  # the first request's
        torch.testing.assert_close(sp.mu[req.kv.slot], mu)
        want = keys_b[layer] - mu[:, None, :]
        got_k, got_v = sp.method.read(req.kv.store_ids[layer], 0, n - S - W)
        torch.testing.assert_close(got_k, want[:, S : n - W], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(got_v, values_b[layer][:, S : n - W], atol=2e-4, rtol=1e-4)
        slot_k = sp.cache.keys[req.kv.slot]
        torch.testing.assert_close(slot_k[:, :S], want[:, :S], atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(slot_k[:, S : S + W], want[:, n - W :], atol=2e-4, rtol=1e-4)
    shared = e.runner.store_bytes()
    e.abort(b)
    e.step()
    alone = e.runner.store_bytes()
    assert 0 < shared - alone < 0.25 * alone  # b held only its own tokens beside the cached document
    e.close()
