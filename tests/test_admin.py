"""The admin views (healthz, metrics, routes) and the metrics they serve, after real traffic.

Standalone (``DevProxyApp`` under ``/_mint``), mounted in FastAPI, and ``uvicorn --workers 2``
with a Prometheus multiprocess directory.
"""

import asyncio
import os
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from mint_proxy import AdminApp, DevProxyApp, ProxyMetrics, ProxyMiddleware, RouteNotFound, RouteTable, TokenIssuer
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV, parse_dev_config
from mint_proxy.errors import DevConfigError
from mint_proxy.plugins.spec import PluginState, PluginStatus

from .conftest import PluginServer
from .utils import SECRET, RawBackend, free_port, serve


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text, 0 if absent."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        metric, _, value = line.rpartition(" ")
        found_name, _, rest = metric.partition("{")
        found = ",".join(sorted(rest.rstrip("}").split(","))) if rest else ""
        if found_name == name and found == want:
            return float(value)
    return 0.0


@pytest.fixture
def standalone(tmp_path: Path, plugin: PluginServer) -> Iterator[str]:
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[proxy]\n"/peak" = "{plugin.url}"\n', encoding="utf-8")
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    with serve(app, lifespan="on") as running:
        yield running.url


def test_standalone_serves_healthz_routes_and_metrics_under_admin_path(standalone: str) -> None:
    assert httpx.get(standalone + "/_mint/healthz", timeout=10).json() == {"status": "ok"}
    for _ in range(3):
        assert httpx.get(standalone + "/peak/x", timeout=10).status_code == 200
    assert httpx.post(standalone + "/peak/x", content=b"abc", timeout=10).status_code == 200
    assert httpx.request("PROPFIND", standalone + "/peak/x", timeout=10).status_code == 200
    assert httpx.get(standalone + "/elsewhere", timeout=10).status_code == 404
    routes = httpx.get(standalone + "/_mint/routes", timeout=10).json()
    [route] = routes["routes"]
    assert route["prefix"] == "/peak" and route["plugin"] == "peak" and route["supervised"] is False
    text = httpx.get(standalone + "/_mint/metrics", timeout=10).text
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 3
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="POST", code="200") == 1
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="OTHER", code="200") == 1
    assert sample(text, "mint_proxy_requests_total", plugin="-", method="GET", code="404") == 1
    assert sample(text, "mint_proxy_request_duration_seconds_count", plugin="peak") == 5
    assert sample(text, "mint_proxy_request_duration_seconds_bucket", plugin="peak", le="3600.0") == 5
    assert sample(text, "mint_proxy_upstream_time_to_first_byte_seconds_count", plugin="peak") == 5
    assert sample(text, "mint_proxy_active_requests") == 0
    assert sample(text, "mint_proxy_upstream_connections", state="idle") >= 1
    assert "x-mint-internal-token" not in text.lower() and SECRET not in text
    assert "/peak/x" not in text  # never the path as a label


def test_admin_views_answer_only_get(standalone: str) -> None:
    response = httpx.post(standalone + "/_mint/healthz", timeout=10)
    assert response.status_code == 405 and response.json()["error"] == "method_not_allowed"
    assert httpx.get(standalone + "/_mint/nothing", timeout=10).status_code == 404


def test_upstream_errors_are_counted_by_reason(tmp_path: Path) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nretry_window = 0\n[proxy]\n"/gone" = "http://127.0.0.1:{free_port()}"\n')
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    with serve(app, lifespan="on") as running:
        assert httpx.get(running.url + "/gone/x", timeout=10).status_code == 502
        text = httpx.get(running.url + "/_mint/metrics", timeout=10).text
    assert sample(text, "mint_proxy_upstream_errors_total", plugin="gone", reason="refused") == 1
    assert sample(text, "mint_proxy_requests_total", plugin="gone", method="GET", code="502") == 1


def test_a_route_may_not_claim_the_admin_path() -> None:
    with pytest.raises(DevConfigError, match=r'\[proxy\]\."/_mint": .*overlaps the admin views at \'/_mint\''):
        parse_dev_config('[proxy]\n"/_mint" = "http://127.0.0.1:9"\n', path="c.toml")
    assert parse_dev_config('[settings]\nadmin_path = ""\n[proxy]\n"/_mint" = "http://127.0.0.1:9"\n').admin_path == ""
    with pytest.raises(DevConfigError, match=r"\[settings\]\.admin_path"):
        parse_dev_config('[settings]\nadmin_path = "admin/"\n')


def test_empty_admin_path_turns_the_views_off(tmp_path: Path, plugin: PluginServer) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nadmin_path = ""\n[proxy]\n"/peak" = "{plugin.url}"\n', encoding="utf-8")
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    with serve(app, lifespan="on") as running:
        assert httpx.get(running.url + "/_mint/healthz", timeout=10).status_code == 404


