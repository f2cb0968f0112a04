"""The engine: continuous batching on the embedded SmolLM2, against each request run alone."""

from __future__ import annotations

import os

import pytest
import torch

from magicpig import Engine, LongContextModel, MagicPIGConfig, SamplingParams
from magicpig.runtime.prefill import prefill_sequence
from magicpig.attention.base import PendingAppend
from magicpig.attention.baselines import DenseMiddle
from magicpig.core.policies import PolicyConfig
from magicpig.core.request import SequenceKV
from magicpig.runtime.runner import ModelRunner
from magicpig.runtime.standalone import StandaloneRunner
from numerics import reorder_tolerance

DENSE = MagicPIGConfig(method="dense")
# An fp32 store: see test_generate.test_batched_equals_alone for why bf16 storage is left out.
SPARSE = MagicPIGConfig(window_tokens=16, sink_tokens=4, K=8, L=60, min_collisions=2, kv_dtype="fp32")
NEAR_TIE = 1e-4


@pytest.fixture(scope="module")
def model() -> LongContextModel:
    return LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)


def _prompts(model, n: int) -> list[list[int]]:
    texts = [
        "Write one sentence about the sea.",
        "List three colours of the rainbow, then explain why the sky is blue. " * 4,
        "Count from one to ten in words, separated by commas.",
        "Name a famous scientist and say in two sentences what they discovered. " * 2,
        "Translate 'good morning' into French, Spanish and German.",
        "Describe a cat in exactly five words.",
    ]
    return [model.encode(t)[0][0] for t in texts[:n]]


def _alone_logits(model, config, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    """Logits [len(tokens), V] before each generated token, the request decoded alone."""
    state = model.prefill([prompt])
    out = [state.last_logits[0]]
    with model.decode_session(state, config, len(tokens) + 1) as session:
        for tok in tokens[:-1]:
            out.append(session.step(torch.tensor([tok]))[0])
    return torch.stack(out)


def _assert_same_greedy(model, config, prompt, got: list[int], want: list[int]) -> None:
    """Equal greedy tokens, or a divergence at a near-tie of the alone run's logits."""
    if got == want:
        return
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    logits = _alone_logits(model, config, prompt, want[: first + 1])[first]
    top2 = torch.topk(logits, 2).values
    gap = float(top2[0] - top2[1])
    assert gap < NEAR_TIE, f"diverged at token {first} with a top-2 gap of {gap}: {got} vs {want}"


def _drain(engine: Engine, outputs: dict[str, list]) -> None:
    while engine.has_unfinished():
        for out in engine.step().outputs:
            outputs.setdefault(out.request_id, []).append(out)


def _empty_store_bytes(engine: Engine) -> list[int]:
    return [sp.method.nbytes() for sp in engine.runner.sparse.values()]


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "magicpig"])
def test_staggered_requests_equal_each_run_alone(model, config):
    """Requests of different lengths join at different steps; one finishes by a stop string,
    one is aborted while waiting (before its prefill), one mid-decode. Every surviving request
    gets the greedy tokens it gets alone, and everything is freed at the end."""
    prompts = _prompts(model, 6)
    alone = [model.generate(p, max_new_tokens=14, config=config) for p in prompts]
    stop_word = alone[2].text[3:5]  # request 2 ends early at these characters
    assert len(stop_word) == 2 and alone[2].text.find(stop_word) == 3
    # magicpig requests on a cached prefix take its centring (by design): equal to each alone
    # only without the cache (tests/engine/test_prefix_caching.py checks the cached path).
    engine = Engine(model.loaded, config, max_num_seqs=4, block_size=16, max_prefill_tokens=64,
                    prefix_caching=config.method == "dense")
    empty = _empty_store_bytes(engine)
    outputs: dict[str, list] = {}
    ids = {}
    schedule = {0: [0, 1], 2: [2, 3], 3: [4], 5: [5]}  # step -> prompts added before it
    for step in range(8):
        for i in schedule.get(step, []):
            stop = stop_word if i == 2 else None
            ids[i] = engine.add_request(prompts[i], SamplingParams(max_new_tokens=14, stop=stop))
        if step == 3:
            assert engine.scheduler.waiting and engine.scheduler.waiting[-1].request_id == ids[4]
            engine.abort(ids[4])  # still waiting: never prefilled
        if step == 5:
            engine.abort(ids[1])  # running: aborted mid-decode
        for out in engine.step().outputs:
            outputs.setdefault(out.request_id, []).append(out)
    _drain(engine, outputs)
    engine.reset_prefix_cache()  # what the cache kept goes back too: nothing else may be held
    for i, rid in ids.items():
        outs = outputs.get(rid, [])
        tokens = [t for o in outs for t in o.new_token_ids]
        last = outs[-1]
        assert last.finished and sum(o.finished for o in outs) == 1
        if i == 4:  # aborted before it ever ran: one final output, no tokens
            assert len(outs) == 1 and last.finish_reason == "abort" and tokens == []
            continue
        if i == 1:
            assert last.finish_reason == "abort" and 0 < len(tokens) < len(alone[1].token_ids)
            assert tokens == alone[1].token_ids[: len(tokens)]
            continue
        text = "".join(o.new_text for o in outs)
        if i == 2:
            assert last.finish_reason == "stop" and stop_word not in text
            assert tokens == alone[2].token_ids[: len(tokens)]
            continue
        _assert_same_greedy(model, config, prompts[i], tokens, alone[i].token_ids)
        assert text == alone[i].text and last.finish_reason == alone[i].finish_reason
    assert engine.blocks_in_use() == 0 and engine.cpu_store_bytes() == 0
    assert _empty_store_bytes(engine) == empty
    assert engine.scheduler.kv.free_slots == engine.max_num_seqs and not engine.requests


