"""Real servers and raw clients for tests: uvicorn on 127.0.0.1 sockets we bound to port 0, plus raw sockets.

Attacks and upstream faults are written as raw bytes (httpx normalises paths and headers), so the
client side here is a request writer (``make_request``), a reader that waits for the server to close
(``exchange``) and a parser for what came back (``parse_responses``).
"""

import asyncio
import contextlib
import json
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import uvicorn

from mint_proxy._http11 import ResponseHead
from mint_proxy._types import Receive, Scope, Send
from mint_proxy._upstream import Connection

SECRET = "test-internal-token-secret-0123456789abcdef"  # >= 32 bytes


# == servers =======================================================================================


class Server(uvicorn.Server):
    """uvicorn's server, told when it started and when to stop by events.

    uvicorn notices ``should_exit`` on a 0.1 s tick, then sleeps 0.1 s and polls every 0.1 s for
    its connections and tasks to end: about 0.2 s per server and test. ``stop`` wakes it instead.
    """

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.ready = threading.Event()
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._wake, self._loop = asyncio.Event(), asyncio.get_running_loop()
        await super().startup(sockets)
        self.ready.set()

    async def main_loop(self) -> None:
        assert self._wake is not None
        while not await self.on_tick(0):  # (0: the Date header is refreshed on every tick)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), 1.0)

    def stop(self) -> None:
        """Ask the server to exit (from any thread); ``serve`` joins it."""
        self.should_exit = True
        if self._loop is not None and self._wake is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                self._loop.call_soon_threadsafe(self._wake.set)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        """uvicorn's shutdown, waiting on its connections and tasks with no fixed sleep."""
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        for connection in list(self.server_state.connections):
            connection.shutdown()
        try:
            async with asyncio.timeout(self.config.timeout_graceful_shutdown):
                while self.server_state.connections or self.server_state.tasks:
                    await asyncio.sleep(0.002)
                for server in self.servers:
                    await server.wait_closed()
        except TimeoutError:
            for task in self.server_state.tasks:
                task.cancel(msg="Task cancelled, timeout graceful shutdown exceeded")
        await self.lifespan.shutdown()


@dataclass
class Running:
    """A server started by ``serve``."""

    url: str
    port: int
    server: Server
    uds: str = ""


def bind_socket(port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    return sock


def free_port() -> int:
    with contextlib.closing(bind_socket()) as sock:
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def serve(app: Any, *, http: str = "httptools", uds: bool = False, port: int = 0, **options: Any) -> Iterator[Running]:
    """Run ``app`` under uvicorn in a thread until the block exits; wait on events, never sleep."""
    if uds:
        directory = tempfile.mkdtemp(prefix="mint-proxy-test-")
        path = os.path.join(directory, "plugin.sock")
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        url, port = f"unix:{path}", 0
    else:
        sock = bind_socket(port)
        port = sock.getsockname()[1]
        url, path = f"http://127.0.0.1:{port}", ""
    options.setdefault("lifespan", "off")
    options.setdefault("log_level", "warning")
    options.setdefault("ws", "websockets-sansio")
    config = uvicorn.Config(app, http=http, **options)
    server = Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.ready.wait(0.05):
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
    try:
        yield Running(url=url, port=port, server=server, uds=path)
    finally:
        server.stop()
        thread.join(10)
        sock.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def settled(*servers: uvicorn.Server) -> Callable[[], bool]:
    """A condition: none of ``servers`` has an open connection or a running request."""
    return lambda: not any(s.server_state.connections or s.server_state.tasks for s in servers)


def wait_for(condition: Callable[[], bool], *, timeout: float = 5.0) -> bool:
    """Check ``condition`` every 2 ms until it holds (True) or ``timeout`` s pass (False)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


async def async_wait_for(condition: Callable[[], bool], *, timeout: float = 5.0) -> bool:
    """``wait_for`` for a test on the event loop: the servers it watches run in other threads."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.002)
    return True


def counted(items: list[Any], n: int, item: Any = None) -> Callable[[], bool]:
    """A condition: ``items`` holds ``n`` entries (or ``n`` times ``item``)."""
    return lambda: (len(items) if item is None else items.count(item)) == n


class Recorder:
    """The platform app behind the middleware: answers ``{"platform": path}`` and records each request."""

    def __init__(self) -> None:
        self.seen: list[tuple[bytes, str]] = []

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            # The platform speaks lifespan: the middleware closes its upstream pool at shutdown.
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        if scope["type"] != "http":
            return
        self.seen.append((scope["raw_path"], scope["path"]))
        body = json.dumps({"platform": scope["path"]}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body})


# == plugins that misbehave ========================================================================


