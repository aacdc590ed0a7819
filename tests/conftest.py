import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer

from .attack_rig import Rig, StartSite, open_rig, site_starter
from .backends import Plugin
from .utils import SECRET, RawBackend, Running, Server, serve

# The isolation tests' session fixtures: one wheelhouse, one throwaway platform venv.
pytest_plugins = ["tests.isolation_support"]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def clean_environ() -> Iterator[None]:
    """Tests pass configuration explicitly; no MINT_* variable leaks in or out."""
    saved = dict(os.environ)
    for name in list(os.environ):
        if name.startswith("MINT_"):
            del os.environ[name]
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def private_runtime_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Each test's default runtime dir (lock, state, generated secret) is its own, never the user's.

    The per-user default sits under the temp dir: point ``tempfile`` (and ``TMPDIR`` for
    child processes) at a short fresh directory, short enough for Unix socket paths.
    """
    tmp_path_factory.getbasetemp()  # pytest's own base dir stays where it was
    directory = tempfile.mkdtemp(prefix="mp-", dir="/tmp")
    saved = tempfile.tempdir
    tempfile.tempdir = directory
    os.environ["TMPDIR"] = directory
    os.environ.pop("XDG_RUNTIME_DIR", None)
    yield directory
    tempfile.tempdir = saved
    shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture(scope="module", params=["h11", "httptools"])
def http(request: pytest.FixtureRequest) -> str:
    """The proxy's uvicorn HTTP parser: the two accept different malformed input.

    Module-scoped, so that a module's tests run parser by parser and share one ``shared_rig`` each.
    """
    param: str = request.param
    return param


@dataclass
class PluginServer:
    app: Plugin
    url: str
    port: int
    server: Server


@pytest.fixture
def plugin() -> Iterator[PluginServer]:
    app = Plugin()
    with serve(app) as running:
        yield PluginServer(app, running.url, running.port, running.server)


@pytest.fixture
def plugin2() -> Iterator[PluginServer]:
    app = Plugin()
    with serve(app) as running:
        yield PluginServer(app, running.url, running.port, running.server)


@dataclass
class ProxyServer:
    url: str
    port: int
    middleware: ProxyMiddleware
    routes: RouteTable
    server: Server


StartProxy = Callable[..., ProxyServer]


@pytest.fixture
def start_proxy(http: str) -> Iterator[StartProxy]:
    """Start ``ProxyMiddleware`` under a real uvicorn (both parsers, via ``http``)."""
    with contextlib.ExitStack() as stack:

        def start(routes: Any, *, app: Any = None, trust_forwarded: bool = False, **options: Any) -> ProxyServer:
            options.setdefault("tokens", TokenIssuer(SECRET))
            options.setdefault("retry_window", 0.2)
            table = routes if isinstance(routes, RouteTable) else RouteTable(routes)
            middleware = ProxyMiddleware(app, routes=table, **options)
            # uvicorn trusts X-Forwarded-* from 127.0.0.1 by default; tests say when they want that.
            running: Running = stack.enter_context(
                serve(middleware, http=http, proxy_headers=trust_forwarded, lifespan="auto")
            )
            return ProxyServer(running.url, running.port, middleware, table, running.server)

        yield start


@pytest.fixture(scope="module")
def shared_rig(http: str) -> Iterator[Rig]:
    """The attack rig (tests/attack_rig.py), one per parser and module."""
    with open_rig(http) as rig:
        yield rig


@pytest.fixture
def rig(shared_rig: Rig) -> Rig:
    """The module's attack rig, with its records cleared."""
    shared_rig.reset()
    return shared_rig


@pytest.fixture(params=["standalone", "mounted"])
def start_site(request: pytest.FixtureRequest, http: str) -> Iterator[StartSite]:
    """Start the proxy alone, or mounted on ``/api`` in a FastAPI platform (tests/attack_rig.py)."""
    with site_starter(request.param, http) as start:
        yield start


@pytest.fixture
def ok_backend() -> Iterator[RawBackend]:
    """A plugin that answers 200 "ok" to anything; ``connections`` counts what reached it."""
    with RawBackend(lambda head, index: b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok") as running:
        yield running


@pytest.fixture(autouse=True)
def restore_mint_proxy_logger() -> Iterator[None]:
    """``DevProxyApp``'s lifespan gives the ``mint_proxy`` logger a stderr handler; undo it after each test."""
    logger = logging.getLogger("mint_proxy")
    handlers, propagate, level = logger.handlers[:], logger.propagate, logger.level
    yield
    logger.handlers[:] = handlers
    logger.propagate = propagate
    logger.setLevel(level)
