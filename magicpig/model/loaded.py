"""A loaded model: the lean forward, its tokenizer and config, and prompt encoding.

What every layer above needs from a checkpoint (the engine, the facade, the evaluation), with
no generation logic: ``load_model`` resolves, loads and validates; ``LoadedModel.encode`` turns
text, chat messages or token ids into checked token-id lists.
"""

from __future__ import annotations

import functools
import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence, Union

import torch

from magicpig.model.llama import LlamaModel, ModelArgs, rope_inverse_frequencies
from magicpig.model.loading import load_config, load_state_dict, load_tokenizer, resolve_model_dir

Message = dict  # {"role": ..., "content": ...}
Prompt = Union[str, Sequence[int], Sequence[Message]]


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device={device!r}: expected 'cpu', 'cuda', 'cuda:N' or a torch.device ({err})") from None
    if resolved.type not in ("cpu", "cuda"):
        raise ValueError(f"device={device!r}: expected a CPU or CUDA device")
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device!r}: CUDA is not available on this machine (use device='cpu')")
    return resolved


# Model dtypes the runner computes in; an integer or complex dtype fails deep inside a matmul.
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
          "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


def _resolve_dtype(dtype: torch.dtype | str | None, device: torch.device) -> torch.dtype:
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ValueError(f"dtype={dtype!r}: expected one of {sorted(DTYPES)} or a torch.dtype")
        return DTYPES[dtype]
    if dtype not in DTYPES.values():
        raise ValueError(f"dtype={dtype!r}: expected torch.float32, torch.bfloat16 or torch.float16")
    return dtype


def load_model(
    name_or_path: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    dtype: torch.dtype | str | None = None,
) -> "LoadedModel":
    """Load a model: None or "smollm2-135m-instruct" (the embedded model, fetched and converted
    into the user cache on first use), a local HF directory, a .gguf file, or a hub id already
    in the local Hugging Face cache. device defaults to CUDA when present; dtype to float32 on
    the CPU and bfloat16 on CUDA."""
    device = _resolve_device(device)
    dtype = _resolve_dtype(dtype, device)
    model_dir = resolve_model_dir(name_or_path)
    hf_config = load_config(model_dir)
    args = ModelArgs.from_hf_config(hf_config)  # unsupported architectures fail before weights load
    tokenizer = load_tokenizer(model_dir)
    state = load_state_dict(model_dir)
    inv_freq, scaling = rope_inverse_frequencies(hf_config, args.head_dim)
    model = LlamaModel(args, state, inv_freq, scaling, device, dtype)
    del state
    return LoadedModel(model, tokenizer, hf_config, str(model_dir))


