"""The engine on its own thread, fed by asyncio (the HTTP server's side of DESIGN.md §4).

The :class:`Engine` is not thread-safe, so exactly one thread touches it: the engine thread runs
``step()`` while anything is unfinished, and between steps carries out the commands the event
loop sent it (add a request, abort one). Each request's outputs go to its own asyncio queue
through ``loop.call_soon_threadsafe``; an abort (a client that went away) frees the request's
memory before the next step. Prompts are tokenised on their own threads, so the engine thread
only ever adds encoded, checked requests; a request's own failure ends that request only.
After every step and command the thread publishes a :class:`EngineSnapshot` (running,
waiting, blocks, store bytes), which ``/metrics`` reads without touching the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from magicpig.core.sampling_params import SamplingParams
from magicpig.engine.engine import Engine
from magicpig.engine.engine import RequestOutput

log = logging.getLogger("magicpig.serve")


class QueueFullError(Exception):
    """As many requests run and wait as the engine has free run slots plus ``max_waiting``
    (HTTP 503 with Retry-After)."""


class ShuttingDownError(Exception):
    """The server is shutting down: it admits nothing new (HTTP 503), and a request still
    unfinished when the grace period ends is ended with this error."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an internal error (HTTP 500); the message says which."""


class RequestFailedError(RuntimeError):
    """This request's own work failed inside the engine (HTTP 500); the others go on."""


@dataclass(frozen=True)
class EngineSnapshot:
    """The engine's state after its last step. The prefix cache's figures (zero without one):
    device bytes of its blocks, CPU-store bytes of its tokens, and its counters since start
    (prompt tokens looked up and found, nodes evicted)."""

    running: int = 0
    waiting: int = 0
    blocks_in_use: int = 0
    cpu_store_bytes: int = 0
    prefix_cache_device_bytes: int = 0
    prefix_cache_cpu_bytes: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    prefix_cache_evictions: int = 0

    @classmethod
    def of(cls, e: Engine) -> "EngineSnapshot":
        c = e.cache_usage()
        return cls(e.num_running(), e.queue_len(), e.blocks_in_use(), e.cpu_store_bytes(),
                   c.get("device_bytes", 0), c.get("cpu_bytes", 0), c.get("query_tokens", 0),
                   c.get("hit_tokens", 0), c.get("evictions", 0))


@dataclass
class Submission:
    """One request, encoded and checked, as the engine thread adds it: ``prompt_ids`` the
    prompt's token ids, ``params`` with ``max_new_tokens`` resolved."""

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams


