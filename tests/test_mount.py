"""Shared mode in-process: plugins under their prefixes, failures contained to one request."""

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from websockets.exceptions import ConnectionClosedError, InvalidStatus
from websockets.sync.client import connect

from mint_plugin import current_request
from mint_proxy import verify_internal_token
from mint_proxy.isolation import SharedPlugin, SharedPluginImportError, SharedPluginsMiddleware, _lifespan
from mint_proxy.isolation._lifespan import PluginLifespan
from mint_proxy.tokens import TokenIssuer

from .utils import SECRET, serve

SLUG = "crashy"


def _plugin_app(*, debug: bool = False, base: str = "/api/crashy") -> FastAPI:
    plugin = FastAPI(debug=debug)

    @plugin.get(f"{base}/boom")
    async def boom() -> None:
        raise RuntimeError("secret internals /etc/passwd")

    @plugin.get(f"{base}/ok")
    async def ok(request: Request) -> dict[str, Any]:
        context = current_request.get()
        return {
            "request_id": request.headers.get("x-request-id"),
            "token": request.headers.get("x-mint-internal-token"),
            "context_id": context.request_id if context else None,
            "path": request.url.path,
        }

    @plugin.get(f"{base}/busy")
    async def busy() -> JSONResponse:
        return JSONResponse({"busy": True}, status_code=503)

    return plugin


IMPORTED = _plugin_app()  # named by an import string below