def test_layer_by_layer_prefill_equals_the_full_prefill(model):
    """The runner's offloading prefill (layer-major, each layer handed to its cache when done)
    gives the logits and the per-layer K/V of the chunked full prefill."""
    ids = _prompts(model, 2)[1] * 3
    keys, values, want = prefill_sequence(model.model, ids, chunk_size=64)
    ledger = StandaloneRunner(model.model, DENSE, max_num_seqs=1, num_blocks=8, block_size=64)
    seq, got = ledger.prefill(ids, chunk_size=64)
    tol = reorder_tolerance(want, model.args.num_layers)
    assert (got - want).abs().max().item() < tol
    for layer, cache in ledger.runner.dense.items():
        held, _ = cache.sequence(seq.blocks, len(ids))
        assert torch.allclose(held, keys[layer], atol=1e-4, rtol=1e-4)
    ledger.release(seq)
    assert ledger.blocks_in_use == 0


def _sparse_exact_runner(model, config) -> StandaloneRunner:
    """A runner whose sparse layers attend their middle exactly (DenseMiddle), so that any two
    ways of filling it must agree to float reordering."""
    return StandaloneRunner(model.model, config, max_num_seqs=1, num_blocks=64, block_size=16, method_factory=DenseMiddle)


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "magicpig"])
def test_chunked_prefill_equals_the_whole_prompt_prefill(model, config):
    """A prompt prefilled in three uneven chunks (13, 40 and the rest tokens; rows of 16 within
    each) leaves the same K/V in every cache (dense blocks; sparse slots, centring offsets and
    middle store) and the same logits as the whole-prompt prefill, and the next five decode
    steps give the same logits: a chunk that attended a wrong prefix, a wrong position or a
    stale staging row would differ far beyond float reordering."""
    ids = _prompts(model, 2)[1] * 3
    whole_ledger, chunk_ledger = _sparse_exact_runner(model, config), _sparse_exact_runner(model, config)
    whole_runner, chunk_runner = whole_ledger.runner, chunk_ledger.runner
    whole, want = whole_ledger.prefill(ids)
    seq = chunk_ledger.admit(ids)
    for i, n in enumerate((13, 40, len(ids) - 53)):
        got = chunk_runner.prefill(seq, ids, n, chunk_size=16)
        # the one progress counter: tokens computed so far
        assert (got is None) == (i < 2) and seq.length == sum((13, 40, len(ids) - 53)[: i + 1])
    assert not chunk_runner._prompt_kv, "the staging outlived the last chunk"
    tol = reorder_tolerance(want, model.args.num_layers)
    assert (got - want).abs().max().item() < tol
    assert (seq.length, seq.fill, seq.middle) == (whole.length, whole.fill, whole.middle)
    for layer, cache in whole_runner.dense.items():
        for a, b in zip(cache.sequence(whole.blocks, len(ids)), chunk_runner.dense[layer].sequence(seq.blocks, len(ids))):
            assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for layer, sp in whole_runner.sparse.items():
        other = chunk_runner.sparse[layer]
        assert torch.allclose(sp.mu[whole.slot], other.mu[seq.slot], atol=1e-5)
        assert torch.allclose(sp.cache.keys[whole.slot, :, : whole.fill], other.cache.keys[seq.slot, :, : seq.fill],
                              atol=1e-4)
        assert torch.allclose(sp.method._values[whole.store_ids[layer]], other.method._values[seq.store_ids[layer]],
                              atol=1e-4)
    token = torch.tensor([int(want.argmax())])
    for _ in range(5):
        a, b = whole_ledger.decode([whole], token), chunk_ledger.decode([seq], token)
        assert (a - b).abs().max().item() < reorder_tolerance(a, model.args.num_layers)
        token = a.argmax(dim=-1)


