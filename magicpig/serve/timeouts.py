"""Deadlines for slow senders, which uvicorn does not have.

uvicorn (0.55) bounds only the idle gap between two requests on a keep-alive connection
(``timeout_keep_alive``); and the first byte of the next request cancels even that. A client
that sends half of its headers, or 10 of the 100 body bytes it announced, then waits, holds its
connection (and, for the body, the request's task) for as long as it likes. Two pieces close
that:

* :func:`http_protocol` -- uvicorn's HTTP protocol class with a header deadline: the request
  line and headers must be complete within ``header_timeout`` seconds, counted from the
  connection's start, from the first byte of the next request on a keep-alive connection, or
  (pipelined) from when the server turns to it; otherwise the connection is closed (nothing is
  answered: no request exists yet).
* :class:`BodyReadTimeout` -- ASGI middleware with a body deadline: the request may keep the
  server waiting for its body ``timeout`` seconds in all; then it is answered 408 with OpenAI's
  error JSON and ``Connection: close``.

Wiring::

    app.add_middleware(BodyReadTimeout, timeout=30.0)  # after the other add_middleware calls
    config = uvicorn.Config(app, http=http_protocol(header_timeout=10.0), ...)
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, ClassVar, Literal, MutableMapping, Optional

from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEADER_TIMEOUT = 10.0  # seconds; a real client sends its headers in one packet
DEFAULT_BODY_TIMEOUT = 30.0  # seconds of waiting in all; ~37 MB at 10 Mbit/s

Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Message, Receive, Send], Awaitable[None]]

log = logging.getLogger("magicpig.serve")


# --------------------------------------------------------------------------- header deadline
class _HeaderDeadline(asyncio.Protocol):
    """Mixin for one of uvicorn's HTTP/1.1 protocol classes (h11 or httptools): closes the
    connection when a request's headers are not complete ``header_timeout`` seconds after they
    began. Both uvicorn classes share the hooks used here (``connection_made``,
    ``data_received``, ``connection_lost``, ``loop``, ``transport``,
    ``timeout_keep_alive_task``); the subclass calls :meth:`_headers_complete`."""

    header_timeout: ClassVar[float] = DEFAULT_HEADER_TIMEOUT
    _header_timer: Optional[asyncio.TimerHandle] = None
    # Set by uvicorn's __init__ / connection_made; declared for the type checker.
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    timeout_keep_alive_task: Optional[asyncio.TimerHandle]
    client: Optional[tuple[str, int]]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """A new connection: its first request's headers are due within the deadline (uvicorn
        itself never closes a connection that sends nothing at all)."""
        super().connection_made(transport)
        self._arm_header_timer()

    def data_received(self, data: bytes) -> None:
        """The first byte after a response starts the next request's deadline."""
        # uvicorn arms its keep-alive timer when a response completes and cancels it on the
        # next byte (in super().data_received). From that byte on nothing bounds the time the
        # client takes to finish its headers, so ours starts here. Arming it when the response
        # completes instead would cut idle keep-alive connections at header_timeout, overriding
        # a longer timeout_keep_alive (which is set above a proxy's idle timeout on purpose).
        # The same byte may instead be the rest of a body that the app answered without reading
        # (uvicorn discards it): the deadline bounds that trickle too.
        if self.timeout_keep_alive_task is not None:
            self._arm_header_timer()
        super().data_received(data)

    def connection_lost(self, exc: Optional[Exception]) -> None:
        self._cancel_header_timer()
        super().connection_lost(exc)

    def _headers_complete(self) -> None:
        """The request exists: what follows (body, response) is the app's and the body
        deadline's business."""
        self._cancel_header_timer()

    def _arm_header_timer(self) -> None:
        self._cancel_header_timer()
        self._header_timer = self.loop.call_later(self.header_timeout, self._header_timeout_expired)

    def _cancel_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timeout_expired(self) -> None:
        """Close without an answer: no request was parsed to answer. Logged at debug (as the
        body deadline is), since a slowloris attack would otherwise fill the log."""
        self._header_timer = None
        if not self.transport.is_closing():
            log.debug("%s - request headers not complete within %.1f s: closing the connection",
                      _peer(self.client), self.header_timeout)
            self.transport.close()


class _H11HeaderDeadline(_HeaderDeadline, H11Protocol):
    """uvicorn's h11 protocol with the header deadline."""

    def handle_events(self) -> None:
        # h11 hands the parsed request line and headers over as one h11.Request event inside
        # handle_events, which answers it by making a new RequestResponseCycle: a new cycle
        # after the call means the headers are complete. handle_events also runs from
        # on_response_complete for pipelined requests, so this covers those too.
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:
            self._headers_complete()

    def handle_websocket_upgrade(self, event: Any) -> None:
        # An upgrade request is complete but makes no cycle: it leaves this protocol.
        self._headers_complete()
        super().handle_websocket_upgrade(event)

    def on_response_complete(self) -> None:
        # h11 parses a pipelined request only now, when the previous response is done (until
        # then its bytes wait in h11's buffer, reading paused), so its deadline starts here,
        # not when its bytes came: a slow first response must not time out the second. What
        # is buffered here is the start of a request that is not whole yet (a whole one made a
        # new cycle); the client need send nothing more, so data_received might never arm it.
        cycle = self.cycle
        super().on_response_complete()
        if self.cycle is cycle and self.conn.trailing_data[0] and not self.transport.is_closing():
            self._arm_header_timer()


