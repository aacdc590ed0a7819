"""The platform behind the proxy (``DevProxyApp(platform=...)``, ``serve --platform``): its
lifespan runs inside the proxy's and shares the server's state; an app without lifespan works."""

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
