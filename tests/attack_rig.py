"""The attack suites' rig: one proxy per parser with a byte-counting tap in front of its plugin.

Each attack is sent as raw bytes and checked three ways:

* the answer: a 4xx with the proxy's JSON body and request id, or, when the ASGI server refuses
  the request before the proxy exists for it, the server's own ``400 Invalid HTTP request
  received.``; the two parsers accept different input, so tables give each parser's outcome;
* the plugin: ``Plugin.seen`` lists what its server parsed, and a ``Tap`` (a TCP relay in front of
  it) counts every byte the proxy sent it, so "zero bytes reach the plugin" is measured on the
  socket, not inferred from the app;
* the connection: what the server makes of the bytes that follow.
"""

import contextlib
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from fastapi import FastAPI

from mint_proxy import ProxyMiddleware, Route, RouteTable, TokenIssuer

from .backends import Plugin
from .utils import (
    SECRET,
    RawBackend,
    Recorder,
    Response,
    assert_proxy_error,
    assert_server_refused,
    bind_socket,
    make_request,
    one_response,
    pending_connections,
    read_first,
    serve,
    settled,
    wait_for,
)

TRAP_ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\ntrap"
SMUGGLED = b"GET /trap/smuggled HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
# Outcomes in the tables: the proxy refused (its JSON 4xx), the ASGI server refused (its plain 400),
# or the request reached the plugin.
PROXY, SERVER, FORWARDED = "proxy", "server", "forwarded"


def by_parser(http: str, h11: Any, httptools: Any) -> Any:
    """The expectation for the parser under test, from a table's two columns."""
    return h11 if http == "h11" else httptools


def assert_refused(response: Response, who: str, status: int = 400, error: str = "bad_request") -> None:
    if who == PROXY:
        assert_proxy_error(response, status, error)
    else:
        assert_server_refused(response)


class Tap:
    """A TCP relay in front of 127.0.0.1:``target`` that counts the bytes the proxy sends through it.

    ``Plugin.seen`` only lists requests the plugin's server could parse; the tap proves that not
    one byte reached the plugin's socket. Closing either side closes the other.
    """

    def __init__(self, target: int) -> None:
        self.target = target
        self.bytes_in = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []
        self._sock = bind_socket()
        self._sock.listen(64)
        self.port: int = self._sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._accept, daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._sock.accept()
            except OSError:  # ``stop`` shut the listener down
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target), timeout=5)
            except OSError:
                client.close()
                continue
            client.settimeout(None)
            upstream.settimeout(None)
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket, counted: bool) -> None:
        try:
            while data := src.recv(65536):
                if counted:
                    with self._lock:
                        self.bytes_in += len(data)
                dst.sendall(data)
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def stop(self) -> None:
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self._sock.close()
        self._thread.join(5)
        with self._lock:
            for sock in self._open:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


@dataclass
class Rig:
    """``/peak`` -> Tap -> ``peak``; ``/admin`` -> ``admin``; ``/trap`` -> a RawBackend; else ``platform``.

    ``outsider`` is a listener no route points at and nobody accepts on: the SSRF trap.
    """

    http: str
    port: int
    url: str
    middleware: ProxyMiddleware
    peak: Plugin
    admin: Plugin
    platform: Recorder
    tap: Tap
    trap: RawBackend
    outsider: socket.socket
    plugins: dict[str, Plugin] = field(default_factory=dict)

    @property
    def outsider_port(self) -> int:
        port: int = self.outsider.getsockname()[1]
        return port

    def reset(self) -> None:
        for app in (self.peak, self.admin):
            app.seen.clear()
            app.events.clear()
        self.platform.seen.clear()
        self.tap.bytes_in = 0
        self.trap.connections = 0
        self.trap.requests.clear()
        pending_connections(self.outsider)

    def untouched(self) -> None:
        """Nothing reached any plugin, not one byte."""
        assert self.peak.seen == [] and self.admin.seen == []
        assert self.tap.bytes_in == 0


@contextlib.contextmanager
def open_rig(http: str) -> Iterator[Rig]:
    """The proxy under uvicorn with ``http``, its plugins, tap, trap and outsider, for a whole module."""
    peak, admin, platform = Plugin(), Plugin(), Recorder()
    with contextlib.ExitStack() as stack:
        peak_server = stack.enter_context(serve(peak))
        admin_server = stack.enter_context(serve(admin))
        # Runs after tap.stop (LIFO): let the plugin's server see the tap's connections close
        # before it shuts down, or uvloop closes its loop with a transport still closing.
        stack.callback(wait_for, settled(peak_server.server))
        tap = Tap(peak_server.port)
        stack.callback(tap.stop)
        trap = stack.enter_context(RawBackend(lambda head, index: TRAP_ANSWER))
        outsider = stack.enter_context(contextlib.closing(bind_socket()))
        outsider.listen(64)
        routes = RouteTable({"/peak": tap.url, "/admin": admin_server.url, "/trap": trap.url})
        middleware = ProxyMiddleware(platform, routes=routes, tokens=TokenIssuer(SECRET), retry_window=0.2)
        proxy = stack.enter_context(serve(middleware, http=http, proxy_headers=False, lifespan="auto"))
        rig = Rig(http, proxy.port, proxy.url, middleware, peak, admin, platform, tap, trap, outsider)
        rig.plugins = {"/peak": peak, "/admin": admin}
        yield rig


# == the proxy alone, and mounted in a platform ====================================================


@dataclass
class Site:
    """A proxy under a real uvicorn; ``base`` is what the client's path has before a route prefix."""

    port: int
    base: str
    routes: RouteTable
    middleware: ProxyMiddleware

    def url(self, path: str, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}{self.base}{path}"


class StartSite(Protocol):
    def __call__(self, routes: list[Route], **server_options: Any) -> Site: ...


def build_platform(routes: RouteTable) -> ProxyMiddleware:
    """A FastAPI platform with its own ``/api`` route, and the proxy mounted on ``/api`` in front of it
    (what ``platform.add_middleware(ProxyMiddleware, ...)`` builds, with the instance in hand)."""
    platform = FastAPI()

    @platform.get("/api/experiments")
    async def experiments() -> dict[str, list[str]]:
        return {"experiments": []}

    return ProxyMiddleware(platform, routes=routes, tokens=TokenIssuer(SECRET), mount_path="/api", retry_window=0.2)


@contextlib.contextmanager
def site_starter(mode: str, http: str) -> Iterator[StartSite]:
    """Start sites with the proxy alone (``standalone``) or mounted on ``/api`` in FastAPI (``mounted``)."""
    with contextlib.ExitStack() as stack:

        def start(routes: list[Route], **server_options: Any) -> Site:
            table = RouteTable(routes)
            if mode == "standalone":
                middleware = ProxyMiddleware(None, routes=table, tokens=TokenIssuer(SECRET), retry_window=0.2)
                app: Any = middleware
            else:
                app = middleware = build_platform(table)
            running = stack.enter_context(serve(app, http=http, proxy_headers=False, **server_options))
            return Site(running.port, "/api" if mode == "mounted" else "", table, middleware)

        yield start


def request_once(site: Site, target: str, *headers: str, method: str = "GET") -> Response:
    """Send one raw request and return its response as soon as it is complete (or the server closes)."""
    return first_response(site.port, make_request(site.base + target, *headers, method=method), method=method)


def first_response(port: int, data: bytes, *, method: str = "GET") -> Response:
    return one_response(read_first(port, data, method=method), methods=(method,))
