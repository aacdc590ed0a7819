"""The access log: one line per request, every client-supplied byte escaped, text and JSON formats.

The forging attacks run against real uvicorn servers under both parsers, with the proxy
alone (404 for unrouted paths) and mounted in a FastAPI platform on ``/api``.
"""

import io
import json
import logging
import re
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI
from websockets.sync.client import connect as ws_connect

from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer, enable_access_log
from mint_proxy._accesslog import ACCESS_LOGGER, JSONAccessFormatter, TextAccessFormatter, formatter_for
from mint_proxy._exchange import escape

from .conftest import PluginServer
from .utils import SECRET, RawBackend, Running, raw_request, serve, status_of

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
TRACEPARENT = f"00-{TRACE_ID}-00f067aa0ba902b7-01"


class Lines:
    """The formatted access lines, as a handler on ``mint_proxy.access`` wrote them."""

    def __init__(self, stream: io.StringIO) -> None:
        self.stream = stream

    def all(self) -> list[str]:
        return self.stream.getvalue().splitlines()

    def wait(self, count: int, deadline: float = 10.0) -> list[str]:
        end = time.monotonic() + deadline
        while len(self.all()) < count:
            if time.monotonic() > end:
                pytest.fail(f"expected {count} access lines, got {self.all()!r}")
            time.sleep(0.01)
        return self.all()


@pytest.fixture
def capture() -> Iterator[Callable[[str], Lines]]:
    logger = logging.getLogger(ACCESS_LOGGER)
    saved = logger.handlers[:], logger.level, logger.propagate
    handlers: list[logging.Handler] = []

    def start(format: str) -> Lines:
        stream = io.StringIO()
        handlers.append(enable_access_log(format=format, stream=stream))
        return Lines(stream)

    yield start
    logger.handlers[:], level, logger.propagate = saved
    logger.setLevel(level)


# -- escaping (unit) ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "logged"),
    [
        (b"/b/x", "/b/x"),
        (b"/b/x\r\nFORGED", "/b/x\\x0D\\x0AFORGED"),
        (b"/b/\x00\r", "/b/\\x00\\x0D"),
        (b"/b/\x1b[2J", "/b/\\x1B[2J"),
        (b'/b/"quoted"\\', "/b/\\x22quoted\\x22\\x5C"),
        ("/b/é".encode(), "/b/\\xC3\\xA9"),  # raw non-ASCII bytes
        (b"/b/\x7f", "/b/\\x7F"),
    ],
)
def test_escape_writes_unsafe_bytes_as_hex_escapes(raw: bytes, logged: str) -> None:
    assert escape(raw) == logged
    assert all(0x20 <= ord(c) < 0x7F for c in escape(raw))


def test_formatter_for_rejects_an_unknown_format() -> None:
    with pytest.raises(ValueError, match="'yaml' is not one of: text, json"):
        formatter_for("yaml")


# -- the forging repros, standalone and mounted, both parsers ----------------------------------------------

FORGING_PATHS = [
    b'/x%0d%0aFORGED%20"GET%20/b/admin"%20plugin=b%20status=200',
    b"/x%0aFORGED",
    b"/x%00%0dFORGED",
    b"/x%1b[2J",
]


def _platform() -> FastAPI:
    platform = FastAPI()

    @platform.get("/api/experiments")
    async def experiments() -> dict[str, str]:
        return {"ok": "yes"}

    return platform


@pytest.fixture(params=["standalone", "mounted"])
def forgeable(request: pytest.FixtureRequest, http: str, plugin: PluginServer) -> Iterator[tuple[Running, str]]:
    """A proxy (alone, or mounted on /api in FastAPI) routing ``/b`` to the test plugin; yields it and its mount."""
    mount = "" if request.param == "standalone" else "/api"
    routes = RouteTable({"/b": plugin.url})
    if mount:
        app: Any = _platform()
        app.add_middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer(SECRET), mount_path=mount)
    else:
        app = ProxyMiddleware(None, routes=routes, tokens=TokenIssuer(SECRET), retry_window=0.2)
    with serve(app, http=http, lifespan="on") as running:
        yield running, mount