def test_metrics_setting_off_counts_nothing_and_hides_the_view(tmp_path: Path, plugin: PluginServer) -> None:
    """``[settings] metrics = false``: the standalone app counts nothing and its metrics view is a 404."""
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nmetrics = false\n[proxy]\n"/peak" = "{plugin.url}"\n', encoding="utf-8")
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    with serve(app, lifespan="on") as running:
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
        assert httpx.get(running.url + "/_mint/healthz", timeout=10).status_code == 200
        response = httpx.get(running.url + "/_mint/metrics", timeout=10)
    assert app.metrics is None and app.proxy is not None and app.proxy.metrics is None
    assert response.status_code == 404 and "metrics are off" in response.json()["detail"]


def test_metrics_setting_must_be_a_boolean() -> None:
    """A ``metrics`` setting that is not true or false is a config error naming the file and key."""
    with pytest.raises(
        DevConfigError, match=r"c\.toml: \[settings\]\.metrics: must be true or false, got .no. \(a string\)"
    ):
        parse_dev_config('[settings]\nmetrics = "no"\n', path="c.toml")
    assert parse_dev_config("").metrics is True


def fake_statuses() -> dict[str, PluginStatus]:
    return {
        "peak": PluginStatus(
            "peak",
            "/peak",
            PluginState.READY,
            "unix:/tmp/p.sock",
            pid=42,
            restarts=3,
            start_seconds=1.5,
            log_tail=("secret-token-in-a-log-line",),
        ),
        "lcms": PluginStatus("lcms", "/lcms", PluginState.BACKOFF, "unix:/tmp/l.sock", restarts=7, retry_after=2.0),
    }


def test_mounted_admin_app_in_fastapi_shows_plugin_states(plugin: PluginServer) -> None:
    routes = RouteTable({"/peak": plugin.url, "/lcms": plugin.url})
    metrics = ProxyMetrics(plugin_status=fake_statuses, environ={})
    platform = FastAPI()
    platform.mount("/ops/proxy", AdminApp(routes, metrics=metrics, mount_path="/api"))
    platform.add_middleware(
        ProxyMiddleware, routes=routes, tokens=TokenIssuer(SECRET), mount_path="/api", metrics=metrics
    )
    with serve(platform, lifespan="on") as running:
        assert httpx.get(running.url + "/api/peak/x", timeout=10).status_code == 200
        assert httpx.get(running.url + "/ops/proxy/healthz", timeout=10).json() == {"status": "ok"}
        body = httpx.get(running.url + "/ops/proxy/routes", timeout=10)
        text = httpx.get(running.url + "/ops/proxy/metrics", timeout=10).text
    data = body.json()
    by_prefix = {r["prefix"]: r for r in data["routes"]}
    assert by_prefix["/peak"]["state"] == "READY" and by_prefix["/peak"]["pid"] == 42
    assert by_prefix["/peak"]["path"] == "/api/peak"
    assert by_prefix["/lcms"]["state"] == "BACKOFF" and by_prefix["/lcms"]["retry_after"] == 2.0
    assert "secret-token-in-a-log-line" not in body.text  # the log tail is never shown
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 1
    assert sample(text, "mint_plugin_up", plugin="peak") == 1
    assert sample(text, "mint_plugin_up", plugin="lcms") == 0
    assert sample(text, "mint_plugin_restarts_total", plugin="lcms") == 7
    assert sample(text, "mint_plugin_state", plugin="lcms", state="BACKOFF") == 1
    assert sample(text, "mint_plugin_state", plugin="lcms", state="READY") == 0
    assert sample(text, "mint_plugin_start_duration_seconds", plugin="peak") == 1.5


def test_metrics_off_is_a_404_naming_the_fix(plugin: PluginServer) -> None:
    app = AdminApp(RouteTable({"/peak": plugin.url}))
    with serve(app) as running:
        response = httpx.get(running.url + "/metrics", timeout=10)
    assert response.status_code == 404 and "metrics are off" in response.json()["detail"]


def test_config_reloads_are_counted() -> None:
    metrics = ProxyMetrics(environ={})
    metrics.config_reloaded(True)
    metrics.config_reloaded(False)
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_config_reloads_total", result="success") == 1
    assert sample(text, "mint_proxy_config_reloads_total", result="failure") == 1
    assert abs(sample(text, "mint_proxy_config_last_reload_success_timestamp_seconds") - time.time()) < 60


# -- RouteTable's public listing and removal ---------------------------------------------------------------


def test_route_table_lists_routes_longest_prefix_first() -> None:
    table = RouteTable({"/a": "http://127.0.0.1:1", "/a/b": "http://127.0.0.1:2", "/c": "http://127.0.0.1:3"})
    assert [r.prefix for r in table.routes()] == ["/a/b", "/a", "/c"]


def test_removing_an_unknown_prefix_names_it() -> None:
    table = RouteTable({"/a": "http://127.0.0.1:1"})
    with pytest.raises(RouteNotFound, match="no route for prefix '/nope'") as caught:
        table.remove("/nope")
    assert isinstance(caught.value, KeyError) and caught.value.prefix == "/nope"
    assert table.remove("/a").prefix == "/a" and len(table) == 0


# -- several workers ----------------------------------------------------------------------------------------