def test_tables_built_on_the_workers_equal_the_inline_build(model):
    """A prefill whose sparse layers' CPU tables are built on the stores' workers while the next
    layers compute (overlap_appends, the GPU default) holds what the inline build holds: the
    same logits, store bytes and six decode steps. An append that fails on a worker fails the
    prefill and frees the sequence."""
    ids = _prompts(model, 2)[1] * 3
    config = MagicPIGConfig(window_tokens=16, sink_tokens=4, K=8, L=60, min_collisions=2)
    runners = [StandaloneRunner(model.model, config, max_num_seqs=1, num_blocks=64, block_size=16, overlap_appends=f)
               for f in (True, False)]
    seqs, firsts = zip(*(r.prefill(ids) for r in runners))
    assert torch.equal(firsts[0], firsts[1])
    assert [r.runner.cpu_bytes(s) for r, s in zip(runners, seqs)][0] == runners[1].runner.cpu_bytes(seqs[1]) > 0
    token = torch.tensor([int(firsts[0].argmax())])
    for _ in range(6):
        a, b = (r.decode([s], token) for r, s in zip(runners, seqs))
        assert torch.equal(a, b)
        token = a.argmax(dim=-1)
    for r in runners:
        r.close()

    class FailingAppend(DenseMiddle):
        def append_async(self, seq_id, keys, values):
            def fail():
                raise RuntimeError("store worker failed")
            return PendingAppend(fail)

    ledger = StandaloneRunner(model.model, config, max_num_seqs=1, num_blocks=64, block_size=16, overlap_appends=True,
                      method_factory=FailingAppend)
    with pytest.raises(RuntimeError, match="store worker failed"):
        ledger.prefill(ids)
    assert ledger.blocks_in_use == 0 and ledger.kv.free_slots == 1 and not ledger.runner._prompt_kv


def test_prefill_chunk_refuses_a_wrong_token_count(model):
    ledger = StandaloneRunner(model.model, DENSE, max_num_seqs=2, num_blocks=8, block_size=16)
    runner, ids = ledger.runner, [1, 2, 3, 4, 5]
    with pytest.raises(ValueError, match=r"num_tokens=.*\[1, 0\]"):
        runner.prefill(ledger.admit([1]), [], 1)  # an empty prompt has nothing to prefill
    seq = ledger.admit(ids)
    for bad in (0, 6, -1, 2.0, True):
        with pytest.raises(ValueError, match=r"num_tokens=.*\[1, 5\]"):
            runner.prefill(seq, ids, bad)
    assert runner.prefill(seq, ids, 2) is None and seq.length == 2
    with pytest.raises(ValueError, match=r"\[1, 3\]"):
        runner.prefill(seq, ids, 4)
    assert runner.prefill(seq, ids, 3).shape == (model.args.vocab_size,)
    ledger.release(seq)
    with pytest.raises(AssertionError, match="blocks granted"):  # the runner allocates nothing itself
        runner.prefill(SequenceKV(), list(range(40)), 40)


