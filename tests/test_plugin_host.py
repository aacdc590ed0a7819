"""The plugin host (mint_plugin/host.py) as a real process, alone and behind a real proxy."""

import asyncio
import json
import logging
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest

from mint_plugin import RequestContext, current_request
from mint_plugin.host import LOG_FORMAT, install_request_log_context, with_request_context
from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer
from mint_proxy.plugins._launch import HOST_PATH

from .supervised import DEADLINE, REPO_ROOT, Lines, app_spec, short_tempdir, supervising, wait_all_exited
from .utils import SECRET, serve


@pytest.fixture
def socket_dir() -> Iterator[str]:
    with short_tempdir() as path:
        os.makedirs(path, mode=0o700)
        yield path


def _run_host(*args: str, pass_fds: tuple[int, ...] = ()) -> "subprocess.Popen[bytes]":
    return subprocess.Popen(
        [sys.executable, HOST_PATH, *args],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        pass_fds=pass_fds,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def _wait_connectable(path: str, process: "subprocess.Popen[bytes]") -> None:
    """Wait until the host accepts connections on ``path`` (or fail if it exited)."""
    deadline = time.monotonic() + DEADLINE
    while True:
        assert process.poll() is None, process.stderr.read() if process.stderr else b""
        with socket.socket(socket.AF_UNIX) as sock:
            try:
                sock.connect(path)
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
        time.sleep(0.01)


def _close(process: "subprocess.Popen[bytes]") -> None:
    if process.poll() is None:
        process.kill()
    process.wait()
    if process.stderr is not None:
        process.stderr.close()


def test_host_exits_when_the_lifeline_closes(socket_dir: str) -> None:
    """EOF on the lifeline pipe (the supervisor is gone) ends the host, socket 0600 meanwhile."""
    read, write = os.pipe()
    path = os.path.join(socket_dir, "p.sock")
    process = _run_host("--app", "tests.plugin_apps:hello", "--uds", path, "--lifeline", str(read), pass_fds=(read,))
    os.close(read)
    try:
        _wait_connectable(path, process)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        os.close(write)
        process.wait(DEADLINE)  # raises TimeoutExpired if the host outlived its lifeline
    finally:
        _close(process)


def test_host_replaces_a_stale_socket_file(socket_dir: str) -> None:
    """A socket file a killed predecessor left behind does not stop the host from listening."""
    path = os.path.join(socket_dir, "p.sock")
    with socket.socket(socket.AF_UNIX) as stale:
        stale.bind(path)
    process = _run_host("--app", "tests.plugin_apps:hello", "--uds", path)
    try:
        _wait_connectable(path, process)
    finally:
        _close(process)


def test_host_whose_parent_is_already_gone_exits_at_once(socket_dir: str) -> None:
    """If the supervisor died before PR_SET_PDEATHSIG was armed, the host notices and leaves."""
    process = _run_host(
        "--app", "tests.plugin_apps:hello", "--uds", os.path.join(socket_dir, "p.sock"), "--parent", "1"
    )
    try:
        assert process.wait(DEADLINE) != 0
        assert process.stderr is not None and b"the supervisor is gone" in process.stderr.read()
    finally:
        _close(process)


def test_host_with_an_unloadable_app_says_so(socket_dir: str) -> None:
    """A wrong import string is a startup failure (exit 3) with the reason on stderr."""
    process = _run_host("--app", "tests.plugin_apps:missing", "--uds", os.path.join(socket_dir, "p.sock"))
    try:
        assert process.wait(DEADLINE) == 3
        assert process.stderr is not None and b"cannot load app 'tests.plugin_apps:missing'" in process.stderr.read()
    finally:
        _close(process)


def _tagged_with(request_id: str) -> Callable[[str], bool]:
    return lambda line: f"[req={request_id}]" in line


@pytest.mark.anyio
async def test_plugin_log_lines_carry_the_request_id_through_a_real_proxy() -> None:
    """One grep for the proxy's request id finds the plugin's own log lines for that request."""
    with short_tempdir() as runtime_dir, Lines("hello") as lines:
        async with supervising([app_spec("hello")], runtime_dir) as supervisor:
            status = supervisor.status()["hello"]
            routes = RouteTable({"/hello": status.endpoint})
            with serve(ProxyMiddleware(None, routes=routes, tokens=TokenIssuer(SECRET)), lifespan="auto") as proxy:
                async with httpx.AsyncClient(base_url=proxy.url, timeout=DEADLINE) as client:
                    sent = await client.get("/hello/whoami", headers={"X-Request-Id": "grep-me-42"})
                    minted = await client.get("/hello/whoami")
            assert sent.status_code == 200 and sent.text == "grep-me-42"
            request_id = minted.headers["x-request-id"]
            assert minted.text == request_id  # current_request holds the id the proxy minted
            for rid in ("grep-me-42", request_id):
                tagged = await lines.wait_for(_tagged_with(rid), count=2)
                assert any("handling /hello/whoami" in line for line in tagged)
                assert any('"GET /hello/whoami HTTP/1.1" 200' in line for line in tagged)
            startup = [line for line in lines.lines if "Application startup complete" in line]
            assert startup and "[req=" not in startup[0]  # outside a request: no tag
            pid = status.pid
    assert pid is not None and await asyncio.to_thread(wait_all_exited, {pid}, DEADLINE) == set()


ABORTED = -1  # the response head arrived, then the connection closed before the whole body


async def _keep_alive_get(
    streams: tuple[asyncio.StreamReader, asyncio.StreamWriter], path: str, request_id: str
) -> tuple[int, bytes, bool]:
    """One GET on a kept-alive connection: status, body, and whether the server closes it.

    Every response here carries a Content-Length. A body cut short by the connection closing
    (the plugin died after its head went out, so the proxy aborted the client's connection:
    a truncated body must never look complete) is status ``ABORTED``."""
    reader, writer = streams
    writer.write(f"GET {path} HTTP/1.1\r\nHost: proxy\r\nX-Request-Id: {request_id}\r\n\r\n".encode())
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").lower().split("\r\n")
    length = next(int(line.split(":", 1)[1]) for line in lines if line.startswith("content-length:"))
    try:
        body = await reader.readexactly(length)
    except asyncio.IncompleteReadError:
        assert lines[0].split()[1] == "200"  # only the plugin's own answer can be cut: the proxy's are whole
        return ABORTED, request_id.encode(), True
    return int(lines[0].split()[1]), body, "connection: close" in lines


@pytest.mark.anyio
async def test_plugin_killed_under_load_loses_no_request() -> None:
    """1,000 requests through the proxy while the plugin is SIGKILLed and restarted: each one gets
    its own answer or a clean JSON 502/503 with its own request id, or, if the kill came between
    the plugin's head and its body, a closed connection; none hangs or is mixed up."""
    results: list[tuple[str, int, str]] = []
    with short_tempdir() as runtime_dir:
        async with supervising([app_spec("hello")], runtime_dir) as supervisor:
            routes = RouteTable({"/hello": supervisor.status()["hello"].endpoint})
            proxy_app = ProxyMiddleware(None, routes=routes, tokens=TokenIssuer(SECRET), retry_window=5.0)
            with serve(proxy_app, lifespan="auto") as proxy:

                async def worker(first: int) -> None:
                    # 20 keep-alive connections x 50 sequential requests: steady load.
                    streams = await asyncio.open_connection("127.0.0.1", proxy.port)
                    try:
                        for index in range(first, 1000, 20):
                            rid = f"load-{index}"
                            async with asyncio.timeout(DEADLINE):
                                status, body, closing = await _keep_alive_get(streams, "/hello/whoami", rid)
                                if closing:
                                    streams[1].close()
                                    streams = await asyncio.open_connection("127.0.0.1", proxy.port)
                            answer = body.decode() if status in (200, ABORTED) else json.loads(body)["request_id"]
                            results.append((rid, status, answer))
                            if len(results) == 200:
                                pid = supervisor.status()["hello"].pid
                                assert pid is not None
                                os.kill(pid, 9)
                    finally:
                        streams[1].close()

                await asyncio.gather(*(worker(first) for first in range(20)))
            assert supervisor.status()["hello"].restarts == 1
    assert len(results) == 1000
    assert all(status in (200, 502, 503, ABORTED) for _, status, _ in results)
    assert all(answer == rid for rid, _, answer in results)  # none mixed up, errors carry their own id
    assert sum(status != 200 for _, status, _ in results) <= 20  # at most those in flight at the kill


@pytest.mark.anyio
async def test_an_exception_in_a_route_is_logged_with_the_request_id() -> None:
    """The server's report of a route's exception (the traceback and the 500 access line) carries the
    request's id like the route's own lines: the one line most worth finding by the id."""
    with short_tempdir() as runtime_dir, Lines("hello") as lines:
        async with supervising([app_spec("hello")], runtime_dir) as supervisor:
            transport = httpx.AsyncHTTPTransport(uds=supervisor.status()["hello"].endpoint.removeprefix("unix:"))
            async with httpx.AsyncClient(transport=transport, base_url="http://plugin", timeout=DEADLINE) as client:
                response = await client.get("/raise", headers={"X-Request-Id": "crash-77"})
            assert response.status_code == 500
            await lines.wait_for(lambda line: '"GET /raise HTTP/1.1" 500' in line)
            assert any("Exception in ASGI application" in line for line in lines.lines)
            for line in lines.lines:
                if "Exception in ASGI application" in line or '"GET /raise HTTP/1.1" 500' in line:
                    assert "[req=crash-77]" in line, line


def test_host_that_cannot_listen_says_where_and_exits_3(socket_dir: str) -> None:
    """A socket path in a directory that does not exist is a startup failure naming the path."""
    path = os.path.join(socket_dir, "missing", "p.sock")
    process = _run_host("--app", "tests.plugin_apps:hello", "--uds", path)
    try:
        assert process.wait(DEADLINE) == 3
        assert process.stderr is not None and f"cannot listen on {path}".encode() in process.stderr.read()
    finally:
        _close(process)


# -- the request context and log tags, in-process ------------------------------------------------------------


def test_each_request_sees_its_own_id_and_token_and_lifespan_sees_none() -> None:
    seen: list[tuple[str, RequestContext | None]] = []

    async def app(scope: Any, receive: Any, send: Any) -> None:
        seen.append((scope["type"], current_request.get()))

    wrapped = with_request_context(app)

    async def run(scope: dict[str, Any]) -> None:
        await wrapped(scope, _no_receive, _no_send)

    headers = [(b"x-request-id", b"rid-1"), (b"x-mint-internal-token", b"tok")]
    asyncio.run(run({"type": "http", "headers": headers}))
    asyncio.run(run({"type": "websocket", "headers": [(b"x-request-id", b"rid-2")]}))
    asyncio.run(run({"type": "lifespan"}))
    assert seen == [
        ("http", RequestContext("rid-1", "tok")),
        ("websocket", RequestContext("rid-2", None)),
        ("lifespan", None),
    ]


def test_log_records_carry_the_request_id_only_inside_a_request() -> None:
    previous = logging.getLogRecordFactory()
    install_request_log_context()
    try:
        outside = logging.getLogRecordFactory()("x", logging.INFO, __file__, 1, "outside", None, None)
        reset = current_request.set(RequestContext("rid-9"))
        try:
            inside = logging.getLogRecordFactory()("x", logging.INFO, __file__, 1, "inside", None, None)
        finally:
            current_request.reset(reset)
    finally:
        logging.setLogRecordFactory(previous)
    assert (outside.__dict__["request_id"], outside.__dict__["request_tag"]) == ("", "")
    assert (inside.__dict__["request_id"], inside.__dict__["request_tag"]) == ("rid-9", " [req=rid-9]")
    assert logging.Formatter(LOG_FORMAT).format(inside) == "INFO [req=rid-9] x: inside"


async def _no_receive() -> Any:
    raise AssertionError("the app under test does not receive")


async def _no_send(message: Any) -> None:
    raise AssertionError("the app under test does not send")