class AsyncEngine:
    """Owns the engine thread. ``add`` encodes a request on a tokenizer thread (never the
    engine's: a long prompt must not stall the batch), then hands it to the engine thread and
    returns its :class:`RequestStream`.

    Admission: running + waiting requests are bounded by the engine's run slots plus
    ``max_waiting``; beyond it, and while draining, ``add`` refuses at once."""

    def __init__(self, engine: Engine, max_waiting: int,
                 on_finish: Optional[Callable[[RequestOutput], None]] = None, tokenizer_threads: int = 2):
        self.engine = engine
        self.on_finish = on_finish  # called on the engine thread for every request that ends
        self.max_waiting = max_waiting
        self.capacity = engine.max_num_seqs + max_waiting
        self.snapshot = EngineSnapshot()
        self.error: Optional[BaseException] = None
        self.draining = False
        self._closed = False
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="magicpig-engine", daemon=True)
        self._tokenizers = ThreadPoolExecutor(tokenizer_threads, thread_name_prefix="magicpig-tokenize")

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """End what runs and free the engine's memory. The engine thread closes the engine
        itself (never while a step of it runs); if its step outlasts ``timeout``, it closes
        the engine when that step ends."""
        self.draining = True
        self._tokenizers.shutdown(wait=False, cancel_futures=True)
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("engine thread still in a step after %.0f s; it frees the engine when the step ends", timeout)
        elif not self._closed:  # never started, or died: no step can be running
            self._close_engine()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------ event-loop side
    async def add(self, request_id: str, prompt: Any, chat: bool, params: SamplingParams,
                  max_tokens: Optional[int]) -> "RequestStream":
        """Encode and add one request (text, chat messages or token ids; ``max_tokens`` None:
        up to the context limit). Raises ValueError / TypeError (a bad request),
        QueueFullError, ShuttingDownError or EngineDeadError."""
        self._check_admission()  # before tokenising: an overloaded server spends nothing on it
        loop = asyncio.get_running_loop()
        sub = await loop.run_in_executor(self._tokenizers, self.prepare, request_id, prompt, chat, params, max_tokens)
        outputs: asyncio.Queue = asyncio.Queue()
        added = self._call(self._add, sub, (loop, outputs))
        try:
            await asyncio.wrap_future(added)
        except asyncio.CancelledError:
            self.abort(request_id)  # the caller left; the add may have run already
            raise
        return RequestStream(self, request_id, len(sub.prompt_ids), outputs)

    def prepare(self, request_id: str, prompt: Any, chat: bool, params: SamplingParams,
                max_tokens: Optional[int]) -> Submission:
        """Encode and check one request (a tokenizer thread's work). A text far over the
        context limit is refused by its length before it is tokenised."""
        loaded, limit = self.engine.loaded, self.engine.max_model_len
        chars = _prompt_chars(prompt)
        at_least = loaded.min_tokens(chars)
        if at_least > limit:
            raise ValueError(f"prompt: {chars} characters are at least {at_least} tokens, "
                             f"over the context limit of {limit} positions")
        prompts, single = loaded.encode(prompt, chat)
        if not single:
            raise TypeError("prompt: expected one prompt, got a list of prompts")
        max_new = max_tokens if max_tokens is not None else max(limit - len(prompts[0]), 1)
        loaded.check_lengths(prompts, max_new, limit)
        return Submission(request_id, prompts[0], dataclasses.replace(params, max_new_tokens=max_new))

    def abort(self, request_id: str) -> None:
        """Abort from any thread (no wait); no-op for a finished or unknown request."""
        if self.alive:
            self._call(self._abort, request_id)

    async def reset_prefix_cache(self) -> int:
        """Evict every cached prefix no running request uses (on the engine thread); returns
        how many went."""
        return await asyncio.wrap_future(self._call(self.engine.reset_prefix_cache))

    async def drain(self, grace: float) -> None:
        """Graceful shutdown: admit nothing new, let what runs and waits finish for up to
        ``grace`` seconds, then end the rest with :class:`ShuttingDownError` (each client
        gets an error, not a cut connection) and free their memory."""
        self.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while self.alive and self._busy() and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.alive and self._busy():
            err = ShuttingDownError(f"the server is shutting down; this request did not finish within {grace:g} s")
            await asyncio.wrap_future(self._call(self._end_all, err))

    def _busy(self) -> bool:
        return bool(self._streams) or self.snapshot.running + self.snapshot.waiting > 0

    def _check_admission(self) -> None:
        if self.draining:
            raise ShuttingDownError("the server is shutting down and admits no new requests")
        held = self.snapshot.running + self.snapshot.waiting
        if held >= self.capacity:
            raise QueueFullError(f"{held} requests are running or waiting ({self.engine.max_num_seqs} run slots "
                                 f"+ --max-waiting {self.max_waiting}); try again later")

    def _call(self, fn: Callable[..., Any], *args: Any) -> Future:
        if not self.alive:
            raise EngineDeadError(f"engine thread stopped: {self.error!r}")
        done: Future = Future()
        self._commands.put((fn, args, done))
        return done

    # ------------------------------------------------------------ engine-thread side
    def _add(self, sub: Submission, stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue]) -> None:
        e = self.engine
        self.snapshot = dataclasses.replace(self.snapshot, running=e.num_running(), waiting=e.queue_len())
        self._check_admission()  # again, on the engine's own counts: adds queued together
        e.submit(sub.prompt_ids, sub.params, sub.request_id)  # encoded once, on a tokenizer thread
        self._streams[sub.request_id] = stream

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _end_all(self, err: BaseException) -> None:
        """Each stream gets ``err``, then its request is aborted (memory freed; the abort
        outputs of the next step find no stream)."""
        for loop, q in self._streams.values():
            _put(loop, q, err)
        self._streams.clear()
        for request_id in list(self.engine.requests):
            self.engine.abort(request_id)

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                if not self._run_commands(block):
                    return
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step().outputs)
                    self._publish()
        except BaseException as err:  # noqa: BLE001 - every waiting client must hear of it
            log.exception("engine thread stopped")
            self.error = err
            self._fail_all(err)

    def _run_commands(self, block: bool) -> bool:
        """Carry out the queued commands (waiting for one when idle); False on stop."""
        while True:
            try:
                item = self._commands.get(block=block)
            except queue.Empty:
                return True
            block = False
            if item is None:
                self._fail_all(EngineDeadError("the server is shutting down"))
                self._close_engine()
                return False
            fn, args, done = item
            if not done.set_running_or_notify_cancel():
                continue  # its caller was cancelled before it ran
            try:
                result = fn(*args)
            except Exception as err:  # a bad request: the caller raises it
                done.set_exception(err)
            else:
                done.set_result(result)
            self._publish()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished and self.on_finish is not None:
                _report(self.on_finish, out)  # aborts too, whose client is gone
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            loop, q = target
            _put(loop, q, out)

    def _publish(self) -> None:
        e = self.engine
        self.snapshot = EngineSnapshot.of(e)

    def _close_engine(self) -> None:
        self._closed = True
        self.engine.close()

    def _fail_all(self, err: BaseException) -> None:
        for loop, q in self._streams.values():
            _put(loop, q, err)
        self._streams.clear()
        while True:  # commands nobody will carry out
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and item[2].set_running_or_notify_cancel():
                item[2].set_exception(EngineDeadError(f"engine thread stopped: {err!r}"))


