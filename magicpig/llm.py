"""LongContextModel: what users touch (load, generate) and what the evaluation builds on
(prefill once, decode with several attention methods from the same state).

Every generation runs through the :class:`~magicpig.engine.engine.Engine` (continuous
batching): ``generate`` from prompts, ``generate_from`` from a read-only prefill state, whose
rows the engine's admissions take as they are instead of prefilling again (the evaluation
prefills each sample once and decodes every :class:`MagicPIGConfig` from that state).
``decode_session`` is the bare mechanism for tools that step the logits themselves.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Generator, Iterator, Sequence

import torch

from magicpig.config import MagicPIGConfig, check_int, resolve_config
from magicpig.core.kv_budget import blocks_for
from magicpig.core.sampling_params import SamplingParams
from magicpig.engine.engine import Engine
from magicpig.engine.outputs import GenerationResult
from magicpig.model.llama import LlamaModel, ModelArgs
from magicpig.model.loaded import LoadedModel, Prompt, _is_token_ids, as_loaded, load_model
from magicpig.runtime.calibration import LSHChoice, resolve_lsh
from magicpig.runtime.decode import DecodeSession
from magicpig.runtime.prefill import PREFILL_CHUNK, PrefillState, prefill, prefill_sequence
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, cache_bytes


class LongContextModel:
    """A Llama-family causal LM on the heterogeneous pipeline, with its default config.
    ``prefix_caching``: whether ``generate`` shares the full blocks prompts have in common
    (automatic prefix caching, on by default as in vLLM's ``LLM``; each call's cache lives
    as long as the call)."""

    def __init__(self, loaded: LoadedModel, config: MagicPIGConfig | None = None):
        self.loaded = loaded
        self.prefix_caching = True
        self.lsh_choice: LSHChoice | None = None  # how K, L, m were chosen, when they were
        self.config = resolve_config(config, None, loaded.args.num_layers, loaded.args.max_context)
        self.config = self.resolve_lsh(self.config)

    def resolve_lsh(self, config: MagicPIGConfig) -> MagicPIGConfig:
        """``config`` with K, L and min_collisions chosen for this model where it leaves them
        unset and samples (method "magicpig"); see :func:`magicpig.runtime.calibration.default_lsh`.
        The choice is kept in ``lsh_choice``."""
        config, choice = resolve_lsh(self.loaded, config)
        if choice is not None and self.lsh_choice is None:
            self.lsh_choice = choice
        return config

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        config: MagicPIGConfig | None = None,
        device: str | torch.device | None = None,
        dtype: torch.dtype | str | None = None,
    ) -> "LongContextModel":
        """Load a model (see :func:`magicpig.model.loaded.load_model`): None or
        "smollm2-135m-instruct" (the embedded model), a local HF directory, a .gguf file, or a
        hub id already in the local Hugging Face cache. device defaults to CUDA when present;
        dtype to float32 on the CPU and bfloat16 on CUDA."""
        resolve_config(config)  # a wrong type fails before the weights load
        return cls(load_model(name_or_path, device, dtype), config)

    @property
    def model(self) -> LlamaModel:
        return self.loaded.model

    @property
    def tokenizer(self) -> Any:
        return self.loaded.tokenizer

    @property
    def hf_config(self) -> Any:
        return self.loaded.hf_config

    @property
    def source(self) -> str:
        return self.loaded.source

    @property
    def eos_token_ids(self) -> set[int]:
        return self.loaded.eos_token_ids

    @property
    def args(self) -> ModelArgs:
        return self.model.args

    @property
    def device(self) -> torch.device:
        return self.model.device

    def _config(self, config: MagicPIGConfig | None) -> MagicPIGConfig:
        """``config`` (default: the model's), checked against this model, K and L chosen for it
        when unset."""
        return self.resolve_lsh(resolve_config(config, self.config, self.args.num_layers, self.args.max_context))

    def encode(self, prompts: Prompt | Sequence[Prompt], chat: bool = True) -> tuple[list[list[int]], bool]:
        """Token ids of each prompt, and whether a single prompt was given (see
        :meth:`LoadedModel.encode`)."""
        return self.loaded.encode(prompts, chat)

    # -------------------------------------------------------------- prefill/decode
    def prefill(
        self,
        prompts: Prompt | Sequence[Prompt],
        chat: bool = True,
        chunk_size: int = PREFILL_CHUNK,
        progress: bool | None = None,
    ) -> PrefillState:
        """Exact prefill of a batch; the state is read-only and can seed many decodes."""
        ids, _ = self.encode(prompts, chat)
        self.loaded.check_lengths(ids, 0)
        return prefill(self.model, ids, chunk_size, progress)

    def decode_session(
        self, state: PrefillState, config: MagicPIGConfig | None = None, max_new_tokens: int = 256,
        method_factory: Callable[..., Any] | None = None,
    ) -> DecodeSession:
        """A decode session from ``state`` with ``config`` (default: the model's). Feed tokens
        with ``session.step(tokens [B]) -> logits [B, V]``; close it when done.
        ``method_factory``: see :class:`DecodeSession` (default: ``config.method``'s class)."""
        config = self._config(config)
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
        params = SamplingParams(temperature, top_p, top_k, seed, max_new_tokens, stop)
        self.loaded.check_lengths(state.token_ids, params.max_new_tokens)
        events = self._engine_events(state.token_ids, params, self._config(config), state)
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
        """Generate from a string, chat messages, token ids, or a list of those (one batch,
        run through the :class:`Engine`: a finished sequence leaves the batch at once).

        A single prompt returns one :class:`GenerationResult`, a list returns a list. With
        ``stream=True`` returns a generator of text pieces (single prompt) or of
        (prompt index, piece) pairs (a list); its return value holds the results. With a
        ``seed``, every prompt samples from its own generator seeded with it."""
        params = SamplingParams(temperature, top_p, top_k, seed, max_new_tokens, stop)
        ids, single = self.encode(prompts, chat)
        self.loaded.check_lengths(ids, params.max_new_tokens)
        events = self._engine_events(ids, params, self._config(config))
        if stream:
            return _single_stream(events) if single else events
        results = _drain(events)
        return results[0] if single else results

    def _engine_events(
        self, ids: list[list[int]], params: SamplingParams, config: MagicPIGConfig,
        prefilled: PrefillState | None = None,
    ) -> Generator[tuple[int, str], None, list[GenerationResult]]:
        """Run the prompts through an engine sized for exactly them; yields (index, piece).
        Without ``prefilled``, one whole prompt per step (the layer-by-layer prefill: the lowest
        peak memory); with it, every row is admitted at once from its prefill state."""
        slot_bytes, block_bytes = cache_bytes(self.model, config, DEFAULT_BLOCK_SIZE)
        blocks = sum(blocks_for(len(p) + params.max_new_tokens + 1, DEFAULT_BLOCK_SIZE) for p in ids)
        budget = 1 if prefilled is None else sum(map(len, ids))
        engine = Engine(self.loaded, config, max_num_seqs=len(ids), max_prefill_tokens=budget, chunked_prefill=False,
                        device_memory_bytes=max(1, len(ids) * slot_bytes + blocks * block_bytes),
                        prefix_caching=self.prefix_caching)
        try:
            rows = [None if prefilled is None else prefilled.select([i]) for i in range(len(ids))]
            index = {engine.submit(p, params, prefilled=row): i for i, (p, row) in enumerate(zip(ids, rows))}
            tokens: list[list[int]] = [[] for _ in ids]
            texts, results = [""] * len(ids), [None] * len(ids)
            while engine.has_unfinished():
                for out in engine.step().outputs:
                    if out.error is not None:  # one caller, one batch: its failure is theirs
                        raise out.error
                    i = index[out.request_id]
                    tokens[i] += out.new_token_ids
                    texts[i] += out.new_text
                    if out.new_text:
                        yield i, out.new_text
                    if out.finished:
                        results[i] = GenerationResult(texts[i], tokens[i], out.stats, out.finish_reason)
            return results
        finally:
            engine.close()

    # ------------------------------------------------------------------- testing
    @torch.inference_mode()
    def forward_logits(self, token_ids: Sequence[int], chunk_size: int = PREFILL_CHUNK) -> torch.Tensor:
        """Dense float32 logits [n, vocab] of every position of one sequence (for checks)."""
        if not _is_token_ids(token_ids):
            raise TypeError(f"token_ids: expected a non-empty list of int token ids, got {type(token_ids).__name__}")
        check_int("chunk_size", chunk_size, 1)
        ids, _ = self.encode(token_ids)  # checks the id range
        self.loaded.check_lengths(ids, 0)
        _, _, logits = prefill_sequence(self.model, ids[0], chunk_size, False, all_logits=True)
        return logits



def calibrate(model: "LongContextModel | LoadedModel | str | os.PathLike | None",
              config: MagicPIGConfig | None = None) -> MagicPIGConfig:
    """``config`` (default: ``MagicPIGConfig()``) with K, L and min_collisions chosen for
    ``model`` where it leaves them unset and samples: the cached calibration of that model, or
    a short one run now (see :func:`magicpig.runtime.calibration.default_lsh`). The explicit
    step before building an :class:`Engine` with such a config."""
    loaded = model.loaded if isinstance(model, LongContextModel) else as_loaded(model)
    config = resolve_config(config, None, loaded.args.num_layers, loaded.args.max_context)
    return resolve_lsh(loaded, config)[0]


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
