"""The proxy mounted in a real FastAPI (and plain Starlette) platform, under a real uvicorn.

The platform keeps its own routes, lifespan and 404s; only route prefixes under ``mount_path``
go to plugins, and plugins call back to ``/api/internal`` with the token the proxy gave them.
"""

import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route as StarletteRoute
from websockets.sync.client import connect as ws_connect

from mint_proxy import InternalTokenAuth, ProxyMiddleware, RouteTable, TokenIssuer

from .backends import header_values
from .conftest import PluginServer
from .utils import SECRET, Running, serve

TOKEN_HEADER = "X-Mint-Internal-Token"


@dataclass
class Platform:
    url: str
    routes: RouteTable
    lifespan: list[str] = field(default_factory=list)


def get(url: str, **kwargs: Any) -> httpx.Response:
    return httpx.get(url, timeout=10, **kwargs)


def scope_summary(request: Request) -> dict[str, Any]:
    """What the platform received: the raw path and the headers, as sent."""
    headers = [[n.decode("latin-1"), v.decode("latin-1")] for n, v in request.scope["headers"]]
    return {"raw_path": request.scope["raw_path"].decode("latin-1"), "headers": headers}


def build_fastapi(routes: RouteTable, lifespan_events: list[str]) -> FastAPI:
    """The seed's platform: its own API, an internal API for plugins, and the proxy mounted on ``/api``."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        lifespan_events.append("startup")
        yield
        lifespan_events.append("shutdown")

    platform = FastAPI(lifespan=lifespan)
    internal_auth = InternalTokenAuth(SECRET)

    @platform.get("/api/experiments")
    async def experiments() -> dict[str, list[str]]:
        return {"experiments": ["exp-1", "exp-2"]}

    @platform.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @platform.get("/api/internal/whoami")
    async def whoami(plugin: Annotated[str, Depends(internal_auth)]) -> dict[str, str]:
        return {"plugin": plugin}

    @platform.get("/api/echo")
    async def echo(request: Request) -> dict[str, Any]:
        return scope_summary(request)

    platform.add_middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer(SECRET), mount_path="/api")
    return platform


def build_starlette(routes: RouteTable, lifespan_events: list[str]) -> Starlette:
    """The same platform in plain Starlette: ``InternalTokenAuth`` is called inside the endpoint."""
    internal_auth = InternalTokenAuth(SECRET)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        lifespan_events.append("startup")
        yield
        lifespan_events.append("shutdown")

    async def experiments(request: Request) -> JSONResponse:
        return JSONResponse({"experiments": ["exp-1", "exp-2"]})

    async def health(request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def whoami(request: Request) -> JSONResponse:
        return JSONResponse({"plugin": internal_auth(request)})

    async def echo(request: Request) -> JSONResponse:
        return JSONResponse(scope_summary(request))

    return Starlette(
        routes=[
            StarletteRoute("/api/experiments", experiments),
            StarletteRoute("/health", health),
            StarletteRoute("/api/internal/whoami", whoami),
            StarletteRoute("/api/echo", echo),
        ],
        middleware=[Middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer(SECRET), mount_path="/api")],
        lifespan=lifespan,
    )


@pytest.fixture(params=["fastapi", "starlette"])
def platform(request: pytest.FixtureRequest, http: str, plugin: PluginServer) -> Iterator[Platform]:
    """The platform under uvicorn (both parsers), lifespan on, routing ``/peak`` to the ``plugin`` fixture."""
    routes = RouteTable({"/peak": plugin.url})
    events: list[str] = []
    build = build_fastapi if request.param == "fastapi" else build_starlette
    running: Running
    with serve(build(routes, events), http=http, lifespan="on") as running:
        yield Platform(running.url, routes, events)


def token_from(plugin: PluginServer) -> str:
    [token] = header_values(plugin.app.seen[-1], "x-mint-internal-token")
    return token


def test_routed_prefix_goes_to_the_plugin_with_the_mount_path_kept(platform: Platform, plugin: PluginServer) -> None:
    response = get(platform.url + "/api/peak/x?run=1")
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/api/peak/x"
    assert response.json()["query_string"] == "run=1"
    assert len(plugin.app.seen) == 1


def test_platform_api_routes_reach_the_platform_untouched(platform: Platform, plugin: PluginServer) -> None:
    response = get(platform.url + "/api/experiments")
    assert response.status_code == 200
    assert response.json() == {"experiments": ["exp-1", "exp-2"]}
    assert "x-request-id" not in response.headers  # the proxy did not handle it
    assert plugin.app.seen == []


def test_unrouted_request_reaches_the_platform_with_its_headers_as_sent(platform: Platform) -> None:
    """The proxy neither strips nor adds headers on requests it does not route."""
    sent = {"X-Request-Id": "not valid!", TOKEN_HEADER: "client-value", "X-Forwarded-For": "6.6.6.6"}
    response = get(platform.url + "/api/echo", headers=sent)
    received = {name: value for name, value in response.json()["headers"]}
    assert response.json()["raw_path"] == "/api/echo"
    assert received["x-request-id"] == "not valid!"
    assert received["x-mint-internal-token"] == "client-value"
    assert received["x-forwarded-for"] == "6.6.6.6"
    assert "via" not in received


def test_platform_routes_outside_the_mount_path_reach_the_platform(platform: Platform, plugin: PluginServer) -> None:
    response = get(platform.url + "/health")
    assert response.json() == {"status": "ok"}
    assert get(platform.url + "/peak/x").status_code == 404  # /peak is a route only under /api
    assert plugin.app.seen == []


def test_prefix_lookalike_is_the_platforms_own_404(platform: Platform, plugin: PluginServer) -> None:
    response = get(platform.url + "/api/peakX")
    assert response.status_code == 404
    assert "x-request-id" not in response.headers
    assert response.content in (b'{"detail":"Not Found"}', b"Not Found")  # FastAPI's or Starlette's, not the proxy's
    assert plugin.app.seen == []


def test_added_route_takes_effect_on_the_next_request(
    platform: Platform, plugin: PluginServer, plugin2: PluginServer
) -> None:
    assert get(platform.url + "/api/lcms/x").status_code == 404
    platform.routes.set("/lcms", plugin2.url)
    response = get(platform.url + "/api/lcms/x")
    assert response.status_code == 200
    assert [r["raw_path"] for r in plugin2.app.seen] == ["/api/lcms/x"]


def test_changed_route_takes_effect_on_the_next_request(
    platform: Platform, plugin: PluginServer, plugin2: PluginServer
) -> None:
    get(platform.url + "/api/peak/first")
    platform.routes.set("/peak", plugin2.url)
    get(platform.url + "/api/peak/second")
    assert [r["raw_path"] for r in plugin.app.seen] == ["/api/peak/first"]
    assert [r["raw_path"] for r in plugin2.app.seen] == ["/api/peak/second"]


def test_removed_route_falls_through_to_the_platform(platform: Platform, plugin: PluginServer) -> None:
    assert get(platform.url + "/api/peak/x").status_code == 200
    platform.routes.remove("/peak")
    response = get(platform.url + "/api/peak/x")
    assert response.status_code == 404
    assert "x-request-id" not in response.headers
    assert len(plugin.app.seen) == 1


def test_plugin_calls_back_to_the_internal_api_with_its_token(platform: Platform, plugin: PluginServer) -> None:
    get(platform.url + "/api/peak/x")
    response = get(platform.url + "/api/internal/whoami", headers={TOKEN_HEADER: token_from(plugin)})
    assert response.status_code == 200
    assert response.json() == {"plugin": "peak"}


def test_internal_api_without_a_token_is_401(platform: Platform) -> None:
    response = get(platform.url + "/api/internal/whoami")
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith(TOKEN_HEADER)


def test_internal_api_with_a_bad_token_is_401(platform: Platform, plugin: PluginServer) -> None:
    get(platform.url + "/api/peak/x")
    tampered = token_from(plugin)[:-4] + "AAAA"
    response = get(platform.url + "/api/internal/whoami", headers={TOKEN_HEADER: tampered})
    assert response.status_code == 401


def test_fastapi_internal_api_refusal_is_json(http: str, plugin: PluginServer) -> None:
    with serve(build_fastapi(RouteTable({"/peak": plugin.url}), []), http=http) as running:
        response = get(running.url + "/api/internal/whoami")
    assert response.status_code == 401
    assert response.json() == {"detail": f"missing {TOKEN_HEADER} header"}


@pytest.mark.parametrize("build", [build_fastapi, build_starlette], ids=["fastapi", "starlette"])
def test_lifespan_runs_with_the_middleware_installed(
    http: str, plugin: PluginServer, build: Callable[[RouteTable, list[str]], Starlette]
) -> None:
    """The platform's own lifespan runs through the middleware: startup while it serves, shutdown once stopped."""
    events: list[str] = []
    with serve(build(RouteTable({"/peak": plugin.url}), events), http=http, lifespan="on"):
        assert events == ["startup"]
    assert events == ["startup", "shutdown"]


def test_streamed_response_passes_through_the_platform(platform: Platform, plugin: PluginServer) -> None:
    with httpx.stream("GET", platform.url + "/api/peak/stream?chunks=5&size=1000", timeout=10) as response:
        body = b"".join(response.iter_bytes())
    assert response.status_code == 200
    assert body == b"x" * 5000


def test_websocket_under_the_mount_path_goes_to_the_plugin(platform: Platform, plugin: PluginServer) -> None:
    with ws_connect(
        "ws://" + platform.url.removeprefix("http://") + "/api/peak/feed", proxy=None, open_timeout=10
    ) as ws:
        ws.send("hi")
        assert ws.recv(timeout=10) == "echo:hi"
    assert plugin.app.seen[0]["raw_path"] == "/api/peak/feed"