def _prompt_chars(prompt: Any) -> int:
    """Characters of a text prompt or of chat messages' contents (0 for token ids)."""
    if isinstance(prompt, str):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
        return sum(len(m.get("content") or "") for m in prompt if isinstance(m.get("content"), str))
    return 0


def _report(callback: Callable[[RequestOutput], None], out: RequestOutput) -> None:
    try:
        callback(out)
    except Exception:  # noqa: BLE001 - a metrics bug must not stop the engine
        log.exception("on_finish callback failed for %s", out.request_id)


class RequestStream:
    """One request's outputs in order (async-iterable); ``abort`` when the caller leaves early."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_tokens: int, outputs: asyncio.Queue):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.finished = False
        self._engine, self._outputs = engine, outputs

    async def get(self) -> RequestOutput:
        """The next output. Raises ShuttingDownError (ended at shutdown), RequestFailedError
        (this request's work failed) or EngineDeadError."""
        out = await self._outputs.get()
        if isinstance(out, ShuttingDownError):
            self.finished = True
            raise out
        if isinstance(out, BaseException):
            self.finished = True
            raise EngineDeadError(f"engine thread stopped: {out!r}") from out
        self.finished = out.finished
        if out.error is not None:
            raise RequestFailedError(f"request {self.request_id} failed: {type(out.error).__name__}: {out.error}")
        return out

    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        while not self.finished:
            yield await self.get()

    def abort(self) -> None:
        if not self.finished:
            self.finished = True
            self._engine.abort(self.request_id)


def _put(loop: asyncio.AbstractEventLoop, q: asyncio.Queue, item: Any) -> None:
    try:
        loop.call_soon_threadsafe(q.put_nowait, item)
    except RuntimeError:  # that request's event loop is closed: nobody is listening
        pass