class ScriptedBackend:
    """A plugin socket whose every connection runs ``handle(sock, index)`` in a thread of its own.

    ``index`` counts connections from 0; ``connections`` is how many were accepted. For
    plugin behaviour no framework produces: stopping reading, closing after a request, lying.
    """

    def __init__(self, handle: Callable[[socket.socket, int], None]) -> None:
        self.handle = handle
        self.connections = 0
        self._sock = bind_socket()
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except OSError:  # ``stop`` shut the listener down
                return
            index, self.connections = self.connections, self.connections + 1
            threading.Thread(target=self._run, args=(conn, index), daemon=True).start()

    def _run(self, conn: socket.socket, index: int) -> None:
        with conn:
            conn.settimeout(5)
            with contextlib.suppress(OSError):
                self.handle(conn, index)

    def stop(self) -> None:
        self._stop.set()
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        self._thread.join(5)

    def __enter__(self) -> "ScriptedBackend":
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class RawBackend(ScriptedBackend):
    """A plugin that answers each request with ``respond(request_head, index_on_connection)``.

    An empty answer closes the connection without responding.

    For upstream faults a real framework will not produce: invalid HTTP, lies
    about lengths, drops mid-headers. ``connections`` counts accepted sockets.
    """

    def __init__(self, respond: Callable[[bytes, int], bytes], *, close: bool = True) -> None:
        self.respond = respond
        self.close = close
        self.requests: list[bytes] = []
        super().__init__(self._answer)

    def _answer(self, conn: socket.socket, _: int) -> None:
        index = 0
        while not self._stop.is_set():
            head = read_head(conn)
            if b"\r\n\r\n" not in head:
                return
            self.requests.append(head)
            answer = self.respond(head, index)
            index += 1
            if not answer:
                return
            conn.sendall(answer)
            if self.close:
                return

    def __enter__(self) -> "RawBackend":
        return self


def pending_connections(listener: socket.socket) -> int:
    """Accept (and close) every connection waiting on a listening socket nobody serves.

    A connect completes in the kernel's backlog before ``connect()`` returns, so a connection
    made before a response was sent is counted here at once, with no wait.
    """
    count = 0
    listener.setblocking(False)
    while True:
        try:
            conn, _ = listener.accept()
        except BlockingIOError:
            return count
        conn.close()
        count += 1


# == raw clients ===================================================================================


def make_request(
    target: bytes | str,
    *headers: bytes | str,
    method: str = "GET",
    version: str = "HTTP/1.1",
    body: bytes = b"",
    host: bytes | None = b"x",
) -> bytes:
    """Raw request bytes, exactly as written; ``Host: x`` first unless ``host=None``."""
    lines = [(method + " ").encode() + _b(target) + (" " + version).encode()]
    if host is not None:
        lines.append(b"Host: " + host)
    lines += [_b(h) for h in headers]
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


def _b(text: bytes | str) -> bytes:
    return text if isinstance(text, bytes) else text.encode("latin-1")


def exchange(port: int, data: bytes, *, timeout: float = 3.0) -> tuple[bytes, bool]:
    """Send ``data``; read until the server closes, at most ``timeout`` s. Returns ``(bytes, closed)``."""
    received = bytearray()
    deadline = time.monotonic() + timeout
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        with contextlib.suppress(OSError):  # a server may refuse and close while we still send
            sock.sendall(data)
        while (left := deadline - time.monotonic()) > 0:
            sock.settimeout(left)
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                return bytes(received), False
            except ConnectionResetError:
                return bytes(received), True
            if not chunk:
                return bytes(received), True
            received += chunk
    return bytes(received), False