def _httptools_class() -> type[asyncio.Protocol]:
    """uvicorn's httptools protocol with the header deadline (imported only when asked for:
    httptools is optional)."""
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

    class _HttpToolsHeaderDeadline(_HeaderDeadline, HttpToolsProtocol):
        """uvicorn's httptools protocol with the header deadline."""

        def on_message_begin(self) -> None:
            # The parser's callback on a request's first byte. httptools parses pipelined
            # requests as their bytes come (unlike h11), so this is when the deadline starts,
            # unless it runs already (a new connection's, from connection_made).
            if self._header_timer is None:
                self._arm_header_timer()
            super().on_message_begin()

        def on_headers_complete(self) -> None:
            # The parser's callback, upgrades included.
            self._headers_complete()
            super().on_headers_complete()

    return _HttpToolsHeaderDeadline


def _base_class(impl: str) -> type[asyncio.Protocol]:
    """The protocol class that uvicorn's ``http=impl`` would pick, with the header deadline:
    "auto" is httptools when it is installed, else h11, as in uvicorn.protocols.http.auto."""
    if impl == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            impl = "h11"
        else:
            impl = "httptools"
    if impl == "h11":
        return _H11HeaderDeadline
    if impl == "httptools":
        return _httptools_class()
    raise ValueError(f"unknown HTTP implementation {impl!r} (auto, h11 or httptools)")


def http_protocol(header_timeout: float = DEFAULT_HEADER_TIMEOUT,
                  impl: Literal["auto", "h11", "httptools"] = "auto") -> type[asyncio.Protocol]:
    """A protocol class for ``uvicorn.Config(app, http=...)`` that closes a connection whose
    request line and headers are not complete within ``header_timeout`` seconds of the
    connection's start (first request) or of the request's first byte (keep-alive). A class,
    not an instance: uvicorn makes one per connection."""
    if not header_timeout > 0:
        raise ValueError(f"header_timeout must be positive, got {header_timeout}")
    base = _base_class(impl)
    return type(base.__name__, (base,), {"header_timeout": float(header_timeout)})


# --------------------------------------------------------------------------- body deadline
class BodyReadTimeout:
    """ASGI middleware: a request may keep the server waiting for its body ``timeout`` seconds
    in all (summed over its ``receive`` calls), then it is answered 408.

    A total, not a per-message idle timeout: an idle timeout is reset by every byte, so a
    client trickling a byte per interval would hold the request forever. Only time spent
    waiting in ``receive`` counts, so an app that reads the body late (queued behind others)
    costs the client nothing. Once the body is complete, ``receive`` passes straight through:
    it then only waits for the client to disconnect (as streaming responses do), which must
    never time out.

    On the deadline: if the response has not started, 408 with OpenAI's error JSON and
    ``Connection: close`` (uvicorn closes the connection after it); either way the app is
    handed ``http.disconnect`` and its later ``send`` calls are dropped, so an app that was
    mid-response leaves it incomplete, which uvicorn answers by closing the connection.
    """

    def __init__(self, app: ASGIApp, timeout: float = DEFAULT_BODY_TIMEOUT):
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, got {timeout}")
        self.app, self.timeout = app, float(timeout)

    async def __call__(self, scope: Message, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        request = _BodyDeadline(receive, send, self.timeout, _peer(scope.get("client")))
        try:
            await self.app(scope, request.receive, request.send)
        except Exception:
            if not request.timed_out:
                raise
            # The app failed on the disconnect it was handed (e.g. Starlette's ClientDisconnect):
            # the request is over, there is nobody to tell.
            log.debug("app error after the body timeout (ignored)", exc_info=True)


class _BodyDeadline:
    """One request's state for :class:`BodyReadTimeout`: the ``receive`` and ``send`` handed to
    the app."""

    def __init__(self, receive: Receive, send: Send, timeout: float, peer: str):
        self._receive, self._send, self.peer = receive, send, peer
        self.budget = timeout  # seconds of waiting left
        self.timeout = timeout
        self.body_done = False  # the last body message (or a disconnect) was handed on
        self.response_started = False
        self.timed_out = False

    async def receive(self) -> Message:
        if self.timed_out:
            return {"type": "http.disconnect"}
        if self.body_done:
            return await self._receive()  # waiting for a disconnect: no deadline
        loop = asyncio.get_running_loop()
        start = loop.time()
        try:
            message = await asyncio.wait_for(self._receive(), self.budget)
        except asyncio.TimeoutError:
            await self._expire()
            return {"type": "http.disconnect"}
        self.budget -= loop.time() - start
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if self.timed_out:
            # The 408 went out, or the connection is to be dropped: uvicorn would raise on a
            # second response, and completing a started one would keep the connection.
            return
        if message["type"] == "http.response.start":
            self.response_started = True
        await self._send(message)

    async def _expire(self) -> None:
        """The deadline passed: 408 if we still can, and from now on the request is over."""
        self.timed_out = True
        action = "dropping the connection" if self.response_started else "answering 408"
        log.debug("%s - request body not received within %.1f s: %s", self.peer, self.timeout, action)
        if not self.response_started:
            for message in _timeout_response(self.timeout):
                await self._send(message)


def _timeout_response(timeout: float) -> list[Message]:
    """OpenAI's error JSON for a 408, as ASGI messages; ``Connection: close`` because the rest
    of the body may still come and could not be told from the next request."""
    error = {"message": f"request body not received within {timeout:g} seconds",
             "type": "invalid_request_error", "param": None, "code": 408}
    body = json.dumps({"error": error}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    return [{"type": "http.response.start", "status": 408, "headers": headers},
            {"type": "http.response.body", "body": body, "more_body": False}]


def _peer(client: Any) -> str:
    """``host:port`` of a client address tuple, for log lines."""
    return "%s:%d" % tuple(client) if client else "-"
