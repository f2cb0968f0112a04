"""LongContextModel: what users touch (load, generate) and what the evaluation builds on
(prefill once, decode with several attention methods from the same state)."""

from __future__ import annotations

import os
from typing import Any, Callable, Iterator, Sequence, Union

import torch

from magicpig.config import MagicPIGConfig, check_int
from magicpig.model.llama import LlamaModel, ModelArgs, rope_inverse_frequencies
from magicpig.model.loading import load_config, load_state_dict, load_tokenizer, resolve_model_dir
from magicpig.runtime.decode import DecodeSession
from magicpig.runtime.generate import GenerationResult, SamplingParams, decode_loop
from magicpig.runtime.prefill import DEFAULT_CHUNK, PrefillState, prefill, prefill_sequence

Prompt = Union[str, Sequence[int]]


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


class LongContextModel:
    """A Llama-family causal LM on the heterogeneous pipeline.

    ``generate`` is the one-call API. ``prefill`` + ``decode_session`` / ``generate_from`` split
    it so one exact prefill can feed decodes with different :class:`MagicPIGConfig`s.
    """

    def __init__(self, model: LlamaModel, tokenizer: Any, hf_config: Any, config: MagicPIGConfig, source: str = ""):
        self.model = model
        self.tokenizer = tokenizer
        self.hf_config = hf_config
        self.config = config
        self.source = source
        self.eos_token_ids = self._eos_ids()

    # ------------------------------------------------------------------- loading
    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        config: MagicPIGConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> "LongContextModel":
        """Load a model: None or "smollm2-135m-instruct" (the embedded model, fetched and
        converted into the user cache on first use), a local HF directory, a .gguf file, or a
        hub id already in the local Hugging Face cache. device defaults to CUDA when present;
        dtype defaults to float32 on the CPU and bfloat16 on CUDA."""
        if config is None:
            config = MagicPIGConfig()
        if not isinstance(config, MagicPIGConfig):
            raise TypeError(f"config={config!r}: expected a MagicPIGConfig or None")
        device = _resolve_device(device)
        dtype = _resolve_dtype(dtype, device)
        model_dir = resolve_model_dir(name_or_path)
        hf_config = load_config(model_dir)
        args = ModelArgs.from_hf_config(hf_config)  # unsupported architectures fail before weights load
        tokenizer = load_tokenizer(model_dir)
        state = load_state_dict(model_dir)
        inv_freq, scaling = rope_inverse_frequencies(hf_config, args.head_dim)
        config.check_model(args.num_layers, args.max_context)
        model = LlamaModel(args, state, inv_freq, scaling, device, dtype)
        del state
        return cls(model, tokenizer, hf_config, config, source=str(model_dir))

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        for value in (getattr(self.hf_config, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(value, int):
                ids.add(value)
            elif isinstance(value, (list, tuple)):
                ids.update(int(v) for v in value)
        return ids

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    # ----------------------------------------------------------------- prompts
    def encode(self, prompts: Prompt | Sequence[Prompt], chat: bool = True) -> tuple[list[list[int]], bool]:
        """Token ids of each prompt, and whether a single prompt was given.

        A prompt is a string (chat template applied when ``chat`` and the tokenizer has one)
        or a sequence of token ids (used as given)."""
        single = isinstance(prompts, str) or _is_token_ids(prompts)
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
            if isinstance(p, str):
                ids = self._encode_text(p, chat)
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
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            raise ValueError(
                f"prompt text is not valid Unicode: {err.reason} at index {err.start} ({text[err.start:err.end]!r}); "
                "expected a str without lone surrogates"
            ) from None
        if chat and getattr(self.tokenizer, "chat_template", None):
            rendered = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
            )
            return list(self.tokenizer(rendered, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer(text)["input_ids"])

    def _check_lengths(self, prompts: list[list[int]], max_new_tokens: int) -> None:
        limit = self.args.max_context
        for i, ids in enumerate(prompts):
            if len(ids) + max_new_tokens > limit:
                raise ValueError(
                    f"prompts[{i}] has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that "
                    f"exceeds the model's {limit} positions (shorten the prompt or max_new_tokens)"
                )

    # -------------------------------------------------------------- prefill/decode
    def prefill(
        self,
        prompts: Prompt | Sequence[Prompt],
        chat: bool = True,
        chunk_size: int = DEFAULT_CHUNK,
        progress: bool | None = None,
    ) -> PrefillState:
        """Exact prefill of a batch; the state is read-only and can seed many decodes."""
        ids, _ = self.encode(prompts, chat)
        self._check_lengths(ids, 0)
        return prefill(self.model, ids, chunk_size, progress)

    def decode_session(
        self, state: PrefillState, config: MagicPIGConfig | None = None, max_new_tokens: int = 256,
        method_factory: Callable[..., Any] | None = None,
    ) -> DecodeSession:
        """A decode session from ``state`` with ``config`` (default: the model's). Feed tokens
        with ``session.step(tokens [B]) -> logits [B, V]``; close it when done.
        ``method_factory``: see :class:`DecodeSession` (default: ``config.method``'s class)."""
        config = self.config if config is None else config
        if not isinstance(config, MagicPIGConfig):
            raise TypeError(f"config={config!r}: expected a MagicPIGConfig or None")
        config.check_model(self.args.num_layers, self.args.max_context)
        return DecodeSession(self.model, state, config, max_new_tokens, method_factory)

    def generate_from(
        self,
        state: PrefillState,
        config: MagicPIGConfig | None = None,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        stream: bool = False,
    ) -> list[GenerationResult] | Iterator[tuple[int, str]]:
        """Decode every sequence of a prefill state with ``config``. Returns a list of results,
        or with ``stream=True`` a generator of (sequence index, text piece) whose return
        value (``StopIteration.value``) is that list."""
        check_int("max_new_tokens", max_new_tokens, 1)
        params = SamplingParams(temperature, top_p, top_k, seed)
        stops = _stop_list(stop)
        self._check_lengths(state.token_ids, max_new_tokens)
        session = self.decode_session(state, config, max_new_tokens)
        events = decode_loop(
            session, state.last_logits, self.tokenizer, max_new_tokens, params,
            self.eos_token_ids, stops, state.prefill_seconds,
        )
        if stream:
            return events
        return _drain(events)

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stop: str | Sequence[str] | None = None,
        chat: bool = True,
        stream: bool = False,
        config: MagicPIGConfig | None = None,
    ) -> GenerationResult | list[GenerationResult] | Iterator[Any]:
        """Generate from a string, a list of strings (one batch), token ids or a list of them.

        A single prompt returns one :class:`GenerationResult`, a list returns a list. With
        ``stream=True`` returns a generator of text pieces (single prompt) or of
        (prompt index, piece) pairs (a list); its return value holds the results."""
        check_int("max_new_tokens", max_new_tokens, 1)
        params = SamplingParams(temperature, top_p, top_k, seed)
        stops = _stop_list(stop)
        ids, single = self.encode(prompts, chat)
        self._check_lengths(ids, max_new_tokens)
        state = prefill(self.model, ids)
        events = self.generate_from(
            state, config, max_new_tokens, params.temperature, params.top_p, params.top_k,
            params.seed, stops, stream=True,
        )
        if stream:
            return _single_stream(events) if single else events
        results = _drain(events)
        return results[0] if single else results

    # ------------------------------------------------------------------- testing
    @torch.inference_mode()
    def forward_logits(self, token_ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK) -> torch.Tensor:
        """Dense float32 logits [n, vocab] of every position of one sequence (for checks)."""
        if not _is_token_ids(token_ids):
            raise TypeError(f"token_ids: expected a non-empty list of int token ids, got {type(token_ids).__name__}")
        check_int("chunk_size", chunk_size, 1)
        ids, _ = self.encode(token_ids)  # checks the id range
        self._check_lengths(ids, 0)
        _, _, logits = prefill_sequence(self.model, ids[0], chunk_size, False, all_logits=True)
        return logits


def _is_token_ids(x: object) -> bool:
    if isinstance(x, torch.Tensor):
        return x.dim() == 1 and not x.is_floating_point()
    return isinstance(x, (list, tuple)) and len(x) > 0 and all(
        isinstance(t, int) and not isinstance(t, bool) for t in x
    )


def _stop_list(stop: str | Sequence[str] | None) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) and s for s in stop):
        raise ValueError(f"stop={stop!r}: expected None, a non-empty string or a list of them")
    return list(stop)


def _drain(events: Iterator[Any]) -> list[GenerationResult]:
    while True:
        try:
            next(events)
        except StopIteration as done:
            return done.value


def _single_stream(events: Iterator[tuple[int, str]]) -> Iterator[str]:
    """Pieces of the only sequence; the generator's return value is its one result."""
    while True:
        try:
            _, piece = next(events)
        except StopIteration as done:
            return done.value[0]
        yield piece
