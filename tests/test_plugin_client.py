"""The plugin side's platform client (``mint_plugin.client``) and request context (``mint_plugin._context``).

In-process: an ASGI app stands in for the platform (shared mode), or a Unix socket /
URL is named by ``MINT_PLATFORM_URL`` (isolated mode).
"""

import asyncio
import os
from collections.abc import Iterator
from typing import Any

import pytest

from mint_plugin import RequestContext, client as client_module, current_request
from mint_plugin.client import PLATFORM_URL_ENV, PlatformClient, PlatformUnavailable, serve_in_process


class Recorder:
    """A platform app that answers 200 and keeps each request's method, path and headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str]]] = []

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        headers = {name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]}
        self.seen.append((scope["method"], scope["path"], headers))
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def platform() -> Iterator[Recorder]:
    app = Recorder()
    serve_in_process(app)
    yield app
    serve_in_process(None)


@pytest.fixture
def in_request() -> Iterator[RequestContext]:
    context = RequestContext("req-7", "the-token")
    reset = current_request.set(context)
    yield context
    current_request.reset(reset)


def test_request_context_reads_the_request_id_and_token_from_asgi_headers() -> None:
    headers = [(b"accept", b"*/*"), (b"x-request-id", b"abc-123"), (b"x-mint-internal-token", b"tok.en")]
    assert RequestContext.from_headers(headers) == RequestContext("abc-123", "tok.en")


def test_request_context_without_the_headers_has_an_empty_id_and_no_token() -> None:
    assert RequestContext.from_headers([(b"accept", b"*/*")]) == RequestContext("", None)


@pytest.mark.anyio
@pytest.mark.parametrize("method", ["GET", "POST", "PUT", "DELETE"])
async def test_calls_carry_the_current_requests_token_and_id_under_api_internal(
    platform: Recorder, in_request: RequestContext, method: str
) -> None:
    async with PlatformClient() as client:
        response = await getattr(client, method.lower())("experiments/42", headers={"Accept": "application/json"})
    assert response.status_code == 200
    [(seen_method, path, headers)] = platform.seen
    assert (seen_method, path) == (method, "/api/internal/experiments/42")
    assert headers["x-request-id"] == "req-7"
    assert headers["x-mint-internal-token"] == "the-token"
    assert headers["accept"] == "application/json"  # the caller's own headers are kept


@pytest.mark.anyio
async def test_a_path_already_under_api_internal_is_not_prefixed_twice(
    platform: Recorder, in_request: RequestContext
) -> None:
    async with PlatformClient() as client:
        await client.get("/api/internal/samples")
        await client.get("/samples")
    assert [path for _, path, _ in platform.seen] == ["/api/internal/samples", "/api/internal/samples"]


@pytest.mark.anyio
async def test_a_request_without_a_token_sends_none(platform: Recorder) -> None:
    reset = current_request.set(RequestContext("req-8"))
    try:
        async with PlatformClient() as client:
            await client.get("ping")
    finally:
        current_request.reset(reset)
    [(_, _, headers)] = platform.seen
    assert headers["x-request-id"] == "req-8" and "x-mint-internal-token" not in headers


@pytest.mark.anyio
async def test_use_outside_a_request_is_refused(platform: Recorder) -> None:
    """No request being served means no token to call with: nothing is sent."""
    async with PlatformClient() as client:
        with pytest.raises(PlatformUnavailable, match="outside a request"):
            await client.get("ping")
    assert platform.seen == []


def test_without_a_platform_url_or_app_the_error_names_both_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client_module, "_in_process_app", None)  # whatever a shared-mode test left
    with pytest.raises(PlatformUnavailable, match=f"{PLATFORM_URL_ENV} is not set .* served in-process"):
        PlatformClient(environ={})


class RawPlatform:
    """An HTTP/1.1 server on a real socket that answers 204 and keeps each request's head."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()
        writer.close()


@pytest.mark.anyio
async def test_isolated_mode_calls_the_http_url_in_the_environment(in_request: RequestContext) -> None:
    raw = RawPlatform()
    server = await asyncio.start_server(raw.handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server, PlatformClient(environ={PLATFORM_URL_ENV: f"http://127.0.0.1:{port}/"}) as client:
        assert (await client.delete("runs/9")).status_code == 204
    [head] = raw.heads
    assert head.startswith(b"DELETE /api/internal/runs/9 HTTP/1.1\r\n")
    assert b"\r\nX-Mint-Internal-Token: the-token\r\n" in head


@pytest.mark.anyio
async def test_isolated_mode_calls_a_unix_socket_platform(
    in_request: RequestContext, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """``MINT_PLATFORM_URL=unix:/path``: the call goes over that socket."""
    raw = RawPlatform()
    path = os.path.join(str(tmp_path_factory.mktemp("s")), "platform.sock")
    server = await asyncio.start_unix_server(raw.handle, path)
    async with server, PlatformClient(environ={PLATFORM_URL_ENV: f"unix:{path}"}) as client:
        assert (await client.get("ping")).status_code == 204
    [head] = raw.heads
    assert head.startswith(b"GET /api/internal/ping HTTP/1.1\r\n")
    assert b"\r\nX-Request-Id: req-7\r\n" in head
