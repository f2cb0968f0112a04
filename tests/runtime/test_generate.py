"""generate(), prefill/decode sessions and the magicpig routing on the embedded SmolLM2."""

from __future__ import annotations

import pytest
import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.attention.reference import candidate_mask, sampled_attention
from magicpig.attention.sampled import SampledMiddle
from magicpig.lsh import SimHash, head_seed
from numerics import reorder_tolerance

DENSE = MagicPIGConfig(method="dense")
PROMPTS = [
    "Write one sentence about the sea.",
    "List three colours of the rainbow, then explain in a few words why the sky looks blue "
    "during the day and red at sunset. " * 3,
    "Count from one to five in words.",
]


@pytest.fixture(scope="module")
def model() -> LongContextModel:
    return LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)


def _session_logits(model, state, config, steps):
    """Greedy-decode ``steps`` tokens; returns logits per step [steps, B, V] and the tokens."""
    out, toks = [], []
    with model.decode_session(state, config, steps) as s:
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            toks.append(tokens)
            logits = s.step(tokens)
            out.append(logits)
            tokens = logits.argmax(-1)
    return torch.stack(out), torch.stack(toks)


def test_sampled_middle_matches_reference_estimator():
    """Hashing on the device + the CPU store == the torch oracle fed the same codes (GQA)."""
    cfg = MagicPIGConfig(K=4, L=30, min_collisions=2, kv_dtype="fp32", seed=3)
    hkv, hq, d, n = 2, 6, 16, 300
    g = torch.Generator().manual_seed(0)
    k = torch.randn(hkv, n, d, generator=g)
    v = torch.randn(hkv, n, d, generator=g)
    q = torch.randn(2, hq, d, generator=g) * 2
    method = SampledMiddle(cfg, layer=5, num_kv_heads=hkv, head_dim=d)
    ids = [method.add_sequence(), method.add_sequence()]
    method.append(ids[0], k[:, :200], v[:, :200])
    method.append(ids[0], k[:, 200:], v[:, 200:])  # appends after appends are retrievable
    method.append(ids[1], k[:, :40], v[:, :40])
    assert [method.length(i) for i in ids] == [300, 40]
    out, lse, num = method.attend(ids, q)
    for b, length in enumerate((300, 40)):
        kh = [SimHash(d, cfg.K, cfg.L, head_seed(cfg.seed, 5, h)) for h in range(hkv)]
        key_codes = torch.stack([kh[h].hash(k[h, :length]) for h in range(hkv)])[None]
        query_codes = torch.stack([kh[h // 3].hash(q[b, h]) for h in range(hq)])[None]
        mask = candidate_mask(query_codes, key_codes, cfg.min_collisions)
        ref_out, ref_lse = sampled_attention(q[b : b + 1], k[None, :, :length], v[None, :, :length],
                                             mask, cfg.K, cfg.L, cfg.min_collisions)
        assert torch.equal(num[b], mask[0].sum(-1).to(torch.int32))
        assert 0 < int(num[b].sum()) < hq * length  # some but not all keys sampled
        assert torch.allclose(out[b], ref_out[0], atol=1e-4, rtol=1e-4)
        assert torch.allclose(lse[b], ref_lse[0], atol=1e-4)


def test_trusted_attend_equals_the_checked_one_and_survives_a_nan_query():
    """The runner's unchecked per-layer path (its own hash call straight into a buffer, the
    store called without checks) gives exactly the checked path's out, lse and counts: GQA
    groups of 3, a batch of 4 with a repeated id and unequal lengths, one sequence with no
    middle, a bf16 store and queries in bf16. A NaN query head, which only the checks would
    stop, comes back as NaN or as "no key" (out 0, lse -inf) for that head, with no crash and
    the other heads unchanged (to float rounding within its GQA group, whose candidate rows the
    kernel reads together); the device half of that head's attention is NaN anyway."""
    cfg = MagicPIGConfig(K=5, L=40, min_collisions=2, kv_dtype="bf16", seed=7)
    hkv, hq, d = 2, 6, 32
    g = torch.Generator().manual_seed(1)
    method = SampledMiddle(cfg, layer=2, num_kv_heads=hkv, head_dim=d)
    ids = [method.add_sequence() for _ in range(3)]
    for sid, n in zip(ids, (500, 37, 0)):
        if n:
            method.append(sid, torch.randn(hkv, n, d, generator=g), torch.randn(hkv, n, d, generator=g))
    batch = [ids[0], ids[1], ids[0], ids[2]]
    for dtype in (torch.float32, torch.bfloat16):
        q = (torch.randn(4, hq, d, generator=g) * 3).to(dtype)
        want = method.attend_async(batch, q).wait()
        got = method.attend_trusted(batch, q).wait()
        for a, b in zip(got, want):
            assert a.dtype == b.dtype and torch.equal(a, b)
        assert int(want[2][:3].sum()) > 0 and int(want[2][3].sum()) == 0  # the empty middle: no key read
    q = torch.randn(4, hq, d, generator=g)
    clean = method.attend_trusted(batch, q).wait()
    q[1, 4] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        method.attend_async(batch, q)
    out, lse, num = method.attend_trusted(batch, q).wait()
    assert torch.isnan(out[1, 4]).all() or (torch.equal(out[1, 4], torch.zeros(d)) and torch.isneginf(lse[1, 4]))
    keep = torch.ones(4, hq, dtype=torch.bool)
    keep[1, 4] = False
    torch.testing.assert_close(out[keep], clean[0][keep], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse[keep], clean[1][keep], rtol=1e-5, atol=1e-5)
    assert torch.equal(num[keep], clean[2][keep])


def test_generate_prefills_each_prompt_whole_in_one_step(model, monkeypatch):
    """generate() runs its engine with one whole prompt per step (the layer-by-layer prefill):
    every runner prefill call starts at token 0 and runs the whole prompt, where a prefill split
    into chunks (of max_prefill_tokens=1 token!) would run a piece."""
    from magicpig.runtime.runner import ModelRunner

    calls, real = [], ModelRunner.prefill

    def spy(self, kv, token_ids, num_tokens, *args, **kwargs):
        calls.append((kv.length, num_tokens, len(token_ids)))
        return real(self, kv, token_ids, num_tokens, *args, **kwargs)

    monkeypatch.setattr(ModelRunner, "prefill", spy)
    results = model.generate(PROMPTS, max_new_tokens=3, config=DENSE)
    assert [len(r.token_ids) for r in results] == [3] * len(PROMPTS)
    assert len(calls) == len(PROMPTS) and all(start == 0 and n == total for start, n, total in calls), calls


def test_magicpig_equals_dense_when_window_covers_context(model):
    state = model.prefill(PROMPTS)
    wide = MagicPIGConfig(window_tokens=2048)
    la, ta = _session_logits(model, state, DENSE, 8)
    lb, tb = _session_logits(model, state, wide, 8)
    assert torch.equal(ta, tb)
    # Same keys, but centred by mu on the sparse layers: equal up to float32 reordering.
    assert (la - lb).abs().max().item() < reorder_tolerance(la, model.args.num_layers)
    dense = model.generate_from(state, DENSE, max_new_tokens=12)
    sparse = model.generate_from(state, wide, max_new_tokens=12)
    assert [r.token_ids for r in dense] == [r.token_ids for r in sparse]
    with model.decode_session(state, wide) as s:
        assert s.middle == [0, 0, 0]  # nothing offloaded


# The CPU store holds K/V in fp32 here: stored in bf16, a key element that float32 reordering
# moved across a bf16 rounding boundary jumps by one bf16 ulp (2^-8 relative), which turns the
# 1e-7-relative noise of a different batch shape into ~1e-5-relative logit noise at random.
# bf16 storage is exercised by the other tests; this one checks the batching arithmetic.
@pytest.mark.parametrize(
    "config", [DENSE, MagicPIGConfig(window_tokens=16, sink_tokens=4, kv_dtype="fp32")], ids=["dense", "magicpig"]
)
def test_batched_equals_alone(model, config):
    batch = model.generate(PROMPTS, max_new_tokens=10, config=config)
    assert len({len(r.stats.__dict__) for r in batch}) == 1 and len(batch) == 3
    lengths = {r.stats.prompt_tokens for r in batch}
    assert len(lengths) == 3  # really different lengths
    for prompt, got in zip(PROMPTS, batch):
        alone = model.generate(prompt, max_new_tokens=10, config=config)
        assert alone.token_ids == got.token_ids
        assert alone.text == got.text
    # Per-step logits too, not only the argmax: equal up to float32 reordering (row 1 runs in a
    # micro-batch of 2 here, alone in one of 1).
    ids, _ = model.encode(PROMPTS)
    both, _ = _session_logits(model, model.prefill(ids), config, 4)
    one, _ = _session_logits(model, model.prefill([ids[1]]), config, 4)
    tol = reorder_tolerance(one, model.args.num_layers)
    assert (both[:, 1] - one[:, 0]).abs().max().item() < tol


def test_generation_longer_than_window_buffer(model):
    """The window buffer (W + spill) overflows many times; the middle grows in the store."""
    cfg = MagicPIGConfig(window_tokens=8, sink_tokens=4, kv_dtype="fp32")
    state = model.prefill([PROMPTS[1]])
    n = state.lengths[0]
    steps = 60
    with model.decode_session(state, cfg, steps) as s:
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            tokens = s.step(tokens).argmax(-1)
        assert s.lengths == [n + steps]
        assert s.fill[0] <= 4 + 16 and s.middle[0] + s.fill[0] == n + steps
        assert s.middle[0] > n - 12  # tokens moved from the window into the middle
        for sp in s.sparse.values():
            assert sp.method.length(sp.seq_ids[0]) == s.middle[0]
            assert sp.method.store.length(sp.seq_ids[0]) == s.middle[0]
    first = model.generate_from(state, cfg, max_new_tokens=steps)[0]
    again = model.generate_from(state, cfg, max_new_tokens=steps)[0]
    assert first.token_ids == again.token_ids  # sessions from one state are independent
    assert 0 < first.stats.computation_cost < 1 and first.stats.cpu_bytes > 0


def test_short_prompt_is_centred_at_the_first_spill(model):
    """A prompt inside sinks + window has no middle at prefill (mu = 0). At the first spill the
    session centres every key of the row by the spilled block's mean: exact middle attention
    (topk at budget 1) must still give dense's logits across that spill."""
    cfg = MagicPIGConfig(method="topk", budget=1.0, window_tokens=40, sink_tokens=4, kv_dtype="fp32")
    state = model.prefill([PROMPTS[0]])
    n = state.lengths[0]
    assert n <= 4 + 40  # no middle at prefill
    steps = 60  # the buffer holds 4 + 40 + 40 tokens: spills once
    la, ta = _session_logits(model, state, DENSE, steps)
    with model.decode_session(state, cfg, steps) as s:
        lb = []
        for i in range(steps):
            lb.append(s.step(ta[i]))
        assert s.middle[0] > 0
        for sp in s.sparse.values():
            assert sp.mu[0].abs().sum() > 0  # centred at the first spill
            held = sp.method._keys[sp.seq_ids[0]]  # [Hkv, n_mid, d] what the middle holds
            first = held[:, :40]
            assert first.mean(1).abs().max() < 1e-4 * (1 + first.abs().max())  # first block centred
    assert (la - torch.stack(lb)).abs().max().item() < 1e-3


def test_stream_stop_eos_and_sampling(model):
    full = model.generate(PROMPTS[0], max_new_tokens=24)
    pieces = list(model.generate(PROMPTS[0], max_new_tokens=24, stream=True))
    assert "".join(pieces) == full.text and len(pieces) > 3
    assert full.finish_reason in ("eos", "length")
    if full.finish_reason == "eos":
        assert full.token_ids[-1] in model.eos_token_ids
    word = full.text.split()[2]
    cut = model.generate(PROMPTS[0], max_new_tokens=24, stop=[word])
    assert cut.finish_reason == "stop" and cut.text == full.text[: full.text.index(word)]
    a = model.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    b = model.generate(PROMPTS[0], max_new_tokens=12, temperature=0.9, top_p=0.9, seed=7)
    assert a.token_ids == b.token_ids
    k1 = model.generate(PROMPTS[0], max_new_tokens=12, temperature=1.0, top_k=1, seed=1)
    assert k1.token_ids == full.token_ids[:12]
    ids, _ = model.encode(PROMPTS[0])
    assert model.generate(ids[0], max_new_tokens=12).token_ids == full.token_ids[:12]
    plain = model.generate(PROMPTS[0], max_new_tokens=4, chat=False)
    assert plain.stats.prompt_tokens < full.stats.prompt_tokens  # no chat template


def test_stats(model):
    r = model.generate(PROMPTS[1], max_new_tokens=6, config=MagicPIGConfig(window_tokens=16))
    s = r.stats
    assert s.prefill_seconds > 0 and s.decode_tokens_per_second > 0
    assert 0 < s.computation_cost < 1 and s.cpu_bytes > 0 and s.device_bytes > 0
    d = model.generate(PROMPTS[1], max_new_tokens=6, config=DENSE).stats
    assert d.computation_cost == 1.0 and d.cpu_bytes == 0 and d.device_bytes > s.device_bytes


def test_bad_inputs(model):
    limit = model.args.max_context
    with pytest.raises(ValueError, match="positions"):
        model.generate([5] * (limit + 1), max_new_tokens=1)
    with pytest.raises(ValueError, match="positions"):
        model.generate([5] * (limit - 2), max_new_tokens=10)
    with pytest.raises(ValueError, match="empty"):
        model.generate("", max_new_tokens=1)
    with pytest.raises(TypeError, match="prompts"):
        model.generate(123)
    with pytest.raises(TypeError, match="prompts"):
        model.generate([])
    with pytest.raises(TypeError, match=r"prompts\[1\]"):
        model.generate(["ok", 3.5])
    with pytest.raises(ValueError, match="token ids outside"):
        model.generate([1, 2, model.args.vocab_size])
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate("hi", max_new_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        model.generate("hi", temperature=-1.0)
    with pytest.raises(ValueError, match="top_p"):
        model.generate("hi", top_p=0.0)
    with pytest.raises(ValueError, match="stop"):
        model.generate("hi", stop=[""])
    with pytest.raises(TypeError, match="MagicPIGConfig"):
        model.generate("hi", config="magicpig")


def test_finished_row_stats_stop_when_it_finishes(model):
    """A row that finishes on its first token (here by a stop string) and then rides along in
    the batch reports the same stats as when run alone: nothing read or held after it ended."""
    cfg = MagicPIGConfig(window_tokens=16, sink_tokens=4, kv_dtype="fp32")
    first = model.generate(PROMPTS[1], max_new_tokens=1, config=cfg)
    stop = first.text.strip()[:3]
    assert stop, first.text
    alone = model.generate(PROMPTS[1], max_new_tokens=12, config=cfg, stop=stop)
    batch = model.generate([PROMPTS[1], PROMPTS[2]], max_new_tokens=12, config=cfg, stop=stop)
    assert alone.finish_reason == batch[0].finish_reason == "stop" and len(alone.token_ids) == 1
    assert len(batch[1].token_ids) > 1  # its mate kept decoding
    a, b = alone.stats, batch[0].stats
    assert a.computation_cost == b.computation_cost == 0.0  # finished before any decode step
    assert (a.device_bytes, a.cpu_bytes, a.new_tokens) == (b.device_bytes, b.cpu_bytes, b.new_tokens)
    assert b.decode_seconds <= batch[1].stats.decode_seconds


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda m: m.generate("hi", temperature=float("nan")), ValueError, "temperature=nan"),
        (lambda m: m.generate("hi", temperature=float("inf")), ValueError, "temperature=inf"),
        (lambda m: m.generate("hi", seed=2**64), ValueError, r"seed=18446744073709551616"),
        (lambda m: m.generate("hi", seed=1.5), TypeError, r"seed=1.5"),
        (lambda m: m.generate("hi", top_k=-1), ValueError, "top_k"),
        (lambda m: m.generate("hi", max_new_tokens=2.0), TypeError, "max_new_tokens"),
        (lambda m: m.generate("a\ud800b"), ValueError, "surrogate"),
        (lambda m: m.generate(["ok", "a\udfffb"]), ValueError, "surrogate"),
        (lambda m: m.forward_logits([1] * (m.args.max_context + 1)), ValueError, "positions"),
        (lambda m: m.forward_logits([1, 2, m.args.vocab_size]), ValueError, "token ids outside"),
        (lambda m: m.forward_logits("text"), TypeError, "token_ids"),
        (lambda m: m.generate("hi", config=MagicPIGConfig(window_tokens=m.args.max_context)), ValueError,
         "window_tokens"),
        (lambda m: m.generate("hi", config=MagicPIGConfig(dense_layers=(m.args.num_layers,))), ValueError,
         "dense_layers"),
    ],
)
def test_bad_arguments_name_themselves(model, call, error, match):
    with pytest.raises(error, match=match):
        call(model)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(dtype=torch.int32), ValueError, "dtype=torch.int32"),
        (dict(dtype="int8"), ValueError, "dtype='int8'"),
        (dict(device="nosuch"), ValueError, "device='nosuch'"),
        (dict(device="meta"), ValueError, "device='meta'"),
        (dict(config=MagicPIGConfig(window_tokens=10**6)), ValueError, "window_tokens"),
        (dict(config=MagicPIGConfig(dense_layers=(99,))), ValueError, "dense_layers"),
    ],
)
def test_from_pretrained_refuses_what_cannot_run(kwargs, error, match):
    with pytest.raises(error, match=match):
        LongContextModel.from_pretrained(**kwargs)


@pytest.mark.parametrize("temperature", [1e-300, 1e-30, 1e-6])
def test_tiny_temperature_samples_the_argmax_without_nan(temperature):
    """logits / T overflowed to inf for a tiny T and softmax gave NaN (the HTTP fuzzer found it:
    multinomial raised inside the engine thread). Every row must come out as its argmax."""
    from magicpig.core.sampling_params import SamplingParams
    from magicpig.runtime.sampling import select_tokens

    logits = torch.randn(4, 1000, generator=torch.Generator().manual_seed(0)) * 30
    logits[1] = -1e30  # a row of huge negative logits, one token a bit above the rest
    logits[1, 7] = -1e29
    for params in (SamplingParams(temperature=temperature), SamplingParams(temperature=temperature, top_p=0.5),
                   SamplingParams(temperature=temperature, top_k=3)):
        got = select_tokens(logits, params, torch.Generator().manual_seed(1))
        assert torch.equal(got, logits.argmax(-1)), params
