"""One plugin, one test file, both modes: the plugin calls the platform through the client.

The plugin (``echo_plugin``, a real wheel) answers with what the platform's
``/api/internal/whoami`` said about the call: which plugin the verified internal token
names, and the request id the call carried. Shared: the plugin is mounted in-process
and the client goes through httpx's ASGI transport. Isolated: the plugin runs in its
own provisioned venv, served by the real plugin host (``mint_plugin/host.py``) that the
real ``PluginSupervisor`` starts on a Unix socket behind ProxyMiddleware, and the client
calls back over HTTP to the ``MINT_PLATFORM_URL`` the supervisor gives it. The platform checks the token
with ``InternalTokenAuth`` in both.
"""

import contextlib
import importlib.util
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

import mint_plugin.client
from mint_proxy import InternalTokenAuth, ProxyMiddleware, TokenIssuer
from mint_proxy.isolation import SharedPlugin, SharedPluginsMiddleware, provision
from mint_proxy.isolation._uv import Sources, Uv
from mint_proxy.isolation.platform import inspect_platform
from mint_proxy.isolation.wheels import read_wheel
from mint_proxy.plugins import PluginSpec, PluginState, PluginSupervisor

from .isolation_support import PLUGIN_APP, Wheelhouse
from .supervised import DEADLINE, SupervisedApp, short_tempdir
from .utils import SECRET, free_port, serve
from .wheels import make_wheel

SLUG = "echo-plugin"


def _platform_app() -> FastAPI:
    platform = FastAPI()
    auth = InternalTokenAuth(SECRET)

    @platform.get("/api/internal/whoami")
    async def whoami(request: Request, plugin: Annotated[str, Depends(auth)]) -> dict[str, str]:
        return {"plugin": plugin, "request_id": request.headers.get("x-request-id", "")}

    return platform


@pytest.fixture(scope="module")
def echo_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_wheel(
        tmp_path_factory.mktemp("echo"), SLUG, "1.0", ["httpx"],
        plugin=(SLUG, "echo_plugin:app"), modules={"echo_plugin.py": PLUGIN_APP},
    )  # fmt: skip


@pytest.fixture(scope="module")
def echo_python(
    echo_wheel: Path, wheelhouse: Wheelhouse, uv_cache: Path, tmp_path_factory: pytest.TempPathFactory
) -> Path:
    """The echo plugin's isolated venv, provisioned once for the module."""
    home = tmp_path_factory.mktemp("echo-home")
    uv = Uv(cache_dir=uv_cache, sources=Sources((wheelhouse.path,)))
    return provision(read_wheel(echo_wheel), inspect_platform(), venvs_dir=home / "venvs", uv=uv).python


@contextlib.contextmanager
def _isolated(python: Path) -> Iterator[str]:
    """The platform behind the proxy, the echo plugin run from its venv by the real host and supervisor."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with short_tempdir() as runtime_dir:
        spec = PluginSpec(SLUG, app="echo_plugin:app", python=str(python), startup_timeout=DEADLINE)
        supervisor = PluginSupervisor([spec], runtime_dir=runtime_dir, platform_url=url)
        proxy = ProxyMiddleware(
            _platform_app(),
            routes={f"/{SLUG}": f"unix:{spec.socket_path(runtime_dir)}"},
            tokens=TokenIssuer(SECRET),
            mount_path="/api",
        )
        with serve(SupervisedApp(proxy, supervisor), port=port, lifespan="on"):
            assert supervisor.status()[SLUG].state is PluginState.READY
            yield url


@contextlib.contextmanager
def _shared(echo_wheel: Path, tmp_path: Path) -> Iterator[str]:
    # In shared mode the wheel is installed into the platform; here its module is loaded from the wheel's source.
    source = tmp_path / "echo_plugin.py"
    source.write_text(PLUGIN_APP)
    spec = importlib.util.spec_from_file_location("echo_plugin_shared", source)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    app = SharedPluginsMiddleware(
        _platform_app(), plugins=[SharedPlugin(SLUG, module.app)], tokens=TokenIssuer(SECRET), mount_path="/api"
    )
    try:
        with serve(app) as platform:
            yield platform.url
    finally:
        mint_plugin.client.serve_in_process(None)


@pytest.fixture(params=["shared", "isolated"])
def plugin_url(request: pytest.FixtureRequest, echo_wheel: Path, tmp_path: Path) -> Iterator[str]:
    """The platform's URL with the echo plugin behind it, in each mode."""
    if request.param == "isolated":
        python: Path = request.getfixturevalue("echo_python")
        with _isolated(python) as url:
            yield url
    else:
        with _shared(echo_wheel, tmp_path) as url:
            yield url


def _get(url: str, **options: Any) -> httpx.Response:
    return httpx.get(f"{url}/api/{SLUG}/whoami", timeout=30, **options)


def test_plugin_calls_the_platform_with_its_own_token(plugin_url: str) -> None:
    """The platform's InternalTokenAuth sees the calling plugin's slug."""
    response = _get(plugin_url)
    assert response.status_code == 200, response.text
    assert response.json()["plugin"] == SLUG


def test_the_client_request_id_reaches_the_platform_callback(plugin_url: str) -> None:
    """The request id the client sent is the one the plugin sees, its callback carries, and the one returned."""
    response = _get(plugin_url, headers={"X-Request-Id": "trace-42.a"})
    assert response.json()["seen_request_id"] == "trace-42.a"
    assert response.json()["request_id"] == "trace-42.a"
    assert response.headers["x-request-id"] == "trace-42.a"


def test_a_new_request_id_when_the_client_sends_none(plugin_url: str) -> None:
    """Without a client id, the id minted for the request is the one the callback carries."""
    response = _get(plugin_url)
    assert len(response.json()["request_id"]) == 32
    assert response.headers["x-request-id"] == response.json()["request_id"]


def test_a_forged_token_header_never_reaches_the_plugin(plugin_url: str) -> None:
    """A client's own X-Mint-Internal-Token is replaced by the plugin's real one."""
    response = _get(plugin_url, headers={"X-Mint-Internal-Token": "forged"})
    assert response.status_code == 200
    assert response.json()["plugin"] == SLUG
