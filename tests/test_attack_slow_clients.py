"""Slow clients: stalled uploads and silent bodies are a 408; a slow first request head is the ASGI
server's to bound, not the proxy's."""

import contextlib
import socket

import pytest

from .conftest import PluginServer, StartProxy
from .utils import (
    Recorder,
    assert_proxy_error,
    async_wait_for,
    exchange,
    make_request,
    one_response,
    serve,
)

pytestmark = pytest.mark.anyio


@pytest.mark.parametrize(
    "head, partial",
    [
        pytest.param("Content-Length: 100", b"abc", id="content-length"),
        pytest.param("Transfer-Encoding: chunked", b"64\r\nabc", id="chunked"),
    ],
)
async def test_stalled_upload_is_a_408_and_the_upstream_request_is_aborted(
    start_proxy: StartProxy, plugin: PluginServer, head: str, partial: bytes
) -> None:
    """Headers and part of the body, then silence: 408 (JSON, connection closed) after
    ``client_body_timeout``, and the plugin sees its request end without a body end."""
    proxy = start_proxy({"/peak": plugin.url}, client_body_timeout=0.5)
    data = make_request("/peak/upload", head, method="POST", body=partial)
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as sock:
        sock.sendall(data)
        raw = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                raw += chunk
    assert_proxy_error(one_response(raw), 408, "request_timeout")
    assert one_response(raw).header(b"connection") == b"close"
    assert await async_wait_for(lambda: "disconnect-during-body" in plugin.app.events)


async def test_headers_then_silence_is_a_408(start_proxy: StartProxy, plugin: PluginServer) -> None:
    """The body-idle timeout starts when the head is complete, not after the first body bytes.

    Regression test: the first body read had no timeout, so such a request was held forever.
    """
    proxy = start_proxy({"/peak": plugin.url}, client_body_timeout=0.5)
    raw, _ = exchange(proxy.port, make_request("/peak/upload", "Content-Length: 100", method="POST"), timeout=1.5)
    assert_proxy_error(one_response(raw), 408, "request_timeout")


@pytest.mark.slow
def test_slow_first_request_head_is_not_bounded_by_the_asgi_server(http: str) -> None:
    """uvicorn's ``timeout_keep_alive`` only runs between requests; a connection whose
    first request head never completes stays open (slowloris). That limit belongs in front of the
    server (``--limit-concurrency``, a front proxy's header timeout), not in the proxy."""
    with serve(Recorder(), http=http, timeout_keep_alive=0.3) as server:
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n")
            sock.settimeout(1.0)
            with pytest.raises(TimeoutError):
                sock.recv(1)  # still open, long after the 0.3 s keep-alive timeout
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as sock:
            sock.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
            sock.settimeout(3)
            assert sock.recv(1) == b""  # idle after a response: closed by the keep-alive timeout