@pytest.mark.parametrize("config", [DENSE, SPARSE], ids=["dense", "magicpig"])
def test_engine_prefills_in_chunks_and_frees_a_prompt_aborted_part_way(model, config):
    """The ``chunked`` policy with a 24-token budget: prompts of 40-110 tokens are prefilled
    over several steps while others decode, and each request gets its alone greedy tokens. One
    request is aborted while part-way through its chunks: its blocks, slot, store ids and
    staging are all freed."""
    prompts = _prompts(model, 4)
    alone = [model.generate(p, max_new_tokens=10, config=config) for p in prompts]
    engine = Engine(model.loaded, config, max_num_seqs=4, block_size=16,  # see the staggered test
                    policy=PolicyConfig("chunked", token_budget=24), prefix_caching=config.method == "dense")
    empty = _empty_store_bytes(engine)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=10)) for p in prompts]
    victim = engine.requests[ids[3]]
    outputs: dict[str, list] = {}
    part_way_steps = 0
    while engine.has_unfinished():
        for out in engine.step().outputs:
            outputs.setdefault(out.request_id, []).append(out)
        part_way_steps += sum(r.is_prefilling for r in engine.scheduler.running)
        if victim.is_prefilling and victim.num_computed_tokens > 0:
            staged = id(victim.kv) in engine.runner._prompt_kv
            engine.abort(ids[3])
            assert staged and id(victim.kv) not in engine.runner._prompt_kv
            assert victim.kv.blocks == [] and victim.kv.slot == -1 and victim.kv.store_ids == {}
    assert part_way_steps >= 4 and outputs[ids[3]][-1].finish_reason == "abort"
    for i in range(3):
        tokens = [t for o in outputs[ids[i]] for t in o.new_token_ids]
        _assert_same_greedy(model, config, prompts[i], tokens, alone[i].token_ids)
    engine.reset_prefix_cache()
    assert engine.blocks_in_use() == 0 and engine.cpu_store_bytes() == 0
    assert _empty_store_bytes(engine) == empty and engine.scheduler.kv.free_slots == engine.max_num_seqs
    engine.close()


def test_engine_rejects_bad_requests_by_name(model):
    engine = Engine(model.loaded, DENSE, max_num_seqs=2, device_memory_bytes=64 << 20)
    with pytest.raises(TypeError, match="params"):
        engine.add_request("hi", params={"max_new_tokens": 3})
    with pytest.raises(TypeError, match="prompt"):
        engine.add_request(["one", "two"])
    with pytest.raises(ValueError, match="positions"):
        engine.add_request([1] * 10, SamplingParams(max_new_tokens=model.args.max_context))
    rid = engine.add_request("hi", request_id="x")
    with pytest.raises(ValueError, match="already in use"):
        engine.add_request("hi", request_id="x")
    engine.abort(rid)
    assert engine.has_unfinished()  # until the abort is reported
    (out,) = engine.step().outputs
    assert (out.request_id, out.finished, out.finish_reason) == ("x", True, "abort")
    assert not engine.has_unfinished() and engine.step().outputs == []


def test_ping_pong_halves_are_balanced_by_middle_length(model):
    """The two micro-batches split the CPU store's work (middle tokens), not the row count."""
    runner = ModelRunner(model.model, SPARSE, max_num_seqs=4, num_blocks=1, block_size=16, ping_pong=True)
    seqs = [SequenceKV(length=n + 20, middle=n) for n in (3000, 100, 100, 100)]
    assert runner._split(seqs) == [(0, 1), (1, 4)]
    seqs = [SequenceKV(length=n + 20, middle=n) for n in (10, 10, 10, 500, 500)]
    assert runner._split(seqs) == [(0, 4), (4, 5)]
    assert runner._split(seqs[:1]) == [(0, 1)]
    dense = ModelRunner(model.model, DENSE, max_num_seqs=4, num_blocks=1, block_size=16)
    assert dense._split(seqs) == [(0, 5)]  # no middle attention to overlap: one batch
    runner.close()
    on_cpu = ModelRunner(model.model, SPARSE, max_num_seqs=4, num_blocks=1, block_size=16)
    assert not on_cpu.ping_pong and on_cpu._split(seqs) == [(0, 5)]  # the store is inline: nothing to overlap
    on_cpu.close()


