"""Engine: continuous batching on the heterogeneous runtime (DESIGN.md §4).

``add_request`` queues a request; each ``step`` is schedule -> run -> postprocess: the
scheduler (pure policy) picks who prefills and who decodes, the runner (mechanism) runs them,
and postprocess samples, detokenises, finishes requests and frees their memory in the same
step. Requests join and leave the decode batch at any step.

    engine = Engine("smollm2-135m-instruct", MagicPIGConfig(), max_num_seqs=8)
    rid = engine.add_request("Tell me a story.", SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step():
            print(out.request_id, out.new_text, end="")
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any, Optional

import torch

from magicpig.config import MagicPIGConfig, check_int, resolve_config
from magicpig.model.loaded import LoadedModel, Prompt, load_model
from magicpig.runtime.generate import select_tokens
from magicpig.runtime.outputs import GenerationStats, SamplingParams
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, ModelRunner, cache_bytes
from magicpig.runtime.calibration import resolve_lsh
from magicpig.serve.request import Request, RequestOutput, Status, next_request_id
from magicpig.serve.lanes import InterleavedLanes, LaneTimes, make_lanes
from magicpig.serve.scheduler import (
    SPLIT_POLICIES, DecodeCost, MemoryState, PolicyConfig, PrefillChunk, Scheduler, reserved_cpu_bytes,
)

DEFAULT_MAX_PREFILL_TOKENS = 8192
log = logging.getLogger("magicpig.engine")


def default_device_budget(device: torch.device) -> int:
    """Bytes for the device KV caches: 80% of the free GPU memory, or a quarter of the host's
    memory (at most 8 GiB) when the device is the CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(0.8 * free)
    return min(8 << 30, _host_memory() // 4)


def default_cpu_budget() -> int:
    """Bytes for the CPU stores: half the host's memory."""
    return _host_memory() // 2


def _host_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


class Engine:
    """Continuous batching over one model and one :class:`MagicPIGConfig`.

    model: a name or path (loaded with :func:`load_model`), a :class:`LoadedModel`, or anything
    with a ``loaded`` attribute (a :class:`magicpig.LongContextModel`). max_num_seqs: most
    requests running at once. device_memory_bytes / cpu_memory_bytes: budgets of the device KV
    caches (dense-layer blocks and sinks+window slots) and of the CPU stores. max_model_len:
    the most tokens (prompt + new) of one request, at most the model's positions (the default).
    policy: the scheduler's policy (a name of ``scheduler.POLICIES`` or a ``PolicyConfig``;
    ``nexus`` also needs ``cost``, a cost model pricing decode shares). lanes: how a split
    policy's lanes run ("auto": :func:`make_lanes`; "interleaved": one after the other).
    chunked_prefill: a prompt longer than the step's prefill budget is prefilled over several
    steps (the default, as in vLLM); False prefills each prompt whole in the step that admits it
    (lower peak memory: the whole-prompt prefill hands each layer's K/V on as soon as it is done).
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel | Any | None = None,
        config: MagicPIGConfig | None = None,
        max_num_seqs: int = 16,
        device_memory_bytes: int | None = None,
        cpu_memory_bytes: int | None = None,
        block_size: int = DEFAULT_BLOCK_SIZE,
        max_prefill_tokens: int = DEFAULT_MAX_PREFILL_TOKENS,
        max_model_len: int | None = None,
        policy: PolicyConfig | str = "fcfs",
        cost: DecodeCost | None = None,
        lanes: str = "auto",
        chunked_prefill: bool = True,
    ):
        resolve_config(config)  # a wrong type fails before a model is loaded by name
        self.loaded = _as_loaded(model)
        args = self.loaded.args
        self.config = resolve_config(config, getattr(model, "config", None), args.num_layers, args.max_context)
        self.config, _ = resolve_lsh(self.loaded, self.config)  # K, L chosen for the model when unset
        self.max_num_seqs = check_int("max_num_seqs", max_num_seqs, 1, 4096)
        # Prompt + new tokens of one request: the model's positions unless a smaller limit is set.
        self.max_model_len = args.max_context if max_model_len is None else check_int(
            "max_model_len", max_model_len, 2, args.max_context)
        check_int("block_size", block_size, 1, 1 << 16)
        device = self.loaded.model.device
        device_budget = default_device_budget(device) if device_memory_bytes is None else device_memory_bytes
        self.cpu_budget = default_cpu_budget() if cpu_memory_bytes is None else cpu_memory_bytes
        check_int("device_memory_bytes", device_budget, 1)
        check_int("cpu_memory_bytes", self.cpu_budget, 0)
        self.runner = self._make_runner(device_budget, block_size)
        if not isinstance(chunked_prefill, bool):
            raise TypeError(f"chunked_prefill={chunked_prefill!r}: expected True or False")
        self.scheduler = Scheduler(self.max_num_seqs, check_int("max_prefill_tokens", max_prefill_tokens, 1),
                                   policy, chunked_prefill=chunked_prefill, cost=cost, clock=time.perf_counter)
        # Split policies run their two lanes concurrently where the device allows it.
        self.lanes = make_lanes(self.loaded.model.device, lanes) if self.scheduler.policy.name in SPLIT_POLICIES \
            else InterleavedLanes()
        self.last_lane_times = LaneTimes()
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._aborted: list[RequestOutput] = []  # reported by the next step

    def _make_runner(self, device_budget: int, block_size: int) -> ModelRunner:
        """A runner whose sequence slots and dense blocks fit the device budget."""
        slot_bytes, block_bytes = cache_bytes(self.loaded.model, self.config, block_size)
        left = device_budget - slot_bytes * self.max_num_seqs
        num_blocks = left // block_bytes if block_bytes else 0
        if left < 0 or (block_bytes and num_blocks < 1):
            raise ValueError(
                f"device_memory_bytes={device_budget}: too small for {self.max_num_seqs} sequence slots "
                f"({slot_bytes} bytes each) and one KV block ({block_bytes} bytes)"
            )
        return ModelRunner(self.loaded.model, self.config, self.max_num_seqs, int(num_blocks), block_size)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    chat: bool = True) -> str:
        """Queue a request: text (chat template applied when ``chat``), chat messages, or token
        ids. Returns its id. Refuses (ValueError) a request that could never fit."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params={params!r}: expected a SamplingParams or None")
        if request_id is None:
            request_id = next_request_id()
        elif not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id={request_id!r}: expected a non-empty string or None")
        if request_id in self.requests or any(o.request_id == request_id for o in self._aborted):
            raise ValueError(f"request_id={request_id!r} is already in use")
        prompts, single = self.loaded.encode(prompt, chat)
        if not single:
            raise TypeError("prompt: expected one prompt (text, chat messages or token ids), got a list of prompts")
        ids = prompts[0]
        self.loaded.check_lengths([ids], params.max_new_tokens, self.max_model_len)
        req = Request(request_id, ids, params)
        self._check_fits(req)
        if params.seed is not None:
            req.generator = torch.Generator(device=self.loaded.model.device).manual_seed(params.seed)
        self.requests[request_id] = req
        self.scheduler.add(req)
        return request_id

    def _check_fits(self, req: Request) -> None:
        # The last generated token is never fed back: at most prompt + max_new - 1 tokens of K/V.
        total = req.num_prompt_tokens + req.params.max_new_tokens - 1
        r = self.runner
        blocks = r.blocks_needed(total)
        if blocks > r.allocator.num_blocks:
            raise ValueError(
                f"request of {req.num_prompt_tokens} prompt + {req.params.max_new_tokens} new tokens needs "
                f"{blocks} KV blocks ({blocks * r.device_bytes_per_block()} bytes); the device budget holds "
                f"{r.allocator.num_blocks} ({r.allocator.num_blocks * r.device_bytes_per_block()} bytes)"
            )
        cpu = reserved_cpu_bytes(req, r.cpu_bytes_per_token())
        if cpu > self.cpu_budget:
            raise ValueError(
                f"request of {total} tokens needs about {cpu} bytes of CPU store; cpu_memory_bytes={self.cpu_budget}"
            )

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its memory (no-op for an unknown or finished id). Its
        final output (finish_reason "abort") comes with the next ``step``."""
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            req.output.done, req.output.reason = True, "abort"
            self._finish(req)
            self._aborted.append(RequestOutput(request_id, [], "", True, "abort", req.stats))

    def has_unfinished(self) -> bool:
        """True while a request waits, runs, or has an abort not yet reported by ``step``."""
        return self.scheduler.has_unfinished() or bool(self._aborted)

    # ---------------------------------------------------------------------- step
    def step(self) -> list[RequestOutput]:
        """Schedule, run (the two lanes), postprocess; one output per request touched.

        A failure in one request's work (its prefill chunk, its sampling, its detokenising)
        ends that request with finish_reason "error" and the exception in ``error``; a failed
        batched decode ends the requests of that batch. The others go on, and so does the
        engine: one request must never stop the rest."""
        outputs, self._aborted = self._aborted, []
        plan = self.scheduler.schedule(self._memory())
        for req in plan.preempted:
            self._preempt(req)
        chunks = plan.chunks
        run_prefills = (lambda: [_caught(self._prefill, c) for c in chunks]) if chunks else None
        run_decodes = (lambda: _caught(self._decode, plan.decodes)) if plan.decodes else None
        firsts, chosen, self.last_lane_times = self.lanes.run(run_prefills, run_decodes, plan.prefill_share)
        if isinstance(chosen, BaseException):  # the batched decode itself failed: its requests end
            chosen = [chosen] * len(plan.decodes)
        for req, token in zip(plan.decodes, chosen or []):
            req.decode_steps += 1
            outputs.append(self._postprocess(req, token))
        for chunk, token in zip(chunks, firsts or []):
            if token is not None:  # None: part-way, or re-admitted after a preemption
                outputs.append(self._postprocess(chunk.request, token))
        return outputs

    def _memory(self) -> MemoryState:
        r = self.runner
        per_token = r.cpu_bytes_per_token()
        reserved = sum(reserved_cpu_bytes(q, per_token) for q in self.scheduler.running)
        return MemoryState(
            free_blocks=r.allocator.num_free, block_size=r.block_size if r.dense else 0,
            free_slots=r.free_slots if r.sparse else self.max_num_seqs - len(self.scheduler.running),
            cpu_bytes_free=self.cpu_budget - reserved, cpu_bytes_per_token=per_token,
            total_blocks=r.allocator.num_blocks, cpu_bytes_total=self.cpu_budget,
        )

    def _preempt(self, req: Request) -> None:
        self.runner.release(req.kv)
        req.carried_cost = (req.kv.cost_sum, req.kv.cost_steps)  # into the re-prefilled state
        req.kv, req.partial, req.status = None, None, Status.WAITING
        req.num_preemptions += 1

    def _prefill(self, chunk: PrefillChunk) -> Optional[int]:
        """Run one prefill chunk (a lane's work: no scheduler or output state is touched);
        returns the request's first token when the chunk completes its prompt, else None
        (part-way, or re-admitted after a preemption: its last token is fed next)."""
        req = chunk.request
        t0 = time.perf_counter()
        logits = self._run_chunk(req, chunk)
        if req.output.out_ids:
            if logits is not None:
                req.kv.cost_sum, req.kv.cost_steps = req.carried_cost
            return None
        req.prefill_seconds += time.perf_counter() - t0  # compute time, summed over the chunks
        if logits is None:
            return None
        token = int(select_tokens(logits[None], req.params, req.generator)[0])
        req.first_token_time = time.perf_counter()
        return token

    def _run_chunk(self, req: Request, chunk: PrefillChunk) -> Optional[torch.Tensor]:
        """The runner's part: a whole prompt in one go, or the next piece of a chunked one.
        Returns the logits after the prompt's last token, or None while part-way."""
        expected = req.num_prompt_tokens + req.params.max_new_tokens
        req.status = Status.RUNNING
        if chunk.start == 0 and chunk.last:
            req.kv, logits = self.runner.prefill(req.tokens_to_prefill(), expected=expected)
            return logits
        if chunk.start == 0:
            req.partial = self.runner.begin_prefill(req.tokens_to_prefill(), expected=expected)
            req.kv = req.partial.seq
        assert req.partial.done == chunk.start, "chunks of a prompt run in order"
        logits = self.runner.prefill_chunk(req.partial, chunk.num_tokens)
        if chunk.last:
            req.partial = None
        return logits

    def _decode(self, reqs: list[Request]) -> list[int]:
        """One decode step of ``reqs`` (a lane's work); their next tokens."""
        tokens = torch.tensor([r.output.out_ids[-1] for r in reqs], dtype=torch.int64)
        return self._sample(reqs, self.runner.decode([r.kv for r in reqs], tokens))

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | BaseException]:
        """Next token per request: greedy rows in one argmax, sampled rows with their own
        parameters and generator (a request's draws do not depend on its batch mates). A row
        whose sampling fails gets its exception instead of a token."""
        chosen: list[int | BaseException] = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            if req.params.temperature > 0:
                chosen[i] = _caught(lambda r=req, row=i: int(select_tokens(logits[row : row + 1], r.params, r.generator)[0]))
        return chosen

    def _postprocess(self, req: Request, token: int | BaseException | None) -> RequestOutput:
        """The request's output for this step; a request whose work failed ends with its error."""
        if isinstance(token, BaseException):
            return self._fail(req, token)
        try:
            return self._add_token(req, token)
        except Exception as err:  # noqa: BLE001 - detokenising or a stop check of this request only
            return self._fail(req, err)

    def _fail(self, req: Request, err: BaseException) -> RequestOutput:
        """End ``req`` with finish_reason "error", freeing its memory (logged: a bug or a fault
        worth knowing about, not a bad request, which add_request refuses up front)."""
        log.error("request %s failed: %r", req.request_id, err, exc_info=err)
        req.output.done, req.output.reason = True, "error"
        if not req.finished:
            self._finish(req)
        return RequestOutput(req.request_id, [], "", True, "error", req.stats, error=err)

    def _add_token(self, req: Request, token: int) -> RequestOutput:
        out = req.output
        before = len(out.out_ids)
        out.add_token(token, self.loaded.tokenizer, self.loaded.eos_token_ids, req.params.stop)
        if not out.done and len(out.out_ids) >= req.params.max_new_tokens:
            out.done, out.reason = True, "length"
        piece = out.new_text(out.done, req.params.stop)
        if out.done:
            self._finish(req)
        return RequestOutput(req.request_id, out.out_ids[before:], piece, out.done,
                             out.reason if out.done else None, req.stats)

    def _finish(self, req: Request) -> None:
        """Record the stats, free the device blocks, slot and store memory, drop from the queue."""
        req.finish_time = time.perf_counter()
        req.stats = self._stats(req)
        if req.kv is not None:
            self.runner.release(req.kv)
            req.kv, req.partial = None, None
        self.scheduler.remove(req)
        req.status = Status.FINISHED
        del self.requests[req.request_id]  # the caller has its RequestOutput; nothing is kept

    def _stats(self, req: Request) -> GenerationStats:
        r, kv = self.runner, req.kv
        seconds = req.finish_time - req.first_token_time if req.first_token_time else 0.0
        if kv is None:
            cost, dev, cpu = 0.0, 0, 0
        else:
            cost = kv.computation_cost if r.sparse else 1.0
            dev, cpu = r.device_bytes(kv), r.cpu_bytes(kv)
        return GenerationStats(
            prefill_seconds=req.prefill_seconds,
            decode_tokens_per_second=req.decode_steps / seconds if seconds > 0 and req.decode_steps else 0.0,
            computation_cost=cost, device_bytes=dev, cpu_bytes=cpu,
            prompt_tokens=req.num_prompt_tokens, new_tokens=len(req.output.out_ids), decode_seconds=seconds,
        )

    # --------------------------------------------------------------------- state
    def blocks_in_use(self) -> int:
        return self.runner.allocator.num_used

    def cpu_store_bytes(self) -> int:
        """Bytes the CPU stores hold for requests (0 when none is running)."""
        return sum(self.runner.cpu_bytes(q.kv) for q in self.scheduler.running if q.kv is not None)

    def close(self) -> None:
        for req in list(self.requests.values()):
            self.abort(req.request_id)
        self.lanes.close()
        self.runner.close()


def _caught(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (a lane's work reports one request's failure
    as a value, so the rest of the step's results still come back)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - handed to _postprocess, which ends that request
        return err


def _as_loaded(model: Any) -> LoadedModel:
    if isinstance(model, LoadedModel):
        return model
    if isinstance(getattr(model, "loaded", None), LoadedModel):
        return model.loaded
    if model is None or isinstance(model, (str, os.PathLike)):
        return load_model(model)
    raise TypeError(f"model={model!r}: expected a name or path, a LoadedModel or a LongContextModel")
