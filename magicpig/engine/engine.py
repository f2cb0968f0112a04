"""Engine: continuous batching on the heterogeneous runtime (DESIGN.md §4).

``add_request`` queues a request; each ``step`` is schedule -> run -> update: the scheduler
(pure policy, owning the memory ledger) picks who prefills and who decodes and grants their
memory, the runner (mechanism) runs them on the two lanes, and the update samples, detokenises,
finishes requests and frees their memory in the same step. Requests join and leave the decode
batch at any step. Each step returns a :class:`StepRecord`: its outputs and what it ran.

    engine = Engine("smollm2-135m-instruct", MagicPIGConfig(K=10, L=150), max_num_seqs=8)
    rid = engine.add_request("Tell me a story.", SamplingParams(max_new_tokens=64))
    while engine.has_unfinished():
        for out in engine.step().outputs:
            print(out.request_id, out.new_text, end="")
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from magicpig.config import MagicPIGConfig, check_int, resolve_config
from magicpig.core.kv_budget import KVBudget
from magicpig.core.prefix_cache import PrefixCache
from magicpig.core.policies import SPLIT_POLICIES, DecodeCost, PolicyConfig, PrefillChunk, SchedulePlan
from magicpig.core.request import Request, next_request_id
from magicpig.core.sampling_params import SamplingParams
from magicpig.core.scheduler import Scheduler
from magicpig.engine.lanes import InterleavedLanes, LaneTimes, make_lanes
from magicpig.engine.outputs import GenerationStats, OutputText
from magicpig.model.loaded import LoadedModel, Prompt, as_loaded
from magicpig.runtime.prefill import PrefillState
from magicpig.runtime.runner import DEFAULT_BLOCK_SIZE, ModelRunner, kv_layout
from magicpig.runtime.sampling import select_tokens

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


@dataclass
class RequestOutput:
    """What ``Engine.step`` reports for one request it touched: the new token ids and text
    piece of this step, whether it finished, why ("eos", "stop", "length", "abort", or
    "error" with the exception in ``error``), and on finish the stats a
    :class:`GenerationResult` has."""

    request_id: str
    new_token_ids: list[int]
    new_text: str
    finished: bool
    finish_reason: Optional[str] = None
    stats: Optional[GenerationStats] = None
    error: Optional[BaseException] = None
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache (not prefilled again)


@dataclass
class StepRecord:
    """One step: its outputs, and what it ran. chunks: (request id, start, tokens) per prefill
    chunk; decode_contexts: tokens of K/V each decode read (its context before this token);
    preempted: ids sent back to the queue; prefill_share: the split (None: one batch);
    lane_times: wall seconds of each lane and of the step; store_seconds: decode time spent
    waiting for the CPU stores (0 without a store)."""

    outputs: list[RequestOutput] = field(default_factory=list)
    chunks: list[tuple[str, int, int]] = field(default_factory=list)
    decode_ids: list[str] = field(default_factory=list)
    decode_contexts: list[int] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    prefill_share: Optional[float] = None
    lane_times: LaneTimes = field(default_factory=LaneTimes)
    store_seconds: float = 0.0

    @property
    def ran(self) -> bool:
        return bool(self.chunks or self.decode_ids)


@dataclass
class _Live:
    """The engine's side of a running request: its output text (detokenising, stops; its ids
    list is the request's own ``output_ids``), its generator, a prefill state it starts from."""

    text: OutputText
    generator: Optional[torch.Generator] = None
    prefilled: Optional[tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]] = None