def _platform() -> FastAPI:
    platform = FastAPI()

    @platform.get("/api/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return platform


@pytest.fixture
def url() -> Iterator[str]:
    app = SharedPluginsMiddleware(
        _platform(),
        plugins=[
            SharedPlugin(SLUG, _plugin_app()),
            SharedPlugin("debugging", _plugin_app(debug=True, base="/api/dbg"), prefix="/dbg"),
        ],
        tokens=TokenIssuer(SECRET),
        mount_path="/api",
        register_client=False,
    )
    with serve(app) as running:
        yield running.url


def test_a_crashing_route_is_a_json_500_with_the_request_id(url: str, caplog: pytest.LogCaptureFixture) -> None:
    """An exception in a plugin route becomes the proxy's JSON 500, logged with slug and request id."""
    with caplog.at_level(logging.ERROR, logger="mint_proxy"):
        response = httpx.get(f"{url}/api/crashy/boom", headers={"X-Request-Id": "crash-1"})
    assert response.status_code == 500
    assert response.headers["content-type"] == "application/json"
    assert response.json() == {
        "error": "plugin_error",
        "detail": "plugin 'crashy' failed on this request",
        "request_id": "crash-1",
    }
    assert response.headers["x-request-id"] == "crash-1"
    assert "secret internals" not in response.text and "Traceback" not in response.text
    (record,) = [r for r in caplog.records if "plugin=crashy" in r.getMessage()]
    assert "request_id=crash-1" in record.getMessage()
    assert record.exc_info is not None and "secret internals" in str(record.exc_info[1])


def test_other_routes_and_the_platform_keep_serving_after_a_crash(url: str) -> None:
    """The crash is contained to its request: the same plugin and the platform keep answering."""
    with httpx.Client(base_url=url) as client:
        assert client.get("/api/crashy/boom").status_code == 500
        assert client.get("/api/crashy/ok").status_code == 200
        assert client.get("/api/health").json() == {"status": "ok"}
        assert client.get("/api/crashy/boom").status_code == 500
        assert client.get("/api/crashy/ok").status_code == 200


def test_a_debug_traceback_page_never_reaches_the_client(url: str) -> None:
    """A plugin framework in debug mode renders a traceback page; the client gets the JSON 500 instead."""
    response = httpx.get(f"{url}/api/dbg/boom")
    assert response.status_code == 500
    assert response.json()["error"] == "plugin_error"
    assert "secret internals" not in response.text


def test_a_5xx_the_plugin_answers_itself_passes_through(url: str) -> None:
    """Only exceptions are replaced: a 503 the plugin chose to send reaches the client as sent."""
    response = httpx.get(f"{url}/api/crashy/busy")
    assert (response.status_code, response.json()) == (503, {"busy": True})
    assert len(response.headers["x-request-id"]) == 32


def test_the_plugin_sees_the_same_headers_as_behind_the_proxy(url: str) -> None:
    """Request id by the proxy's rules, its own internal token, the full path, and current_request set."""
    response = httpx.get(f"{url}/api/crashy/ok", headers={"X-Request-Id": "abc.1", "X-Mint-Internal-Token": "forged"})
    seen = response.json()
    assert seen["request_id"] == seen["context_id"] == "abc.1"
    assert verify_internal_token(seen["token"], SECRET, plugin=SLUG).plugin == SLUG
    assert seen["path"] == "/api/crashy/ok"
    invalid = httpx.get(f"{url}/api/crashy/ok", headers={"X-Request-Id": "bad id with spaces"}).json()
    assert invalid["request_id"] != "bad id with spaces" and len(invalid["request_id"]) == 32


def test_prefixes_match_at_segment_boundaries(url: str) -> None:
    """``/api/crashyX`` is not the plugin's; it falls through to the platform (404 there)."""
    assert httpx.get(f"{url}/api/crashyX/ok").status_code == 404
    assert httpx.get(f"{url}/crashy/ok").status_code == 404  # outside mount_path


@pytest.mark.anyio
async def test_strip_prefix_moves_the_prefix_into_root_path() -> None:
    """With strip_prefix the plugin routes on the path below its prefix, as behind a stripping proxy."""
    plugin = FastAPI()

    @plugin.get("/ok")
    async def ok(request: Request) -> dict[str, str]:
        return {"root_path": request.scope["root_path"]}

    app = SharedPluginsMiddleware(
        _platform(), plugins=[SharedPlugin("strip", plugin, strip_prefix=True)], mount_path="/api",
        register_client=False,
    )  # fmt: skip
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        assert (await client.get("/api/strip/ok")).json() == {"root_path": "/api/strip"}


@pytest.mark.anyio
async def test_shared_plugin_from_an_import_string() -> None:
    """``"module:attr"`` (the spec file's ``app`` key) is imported when the middleware is built, and served."""
    app = SharedPluginsMiddleware(
        _platform(), plugins=[SharedPlugin(SLUG, "tests.test_mount:IMPORTED")], mount_path="/api", register_client=False
    )
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        response = await client.get(f"/api/{SLUG}/ok")
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("target", ["no_such_module_xyz:app", "os.path:no_such_attr", "os:sep"])
def test_an_import_string_that_names_no_app_is_a_clear_error(target: str) -> None:
    """A missing module, a missing attribute or a non-callable is refused naming the plugin and the string."""
    with pytest.raises(SharedPluginImportError, match=f"shared plugin 'broken': .*{target}"):
        SharedPluginsMiddleware(_platform(), plugins=[SharedPlugin("broken", target)], register_client=False)


def test_invalid_slug_and_duplicate_prefix_are_refused() -> None:
    """A bad slug or two plugins on one prefix are refused when the middleware is built."""
    with pytest.raises(ValueError, match="not valid"):
        SharedPlugin("Bad Slug", _plugin_app())
    with pytest.raises(TypeError, match="import string"):
        SharedPlugin("no-app", 42)
    with pytest.raises(ValueError, match="two shared plugins"):
        SharedPluginsMiddleware(
            _platform(), plugins=[SharedPlugin("a", _plugin_app()), SharedPlugin("b", _plugin_app(), prefix="/a")],
            register_client=False,
        )  # fmt: skip


def test_an_exception_after_the_response_started_aborts_the_connection() -> None:
    """A plugin that fails mid-stream: the client sees a broken response, never a complete-looking one."""

    async def streaming(scope: Any, receive: Any, send: Any) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"100")]})
        await send({"type": "http.response.body", "body": b"partial", "more_body": True})
        raise RuntimeError("mid-stream")

    app = SharedPluginsMiddleware(_platform(), plugins=[SharedPlugin("stream", streaming)], register_client=False)
    with serve(app) as running, pytest.raises(httpx.RemoteProtocolError):
        httpx.get(f"{running.url}/stream/x")


