"""The engine on its own thread, fed by asyncio (the HTTP server's side of DESIGN.md §4).

The :class:`Engine` is not thread-safe, so exactly one thread touches it: the engine thread runs
``step()`` while anything is unfinished, and between steps carries out the commands the event
loop sent it (add a request, abort one). Each request's outputs go to its own asyncio queue
through ``loop.call_soon_threadsafe``; an abort (a client that went away) frees the request's
memory before the next step. After every step and command the thread publishes a
:class:`EngineSnapshot` (running, waiting, blocks, store bytes), which ``/metrics`` reads
without touching the engine.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Optional

from magicpig.runtime.outputs import SamplingParams
from magicpig.serve.engine import Engine
from magicpig.serve.request import RequestOutput

log = logging.getLogger("magicpig.serve")


class QueueFullError(Exception):
    """The waiting queue holds ``max_waiting`` requests already (HTTP 503)."""


class EngineDeadError(RuntimeError):
    """The engine thread stopped on an internal error (HTTP 500); the message says which."""


@dataclass(frozen=True)
class EngineSnapshot:
    running: int = 0
    waiting: int = 0
    blocks_in_use: int = 0
    cpu_store_bytes: int = 0


@dataclass
class Submission:
    """What the engine thread needs to add one request. ``max_tokens`` None: up to the
    context limit (the prompt's length is known only once it is encoded)."""

    request_id: str
    prompt: Any  # text, chat messages or token ids
    chat: bool
    params: SamplingParams
    max_tokens: Optional[int]


class AsyncEngine:
    """Owns the engine thread. ``generate`` is an async iterator of :class:`RequestOutput`."""

    def __init__(self, engine: Engine, max_waiting: int,
                 on_finish: Optional[Callable[[RequestOutput], None]] = None):
        self.engine = engine
        self.on_finish = on_finish  # called on the engine thread for every request that ends
        self.max_waiting = max_waiting
        self.snapshot = EngineSnapshot()
        self.error: Optional[BaseException] = None
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread = threading.Thread(target=self._run, name="magicpig-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what runs, stop the thread, free the engine's memory."""
        if self._thread.is_alive():
            self._commands.put(None)
            self._thread.join(timeout)
        self.engine.close()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive() and self.error is None

    # ------------------------------------------------------------ event-loop side
    async def add(self, sub: Submission) -> "RequestStream":
        """Add the request; its outputs come from the returned stream. Raises ValueError /
        TypeError (a bad request), QueueFullError or EngineDeadError."""
        outputs: asyncio.Queue = asyncio.Queue()
        target = (asyncio.get_running_loop(), outputs)
        prompt_tokens = await asyncio.wrap_future(self._call(self._add, sub, target))
        return RequestStream(self, sub.request_id, prompt_tokens, outputs)

    def abort(self, request_id: str) -> None:
        """Abort from any thread (no wait); no-op for a finished or unknown request."""
        if self.alive:
            self._call(self._abort, request_id)

    def _call(self, fn: Callable[..., Any], *args: Any) -> Future:
        if not self.alive:
            raise EngineDeadError(f"engine thread stopped: {self.error!r}")
        done: Future = Future()
        self._commands.put((fn, args, done))
        return done

    # ------------------------------------------------------------ engine-thread side
    def _add(self, sub: Submission, stream: tuple[asyncio.AbstractEventLoop, asyncio.Queue]) -> int:
        if len(self.engine.scheduler.waiting) >= self.max_waiting:
            raise QueueFullError(f"{len(self.engine.scheduler.waiting)} requests are waiting "
                                 f"(--max-waiting {self.max_waiting}); try again later")
        params = sub.params
        ids, _ = self.engine.loaded.encode(sub.prompt, sub.chat)
        left = self.engine.max_model_len - len(ids[0])
        max_tokens = sub.max_tokens if sub.max_tokens is not None else max(left, 1)
        if max_tokens != params.max_new_tokens:
            params = dataclasses.replace(params, max_new_tokens=max_tokens)
        self.engine.add_request(ids[0], params, sub.request_id)
        self._streams[sub.request_id] = stream
        return len(ids[0])

    def _abort(self, request_id: str) -> None:
        self.engine.abort(request_id)

    def _run(self) -> None:
        try:
            while True:
                block = not self.engine.has_unfinished()
                if not self._run_commands(block):
                    return
                if self.engine.has_unfinished():
                    self._dispatch(self.engine.step())
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
                return False
            fn, args, done = item
            try:
                done.set_result(fn(*args))
            except Exception as err:  # a bad request: the caller raises it
                done.set_exception(err)
            self._publish()

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        for out in outputs:
            if out.finished and self.on_finish is not None:
                self.on_finish(out)  # aborts too, whose client is gone
            target = self._streams.get(out.request_id)
            if target is None:
                continue
            if out.finished:
                del self._streams[out.request_id]
            loop, q = target
            _put(loop, q, out)

    def _publish(self) -> None:
        e = self.engine
        self.snapshot = EngineSnapshot(len(e.scheduler.running), len(e.scheduler.waiting),
                                       e.blocks_in_use(), e.cpu_store_bytes())

    def _fail_all(self, err: BaseException) -> None:
        for loop, q in self._streams.values():
            _put(loop, q, err)
        self._streams.clear()
        while True:  # commands nobody will carry out
            try:
                item = self._commands.get_nowait()
            except queue.Empty:
                return
            if item is not None and not item[2].done():
                item[2].set_exception(EngineDeadError(f"engine thread stopped: {err!r}"))


class RequestStream:
    """One request's outputs in order (async-iterable); ``abort`` when the caller leaves early."""

    def __init__(self, engine: AsyncEngine, request_id: str, prompt_tokens: int, outputs: asyncio.Queue):
        self.request_id, self.prompt_tokens = request_id, prompt_tokens
        self.finished = False
        self._engine, self._outputs = engine, outputs

    async def get(self) -> RequestOutput:
        out = await self._outputs.get()
        if isinstance(out, BaseException):
            self.finished = True
            raise EngineDeadError(f"engine thread stopped: {out!r}") from out
        self.finished = out.finished
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