class Engine:
    """Continuous batching over one model and one resolved :class:`MagicPIGConfig`.

    model: a name or path (loaded with :func:`load_model`) or a :class:`LoadedModel`. config:
    K and L must be chosen (set them, or :func:`magicpig.calibrate` the config first: the
    engine never calibrates on its own). max_num_seqs: most requests running at once.
    device_memory_bytes / cpu_memory_bytes: budgets of the device KV caches (dense-layer
    blocks and sinks+window slots) and of the CPU stores. max_model_len: the most tokens
    (prompt + new) of one request, at most the model's positions (the default). policy: the
    scheduler's policy (a name of ``POLICIES`` or a ``PolicyConfig``; ``nexus`` also needs
    ``cost``, a cost model pricing decode shares). lanes: how a split policy's lanes run
    ("auto": :func:`make_lanes`; "interleaved": one after the other). chunked_prefill: a prompt
    longer than the step's prefill budget is prefilled over several steps (the default, as in
    vLLM); False prefills each prompt whole in the step that admits it (lower peak memory: the
    whole-prompt prefill hands each layer's K/V on as soon as it is done). prefix_caching:
    automatic prefix caching (vLLM's semantics, DESIGN.md §5b; on by default): a request whose
    prompt starts with full blocks another request computed shares them (dense layers' device
    blocks, sparse layers' store forks) and prefills only the rest; prefixes nobody uses stay
    cached until an admission needs their memory.
    """

    def __init__(
        self,
        model: str | os.PathLike | LoadedModel | None = None,
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
        prefix_caching: bool = True,
    ):
        if config is not None and not isinstance(config, MagicPIGConfig):  # before a model loads by name
            raise TypeError(f"config={config!r}: expected a MagicPIGConfig or None")
        self.loaded = as_loaded(model)
        args = self.loaded.args
        self.config = _resolved(resolve_config(config, None, args.num_layers, args.max_context))
        self.max_num_seqs = check_int("max_num_seqs", max_num_seqs, 1, 4096)
        # Prompt + new tokens of one request: the model's positions unless a smaller limit is set.
        self.max_model_len = args.max_context if max_model_len is None else check_int(
            "max_model_len", max_model_len, 2, args.max_context)
        for name, flag in (("chunked_prefill", chunked_prefill), ("prefix_caching", prefix_caching)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r}: expected True or False")
        self.runner, kv = self._make_runner(device_memory_bytes, cpu_memory_bytes, block_size, prefix_caching)
        self.scheduler = Scheduler(kv, self.max_num_seqs, check_int("max_prefill_tokens", max_prefill_tokens, 1),
                                   policy, chunked_prefill=chunked_prefill, cost=cost, clock=time.perf_counter)
        # Split policies run their two lanes concurrently where the device allows it.
        self.lanes = make_lanes(self.loaded.model.device, lanes) if self.scheduler.policy.name in SPLIT_POLICIES \
            else InterleavedLanes()
        self.requests: dict[str, Request] = {}  # unfinished requests by id
        self._live: dict[str, _Live] = {}
        self._aborted: list[RequestOutput] = []  # reported by the next step

    def _make_runner(self, device_bytes: int | None, cpu_bytes: int | None, block_size: int,
                     prefix_caching: bool) -> tuple[ModelRunner, KVBudget]:
        """A runner and its ledger (with the prefix cache), the slots and dense blocks fitting
        the device budget."""
        check_int("block_size", block_size, 1, 1 << 16)
        device = self.loaded.model.device
        device_bytes = default_device_budget(device) if device_bytes is None else device_bytes
        cpu_bytes = default_cpu_budget() if cpu_bytes is None else cpu_bytes
        check_int("device_memory_bytes", device_bytes, 1)
        check_int("cpu_memory_bytes", cpu_bytes, 0)
        layout = kv_layout(self.loaded.model, self.config, self.max_num_seqs, device_bytes, cpu_bytes, block_size)
        runner = ModelRunner(self.loaded.model, self.config, self.max_num_seqs, layout.num_blocks, block_size)
        cache = PrefixCache(block_size, cache_salt(self.loaded, self.config)) if prefix_caching else None
        return runner, KVBudget(layout, cache)

    # ------------------------------------------------------------------ requests
    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, request_id: str | None = None,
                    chat: bool = True) -> str:
        """Queue a request: text (chat template applied when ``chat``), chat messages, or token
        ids. Returns its id. Refuses (ValueError) a request that could never fit."""
        prompts, single = self.loaded.encode(prompt, chat)
        if not single:
            raise TypeError("prompt: expected one prompt (text, chat messages or token ids), got a list of prompts")
        return self.submit(prompts[0], params, request_id)

    def submit(self, prompt_ids: list[int], params: SamplingParams | None = None, request_id: str | None = None,
               prefilled: PrefillState | None = None) -> str:
        """Queue a request whose prompt is already encoded (checked token ids: see
        :meth:`LoadedModel.encode`). ``prefilled``: a one-prompt prefill state of exactly
        these ids, which its admission reuses instead of prefilling again."""
        params = SamplingParams() if params is None else params
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params={params!r}: expected a SamplingParams or None")
        if request_id is None:
            request_id = next_request_id()
        elif not isinstance(request_id, str) or not request_id:
            raise TypeError(f"request_id={request_id!r}: expected a non-empty string or None")
        if request_id in self.requests or any(o.request_id == request_id for o in self._aborted):
            raise ValueError(f"request_id={request_id!r} is already in use")
        self.loaded.check_lengths([prompt_ids], params.max_new_tokens, self.max_model_len)
        req = Request(request_id, list(prompt_ids), params)
        why = self.scheduler.kv.never_fits(req)
        if why is not None:
            raise ValueError(why)
        live = _Live(OutputText(out_ids=req.output_ids))
        if params.seed is not None:
            live.generator = torch.Generator(device=self.loaded.model.device).manual_seed(params.seed)
        if prefilled is not None:  # it starts from its own state: no cached prefix
            req.cacheable = False
            live.prefilled = _one_prefilled(prefilled, req.prompt_ids)
            req.prefill_seconds = prefilled.prefill_seconds[0] if prefilled.prefill_seconds else 0.0
        self.requests[request_id], self._live[request_id] = req, live
        self.scheduler.add(req)
        return request_id

    def abort(self, request_id: str) -> None:
        """Stop a request now and free its memory (no-op for an unknown or finished id). Its
        final output (finish_reason "abort") comes with the next ``step``."""
        req = self.requests.get(request_id)
        if req is not None and not req.finished:
            stats = self._finish(req, "abort")
            self._aborted.append(RequestOutput(request_id, [], "", True, "abort", stats))

    def has_unfinished(self) -> bool:
        """True while a request waits, runs, or has an abort not yet reported by ``step``."""
        return self.scheduler.has_unfinished() or bool(self._aborted)

    def queue_len(self) -> int:
        """Requests waiting to be admitted."""
        return self.scheduler.queue_len()

    def num_running(self) -> int:
        return len(self.scheduler.running)

    # ---------------------------------------------------------------------- step
    def step(self) -> StepRecord:
        """Schedule, run (the two lanes), update; one output per request touched.

        A failure in one request's work (its prefill chunk, its sampling, its detokenising)
        ends that request with finish_reason "error" and the exception in ``error``; a failed
        batched decode ends the requests of that batch. The others go on, and so does the
        engine: one request must never stop the rest."""
        record = StepRecord(outputs=self._aborted)
        self._aborted = []
        plan = self.scheduler.schedule()
        for kv in plan.released:  # preempted: their store entries go now
            self.runner.release(kv)
        for node in plan.evicted:  # prefixes evicted for this step's admissions
            self.runner.drop_node(node.node_id)
        self._record_plan(record, plan)
        firsts, chosen = self._run(plan, record)
        record.outputs += self._update(plan, firsts, chosen)
        return record

    def _record_plan(self, record: StepRecord, plan: SchedulePlan) -> None:
        record.chunks = [(c.request.request_id, c.start, c.num_tokens) for c in plan.chunks]
        record.decode_ids = [r.request_id for r in plan.decodes]
        record.decode_contexts = [r.num_computed_tokens for r in plan.decodes]
        record.preempted = [r.request_id for r in plan.preempted]
        record.prefill_share = plan.prefill_share

    def _run(self, plan: SchedulePlan, record: StepRecord) -> tuple[list[Any], Any]:
        """The plan's prefill chunks on the prefill lane, its decode batch on the decode lane."""
        chunks = plan.chunks
        run_prefills = (lambda: [_caught(self._prefill, c) for c in chunks]) if chunks else None
        run_decodes = (lambda: _caught(self._decode, plan.decodes)) if plan.decodes else None
        store_before = self.runner.store_seconds
        firsts, chosen, record.lane_times = self.lanes.run(run_prefills, run_decodes, plan.prefill_share)
        record.store_seconds = self.runner.store_seconds - store_before
        if isinstance(chosen, BaseException):  # the batched decode itself failed: its requests end
            chosen = [chosen] * len(plan.decodes)
        return firsts or [], chosen or []

    def _update(self, plan: SchedulePlan, firsts: list[Any], chosen: list[Any]) -> list[RequestOutput]:
        """Tokens into outputs (detokenised, stops checked); the requests that finished leave
        the scheduler, which takes their memory back, and the runner frees their store entries."""
        outputs, finished = [], []
        for req, token in zip(plan.decodes, chosen):
            req.decode_steps += 1
            outputs.append(self._postprocess(req, token))
        for chunk, token in zip(plan.chunks, firsts):
            if token is not None:  # None: part-way, or re-admitted after a preemption
                outputs.append(self._postprocess(chunk.request, token))
        for chunk, token in zip(plan.chunks, firsts):
            if chunk.last and not isinstance(token, BaseException):
                self._cache(chunk.request)  # its prompt's blocks serve later requests at once
        for out in outputs:
            out.num_cached_tokens = self.requests[out.request_id].num_cached_tokens
            if out.finished:
                req = self.requests.pop(out.request_id)
                del self._live[out.request_id]
                if out.finish_reason in ("eos", "stop", "length"):
                    self._cache(req)  # prompt and output: a chat's next turn starts from it
                finished.append(req)
        for kv in self.scheduler.update_from_output(finished):
            self.runner.release(kv)
        return outputs

    def _cache(self, req: Request) -> None:
        """Offer the request's computed blocks to the prefix cache; a new node's store state
        is the runner's to keep. A failure here only loses the caching (logged), never the
        request or the engine."""
        if req.kv.slot < 0:  # finished or preempted this step: nothing held to cache
            return
        node = self.scheduler.cache(req)
        if node is None:
            return
        try:
            self.runner.cache_node(node.node_id, node.end, req.kv)
        except Exception as err:  # noqa: BLE001
            log.error("caching the prefix of request %s failed: %r", req.request_id, err, exc_info=err)
            self.scheduler.kv.uncache(node, req.kv)
            self.runner.drop_node(node.node_id)
    def _prefill(self, chunk: PrefillChunk) -> Optional[int]:
        """Run one prefill chunk (a lane's work: no scheduler or output state is touched);
        returns the request's first token when the chunk completes its prompt, else None
        (part-way, or re-admitted after a preemption: its last token is fed next)."""
        req, live = chunk.request, self._live[chunk.request.request_id]
        assert chunk.start == req.num_computed_tokens, "chunks of a prompt run in order"
        t0 = time.perf_counter()
        if live.prefilled is not None and chunk.start == 0 and chunk.last and not req.output_ids:
            keys, values, logits = live.prefilled  # its prefill time is the state's
            self.runner.add_prefilled(req.kv, keys, values)
        else:
            logits = self.runner.prefill(req.kv, req.tokens_to_prefill(), chunk.num_tokens)
            if not req.output_ids:
                req.prefill_seconds += time.perf_counter() - t0  # compute time, summed over the chunks
        if req.output_ids:
            return None
        if logits is None:
            return None
        token = int(select_tokens(logits[None], req.params, live.generator)[0])
        req.first_token_time = time.perf_counter()
        return token

    def _decode(self, reqs: list[Request]) -> list[int | BaseException]:
        """One decode step of ``reqs`` (a lane's work); their next tokens."""
        tokens = torch.tensor([r.output_ids[-1] for r in reqs], dtype=torch.int64)
        return self._sample(reqs, self.runner.decode([r.kv for r in reqs], tokens))

    def _sample(self, reqs: list[Request], logits: torch.Tensor) -> list[int | BaseException]:
        """Next token per request: greedy rows in one argmax, sampled rows with their own
        parameters and generator (a request's draws do not depend on its batch mates). A row
        whose sampling fails gets its exception instead of a token."""
        chosen: list[int | BaseException] = logits.argmax(dim=-1).tolist()
        for i, req in enumerate(reqs):
            if req.params.temperature > 0:
                gen = self._live[req.request_id].generator
                chosen[i] = _caught(lambda r=req, row=i, g=gen: int(select_tokens(logits[row : row + 1], r.params, g)[0]))
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
        return RequestOutput(req.request_id, [], "", True, "error", self._final_stats(req, "error"), error=err)

    def _add_token(self, req: Request, token: int) -> RequestOutput:
        out = self._live[req.request_id].text
        before = len(out.out_ids)
        out.add_token(token, self.loaded.tokenizer, self.loaded.eos_token_ids, req.params.stop)
        if not out.done and len(out.out_ids) >= req.params.max_new_tokens:
            out.done, out.reason = True, "length"
        piece = out.new_text(out.done, req.params.stop)
        stats = self._final_stats(req, out.reason) if out.done else None
        return RequestOutput(req.request_id, out.out_ids[before:], piece, out.done,
                             out.reason if out.done else None, stats)

    def _final_stats(self, req: Request, reason: str) -> GenerationStats:
        """Mark the request finished (``_update`` then retires it) and record its stats."""
        req.finish_time, req.finish_reason = time.perf_counter(), reason
        return self._stats(req)

    def _finish(self, req: Request, reason: str) -> GenerationStats:
        """End a request outside a step (an abort): stats, then its memory and store entries
        freed at once and the request dropped (the caller gets its output from the next step)."""
        stats = self._final_stats(req, reason)
        self.runner.release(self.scheduler.finish(req))
        del self.requests[req.request_id], self._live[req.request_id]
        return stats

    def _stats(self, req: Request) -> GenerationStats:
        r, kv = self.runner, req.kv
        seconds = req.finish_time - req.first_token_time if req.first_token_time else 0.0
        cost_sum, cost_steps = req.middle_reads()
        cost = (cost_sum / cost_steps if cost_steps else 0.0) if r.sparse else 1.0
        return GenerationStats(
            prefill_seconds=req.prefill_seconds,
            decode_tokens_per_second=req.decode_steps / seconds if seconds > 0 and req.decode_steps else 0.0,
            computation_cost=cost if kv.length else 0.0, device_bytes=r.device_bytes(kv), cpu_bytes=r.cpu_bytes(kv),
            prompt_tokens=req.num_prompt_tokens, new_tokens=len(req.output_ids), decode_seconds=seconds,
        )

    # --------------------------------------------------------------------- state
    def blocks_in_use(self) -> int:
        return self.scheduler.kv.allocator.num_used

    def cpu_store_bytes(self) -> int:
        """Bytes the CPU stores hold for running requests and cached prefixes (shared blocks
        counted once; 0 when they hold nothing)."""
        return self.runner.store_bytes()

    @property
    def prefix_cache(self) -> PrefixCache | None:
        return self.scheduler.kv.cache

    def cache_usage(self) -> dict[str, int]:
        """The prefix cache's figures: device bytes of its blocks, CPU-store bytes of its own
        tokens (the ledger's), tokens and nodes cached, and its counters (query / hit tokens,
        evictions)."""
        kv, cache = self.scheduler.kv, self.prefix_cache
        if cache is None:
            return {}
        return {"device_bytes": kv.cached_blocks() * kv.layout.block_bytes, "cpu_bytes": kv.cached_cpu_bytes,
                "tokens": cache.cached_tokens, "nodes": len(cache.nodes), "query_tokens": cache.stats.query_tokens,
                "hit_tokens": cache.stats.hit_tokens, "evictions": cache.stats.evictions}

    def reset_prefix_cache(self) -> int:
        """Evict every cached prefix no running request uses (vLLM's reset_prefix_cache);
        returns how many nodes went."""
        count = self.scheduler.kv.clear_cache()
        for node in self.scheduler.kv.evicted:
            self.runner.drop_node(node.node_id)
        self.scheduler.kv.evicted = []
        return count

    def close(self) -> None:
        for req in list(self.requests.values()):
            self.abort(req.request_id)
        self.lanes.close()
        self.runner.close()