def test_ping_pong_decode_equals_one_batch(model):
    """Three sequences of unequal middles decoded in two micro-batches (the GPU's ping-pong,
    forced on here) give the one-batch logits for six steps, window spills included: a
    micro-batch that attended another's store ids, slots or positions would differ far beyond
    float reordering."""
    ids = _prompts(model, 4)
    prompts = [ids[1] * 2, ids[0], ids[3]]
    runners = [StandaloneRunner(model.model, SPARSE, max_num_seqs=3, num_blocks=64, block_size=16, ping_pong=p)
               for p in (True, False)]
    logits, seqs = [], []
    for r in runners:
        seqs.append([r.prefill(p)[0] for p in prompts])
    assert runners[0].runner._split(seqs[0]) != [(0, 3)] and len({s.middle for s in seqs[0]}) == 3
    tokens = torch.tensor([5, 6, 7])
    for _ in range(20):  # the window of 16 fills: spills into the store happen on the way
        logits = [r.decode(s, tokens) for r, s in zip(runners, seqs)]
        assert (logits[0] - logits[1]).abs().max().item() < reorder_tolerance(logits[1], model.args.num_layers)
        tokens = logits[1].argmax(dim=-1)
    for r in runners:
        r.close()


def test_paged_cache_reads_runs_in_place_and_gathers_fragments():
    """A sequence in one run of blocks is a view of the pool; a fragmented one is gathered; both
    return its tokens in order. The allocator keeps growth contiguous where it can."""
    from magicpig.core.kv_budget import BlockAllocator
    from magicpig.store.device_cache import PagedKVCache

    alloc = BlockAllocator(10)
    a = alloc.allocate(2, room=4)  # blocks 2-3 are kept for a's growth
    b = alloc.allocate(2, room=2)
    assert a == [0, 1] and b == [4, 5]
    a += alloc.allocate(2, after=a[-1])
    b += alloc.allocate(1, after=b[-1])
    assert a == [0, 1, 2, 3] and b == [4, 5, 6]
    c = alloc.allocate(3)
    assert c == [7, 8, 9] and alloc.num_free == 0
    alloc.free(c)
    alloc.free(a)
    d = alloc.allocate(6)  # no gap of 6: scattered over the free blocks, in order
    assert d == [0, 1, 2, 3, 7, 8] and alloc.num_used == 9
    alloc.free(b)
    alloc.free(d)
    assert alloc.num_free == 10 and alloc.allocate(10) == list(range(10))
    cache = PagedKVCache(10, 2, 4, 3, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(0)
    for blocks in ([0, 1, 2, 3], [3, 7, 1]):
        k, v = torch.randn(2, 11, 3, generator=g), torch.randn(2, 11, 3, generator=g)
        cache.fill(blocks, k, v)
        got_k, got_v = cache.sequence(blocks, 11)
        assert torch.equal(got_k, k) and torch.equal(got_v, v)
        assert (got_k.data_ptr() == cache.keys.data_ptr()) == (blocks == [0, 1, 2, 3])  # a view iff one run
        cache.write(torch.tensor([cache.slot(blocks, 11)]), torch.ones(1, 2, 3), torch.ones(1, 2, 3))
        assert torch.equal(cache.sequence(blocks, 12)[0][:, 11], torch.ones(2, 3))


def _resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads Linux's /proc")
def test_cpu_device_buffers_take_memory_only_as_they_fill():
    """A CPU engine's KV pool (its whole device budget) is zero and resident only where written:
    1 GiB of bf16 blocks costs well under 64 MiB until filled, and reads back what was written."""
    from magicpig.store.device_cache import PagedKVCache, zero_buffer

    before = _resident_bytes()
    cache = PagedKVCache(2048, 4, 256, 128, torch.device("cpu"), torch.bfloat16)  # 2 x 512 MiB
    assert cache.keys.shape == (4, 2048 * 256, 128) and cache.keys.dtype == torch.bfloat16
    assert _resident_bytes() - before < 64 << 20
    k = torch.randn(4, 300, 128).to(torch.bfloat16)
    cache.fill([5, 9], k, -k)
    got_k, got_v = cache.sequence([5, 9], 300)
    assert torch.equal(got_k, k) and torch.equal(got_v, -k)
    assert _resident_bytes() - before < 64 << 20
    assert not cache.keys[:, :5 * 256].any() and not cache.values[:, 10 * 256:20 * 256].any()
    odd = zero_buffer((3, 0, 5), torch.device("cpu"), torch.float32)  # empty shapes work too
    assert odd.shape == (3, 0, 5)


def test_constructing_an_engine_never_calibrates(model, monkeypatch):
    """An unset K/L is refused by name (the engine never runs a calibration prefill on its own);
    ``magicpig.calibrate`` is the explicit step, and the engine takes what it chose."""
    from magicpig import calibrate
    from magicpig.runtime import calibration

    def no_calibration(*args, **kwargs):
        raise AssertionError("Engine() ran a calibration")

    with pytest.raises(ValueError, match="config: K and L are unset.*calibrate"):
        Engine(model.loaded, MagicPIGConfig(), max_num_seqs=1)
    chosen = calibrate(model, MagicPIGConfig())  # the model's cached choice (LongContextModel made it)
    assert chosen.lsh_resolved and (chosen.K, chosen.L) == (model.config.K, model.config.L)
    monkeypatch.setattr(calibration, "default_lsh", no_calibration)
    engine = Engine(model.loaded, chosen, max_num_seqs=1)
    assert engine.config == chosen
    engine.close()
    with pytest.raises(TypeError, match="model="):
        Engine(model, DENSE)  # a LongContextModel is not duck-typed back: pass model.loaded


def test_step_records_say_what_ran(model):
    """Each step's record names its prefill chunks (request, start, tokens), its decodes with the
    context each read, its preemptions and its lane times, consistent with the outputs."""
    engine = Engine(model.loaded, SPARSE, max_num_seqs=2, block_size=16,
                    policy=PolicyConfig("chunked", token_budget=32))
    prompts = _prompts(model, 2)
    ids = [engine.add_request(p, SamplingParams(max_new_tokens=4)) for p in prompts]
    records = []
    while engine.has_unfinished():
        records.append(engine.step())
    engine.close()
    first = records[0]
    assert first.chunks[0] == (ids[0], 0, min(32, len(prompts[0]))) and first.decode_ids == []
    cached = {o.request_id: o.num_cached_tokens for r in records for o in r.outputs}
    assert cached[ids[1]] > 0  # the chat template's first block, cached by the first request
    for i, rid in enumerate(ids):  # the chunks of each prompt cover it in order, once, after its cached prefix
        starts = [(s, n) for r in records for q, s, n in r.chunks if q == rid]
        assert [s for s, _ in starts] == [cached[rid] + sum(n for _, n in starts[:k]) for k in range(len(starts))]
        assert cached[rid] + sum(n for _, n in starts) == len(prompts[i])
        contexts = [c for r in records for q, c in zip(r.decode_ids, r.decode_contexts) if q == rid]
        assert contexts == [len(prompts[i]) + k for k in range(3)]  # 4 tokens: the first from the prefill
    for r in records:
        assert r.ran and r.lane_times.step_s > 0 and r.preempted == []
        assert {o.request_id for o in r.outputs if o.new_token_ids} <= set(r.decode_ids) | {q for q, _, _ in r.chunks}
        assert r.store_seconds >= 0
    assert any(r.store_seconds > 0 for r in records)  # magicpig's middles were attended by the store
