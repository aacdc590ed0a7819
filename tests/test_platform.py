"""The platform behind the proxy (``DevProxyApp(platform=...)``, ``serve --platform``): its
lifespan runs inside the proxy's and shares the server's state; an app without lifespan works."""

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from websockets.sync.client import connect

from mint_proxy import DevProxyApp
from mint_proxy._platform import PlatformError, platform_app
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV

from .conftest import PluginServer
from .utils import SECRET, serve


def config_file(tmp_path: Path, plugin_url: str) -> str:
    path = tmp_path / "config.dev.toml"
    path.write_text(f'[proxy]\n"/peak" = "{plugin_url}"\n')
    return str(path)


def test_platform_lifespan_state_reaches_its_requests(tmp_path: Path, plugin: PluginServer) -> None:
    events: list[str] = []

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        events.append("startup")
        yield {"db": "connected"}
        events.append("shutdown")

    async def home(request: Request) -> PlainTextResponse:
        return PlainTextResponse(request.state.db)

    platform = Starlette(routes=[Route("/home", home)], lifespan=lifespan)
    app = DevProxyApp(environ={CONFIG_ENV: config_file(tmp_path, plugin.url), SECRET_ENV: SECRET}, platform=platform)
    with serve(app, lifespan="on") as running:
        assert events == ["startup"]
        assert httpx.get(running.url + "/home", timeout=10).text == "connected"
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
    assert events == ["startup", "shutdown"]


def test_platform_without_lifespan_is_served_anyway(tmp_path: Path, plugin: PluginServer) -> None:
    async def bare(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            raise RuntimeError("no lifespan here")
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"ok"})

    app = DevProxyApp(environ={CONFIG_ENV: config_file(tmp_path, plugin.url), SECRET_ENV: SECRET}, platform=bare)
    with serve(app, lifespan="on") as running:
        assert httpx.get(running.url + "/elsewhere", timeout=10).text == "ok"


@pytest.mark.parametrize(
    ("target", "problem"),
    [
        pytest.param("nope_module:app", "Could not import module", id="missing-module"),
        pytest.param("no-colon", "must be in format", id="not-an-import-string"),
        pytest.param("http://bad host", "must not contain", id="bad-url"),
    ],
)
def test_a_bad_platform_target_is_a_clear_error(target: str, problem: str) -> None:
    with pytest.raises(PlatformError, match=problem):
        platform_app(target)


def test_a_websocket_matching_no_route_reaches_a_url_platform_without_a_token(plugin: PluginServer) -> None:
    """``--platform http://...`` forwards WebSockets too, through the same machinery as HTTP, and signs
    nothing: the platform is not a plugin."""
    with serve(platform_app(plugin.url), lifespan="on") as running:
        with connect("ws" + running.url.removeprefix("http") + "/live/feed?x=1", open_timeout=10) as websocket:
            websocket.send("hello")
            assert websocket.recv(timeout=10) == "echo:hello"
    [record] = plugin.app.seen
    assert record["raw_path"] == "/live/feed"
    assert "x-mint-internal-token" not in {name for name, _ in record["headers"]}


def test_the_url_platform_answers_lifespan_and_ignores_other_scope_types(plugin: PluginServer) -> None:
    """Served alone (its lifespan) it completes startup and shutdown; an unknown scope type is left alone."""
    forward = platform_app(plugin.url)
    sent: list[Any] = []
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]

    async def receive() -> Any:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    async def call_twice() -> None:
        await forward({"type": "lifespan"}, receive, send)
        await forward({"type": "webtransport"}, receive, send)

    asyncio.run(call_twice())
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]