def cache_salt(loaded: LoadedModel, config: MagicPIGConfig) -> bytes:
    """What a cached block's key depends on besides its tokens: the model, its dtype and the
    config fields that change what is stored (not the threads, which only change speed)."""
    fields = {k: v for k, v in dataclasses.asdict(config).items() if k != "cpu_threads"}
    return repr((loaded.source, str(loaded.model.dtype), loaded.args, sorted(fields.items()))).encode()


def _resolved(config: MagicPIGConfig) -> MagicPIGConfig:
    """The engine runs a config whose K and L are chosen; it never calibrates on its own."""
    if config.method == "magicpig" and not config.lsh_resolved:
        raise ValueError("config: K and L are unset; set them (MagicPIGConfig(K=..., L=...)) or choose them for the "
                         "model first with magicpig.calibrate(model, config)")
    return config


def _one_prefilled(state: PrefillState, prompt_ids: list[int]) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    if not isinstance(state, PrefillState) or state.batch_size != 1 or state.token_ids[0] != prompt_ids:
        raise ValueError("prefilled: expected the PrefillState of exactly this one prompt")
    return state.keys[0], state.values[0], state.last_logits[0]


def _caught(fn: Any, *args: Any) -> Any:
    """``fn(*args)``, or the exception it raised (a lane's work reports one request's failure
    as a value, so the rest of the step's results still come back)."""
    try:
        return fn(*args)
    except Exception as err:  # noqa: BLE001 - handed to _postprocess, which ends that request
        return err
