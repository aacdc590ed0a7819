"""The plugin host (mint_plugin/host.py) as a real process, alone and behind a real proxy."""

import asyncio
import os
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator

import httpx
import pytest

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
