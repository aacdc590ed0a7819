"""The demo plugins (``mint_proxy._demo``) in-process: what each answers, and how it reports the token it got.

``tests/test_cli.py`` runs ``mint-proxy demo`` as a whole (supervisor, processes, proxy);
here each plugin app is called directly, so the edge cases need no processes.
"""

import asyncio
from collections.abc import AsyncIterator, MutableMapping
from typing import Any

import httpx
import pytest

from mint_proxy._demo import DEMO_SECRET_ENV, PLUGINS, demo_config, lcms_sequence, lcms_sequence_app, peak_picking_app
from mint_proxy.devconfig import load_dev_config
from mint_proxy.tokens import TokenIssuer

from .utils import SECRET

OTHER_SECRET = "another-secret-0123456789abcdef-0123456789"


def call(app: Any, method: str, path: str, **kwargs: Any) -> httpx.Response:
    async def request() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://demo") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(request())


def signed(plugin: str) -> dict[str, str]:
    return {"X-Mint-Internal-Token": TokenIssuer(SECRET).token_for(plugin), "X-Request-Id": "demo-1"}


@pytest.mark.parametrize(
    ("query", "count"),
    [
        pytest.param("?n=3", 3, id="asked"),
        pytest.param("", 5, id="default"),
        pytest.param("?n=many", 5, id="not-a-number"),
        pytest.param("?n=100000", 100, id="capped"),
    ],
)
def test_peaks_returns_n_peaks_capped_at_100(query: str, count: int) -> None:
    body = call(peak_picking_app(SECRET), "GET", "/api/peak-picking/peaks" + query).json()
    assert len(body["peaks"]) == count
    assert body["peaks"][0] == {"mz": 100.0, "intensity": 1000 * count}


def test_a_genuine_token_shows_its_plugin_and_the_request_id() -> None:
    body = call(peak_picking_app(SECRET), "GET", "/api/peak-picking/peaks", headers=signed("peak-picking")).json()
    assert (body["token_plugin"], body["request_id"]) == ("peak-picking", "demo-1")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="missing"),
        pytest.param({"X-Mint-Internal-Token": TokenIssuer(OTHER_SECRET).token_for("lcms-sequence")}, id="forged"),
    ],
)
def test_a_missing_or_forged_token_is_reported_not_trusted(headers: dict[str, str]) -> None:
    body = call(lcms_sequence_app(SECRET), "GET", "/api/lcms-sequence/status", headers=headers).json()
    assert body["token_plugin"].startswith("invalid token: ")
    assert body["request_id"] == ""


def test_run_counts_the_bytes_and_chunks_of_a_streamed_body() -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b"a" * 10
        yield b"b" * 5

    body = call(peak_picking_app(SECRET), "POST", "/api/peak-picking/run", content=chunks()).json()
    assert (body["received_bytes"], body["chunks"]) == (15, 2)


def test_the_websocket_echoes_text_as_text_and_bytes_as_bytes() -> None:
    incoming: list[MutableMapping[str, Any]] = [
        {"type": "websocket.connect"},
        {"type": "websocket.receive", "text": "hello"},
        {"type": "websocket.receive", "bytes": b"\x00\x01"},
        {"type": "websocket.disconnect", "code": 1000},
    ]
    sent: list[MutableMapping[str, Any]] = []

    async def receive() -> MutableMapping[str, Any]:
        return incoming.pop(0)

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "websocket", "path": "/api/lcms-sequence/ws", "headers": [], "query_string": b""}
    asyncio.run(lcms_sequence_app(SECRET)(scope, receive, send))
    assert sent == [
        {"type": "websocket.accept", "subprotocol": None, "headers": []},
        {"type": "websocket.send", "text": "hello"},
        {"type": "websocket.send", "bytes": b"\x00\x01"},
    ]


def test_the_plugin_objects_take_the_secret_from_their_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """``app = "mint_proxy._demo:lcms_sequence"`` builds its app on first use, with ``MINT_DEMO_SECRET``."""
    monkeypatch.setenv(DEMO_SECRET_ENV, SECRET)
    monkeypatch.setattr(lcms_sequence, "_app", None)
    body = call(lcms_sequence, "GET", "/api/lcms-sequence/status", headers=signed("lcms-sequence")).json()
    assert body["token_plugin"] == "lcms-sequence"


def test_the_demo_config_is_a_valid_config_of_both_plugins(tmp_path_factory: pytest.TempPathFactory) -> None:
    directory = tmp_path_factory.mktemp("demo")
    path = directory / "config.dev.toml"
    path.write_text(demo_config(SECRET, str(directory / "rt")), encoding="utf-8")
    config = load_dev_config(str(path))
    assert config.mount_path == "/api"
    assert [plugin.slug for plugin in config.plugins] == list(PLUGINS)
    assert all(plugin.env == {DEMO_SECRET_ENV: SECRET} for plugin in config.plugins)
