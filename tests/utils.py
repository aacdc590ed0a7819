"""Real servers for tests: uvicorn on 127.0.0.1 sockets we bound to port 0, plus raw sockets."""

import contextlib
import os
import re
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import uvicorn

from mint_proxy._http11 import ResponseHead
from mint_proxy._upstream import Connection

SECRET = "test-internal-token-secret-0123456789abcdef"  # >= 32 bytes


@dataclass
class Running:
    """A server started by ``serve``."""

    url: str
    port: int
    server: uvicorn.Server
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
    """Run ``app`` under uvicorn in a thread until the block exits; wait on ``started``, never sleep."""
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
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.001)
    try:
        yield Running(url=url, port=port, server=server, uds=path)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        if path:
            with contextlib.suppress(OSError):
                os.unlink(path)


def raw_request(port: int, data: bytes, *, timeout: float = 5.0) -> bytes:
    """Send bytes exactly as given and read until the server closes or goes quiet.

    httpx normalises paths (``..``, ``%2e``) before sending; attacks must use this.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(data)
        return read_until_quiet(sock, timeout=timeout)


def read_until_quiet(sock: socket.socket, *, timeout: float = 5.0, quiet: float = 0.3) -> bytes:
    """Read until EOF, or until ``quiet`` seconds pass with nothing new after some data."""
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    sock.settimeout(quiet)
    while time.monotonic() < deadline:
        try:
            data = sock.recv(65536)
        except TimeoutError:
            if chunks:
                break
            continue
        except ConnectionResetError:
            break
        if not data:
            break
        chunks.append(data)
    return b"".join(chunks)


def status_of(response: bytes) -> int:
    """The final status of a raw response (interim 1xx responses skipped); 0 if none."""
    while response.startswith(b"HTTP/1.1 1"):
        response = response.partition(b"\r\n\r\n")[2]
    return int(response.split(b" ", 2)[1]) if response.startswith(b"HTTP/1.") else 0


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
        self._sock.settimeout(0.05)
        while not self._stop.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
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

    def __init__(self, respond: Callable[[bytes, int], bytes], *, close: bool = True, hold: float = 0.0) -> None:
        self.respond = respond
        self.close = close
        self.hold = hold
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
            if self.hold:
                time.sleep(self.hold)
            if self.close:
                return

    def __enter__(self) -> "RawBackend":
        return self


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
