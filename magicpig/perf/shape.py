"""The sizes of a Llama-family decoder that set its FLOPs and bytes (:class:`ModelShape`), for
the cost model (:mod:`magicpig.perf.cost_model`) and the profiles (:mod:`magicpig.perf.profile`).
Pure Python: no torch, no numpy."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Mapping, Optional

from magicpig.config import check_int


@dataclass(frozen=True)
class ModelShape:
    """The sizes of a Llama-family decoder that set its FLOPs and bytes.

    layers, hidden, heads (query), kv_heads, head_dim, intermediate (MLP width), vocab;
    bytes_per_param (weights) and bytes_per_kv_elem (K/V cache), in bytes.
    """

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    bytes_per_param: int = 2
    bytes_per_kv_elem: int = 2
    name: str = "model"

    def __post_init__(self) -> None:
        for f in ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "vocab"):
            object.__setattr__(self, f, check_int(f"ModelShape.{f}", getattr(self, f), 1))
        for f in ("bytes_per_param", "bytes_per_kv_elem"):
            object.__setattr__(self, f, check_int(f"ModelShape.{f}", getattr(self, f), 1, 8))
        if self.heads % self.kv_heads:
            raise ValueError(f"ModelShape.heads={self.heads}: expected a multiple of kv_heads={self.kv_heads}")
        if not isinstance(self.name, str):
            raise TypeError(f"ModelShape.name={self.name!r}: expected a string")

    @classmethod
    def llama31_8b(cls) -> "ModelShape":
        """Llama-3.1-8B in bf16 (32 layers, 32 query / 8 KV heads of 128, MLP 14336)."""
        return cls(32, 4096, 32, 8, 128, 14336, 128256, 2, 2, "Llama-3.1-8B")

    @classmethod
    def from_dict(cls, d: Mapping[str, object]) -> "ModelShape":
        """From this class's own keys or a Hugging Face config dict (``config.to_dict()``:
        num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim,
        intermediate_size, vocab_size, torch_dtype), so the runtime can fill it without this
        module importing transformers. Own keys win where both are present."""
        if "layers" in d:
            return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})  # type: ignore[arg-type]
        heads = d["num_attention_heads"]
        dtype = str(d.get("torch_dtype") or d.get("dtype") or "bfloat16").replace("torch.", "")
        width = {"bfloat16": 2, "float16": 2, "float32": 4}.get(dtype, 2)
        return cls(
            layers=d["num_hidden_layers"], hidden=d["hidden_size"], heads=heads,  # type: ignore[arg-type]
            kv_heads=d.get("num_key_value_heads") or heads,  # type: ignore[arg-type]
            head_dim=d.get("head_dim") or d["hidden_size"] // heads,  # type: ignore[operator]
            intermediate=d["intermediate_size"], vocab=d["vocab_size"],  # type: ignore[arg-type]
            bytes_per_param=width, bytes_per_kv_elem=width,
            name=str(d.get("name_or_path") or d.get("_name_or_path") or d.get("model_type") or "model"),
        )

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def group(self) -> int:
        """Query heads per KV head (GQA)."""
        return self.heads // self.kv_heads

    def layer_params(self) -> int:
        """Weights of one decoder layer: Q, K, V, O projections and the gated MLP (norms are
        negligible)."""
        q = self.heads * self.head_dim
        kv = self.kv_heads * self.head_dim
        return self.hidden * (2 * q + 2 * kv) + 3 * self.hidden * self.intermediate

    def layer_weight_bytes(self) -> int:
        """Bytes of one layer's weights, read once per forward pass of a micro-batch."""
        return self.layer_params() * self.bytes_per_param

    def head_weight_bytes(self) -> int:
        """Bytes of the LM head, read once per step (the embedding is a gather of B rows)."""
        return self.vocab * self.hidden * self.bytes_per_param

    def weight_bytes(self) -> int:
        """Bytes of weights one forward pass reads: every layer plus the LM head."""
        return self.layers * self.layer_weight_bytes() + self.head_weight_bytes()

    def linear_flops_per_token(self, layers: Optional[int] = None) -> float:
        """FLOPs of the layers' matmuls for one token (2 per multiply-add), LM head excluded."""
        return 2.0 * self.layer_params() * (self.layers if layers is None else layers)

    def head_flops_per_token(self) -> float:
        """FLOPs of the LM head for one token."""
        return 2.0 * self.vocab * self.hidden

    def attention_flops(self, query_tokens: int, context_before: int, layers: Optional[int] = None) -> float:
        """FLOPs of exact causal attention (QK^T and PV, 4 per query-key pair per head dim) of
        ``query_tokens`` new tokens over ``context_before`` cached ones plus themselves."""
        pairs = query_tokens * context_before + query_tokens * (query_tokens + 1) / 2.0
        return 4.0 * self.heads * self.head_dim * pairs * (self.layers if layers is None else layers)

    def kv_bytes_per_token(self, layers: Optional[int] = None) -> int:
        """Bytes of K and V of one token (all KV heads) over ``layers`` layers (default all)."""
        per_layer = 2 * self.kv_heads * self.head_dim * self.bytes_per_kv_elem
        return per_layer * (self.layers if layers is None else layers)
