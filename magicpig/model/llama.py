"""A lean forward for Llama-architecture causal LMs (Llama 2/3/3.1, Mistral, Qwen2, Qwen3,
SmolLM2), in the spirit of gpt-fast: plain tensors and torch ops, no transformers modules at
run time (transformers only supplies the config and the RoPE frequencies).

The forward is split into the pieces the runtime composes:
``embed`` -> per layer ``attention_input`` (norm, fused QKV, q/k norm, RoPE), some attention,
``attention_output`` (O-proj + residual) and ``mlp`` -> ``logits``. Token rows are flat
(``[N, hidden]``) so prefill chunks (N tokens of one sequence) and decode steps (one token of
N sequences) share the same code; positions are per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
# RoPE types whose frequencies do not depend on the sequence length (dynamic/longrope do).
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or options are not handled by this runtime."""


@dataclass(frozen=True)
class ModelArgs:
    """Shapes and options of a Llama-family model, read from a transformers config."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float
    max_positions: int
    qk_norm: bool
    tie_embeddings: bool
    rope_type: str
    sliding_window: int | None

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @classmethod
    def from_hf_config(cls, config: Any) -> "ModelArgs":
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = getattr(config, "architectures", None) or [model_type]
            raise UnsupportedModelError(
                f"unsupported architecture {archs[0]!r} (model_type={model_type!r}); this runtime "
                f"handles model_type in {SUPPORTED_MODEL_TYPES}"
            )
        act = getattr(config, "hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"unsupported activation hidden_act={act!r}; expected 'silu'")
        rope = _rope_parameters(config)
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModelError(
                f"unsupported rope_type={rope_type!r}; supported: {STATIC_ROPE_TYPES}"
            )
        if rope.get("partial_rotary_factor", 1.0) != 1.0:
            raise UnsupportedModelError("partial_rotary_factor != 1 is not supported")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        num_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        window = getattr(config, "sliding_window", None)
        if model_type in ("qwen2", "qwen3") and not getattr(config, "use_sliding_window", False):
            window = None
        return cls(
            model_type=model_type,
            vocab_size=config.vocab_size,
            hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size,
            num_layers=config.num_hidden_layers,
            num_heads=config.num_attention_heads,
            num_kv_heads=num_kv,
            head_dim=head_dim,
            rms_eps=float(config.rms_norm_eps),
            max_positions=int(config.max_position_embeddings),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            rope_type=rope_type,
            sliding_window=window,
        )

    @property
    def max_context(self) -> int:
        """Longest sequence this runtime computes exactly as the model defines it: the position
        limit, and a sliding window (Mistral v0.1) when there is one, since attention here is
        always full."""
        if self.sliding_window:
            return min(self.max_positions, int(self.sliding_window))
        return self.max_positions


def _rope_parameters(config: Any) -> dict:
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if "rope_theta" not in params and hasattr(config, "rope_theta"):
        params = {**params, "rope_theta": config.rope_theta}
    return dict(params)


def rope_inverse_frequencies(config: Any, head_dim: int) -> tuple[torch.Tensor, float]:
    """(inv_freq float32 [head_dim/2], attention scaling) via transformers' RoPE init functions."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rope = _rope_parameters(config)
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type == "default":
        # transformers keeps the default init on each model class; it is this formula.
        base = float(rope["rope_theta"])
        inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        return inv, 1.0
    inv, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
    return inv.float(), float(scale)


