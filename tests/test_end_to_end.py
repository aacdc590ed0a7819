"""End to end: install two plugins whose dependencies clash, then one platform serves both.

Two small real wheels are built here. The platform (a throwaway venv from the local
wheelhouse) pins ``fakenum<2``: ``e2e-fits`` needs ``fakenum<2`` and is decided shared,
``e2e-next`` needs ``fakenum>=2`` and is decided isolated. The real install flow runs
offline (``install`` from Python, then ``mint-proxy install`` from the CLI) and writes one
spec file. ``DevProxyApp`` reads that file under real uvicorn on 127.0.0.1: a FastAPI
platform with ``/api/internal/whoami`` behind ``InternalTokenAuth``, the proxy at
``/api``, the shared plugin mounted in-process (imported from the platform venv it was
installed into) and the isolated one run from its own venv's python by the supervisor.
"""

import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated

import httpx
import pytest
from fastapi import Depends, FastAPI, Request

import mint_plugin.client
from mint_proxy import DevProxyApp, InternalTokenAuth
from mint_proxy.cli import main
from mint_proxy.devconfig import load_dev_config
from mint_proxy.isolation import install, plan
from mint_proxy.plugins import PluginState
from mint_proxy.plugins.spec import SharedPlugin

from .isolation_support import PLUGIN_APP, PlatformVenv, Wheelhouse, _make_platform
from .supervised import DEADLINE
from .utils import SECRET, free_port, serve
from .wheels import make_wheel

SHARED = "e2e-fits"
ISOLATED = "e2e-next"


def _wheel(directory: Path, slug: str, requirement: str) -> Path:
    module = slug.replace("-", "_")
    return make_wheel(
        directory, slug, "1.0", [requirement, "httpx"],
        plugin=(slug, f"{module}:app"), modules={f"{module}.py": PLUGIN_APP},
    )  # fmt: skip


def _site_packages(python: Path) -> Path:
    """The platform venv's site-packages, where a shared plugin was installed."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    return python.parent.parent / "lib" / version / "site-packages"


def _platform(calls: list[tuple[str, str]]) -> FastAPI:
    """The platform: its internal surface verifies the plugin's token and logs the request id."""
    platform = FastAPI()
    auth = InternalTokenAuth(SECRET)

    @platform.get("/api/internal/whoami")
    async def whoami(request: Request, plugin: Annotated[str, Depends(auth)]) -> dict[str, str]:
        request_id = request.headers.get("x-request-id", "")
        calls.append((plugin, request_id))
        return {"plugin": plugin, "request_id": request_id}

    return platform


def _state(runtime_dir: str, slug: str) -> tuple[PluginState, int | None]:
    try:
        with open(os.path.join(runtime_dir, "state.json"), "rb") as file:
            status = json.load(file)["plugins"][slug]
    except (OSError, ValueError, KeyError):
        return PluginState.STARTING, None
    return PluginState(status["state"]), status["pid"]


def check_plugin(url: str, slug: str, calls: list[tuple[str, str]]) -> None:
    """The one plugin test, whatever the mode: the plugin calls back with its own verified
    slug, and the client, the plugin and the platform's log all see one request id."""
    response = httpx.get(f"{url}/api/{slug}/whoami", headers={"X-Request-Id": f"e2e-{slug}.1"}, timeout=DEADLINE)
    assert response.status_code == 200, response.text
    assert response.json() == {"plugin": slug, "request_id": f"e2e-{slug}.1", "seen_request_id": f"e2e-{slug}.1"}
    assert response.headers["x-request-id"] == f"e2e-{slug}.1"
    assert (slug, f"e2e-{slug}.1") in calls
    minted = httpx.get(f"{url}/api/{slug}/whoami", timeout=DEADLINE)  # no id from the client: one is made
    request_id = minted.headers["x-request-id"]
    assert len(request_id) == 32
    assert minted.json() == {"plugin": slug, "request_id": request_id, "seen_request_id": request_id}
    assert calls[-1] == (slug, request_id)