def test_plugin_lifespans_run_with_the_platform() -> None:
    """A shared plugin's startup runs when the platform starts and its shutdown when it stops;
    a plugin whose startup fails answers 503, and the platform and other plugins still serve."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        app.state.ready = True
        events.append("startup")
        yield
        events.append("shutdown")

    ready = FastAPI(lifespan=lifespan)

    @ready.get("/api/ready/x")
    async def ready_route(request: Request) -> dict[str, bool]:
        return {"ready": request.app.state.ready}

    @asynccontextmanager
    async def broken_lifespan(app: FastAPI) -> AsyncIterator[None]:
        raise RuntimeError("no database")
        yield

    broken = FastAPI(lifespan=broken_lifespan)

    async def no_lifespan(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    plugins = [SharedPlugin("ready", ready), SharedPlugin("broken", broken), SharedPlugin("plain", no_lifespan)]
    app = SharedPluginsMiddleware(_platform(), plugins=plugins, register_client=False, mount_path="/api")
    with serve(app, lifespan="on") as running:
        assert events == ["startup"]
        assert httpx.get(f"{running.url}/api/ready/x").json() == {"ready": True}
        failed = httpx.get(f"{running.url}/api/broken/x")
        assert failed.status_code == 503 and failed.json()["error"] == "plugin_unavailable"
        assert httpx.get(f"{running.url}/api/plain/x").status_code == 204
        assert httpx.get(f"{running.url}/api/health").status_code == 200
    assert events == ["startup", "shutdown"]


def test_a_plugin_lifespan_state_reaches_its_requests() -> None:
    """A shared plugin whose lifespan yields state (Starlette's lifespan-state pattern) starts, and its
    requests see that state and not the platform's, as they do under the plugin host in isolated mode."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    @asynccontextmanager
    async def plugin_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        yield {"owner": "plugin"}

    plugin = FastAPI(lifespan=plugin_lifespan)

    @plugin.get("/api/stateful/x")
    async def stateful(request: Request) -> dict[str, str]:
        return {"owner": request.state.owner}

    @asynccontextmanager
    async def platform_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        yield {"owner": "platform"}

    platform = FastAPI(lifespan=platform_lifespan)

    @platform.get("/api/whose")
    async def whose(request: Request) -> dict[str, str]:
        return {"owner": request.state.owner}

    app = SharedPluginsMiddleware(
        platform, plugins=[SharedPlugin("stateful", plugin)], register_client=False, mount_path="/api"
    )
    with serve(app, lifespan="on") as running:
        response = httpx.get(f"{running.url}/api/stateful/x")
        assert response.status_code == 200, response.text
        assert response.json() == {"owner": "plugin"}
        assert httpx.get(f"{running.url}/api/whose").json() == {"owner": "platform"}


def test_in_process_calls_to_the_platform_see_its_lifespan_state() -> None:
    """A shared plugin's PlatformClient call reaches a platform route that reads its lifespan state
    (a database pool, say), as the same call over HTTP does in isolated mode."""
    from collections.abc import AsyncIterator
    from contextlib import asynccontextmanager

    import mint_plugin.client
    from mint_plugin.client import PlatformClient

    @asynccontextmanager
    async def platform_lifespan(app: FastAPI) -> AsyncIterator[dict[str, str]]:
        yield {"pool": "platform-pool"}

    platform = FastAPI(lifespan=platform_lifespan)

    @platform.get("/api/internal/pool")
    async def pool(request: Request) -> dict[str, str]:
        return {"pool": request.state.pool}

    async def caller(scope: Any, receive: Any, send: Any) -> None:
        assert scope["type"] == "http"
        async with PlatformClient() as client:
            answer = await client.get("pool")
        await send({"type": "http.response.start", "status": answer.status_code, "headers": []})
        await send({"type": "http.response.body", "body": answer.content})

    app = SharedPluginsMiddleware(
        platform, plugins=[SharedPlugin("caller", caller)], tokens=TokenIssuer(SECRET), mount_path="/api"
    )
    try:
        with serve(app, lifespan="on") as running:
            response = httpx.get(f"{running.url}/api/caller/x")
    finally:
        mint_plugin.client.serve_in_process(None)
    assert response.status_code == 200, response.text
    assert response.json() == {"pool": "platform-pool"}


# -- WebSockets in shared mode ---------------------------------------------------------------------------------


async def _websocket_plugin(scope: Any, receive: Any, send: Any) -> None:
    """Accepts, answers the first message with what it was given (headers, context), or raises where asked."""
    assert scope["type"] == "websocket"
    if scope["path"].endswith("/raise-before-accept"):
        raise RuntimeError("before accept")
    await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    message = await receive()
    if message.get("text") == "raise":
        raise RuntimeError("after accept")
    headers = {name.decode(): value.decode() for name, value in scope["headers"]}
    context = current_request.get()
    seen = {
        "request_id": headers.get("x-request-id"),
        "token": headers.get("x-mint-internal-token"),
        "context_id": context.request_id if context else None,
    }
    await send({"type": "websocket.send", "text": json.dumps(seen)})
    await send({"type": "websocket.close", "code": 1000})


@pytest.fixture
def ws_url() -> Iterator[str]:
    app = SharedPluginsMiddleware(
        _platform(),
        plugins=[SharedPlugin("live", _websocket_plugin)],
        tokens=TokenIssuer(SECRET),
        mount_path="/api",
        register_client=False,
    )
    with serve(app) as running:
        yield "ws" + running.url.removeprefix("http")


def test_a_websocket_reaches_its_shared_plugin_with_the_request_id_and_token(ws_url: str) -> None:
    with connect(f"{ws_url}/api/live/feed", additional_headers={"X-Request-Id": "ws-1"}, open_timeout=10) as ws:
        ws.send("hello")
        seen = json.loads(ws.recv(timeout=10))
    assert seen["request_id"] == seen["context_id"] == "ws-1"
    assert verify_internal_token(seen["token"], SECRET, plugin="live").plugin == "live"


def test_a_shared_plugin_raising_on_a_websocket_closes_it_1011_once_accepted(
    ws_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    """RFC 6455 7.4.1: 1011 after the handshake; before it, the handshake is refused (403)."""
    with caplog.at_level(logging.ERROR, logger="mint_proxy"):
        with connect(f"{ws_url}/api/live/feed", open_timeout=10) as ws:
            ws.send("raise")
            with pytest.raises(ConnectionClosedError) as closed:
                ws.recv(timeout=10)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011
        with pytest.raises(InvalidStatus) as refused:
            connect(f"{ws_url}/api/live/raise-before-accept", open_timeout=10)
        assert refused.value.response.status_code == 403
    assert sum("plugin=live" in record.getMessage() for record in caplog.records) == 2


# -- a shared plugin's shutdown -----------------------------------------------------------------------------------


def _lifespan_app(on_shutdown: str) -> Any:
    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if on_shutdown == "fail":
            await send({"type": "lifespan.shutdown.failed", "message": "cannot flush the queue"})
        elif on_shutdown == "raise":
            raise RuntimeError("flush crashed")
        elif on_shutdown == "hang":
            await asyncio.Event().wait()

    return app


@pytest.mark.parametrize(
    ("on_shutdown", "logged"),
    [
        pytest.param("fail", "plugin=late: shutdown failed: cannot flush the queue", id="failed"),
        pytest.param("raise", "plugin=late: shutdown failed: flush crashed", id="raised"),
        pytest.param("hang", "plugin=late: shutdown did not finish within 0.05s", id="hung"),
    ],
)
def test_a_shared_plugin_whose_shutdown_fails_is_logged_and_the_platform_stops_anyway(
    on_shutdown: str, logged: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_lifespan, "SHUTDOWN_TIMEOUT", 0.05)
    session = PluginLifespan("late", _lifespan_app(on_shutdown))

    async def start_then_stop() -> None:
        await session.start()
        await session.stop()

    with caplog.at_level(logging.ERROR, logger="mint_proxy"):
        asyncio.run(start_then_stop())
    assert not session.failed
    assert [record.getMessage() for record in caplog.records] == [logged]
