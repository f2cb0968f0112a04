"""Header and body deadlines (magicpig.serve.timeouts) against a real uvicorn server.

A tiny FastAPI app of its own (no engine) is served from a thread on 127.0.0.1 with
``http=http_protocol(HEADER_TIMEOUT)`` and ``BodyReadTimeout(BODY_TIMEOUT)``. Slow senders are
raw sockets; every read has its own timeout, so a deadline that does not fire fails the test
instead of hanging it. Each test also checks that uvicorn logged no warning or error (e.g. an
app exception after the 408, or a response left incomplete).
"""

from __future__ import annotations

import asyncio
import json
import logging
import select
import socket
import threading
import time
from typing import Any, AsyncIterator, Iterator

import httpx
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from magicpig.serve.timeouts import BodyReadTimeout, http_protocol

HEADER_TIMEOUT = 0.8
BODY_TIMEOUT = 0.8
KEEP_ALIVE = 5  # uvicorn's timeout_keep_alive, longer than HEADER_TIMEOUT on purpose
SLACK = 1.0  # how late a deadline may act on a shared 2-core machine
EARLY = 0.1  # how early (timer resolution)
PROMPT = 0.5  # a normal request's answer time while slow senders wait


def _httptools_installed() -> bool:
    try:
        import httptools  # noqa: F401
    except ImportError:
        return False
    return True


IMPLS = ["h11", pytest.param("httptools", marks=pytest.mark.skipif(
    not _httptools_installed(), reason="httptools not installed (uvicorn's 'auto' is h11 then)"))]


# --------------------------------------------------------------------------- server
def _app() -> FastAPI:
    """POST /echo: the JSON body's length; GET /port: the client's port (tells connections
    apart); POST /stream: ``chunks`` lines ``interval`` seconds apart, after reading the body."""
    app = FastAPI()

    @app.post("/echo")
    async def echo(payload: dict[str, Any], request: Request) -> dict[str, int]:
        return {"length": len(await request.body())}

    @app.get("/port")
    async def port(request: Request) -> dict[str, int]:
        return {"port": request.client.port if request.client else -1}

    @app.post("/stream")
    async def stream(payload: dict[str, float]) -> StreamingResponse:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(int(payload["chunks"])):
                await asyncio.sleep(payload["interval"])
                yield b"chunk %d\n" % i

        return StreamingResponse(lines(), media_type="text/plain")

    app.add_middleware(BodyReadTimeout, timeout=BODY_TIMEOUT)
    return app