@pytest.fixture(scope="module")
def spec_file(
    tmp_path_factory: pytest.TempPathFactory, wheelhouse: Wheelhouse, uv_cache: Path
) -> tuple[Path, PlatformVenv]:
    """Both plugins installed by the real flow into one spec file (mount_path /api), once for the module."""
    tmp_path = tmp_path_factory.mktemp("e2e")
    fresh_platform = _make_platform(tmp_path / "platform", wheelhouse)
    dist = tmp_path / "dist"
    fits, nxt = _wheel(dist, SHARED, "fakenum<2"), _wheel(dist, ISOLATED, "fakenum>=2")
    options = {"python": fresh_platform.python, "find_links": [wheelhouse.path]}
    decisions = plan([fits, nxt], **options)  # type: ignore[arg-type]
    assert [(d.plugin, d.mode) for d in decisions] == [(SHARED, "shared"), (ISOLATED, "isolated")]
    assert any("fakenum" in clash for clash in decisions[1].clashes)
    config = tmp_path / "plugins.toml"
    config.write_text('[settings]\nmount_path = "/api"\n')
    home = tmp_path / "home"
    home.mkdir()
    (home / "uv-cache").symlink_to(uv_cache)  # the session's cache: wheels are unpacked once per run
    (installed,) = install([fits], config=config, home=home, **options)  # type: ignore[arg-type]
    assert installed.decision.mode == "shared"
    common = ["--config", str(config), "--home", str(home), "--python", str(fresh_platform.python)]
    assert main(["install", str(nxt), *common, "--find-links", str(wheelhouse.path)]) == 0
    return config, fresh_platform


@pytest.fixture
def platform_url(
    spec_file: tuple[Path, PlatformVenv], monkeypatch: pytest.MonkeyPatch
) -> Iterator[tuple[str, DevProxyApp, list[tuple[str, str]]]]:
    """One platform under uvicorn, built from the spec file ``install`` wrote."""
    config, platform_venv = spec_file
    loaded = load_dev_config(config)
    assert loaded.shared == (SharedPlugin(SHARED, "e2e_fits:app"),)
    (spec,) = loaded.plugins
    assert spec.slug == ISOLATED and spec.python is not None and Path(spec.python).parent.parent.parent.name == "venvs"
    monkeypatch.syspath_prepend(str(_site_packages(platform_venv.python)))  # where install put the shared plugin
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    environ = {"MINT_PROXY_CONFIG": str(config), "MINT_INTERNAL_TOKEN_SECRET": SECRET, "MINT_PLATFORM_URL": url}
    calls: list[tuple[str, str]] = []
    app = DevProxyApp(environ=environ, platform=_platform(calls))
    try:
        with serve(app, port=port, lifespan="on"):
            yield url, app, calls
    finally:
        mint_plugin.client.serve_in_process(None)
        sys.modules.pop("e2e_fits", None)


def test_shared_and_isolated_plugins_under_one_platform(
    platform_url: tuple[str, DevProxyApp, list[tuple[str, str]]],
) -> None:
    """Both plugins answer at /api/<slug>/..., call back with their own verified slug, share the
    request id with the platform; the isolated one is SIGKILLed, restarted by the supervisor,
    and its URL works again."""
    url, app, calls = platform_url
    assert app.config is not None
    runtime_dir = app.config.runtime_dir
    for slug in (SHARED, ISOLATED):
        check_plugin(url, slug, calls)

    state, pid = _state(runtime_dir, ISOLATED)
    assert state is PluginState.READY and pid is not None
    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + DEADLINE
    while _state(runtime_dir, ISOLATED)[1] in (pid, None) or _state(runtime_dir, ISOLATED)[0] is not PluginState.READY:
        assert time.monotonic() < deadline, f"not restarted: {_state(runtime_dir, ISOLATED)}"
        time.sleep(0.02)  # polling the state file the supervisor rewrites on every change
    check_plugin(url, ISOLATED, calls)
    check_plugin(url, SHARED, calls)  # the shared plugin and the platform never noticed


def _readme_block(first_line: str) -> str:
    """The README's python code block that starts with ``first_line``."""
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    for block in readme.split("```python\n")[1:]:
        if block.startswith(first_line):
            return block.split("```", 1)[0]
    raise AssertionError(f"README.md has no python block starting with {first_line!r}")


def test_the_readme_platform_serves_both_plugins(
    spec_file: tuple[Path, PlatformVenv], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The README's lab.py, run as written against the spec file install wrote: the shared and
    the isolated plugin answer under /api and call back with their own verified slug."""
    config, platform_venv = spec_file
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    for name, value in {"MINT_PROXY_CONFIG": str(config), "MINT_INTERNAL_TOKEN_SECRET": SECRET}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("MINT_PLATFORM_URL", url)
    monkeypatch.syspath_prepend(str(_site_packages(platform_venv.python)))
    namespace: dict[str, object] = {"__name__": "lab"}
    exec(compile(_readme_block("# lab.py"), "README.md (lab.py)", "exec"), namespace)
    try:
        with serve(namespace["app"], port=port, lifespan="on"):
            for slug in (SHARED, ISOLATED):
                response = httpx.get(f"{url}/api/{slug}/whoami", headers={"X-Request-Id": "readme.1"}, timeout=DEADLINE)
                assert response.json() == {"plugin": slug, "request_id": "readme.1", "seen_request_id": "readme.1"}
    finally:
        mint_plugin.client.serve_in_process(None)
        sys.modules.pop("e2e_fits", None)