def test_metrics_add_up_across_two_workers(tmp_path: Path, plugin: PluginServer) -> None:
    """uvicorn --workers 2 with a multiprocess dir: every request is counted once, whichever worker took it."""
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[proxy]\n"/peak" = "{plugin.url}"\n', encoding="utf-8")
    multiproc = tmp_path / "prom"
    multiproc.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    env.update({CONFIG_ENV: str(config), SECRET_ENV: SECRET, "PROMETHEUS_MULTIPROC_DIR": str(multiproc)})
    argv = [sys.executable, "-m", "uvicorn", "mint_proxy:app", "--port", str(port), "--workers", "2"]
    log = (tmp_path / "stderr.log").open("w", encoding="utf-8")
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=log)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait(lambda: _get(url + "/_mint/healthz") == 200, "the server answers")
        pids: set[str] = set()
        count = 0
        deadline = time.monotonic() + 30
        while len(pids) < 2 and time.monotonic() < deadline:  # new connections until both workers answered
            with httpx.Client() as client:
                client.get(url + "/peak/x", timeout=10)
                count += 1
            pids = {p.name for p in multiproc.glob("mint_proxy_*.json")}
            time.sleep(0.05)
        total = count

        def counted() -> bool:
            text = httpx.get(url + "/_mint/metrics", timeout=10).text
            return sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == total

        _wait(counted, f"the metrics show {total} requests")
        assert len(list(multiproc.glob("mint_proxy_*.json"))) == 2
    finally:
        proc.terminate()
        proc.wait(20)
        log.close()
    # With several workers each access line says which one wrote it.
    access = [line for line in (tmp_path / "stderr.log").read_text().splitlines() if '"GET /peak/x"' in line]
    assert len(access) == total
    assert {re.search(r" pid=(\d+)$", line)[1] for line in access} == {  # type: ignore[index]
        name.removeprefix("mint_proxy_").removesuffix(".json") for name in pids
    }


def _get(url: str) -> int:
    try:
        return httpx.get(url, timeout=5).status_code
    except httpx.TransportError:
        return 0


def _wait(condition: Any, what: str, deadline: float = 30.0) -> None:
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not true within {deadline} s: {what}")
        time.sleep(0.1)


def test_sample_helper_reads_labels_in_any_order() -> None:
    assert sample('x_total{b="2",a="1"} 3.0\n', "x_total", a="1", b="2") == 3.0
    assert re.fullmatch(r"\d+", "1")


def test_retries_and_dropped_connections_are_counted(start_proxy: Any) -> None:
    """A pooled connection the plugin closed: a GET is sent again (a retry), a POST is a 502 (refused)."""
    ok = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
    metrics = ProxyMetrics(environ={})
    with RawBackend(lambda head, index: ok if index == 0 else b"", close=False) as backend:
        proxy = start_proxy({"/peak": backend.url}, metrics=metrics)
        with httpx.Client(timeout=10) as client:
            assert client.get(proxy.url + "/peak/x").status_code == 200
            assert client.get(proxy.url + "/peak/x").status_code == 200  # on a new connection, after a retry
            assert client.post(proxy.url + "/peak/x", content=b"body").status_code == 502
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_retries_total", plugin="peak") == 1
    assert sample(text, "mint_proxy_upstream_errors_total", plugin="peak", reason="refused") == 1
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 2
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="POST", code="502") == 1
    assert sample(text, "mint_proxy_active_requests") == 0


# -- the ASGI app itself: lifespan, WebSocket, HEAD ----------------------------------------------------------


def run_asgi(app: AdminApp, scope: dict[str, Any], incoming: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Call ``app`` once with ``incoming`` as its receive messages; return what it sent."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return incoming.pop(0)

    async def send(message: Any) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    return sent


def test_served_alone_the_admin_app_completes_its_lifespan() -> None:
    """``uvicorn`` runs the lifespan of an app served on its own: startup and shutdown are answered."""
    incoming = [{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}]
    sent = run_asgi(AdminApp(RouteTable()), {"type": "lifespan"}, incoming)
    assert sent == [{"type": "lifespan.startup.complete"}, {"type": "lifespan.shutdown.complete"}]


def test_a_websocket_to_the_admin_views_is_closed_as_a_policy_violation() -> None:
    scope = {"type": "websocket", "path": "/healthz", "headers": []}
    sent = run_asgi(AdminApp(RouteTable()), scope, [{"type": "websocket.connect"}])
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "not a WebSocket endpoint"}]


def test_head_answers_the_headers_of_get_without_the_body() -> None:
    scope = {"type": "http", "method": "HEAD", "path": "/_mint/routes", "root_path": "/_mint", "headers": []}
    start, body = run_asgi(AdminApp(RouteTable({"/peak": "http://127.0.0.1:9"})), scope, [])
    headers = dict(start["headers"])
    get = run_asgi(AdminApp(RouteTable({"/peak": "http://127.0.0.1:9"})), {**scope, "method": "GET"}, [])[1]["body"]
    assert start["status"] == 200 and headers[b"content-length"] == b"%d" % len(get) and len(get) > 0
    assert body == {"type": "http.response.body", "body": b""}