def raw_request(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes exactly as given (end with ``Connection: close``) and read until the server closes."""
    return exchange(port, data, timeout=timeout)[0]


def read_first(port: int, data: bytes, *, method: str = "GET") -> bytes:
    """The bytes of the first response to ``data``, read until it is complete (or the server closes)."""
    received = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(OSError):
            sock.sendall(data)
        while True:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                chunk = b""
            received += chunk
            responses = parse_responses(received, methods=(method,))
            framed = responses and (responses[0].declared_length is not None or responses[0].status == 204)
            if not chunk or (framed and responses[0].complete) or (responses and method == "HEAD"):
                return received


def read_head(sock: socket.socket) -> bytes:
    """Read until a blank line ends a head (with whatever came after it), or the peer closes."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def read_request(sock: socket.socket) -> tuple[bytes, bytes]:
    """Read one request with a ``Content-Length`` body (or none) from ``sock``: head and body."""
    data = read_head(sock)
    if b"\r\n\r\n" not in data:
        raise ConnectionError("closed before a whole request head")
    head, _, body = data.partition(b"\r\n\r\n")
    match = re.search(rb"(?im)^content-length: *([0-9]+)", head)
    length = int(match.group(1)) if match else 0
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("closed before the whole request body")
        body += chunk
    return head, body


# == responses =====================================================================================

SERVER_400 = b"Invalid HTTP request received."
REQUEST_ID = re.compile(r"[0-9a-f]{32}")


@dataclass
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    complete: bool  # the body ended where its framing said it would
    declared_length: int | None = None

    def values(self, name: bytes) -> list[bytes]:
        return [v for n, v in self.headers if n == name]

    def header(self, name: bytes) -> bytes | None:
        values = self.values(name)
        return values[0] if len(values) == 1 else None

    def json(self) -> Any:
        return json.loads(self.body)

    @classmethod
    def of(cls, response: httpx.Response) -> "Response":
        """An httpx response as a ``Response``, so that one set of checks reads both."""
        headers = [(n.lower(), v) for n, v in response.headers.raw]
        return cls(response.status_code, headers, response.content, True)


def parse_responses(raw: bytes, *, methods: tuple[str, ...] = ()) -> list[Response]:
    """Every response in ``raw``, in order, bodies de-framed; interim 1xx responses skipped.

    ``methods[i]`` is the method of the i-th request (a response to HEAD has no body).
    """
    responses: list[Response] = []
    while raw.startswith(b"HTTP/1."):
        head, sep, rest = raw.partition(b"\r\n\r\n")
        if not sep:
            break
        lines = head.split(b"\r\n")
        status = int(lines[0].split(b" ")[1])
        headers = [(n.strip().lower(), v.strip()) for n, _, v in (line.partition(b":") for line in lines[1:])]
        raw = rest
        if 100 <= status < 200 and status != 101:
            continue
        method = methods[len(responses)] if len(responses) < len(methods) else "GET"
        response = Response(status, headers, b"", True)
        lengths = response.values(b"content-length")
        if lengths:
            response.declared_length = int(lengths[0])
        if method == "HEAD" or status in (101, 204, 304):
            pass
        elif response.header(b"transfer-encoding") == b"chunked":
            body = bytearray()
            while True:
                line, sep, after = raw.partition(b"\r\n")
                size = int(line.split(b";")[0], 16) if sep and re.fullmatch(rb"[0-9a-fA-F]+(;.*)?", line) else -1
                if size < 0 or len(after) < size + 2:
                    response.complete, raw = False, b""
                    break
                body += after[:size]
                raw = after[size + 2 :]
                if size == 0:
                    break
            response.body = bytes(body)
        elif response.declared_length is not None:
            response.body, raw = raw[: response.declared_length], raw[response.declared_length :]
            response.complete = len(response.body) == response.declared_length
        else:
            response.body, raw = raw, b""
        responses.append(response)
    return responses


def one_response(raw: bytes, **kwargs: Any) -> Response:
    responses = parse_responses(raw, **kwargs)
    assert responses, f"no response at all: {raw[:200]!r}"
    return responses[0]


def status_of(raw: bytes) -> int:
    """The status of the first final response in ``raw``; 0 if none."""
    responses = parse_responses(raw)
    return responses[0].status if responses else 0


def assert_proxy_error(
    response: Response | httpx.Response, status: int, error: str | None = None, *, request_id: str | None = None
) -> dict[str, Any]:
    """The proxy's own error: JSON ``{error, detail, request_id}`` with the same id in the header."""
    if isinstance(response, httpx.Response):
        response = Response.of(response)
    assert response.status == status, response
    assert response.header(b"content-type") == b"application/json"
    body: dict[str, Any] = response.json()
    assert set(body) == {"error", "detail", "request_id"}
    assert error is None or body["error"] == error, body
    assert response.header(b"x-request-id") == body["request_id"].encode()
    if request_id is None:
        assert REQUEST_ID.fullmatch(body["request_id"])
    else:
        assert body["request_id"] == request_id
    return body


def assert_server_refused(response: Response) -> None:
    """The ASGI server's own 400, sent before any app (so before the proxy) saw the request."""
    assert response.status == 400
    assert response.body == SERVER_400
    assert response.header(b"x-request-id") is None


# == the upstream client, driven by hand ===========================================================


async def upstream_head(conn: Connection, timeout: float) -> ResponseHead:
    """Wait for an upstream connection's response head (the proxy awaits ``conn.wait`` inline)."""
    while conn.head is None:
        await conn.wait(timeout)
    return conn.head


async def upstream_body(conn: Connection, timeout: float) -> tuple[bytes, bool]:
    """The next piece of an upstream response body and whether more follows."""
    while (piece := conn.next_body()) is None:
        await conn.wait(timeout)
    return piece
