"""Session fixtures for the isolation tests: one wheelhouse and one throwaway platform venv.

The wheelhouse holds small hand-written wheels plus uvicorn, httpx and their
dependencies repacked from the test runner (so plugin venvs build with no network).
The platform venv is made with the current interpreter and holds only what a test
platform needs; the test runner's own environment is never touched.
"""

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import uv

from .wheels import make_wheel, repack

RUNTIME_DISTS = (
    "uvicorn",
    "click",
    "h11",
    "httpx",
    "httpcore",
    "anyio",
    "idna",
    "certifi",
    "sniffio",
    "typing_extensions",
)

# A plugin whose ``.../whoami`` answers what the platform's /api/internal/whoami said about its
# callback, plus the request id the plugin itself saw; any other path is a 404 (the readiness
# probe's GET / must not need the platform, which is not serving yet while plugins start).
PLUGIN_APP = """
import json

from mint_plugin import current_request
from mint_plugin.client import PlatformClient


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            done = "lifespan.startup.complete" if message["type"] == "lifespan.startup" else None
            await send({"type": done or "lifespan.shutdown.complete"})
            if done is None:
                return
    status, body = 404, {"error": "not_found"}
    if scope["path"].endswith("/whoami"):
        async with PlatformClient() as platform:
            answer = await platform.get("whoami")
        status, body = answer.status_code, answer.json()
        body["seen_request_id"] = current_request.get().request_id
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": json.dumps(body).encode()})
"""


@dataclass(frozen=True)
class Wheelhouse:
    path: Path

    def wheel(self, name: str) -> Path:
        (found,) = self.path.glob(f"{name.replace('-', '_')}-*.whl")
        return found


@dataclass(frozen=True)
class PlatformVenv:
    python: Path


def _uv(*args: str) -> None:
    subprocess.run([uv.find_uv_bin(), *args], check=True, capture_output=True, env=_env())


def _env() -> dict[str, str]:
    import os

    env = dict(os.environ)
    env.pop("VIRTUAL_ENV", None)
    env["UV_PYTHON_DOWNLOADS"] = "never"
    return env


@pytest.fixture(scope="session")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Wheelhouse:
    house = tmp_path_factory.mktemp("wheelhouse")
    # what the platform runs
    make_wheel(house, "fakenum", "1.26.4")
    make_wheel(house, "fakenum", "2.1.0")
    make_wheel(house, "mint-platform", "1.0", ["fakenum<2", "prerel>=1", "localv"])
    make_wheel(house, "prerel", "2.0.0rc1")
    make_wheel(house, "localv", "1.0+cu121")
    # dependencies plugins may pull in
    make_wheel(house, "fakesci", "1.10.0", ["fakenum<2"])
    make_wheel(house, "fakesci", "1.15.0", ["fakenum>=2"])
    make_wheel(house, "newdep", "1.0")
    make_wheel(house, "newdep", "2.0")
    for dist in RUNTIME_DISTS:
        repack(house, dist)
    return Wheelhouse(house)


@pytest.fixture(scope="session")
def uv_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One uv cache for the session, on the same filesystem as the tests' venvs."""
    return tmp_path_factory.mktemp("uv-cache")


@pytest.fixture(scope="session")
def platform_venv(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Wheelhouse) -> PlatformVenv:
    """A read-only platform for the decision tests: tests that install get their own copy."""
    return _make_platform(tmp_path_factory.mktemp("platform") / "venv", wheelhouse)


def _make_platform(path: Path, wheelhouse: Wheelhouse) -> PlatformVenv:
    _uv("venv", "--quiet", "--python", sys.executable, str(path))
    python = path / "bin" / "python"
    _uv("pip", "install", "--quiet", "--python", str(python), "--no-index", "--find-links", str(wheelhouse.path),
        "mint-platform", "prerel==2.0.0rc1")  # fmt: skip
    return PlatformVenv(python)


@pytest.fixture
def fresh_platform(tmp_path: Path, wheelhouse: Wheelhouse) -> PlatformVenv:
    """A platform venv of this test's own, for tests that install into it."""
    return _make_platform(tmp_path / "platform", wheelhouse)