@dataclass
class LoadedModel:
    """model: the forward; tokenizer (None for id-only checkpoints); hf_config: the
    transformers config; source: where it was loaded from; eos_token_ids: ids that end text."""

    model: LlamaModel
    tokenizer: Any
    hf_config: Any
    source: str = ""
    eos_token_ids: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        for value in (getattr(self.hf_config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                self.eos_token_ids.add(value)
            elif isinstance(value, (list, tuple)):
                self.eos_token_ids.update(int(v) for v in value)

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    def encode(self, prompts: Prompt | Sequence[Prompt], chat: bool = True) -> tuple[list[list[int]], bool]:
        """Token ids of each prompt, and whether a single prompt was given.

        A prompt is a string (chat template applied when ``chat`` and the tokenizer has one),
        a list of chat messages ({"role", "content"} dicts, through the chat template) or a
        sequence of token ids (used as given)."""
        single = isinstance(prompts, str) or _is_token_ids(prompts) or _is_messages(prompts)
        items = [prompts] if single else prompts
        if isinstance(items, torch.Tensor):
            items = items.tolist()
        if not isinstance(items, (list, tuple)) or len(items) == 0:
            raise TypeError(
                f"prompts: expected a string, a list of strings, token ids (list of int) or a list "
                f"of token-id lists; got {type(prompts).__name__}{' (empty)' if isinstance(items, (list, tuple)) else ''}"
            )
        out = []
        for i, p in enumerate(items):
            if isinstance(p, str) or _is_messages(p):
                ids = self._encode_text(p, chat) if isinstance(p, str) else self._encode_messages(p, i)
            elif _is_token_ids(p):
                ids = [int(t) for t in (p.tolist() if isinstance(p, torch.Tensor) else p)]
                bad = [t for t in ids if not 0 <= t < self.args.vocab_size]
                if bad:
                    raise ValueError(f"prompts[{i}] has token ids outside [0, {self.args.vocab_size}): {bad[:5]}")
            else:
                raise TypeError(f"prompts[{i}]: expected a string or a list of token ids, got {type(p).__name__}")
            if not ids:
                raise ValueError(f"prompts[{i}] is empty: expected at least one token")
            out.append(ids)
        return out, single

    def _encode_text(self, text: str, chat: bool) -> list[int]:
        if self.tokenizer is None:
            raise ValueError(f"model {self.source!r} has no tokenizer: pass prompts as token ids")
        if not text:
            return []
        _check_unicode(text)
        if chat and getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def _encode_messages(self, messages: Sequence[Message], index: int) -> list[int]:
        """Chat messages through the tokenizer's chat template (with the generation prompt)."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"prompts[{index}]: chat messages need a tokenizer with a chat template")
        for j, msg in enumerate(messages):
            if not isinstance(msg.get("role"), str) or not isinstance(msg.get("content"), str):
                raise TypeError(f"prompts[{index}][{j}]: expected {{'role': str, 'content': str}}, got {msg!r}")
            _check_unicode(msg["content"])
        rendered = self.tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=True)
        return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of ``chars`` characters, 0 where none is
        certain. With a byte-level BPE tokenizer and no normaliser every byte of the text is in
        some token and no token stands for more characters than its vocabulary string has, so a
        text has at least ``chars / longest entry`` tokens: a prompt far over the context limit
        can be refused by its length alone, before tokenising it (which costs seconds per MB)."""
        longest = self._longest_token_chars
        return -(-chars // longest) if longest else 0

    @functools.cached_property
    def _longest_token_chars(self) -> int:
        """The longest vocabulary string (0: no certain bound for this tokenizer)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return 0
        spec = json.loads(backend.to_str())
        byte_level = (spec.get("decoder") or {}).get("type") == "ByteLevel"
        if spec.get("normalizer") is not None or not byte_level:
            return 0
        return max(len(token) for token in self.tokenizer.get_vocab())

    def check_lengths(self, prompts: list[list[int]], max_new_tokens: int, limit: int | None = None) -> None:
        """ValueError when a prompt plus max_new_tokens exceeds ``limit`` positions (default:
        the model's)."""
        limit = self.args.max_context if limit is None else limit
        what = "the model's" if limit == self.args.max_context else "the context limit of"
        for i, ids in enumerate(prompts):
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds {what} {limit} positions (shorten the prompt or max_new_tokens)"
                )


def _check_unicode(text: str) -> None:
    """ValueError for text that cannot be encoded as UTF-8 (lone surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"prompt text is not valid Unicode: {err.reason} at index {err.start} ({text[err.start:err.end]!r}); "
            "expected a str without lone surrogates"
        ) from None


def as_loaded(model: "LoadedModel | str | os.PathLike | None",
              device: str | torch.device | None = None) -> "LoadedModel":
    """A :class:`LoadedModel` as it is, or one loaded by name or path (:func:`load_model`) on
    ``device``. With ``device`` given, a LoadedModel on another device is a ValueError (a
    caller that measures one device, e.g. the CPU profiler)."""
    if isinstance(model, LoadedModel):
        if device is not None:
            want, have = torch.device(device), model.model.device
            if have.type != want.type or (want.index is not None and have.index != want.index):
                raise ValueError(f"model: on {have}; expected a model loaded on {want}")
        return model
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model) if device is None else load_model(model, device=device)
    raise TypeError(f"model={model!r}: expected a name or path or a LoadedModel")


def _is_token_ids(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x
    )


def _is_messages(x: object) -> bool:
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(isinstance(m, dict) for m in x)
