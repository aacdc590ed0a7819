"""The spec file's ``[shared."/prefix"]`` plugins, mounted in-process by ``DevProxyApp`` in front of the platform.

The same file also lists supervised ``[proxy]`` plugins elsewhere; here only the shared
side runs (no subprocess), under real uvicorn.
"""

import logging
from pathlib import Path
from typing import Any

import httpx
import pytest

import mint_plugin.client
from mint_plugin import current_request
from mint_proxy import DevProxyApp, verify_internal_token
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV
from mint_proxy.errors import MintProxyError
from mint_proxy.isolation import SharedPluginImportError

from .utils import SECRET, serve

LIFESPAN: list[str] = []  # what NOTES's lifespan saw


async def NOTES(scope: Any, receive: Any, send: Any) -> None:
    """A shared plugin: echoes what it was handed, as JSON."""
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            LIFESPAN.append(message["type"])
            done = message["type"] == "lifespan.shutdown"
            await send({"type": "lifespan.shutdown.complete" if done else "lifespan.startup.complete"})
            if done:
                return
    headers = dict(scope["headers"])
    context = current_request.get()
    body = {
        "path": scope["path"],
        "root_path": scope.get("root_path", ""),
        "token": headers.get(b"x-mint-internal-token", b"").decode(),
        "request_id": context.request_id if context else None,
    }
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": httpx.Response(200, json=body).content})


async def PLATFORM(scope: Any, receive: Any, send: Any) -> None:
    """The platform: answers every path it gets with 200 ``platform``."""
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"platform"})


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "plugins.toml"
    path.write_text(
        '[settings]\nmount_path = "/api"\n\n'
        '[shared."/notes"]\napp = "tests.test_shared_plugins:NOTES"\n\n'
        '[shared."/plain"]\napp = "tests.test_shared_plugins:NOTES"\nplugin = "plain-notes"\nstrip_prefix = true\n'
    )
    return path


@pytest.fixture(autouse=True)
def _forget_the_platform() -> Any:
    yield
    mint_plugin.client.serve_in_process(None)


def test_shared_plugins_are_mounted_in_front_of_the_platform(config: Path) -> None:
    """Each [shared] plugin answers under mount_path + prefix with its own token and a request id,
    its lifespan runs with the platform's (even a platform that does not speak lifespan), and
    every other path reaches the platform."""
    LIFESPAN.clear()
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET}, platform=PLATFORM)
    with serve(app, lifespan="on") as running:
        notes = httpx.get(f"{running.url}/api/notes/7", headers={"X-Request-Id": "rid-1"}, timeout=10)
        plain = httpx.get(f"{running.url}/api/plain/7", timeout=10)
        other = httpx.get(f"{running.url}/api/elsewhere", timeout=10)
    assert notes.status_code == 200, notes.text
    body = notes.json()
    assert body["path"] == "/api/notes/7" and body["request_id"] == "rid-1"
    assert verify_internal_token(body["token"], SECRET, plugin="notes").plugin == "notes"
    assert notes.headers["x-request-id"] == "rid-1"
    assert plain.json()["root_path"] == "/api/plain"  # strip_prefix from the file
    assert verify_internal_token(plain.json()["token"], SECRET).plugin == "plain-notes"
    assert other.text == "platform"
    # both tables name NOTES; PLATFORM does not speak lifespan, the plugins' lifespans run anyway
    assert LIFESPAN == ["lifespan.startup"] * 2 + ["lifespan.shutdown"] * 2


def test_without_a_platform_shared_plugins_are_not_mounted_and_a_warning_says_so(
    config: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Shared plugins live inside the platform: with none (``mint-proxy supervise``) they are left alone."""
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    with caplog.at_level(logging.WARNING, logger="mint_proxy"):
        proxy = app.setup()
    assert proxy.app is None
    assert "[shared] plugins (notes, plain-notes) run inside the platform and are not mounted" in caplog.text


@pytest.mark.parametrize("target", ["no_such_module_here:app", "tests.test_shared_plugins:MISSING"])
def test_a_shared_app_that_cannot_be_imported_fails_startup_naming_it(tmp_path: Path, target: str) -> None:
    """The dev app's setup refuses a [shared] app that names nothing, naming the plugin and the string."""
    path = tmp_path / "plugins.toml"
    path.write_text(f'[shared."/broken"]\napp = "{target}"\n')
    app = DevProxyApp(environ={CONFIG_ENV: str(path), SECRET_ENV: SECRET}, platform=PLATFORM)
    with pytest.raises(SharedPluginImportError, match=f"shared plugin 'broken': cannot import '{target}'") as caught:
        app.setup()
    assert isinstance(caught.value, MintProxyError)