@dataclass
class LayerWeights:
    """Weights of one decoder layer; QKV and gate/up are fused for one matmul each."""

    attn_norm: torch.Tensor
    wqkv: torch.Tensor
    bqkv: torch.Tensor | None
    wo: torch.Tensor
    bo: torch.Tensor | None
    q_norm: torch.Tensor | None
    k_norm: torch.Tensor | None
    mlp_norm: torch.Tensor
    w_gate_up: torch.Tensor
    w_down: torch.Tensor


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm computed in float32 and cast back, as transformers' Llama does."""
    dtype = x.dtype
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight * xf.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class LlamaModel:
    """Weights plus the pieces of the forward. Holds no KV state; the runtime owns caches."""

    def __init__(
        self,
        args: ModelArgs,
        state: dict[str, torch.Tensor],
        inv_freq: torch.Tensor,
        attention_scaling: float,
        device: torch.device,
        dtype: torch.dtype,
    ):
        self.args = args
        self.device = device
        self.dtype = dtype
        self.inv_freq = inv_freq.to(device=device, dtype=torch.float32)
        self.attention_scaling = attention_scaling
        self.scale = 1.0 / math.sqrt(args.head_dim)
        self._cos = torch.empty(0, args.head_dim, device=device, dtype=dtype)
        self._sin = self._cos
        self._load(state)

    # ----------------------------------------------------------------- weights
    def _load(self, state: dict[str, torch.Tensor]) -> None:
        a = self.args
        prefix = "model." if "model.embed_tokens.weight" in state else ""

        def take(name: str, required: bool = True) -> torch.Tensor | None:
            t = state.get(prefix + name)
            if t is None:
                if required:
                    raise UnsupportedModelError(f"checkpoint has no tensor {prefix + name!r}")
                return None
            return t.to(device=self.device, dtype=self.dtype)

        self.embed_weight = take("embed_tokens.weight")
        self.final_norm = take("norm.weight")
        lm = state.get("lm_head.weight")
        if lm is None or a.tie_embeddings:
            if lm is None and not a.tie_embeddings:
                raise UnsupportedModelError("checkpoint has no 'lm_head.weight' and embeddings are not tied")
            self.lm_head = self.embed_weight
        else:
            self.lm_head = lm.to(device=self.device, dtype=self.dtype)
        self.layers: list[LayerWeights] = []
        for i in range(a.num_layers):
            p = f"layers.{i}."
            q, k, v = (take(p + f"self_attn.{n}_proj.weight") for n in "qkv")
            biases = [take(p + f"self_attn.{n}_proj.bias", required=False) for n in "qkv"]
            if any(b is not None for b in biases):
                biases = [
                    b if b is not None else torch.zeros(w.shape[0], device=self.device, dtype=self.dtype)
                    for b, w in zip(biases, (q, k, v))
                ]
                bqkv = torch.cat(biases)
            else:
                bqkv = None
            self.layers.append(
                LayerWeights(
                    attn_norm=take(p + "input_layernorm.weight"),
                    wqkv=torch.cat([q, k, v]).contiguous(),
                    bqkv=bqkv,
                    wo=take(p + "self_attn.o_proj.weight"),
                    bo=take(p + "self_attn.o_proj.bias", required=False),
                    q_norm=take(p + "self_attn.q_norm.weight") if a.qk_norm else None,
                    k_norm=take(p + "self_attn.k_norm.weight") if a.qk_norm else None,
                    mlp_norm=take(p + "post_attention_layernorm.weight"),
                    w_gate_up=torch.cat(
                        [take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")]
                    ).contiguous(),
                    w_down=take(p + "mlp.down_proj.weight"),
                )
            )

    def weight_bytes(self) -> int:
        tensors = [self.embed_weight, self.final_norm]
        if self.lm_head is not self.embed_weight:
            tensors.append(self.lm_head)
        for lw in self.layers:
            tensors += [t for t in vars(lw).values() if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -------------------------------------------------------------------- RoPE
    def rope(self, positions: torch.Tensor, max_position: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin [N, 1, head_dim] (model dtype) for int64 positions [N]. Pass
        ``max_position`` (the largest position) to avoid a device sync."""
        if max_position is None:
            max_position = int(positions.max()) if positions.numel() else -1
        need = max_position + 1
        if need > self._cos.shape[0]:
            size = max(need, min(2 * self._cos.shape[0], self.args.max_positions), 256)
            pos = torch.arange(size, device=self.device, dtype=torch.float32)
            freqs = pos[:, None] * self.inv_freq[None, :]
            emb = torch.cat((freqs, freqs), dim=-1)
            self._cos = (emb.cos() * self.attention_scaling).to(self.dtype)
            self._sin = (emb.sin() * self.attention_scaling).to(self.dtype)
        return self._cos[positions].unsqueeze(1), self._sin[positions].unsqueeze(1)

    # ----------------------------------------------------------------- pieces
    def embed(self, token_ids: torch.Tensor) -> torch.Tensor:
        """int64 [N] -> hidden [N, hidden_size]."""
        return F.embedding(token_ids, self.embed_weight)

    def attention_input(
        self, layer: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, hidden] -> q [N, Hq, d], k [N, Hkv, d], v [N, Hkv, d] (RoPE applied)."""
        a, lw = self.args, self.layers[layer]
        h = rms_norm(x, lw.attn_norm, a.rms_eps)
        qkv = F.linear(h, lw.wqkv, lw.bqkv)
        nq, nk = a.num_heads * a.head_dim, a.num_kv_heads * a.head_dim
        q = qkv[:, :nq].view(-1, a.num_heads, a.head_dim)
        k = qkv[:, nq : nq + nk].view(-1, a.num_kv_heads, a.head_dim)
        v = qkv[:, nq + nk :].reshape(-1, a.num_kv_heads, a.head_dim)
        if a.qk_norm:
            q = rms_norm(q, lw.q_norm, a.rms_eps)
            k = rms_norm(k, lw.k_norm, a.rms_eps)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        return q, k, v

    def attention_output(self, layer: int, x: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        """Residual add of the O-projection: x [N, hidden], attn [N, Hq, d] -> [N, hidden]."""
        lw = self.layers[layer]
        return x + F.linear(attn.reshape(attn.shape[0], -1).to(self.dtype), lw.wo, lw.bo)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Residual add of the SwiGLU MLP: [N, hidden] -> [N, hidden]."""
        a, lw = self.args, self.layers[layer]
        h = rms_norm(x, lw.mlp_norm, a.rms_eps)
        gate, up = F.linear(h, lw.w_gate_up).chunk(2, dim=-1)
        return x + F.linear(F.silu(gate) * up, lw.w_down)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 logits [N, vocab]."""
        return F.linear(rms_norm(x, self.final_norm, self.args.rms_eps), self.lm_head).float()


# The CPU flash-attention op behind SDPA also returns the log-sum-exp (natural log).
_CPU_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def causal_chunk_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start: int, scale: float
) -> torch.Tensor:
    """Causal attention of a prefill chunk.

    q [T, Hq, d] at positions [start, start+T); k, v [Hkv, start+T, d] (the cache so far).
    Returns [T, Hq, d]. Memory is O(T * (start+T)) per head, so chunking bounds it.
    """
    t = q.shape[0]
    n = k.shape[1]
    qh = q.transpose(0, 1).unsqueeze(0)  # [1, Hq, T, d]
    if start == 0:
        out = F.scaled_dot_product_attention(
            qh, k[:, :t].unsqueeze(0), v[:, :t].unsqueeze(0), is_causal=True, scale=scale,
            enable_gqa=True,
        )
    elif q.device.type == "cpu" and _CPU_FLASH is not None:
        # Prefix (no mask) + diagonal block (causal), merged by their LSEs: the flash kernel
        # skips the masked half of the diagonal block and needs no [T, n] mask (~35% faster
        # prefill here than one masked call).
        o1, l1 = _CPU_FLASH(qh, k[:, :start].unsqueeze(0), v[:, :start].unsqueeze(0), 0.0, False, scale=scale)
        o2, l2 = _CPU_FLASH(qh, k[:, start:].unsqueeze(0), v[:, start:].unsqueeze(0), 0.0, True, scale=scale)
        lse = torch.logaddexp(l1, l2)
        out = o1 * torch.exp(l1 - lse).unsqueeze(-1).to(o1.dtype) + o2 * torch.exp(l2 - lse).unsqueeze(-1).to(o2.dtype)
    else:
        rows = torch.arange(start, start + t, device=q.device)[:, None]
        cols = torch.arange(n, device=q.device)[None, :]
        out = F.scaled_dot_product_attention(
            qh, k.unsqueeze(0), v.unsqueeze(0), attn_mask=cols <= rows, scale=scale, enable_gqa=True
        )
    return out[0].transpose(0, 1)


def decode_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor | None, scale: float
) -> torch.Tensor:
    """One query per sequence over a static cache.

    q [B, Hq, d]; k, v [B, Hkv, n, d]; valid bool [B, n] (None = all valid). Returns [B, Hq, d].
    GQA without copying K/V: the query heads of one KV head become SDPA's query rows.
    """
    b, hq, d = q.shape
    hkv = k.shape[1]
    qg = q.view(b, hkv, hq // hkv, d)
    mask = None if valid is None else valid[:, None, None, :]
    out = F.scaled_dot_product_attention(qg, k, v, attn_mask=mask, scale=scale)
    return out.reshape(b, hq, d)


def attention_with_middle(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    valid: torch.Tensor | None,
    scale: float,
    middle: "Callable[[], tuple[torch.Tensor, torch.Tensor]]",
) -> torch.Tensor:
    """Exact attention over the device keys merged with a middle result, float32 [B, Hq, d].

    q [B, Hq, d]; k, v [B, Hkv, n, d]; valid bool [B, n] or None. ``middle()`` returns
    (out [B, Hq, d], lse [B, Hq]) of the middle keys (it waits for the CPU store, so the
    device scores are computed first). The merge by log-sum-exp
    (:func:`magicpig.attention.reference.merge_by_lse`) is done inside the softmax: the middle
    acts as one more key with score ``lse`` and value ``out``. Same math, a handful of ops
    instead of two dozen per layer and step, which is most of a small model's decode time.
    """
    b, hq, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    g = hq // hkv
    scores = torch.matmul(q.float().view(b, hkv, g, d), k.float().transpose(-1, -2)) * scale
    if valid is not None:
        scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    out_mid, lse_mid = middle()
    scores = torch.cat([scores, lse_mid.float().view(b, hkv, g, 1)], dim=-1)
    p = torch.softmax(scores, dim=-1)
    out = torch.matmul(p[..., :n], v.float()) + p[..., n:] * out_mid.float().view(b, hkv, g, d)
    return out.view(b, hq, d)