@pytest.mark.parametrize("path", FORGING_PATHS)
@pytest.mark.parametrize("where", ["routed", "refused"])
def test_a_forged_path_cannot_add_a_log_line(
    forgeable: tuple[Running, str], capture: Callable[[str], Lines], path: bytes, where: str
) -> None:
    """A proxied path (200), a dot-segment refusal (400), and an unrouted one (404 standalone)
    each give exactly one line, with the CR/LF/NUL/ESC written as \\xHH."""
    running, mount = forgeable
    lines = capture("text")
    prefix = mount.encode() + (b"/b" if where == "routed" else b"/b/..")
    response = raw_request(running.port, b"GET " + prefix + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    expected = {"routed": 200, "refused": 400}[where]
    assert status_of(response) == expected
    [line] = lines.wait(1)
    assert line.count(" plugin=") == 1 and line.count(" status=") == 1  # no second, forged, field set
    assert line.count('"') == (4 if where == "refused" else 2)  # the request's, and the reason's
    assert "\x1b" not in line and "\x00" not in line and "\r" not in line
    assert f"status={expected}" in line
    if not mount:
        lines.stream.truncate(0)
        lines.stream.seek(0)
        unrouted = raw_request(running.port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        assert status_of(unrouted) == 404
        [line] = lines.wait(1)
        assert "status=404" in line and "\r" not in line and "\x1b" not in line


def test_a_forged_websocket_path_cannot_add_a_log_line(
    forgeable: tuple[Running, str], capture: Callable[[str], Lines]
) -> None:
    running, mount = forgeable
    lines = capture("json")
    path = mount + "/b/feed%0d%0aFORGED%1b[2J"
    with ws_connect(f"ws://127.0.0.1:{running.port}{path}") as ws:
        ws.send("close:1000")
        with pytest.raises(Exception):  # noqa: B017 (the plugin closes the session)
            ws.recv(timeout=5)
    [line] = lines.wait(1)
    data = json.loads(line)
    assert data["status"] == 101
    assert data["path"] == mount + "/b/feed%0d%0aFORGED%1b[2J"  # the raw path, as sent: nothing decoded
    assert "\x1b" not in line


def test_header_values_in_the_line_are_escaped(start_proxy: Any, capture: Callable[[str], Lines]) -> None:
    """The client address comes from X-Forwarded-For when uvicorn trusts it: escaped too."""
    proxy = start_proxy({}, trust_forwarded=True)
    lines = capture("text")
    response = raw_request(
        proxy.port, b"GET /none HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: 1.2.3.4\x1b[2J\r\nConnection: close\r\n\r\n"
    )
    assert status_of(response) in (400, 404)
    for line in lines.all():
        assert "\x1b" not in line


def test_an_access_log_enabled_at_runtime_gets_the_next_request(
    start_proxy: Any, plugin: PluginServer, capture: Callable[[str], Lines]
) -> None:
    """The proxy remembers that the log is off only until a level changes: the next request after
    ``enable_access_log`` is logged, though the one before was not."""
    proxy = start_proxy({"/peak": plugin.url})
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
    assert httpx.get(proxy.url + "/peak/before", timeout=10).status_code == 200
    lines = capture("text")
    assert httpx.get(proxy.url + "/peak/after", timeout=10).status_code == 200
    [line] = lines.wait(1)
    assert "/peak/after" in line


# -- the JSON format, every field ---------------------------------------------------------------------------


def test_json_access_line_has_every_field(
    start_proxy: Any, plugin: PluginServer, capture: Callable[[str], Lines]
) -> None:
    proxy = start_proxy({"/peak": plugin.url})
    lines = capture("json")
    response = httpx.post(
        proxy.url + "/peak/echo?q=1",
        content=b"0123456789",
        headers={"X-Request-Id": "json-line", "traceparent": TRACEPARENT},
        timeout=10,
    )
    assert response.status_code == 200
    [line] = lines.wait(1)
    data = json.loads(line)
    assert set(data) == {
        "time",
        "level",
        "pid",
        "request_id",
        "trace_id",
        "client",
        "method",
        "path",
        "query",
        "plugin",
        "status",
        "bytes_in",
        "bytes_out",
        "duration_ms",
        "ttfb_ms",
        "reason",
    }
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", data["time"])
    assert data["level"] == "INFO"
    assert isinstance(data["pid"], int)
    assert data["request_id"] == "json-line"
    assert data["trace_id"] == TRACE_ID
    assert re.fullmatch(r"127\.0\.0\.1:\d+", data["client"])
    assert (data["method"], data["path"], data["query"], data["plugin"]) == ("POST", "/peak/echo", "q=1", "peak")
    assert data["status"] == 200
    assert data["bytes_in"] == 10
    assert data["bytes_out"] == len(response.content)
    assert 0 < data["ttfb_ms"] <= data["duration_ms"]
    assert data["reason"] is None


def test_json_line_of_a_refusal_carries_the_reason(start_proxy: Any, capture: Callable[[str], Lines]) -> None:
    proxy = start_proxy({})
    lines = capture("json")
    response = httpx.get(proxy.url + "/nowhere", timeout=10)
    assert response.status_code == 404
    data = json.loads(lines.wait(1)[0])
    assert data["status"] == 404
    assert data["reason"] == "not_found: no route matches this path"
    assert data["bytes_out"] == len(response.content)
    assert data["request_id"] == response.json()["request_id"]
    assert data["ttfb_ms"] is None and data["plugin"] == "-"


def test_text_formatter_adds_the_pid_when_several_workers_run() -> None:
    record = logging.LogRecord(ACCESS_LOGGER, logging.INFO, __file__, 1, "%s", ("plain",), None)
    assert not TextAccessFormatter(show_pid=True).format(record).endswith("pid=" + str(record.process))
    assert "pid=" not in TextAccessFormatter(show_pid=False).format(record)
    other = JSONAccessFormatter().format(
        logging.LogRecord("mint_proxy", logging.WARNING, __file__, 1, "a\nb", (), None)
    )
    assert json.loads(other)["message"] == "a\\x0Ab"


# -- one event, one line -----------------------------------------------------------------------------------


def test_a_plugin_dying_mid_response_is_one_warning_line_with_the_status_the_client_saw(
    start_proxy: Any, capture: Callable[[str], Lines], caplog: pytest.LogCaptureFixture
) -> None:
    """The proxy's part of the event is one WARNING access line (uvicorn adds its own ERROR about the
    unfinished response on ``uvicorn.error``: ASGI has no other way to abort a response)."""
    with RawBackend(lambda head, index: b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\npartial") as backend:
        proxy = start_proxy({"/dies": backend.url})
        lines = capture("text")
        with caplog.at_level(logging.DEBUG, logger="mint_proxy"), pytest.raises(httpx.RemoteProtocolError):
            httpx.get(proxy.url + "/dies/x", timeout=10)
        [line] = lines.wait(1)
    assert re.search(
        r'WARNING mint_proxy.access: .* plugin=dies status=200 .* reason="aborted: the plugin closed', line
    )
    assert [r for r in caplog.records if r.name.startswith("mint_proxy")] == []  # nothing else of ours


# -- trace correlation -------------------------------------------------------------------------------------


def test_request_id_is_the_trace_id_without_a_client_request_id(
    start_proxy: Any, plugin: PluginServer, capture: Callable[[str], Lines]
) -> None:
    proxy = start_proxy({"/peak": plugin.url})
    lines = capture("json")
    response = httpx.get(
        proxy.url + "/peak/x", headers={"traceparent": TRACEPARENT, "tracestate": "vendor=opaque"}, timeout=10
    )
    assert response.headers["x-request-id"] == TRACE_ID
    seen = dict(plugin.app.seen[0]["headers"])
    assert seen["traceparent"] == TRACEPARENT and seen["tracestate"] == "vendor=opaque"  # untouched
    assert seen["x-request-id"] == TRACE_ID
    data = json.loads(lines.wait(1)[0])
    assert data["request_id"] == data["trace_id"] == TRACE_ID


@pytest.mark.parametrize(
    "traceparent",
    [
        f"ff-{TRACE_ID}-00f067aa0ba902b7-01",  # version ff is invalid
        "00-" + "0" * 32 + "-00f067aa0ba902b7-01",  # all-zero trace id
        f"00-{TRACE_ID.upper()}-00f067aa0ba902b7-01",  # uppercase hex
        f"00-{TRACE_ID}-00f067aa0ba902b7-01-extra",  # version 00 has four fields
    ],
)
def test_an_invalid_traceparent_gives_a_fresh_request_id(
    start_proxy: Any, plugin: PluginServer, traceparent: str
) -> None:
    proxy = start_proxy({"/peak": plugin.url})
    response = httpx.get(proxy.url + "/peak/x", headers={"traceparent": traceparent}, timeout=10)
    assert re.fullmatch(r"[0-9a-f]{32}", response.headers["x-request-id"])
    assert response.headers["x-request-id"] != TRACE_ID.lower()
    assert dict(plugin.app.seen[0]["headers"])["traceparent"] == traceparent  # passed through untouched


def test_a_client_request_id_wins_over_the_trace_id(start_proxy: Any, plugin: PluginServer) -> None:
    proxy = start_proxy({"/peak": plugin.url})
    headers = {"traceparent": TRACEPARENT, "X-Request-Id": "mine"}
    response = httpx.get(proxy.url + "/peak/x", headers=headers, timeout=10)
    assert response.headers["x-request-id"] == "mine"


def test_a_refusal_takes_the_trace_id_as_its_request_id(start_proxy: Any) -> None:
    proxy = start_proxy({})
    response = httpx.get(proxy.url + "/nowhere", headers={"traceparent": TRACEPARENT}, timeout=10)
    assert response.json()["request_id"] == TRACE_ID


def test_a_forged_websocket_path_refused_by_the_proxy_is_one_escaped_line(
    forgeable: tuple[Running, str], capture: Callable[[str], Lines]
) -> None:
    """A WebSocket with dot segments is refused (400) before any plugin sees it: still one escaped line."""
    running, mount = forgeable
    lines = capture("text")
    path = mount.encode() + b"/b/../x%0d%0aFORGED%1b[2J"
    handshake = (
        b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    response = raw_request(running.port, handshake)
    assert status_of(response) in (400, 403)  # 403: a server without the websocket.http.response extension
    [line] = lines.wait(1)
    assert '"WEBSOCKET ' in line and " status=400 " in line
    assert "\r" not in line and "\x1b" not in line and line.count(" plugin=") == 1


def test_a_plugins_own_502_is_logged_when_the_access_log_takes_warnings_only(
    start_proxy: Any, plugin: PluginServer, capture: Callable[[str], Lines]
) -> None:
    """A plugin answering 502 or 504 is a WARNING line (``finish_http``): an access log set to
    WARNING must get it, even with metrics off, though it drops the INFO lines."""
    proxy = start_proxy({"/peak": plugin.url})
    lines = capture("text")
    logging.getLogger(ACCESS_LOGGER).setLevel(logging.WARNING)
    assert httpx.get(proxy.url + "/peak/fine", timeout=10).status_code == 200
    assert httpx.get(proxy.url + "/peak/bad?status=502", timeout=10).status_code == 502
    [line] = lines.wait(1)
    assert "WARNING" in line and "status=502" in line
    time.sleep(0.2)
    assert len(lines.all()) == 1  # the 200 stays out