class _Records(logging.Handler):
    """uvicorn's warnings and errors while a test runs."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class _Server:
    """A uvicorn server on a free port of 127.0.0.1, run in a daemon thread."""

    def __init__(self, impl: str):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        self.host, self.port = sock.getsockname()
        config = uvicorn.Config(_app(), http=http_protocol(HEADER_TIMEOUT, impl=impl), lifespan="off",
                                timeout_keep_alive=KEEP_ALIVE, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [sock]}, daemon=True)
        self.url = f"http://{self.host}:{self.port}"

    def start(self) -> None:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)


@pytest.fixture(scope="module", params=IMPLS)
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    srv = _Server(request.param)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


@pytest.fixture(autouse=True)
def no_server_errors(server: _Server) -> Iterator[None]:
    """Fails the test if uvicorn logged a warning or an error meanwhile."""
    records = _Records()
    log = logging.getLogger("uvicorn.error")
    log.addHandler(records)
    try:
        yield
    finally:
        log.removeHandler(records)
    assert [r.getMessage() for r in records.records] == []


# --------------------------------------------------------------------------- raw sockets
def _connect(server: _Server) -> socket.socket:
    sock = socket.create_connection((server.host, server.port), timeout=2)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return sock


def _recv(sock: socket.socket, deadline: float) -> bytes:
    """One read that gives up at ``deadline``; b"" when the server closed (or reset)."""
    sock.settimeout(max(deadline - time.monotonic(), 0.01))
    try:
        return sock.recv(65536)
    except socket.timeout:
        raise AssertionError("the server neither answered nor closed in time") from None
    except ConnectionResetError:
        return b""


def _read_until_closed(sock: socket.socket, within: float) -> bytes:
    """Everything the server sends until it closes the connection, which must be ``within``
    seconds from now."""
    deadline, data = time.monotonic() + within, b""
    while chunk := _recv(sock, deadline):
        data += chunk
    return data


def _read_response(sock: socket.socket, within: float) -> tuple[int, dict[str, str], bytes]:
    """One Content-Length response (status, lower-cased headers, body), leaving the connection
    open."""
    deadline, data = time.monotonic() + within, b""
    while b"\r\n\r\n" not in data:
        chunk = _recv(sock, deadline)
        assert chunk, f"connection closed mid-response: {data!r}"
        data += chunk
    status, headers, body = _parse_head(data)
    while len(body) < int(headers["content-length"]):
        chunk = _recv(sock, deadline)
        assert chunk, "connection closed mid-body"
        body += chunk
    return status, headers, body


def _parse_head(data: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict((k.strip().lower(), v.strip()) for k, v in (h.split(":", 1) for h in lines[1:]))
    return int(lines[0].split()[1]), headers, body


def _request(method: str, path: str, body: bytes = b"", length: int | None = None) -> bytes:
    head = (f"{method} {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body) if length is None else length}\r\n\r\n")
    return head.encode() + body


def _assert_closed_after(sock: socket.socket, since: float, timeout: float) -> bytes:
    """The server closes ``sock`` ``timeout`` seconds after ``since`` (not before, at most
    SLACK after); returns what it sent first."""
    data = _read_until_closed(sock, since + timeout + SLACK - time.monotonic())
    elapsed = time.monotonic() - since
    assert timeout - EARLY <= elapsed <= timeout + SLACK, elapsed
    return data


def _assert_prompt(server: _Server) -> None:
    """A normal client is answered promptly (while a slow sender waits)."""
    start = time.monotonic()
    r = httpx.post(server.url + "/echo", json={"a": 1}, timeout=2, trust_env=False)
    assert r.status_code == 200 and r.json() == {"length": len(b'{"a":1}')}
    assert time.monotonic() - start < PROMPT


# --------------------------------------------------------------------------- header deadline
def test_half_sent_headers_and_silent_connections_are_closed(server: _Server) -> None:
    """All at once: half-sent headers, nothing sent (uvicorn alone closes neither), and a
    whole request pipelined with half of the next (uvicorn would wait timeout_keep_alive)."""
    with _connect(server) as half, _connect(server) as silent, _connect(server) as pipelined:
        start = time.monotonic()
        half.sendall(b"POST /echo HTTP/1.1\r\nHost: test\r\nContent-Le")
        pipelined.sendall(_request("GET", "/port") + b"GET /port HTTP/1.1\r\nHo")
        _assert_prompt(server)
        assert _assert_closed_after(half, start, HEADER_TIMEOUT) == b""  # no request, no answer
        assert _assert_closed_after(silent, start, HEADER_TIMEOUT) == b""
        assert _parse_head(_assert_closed_after(pipelined, start, HEADER_TIMEOUT))[0] == 200


def test_keep_alive_next_request_deadline_starts_at_its_first_byte(server: _Server) -> None:
    """Idle keep-alive time is timeout_keep_alive's business (longer here): the header deadline
    of the second request counts from its first byte."""
    with _connect(server) as sock:
        sock.sendall(_request("GET", "/port"))
        assert _read_response(sock, 2)[0] == 200
        time.sleep(HEADER_TIMEOUT + 0.2)  # idle, longer than the header deadline
        start = time.monotonic()
        sock.sendall(b"GET /port HTTP/1.1\r\nHo")
        assert _assert_closed_after(sock, start, HEADER_TIMEOUT) == b""


def test_slow_but_timely_headers_and_body_are_served(server: _Server) -> None:
    pause = 0.6 * min(HEADER_TIMEOUT, BODY_TIMEOUT)
    with _connect(server) as sock:
        request = _request("POST", "/echo", b'{"key": "value"}')
        head, body = request.split(b"\r\n\r\n")
        # Headers in two pieces, then the body in two: one pause each (the body deadline is a
        # total, so two pauses of the body would add up past it).
        for part in (head[:20], head[20:] + b"\r\n\r\n" + body[:5]):
            sock.sendall(part)
            time.sleep(pause)
        sock.sendall(body[5:])
        status, _, answer = _read_response(sock, 2)
        assert (status, json.loads(answer)) == (200, {"length": len(body)})


# --------------------------------------------------------------------------- body deadline
def _assert_408(data: bytes) -> None:
    status, headers, body = _parse_head(data)
    assert status == 408 and headers["connection"] == "close"
    assert headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["code"] == 408 and error["param"] is None
    assert "body" in error["message"]


def test_stalled_body_is_answered_408_and_closed(server: _Server) -> None:
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(_request("POST", "/echo", b'{"a": "xxx', length=100))  # 10 of 100 bytes
        _assert_prompt(server)
        _assert_408(_assert_closed_after(sock, start, BODY_TIMEOUT))


def test_trickling_body_meets_a_total_deadline(server: _Server) -> None:
    """10 bytes every 0.3 timeouts until the server answers (or 90 of 100 bytes are sent):
    every gap is under the timeout, their sum is not: 408 at BODY_TIMEOUT (a per-message idle
    timeout would answer only a timeout after the last byte, past the slack)."""
    gap = 0.3 * BODY_TIMEOUT
    with _connect(server) as sock:
        start = time.monotonic()
        sock.sendall(_request("POST", "/echo", b'{"a": "xxx', length=100))
        for _ in range(8):
            if select.select([sock], [], [], gap)[0]:
                break  # the answer is there: stop sending to a closing socket
            sock.sendall(b"x" * 10)
        _assert_408(_assert_closed_after(sock, start, BODY_TIMEOUT))


# --------------------------------------------------------------------------- normal clients
def test_keep_alive_client_with_pauses_is_served(server: _Server) -> None:
    """Several requests on one connection, pauses under the deadlines but longer in sum."""
    pause = 0.5 * min(HEADER_TIMEOUT, BODY_TIMEOUT)
    with httpx.Client(base_url=server.url, timeout=2, trust_env=False) as client:
        ports = set()
        for i in range(3):
            start = time.monotonic()
            r = client.post("/echo", json={"i": i})
            assert r.status_code == 200 and r.json() == {"length": len(b'{"i":0}')}
            ports.add(client.get("/port").json()["port"])
            assert time.monotonic() - start < PROMPT
            if i < 2:
                time.sleep(pause)
        assert len(ports) == 1  # one connection throughout


def test_streaming_response_outlasts_the_body_deadline(server: _Server) -> None:
    """After the body, the app waits in receive() for a disconnect: that has no deadline."""
    chunks, interval = 3, 0.5 * BODY_TIMEOUT
    start = time.monotonic()
    with httpx.stream("POST", server.url + "/stream", json={"chunks": chunks, "interval": interval},
                      timeout=2, trust_env=False) as r:
        lines = [line for line in r.iter_lines() if line]
    assert r.status_code == 200 and lines == [f"chunk {i}" for i in range(chunks)]
    assert time.monotonic() - start >= chunks * interval > BODY_TIMEOUT + 0.3
