"""``ProxyMetrics`` on its own: error reasons, the multiprocess snapshots a scrape adds up, and ``collect``.

``tests/test_admin.py`` scrapes the metrics after real traffic (one process and
``uvicorn --workers 2``); here the series are fed and read directly.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, generate_latest

from mint_proxy.errors import BadRequest, UpstreamProtocolError, UpstreamTimeout, UpstreamUnavailable
from mint_proxy.metrics import ProxyMetrics, upstream_error_reason

from .test_admin import sample


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        pytest.param(UpstreamTimeout("slow"), "timeout", id="timeout"),
        pytest.param(UpstreamProtocolError("garbled"), "protocol", id="protocol"),
        pytest.param(UpstreamUnavailable("gone"), "refused", id="refused"),
        pytest.param(BadRequest("client's fault"), None, id="not-an-upstream-error"),
        pytest.param(None, None, id="no-error"),
    ],
)
def test_upstream_errors_have_one_reason_each(error: Exception | None, reason: str | None) -> None:
    assert upstream_error_reason(error) == reason


def test_each_failed_exchange_counts_once_under_its_reason() -> None:
    metrics = ProxyMetrics(environ={})
    metrics.observe_http("peak", "GET", 504, 1.0, None, UpstreamTimeout("slow"))
    metrics.observe_http("peak", "GET", 502, 0.1, 0.05, UpstreamProtocolError("garbled"))
    metrics.observe_http("peak", "POST", 400, 0.1, None, BadRequest("no"))
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_upstream_errors_total", plugin="peak", reason="timeout") == 1
    assert sample(text, "mint_proxy_upstream_errors_total", plugin="peak", reason="protocol") == 1
    assert "reason=" not in "".join(line for line in text.splitlines() if "400" in line)
    assert sample(text, "mint_proxy_upstream_time_to_first_byte_seconds_count", plugin="peak") == 1  # one had a head


def test_websocket_sessions_count_open_ones_and_every_one_accepted() -> None:
    metrics = ProxyMetrics(environ={})
    metrics.websocket_opened("chat")
    metrics.websocket_opened("chat")
    metrics.websocket_closed("chat")
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_websocket_sessions_active", plugin="chat") == 1
    assert sample(text, "mint_proxy_websocket_sessions_total", plugin="chat") == 2


def test_collect_gives_the_families_to_a_platforms_own_registry() -> None:
    """A platform that already exports metrics registers the proxy's in its registry instead of mounting a view."""
    metrics = ProxyMetrics(environ={})
    metrics.observe_http("peak", "GET", 200, 0.01, 0.005, None)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(metrics)  # prometheus_client only calls its collect()
    text = generate_latest(registry).decode()
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 1


# -- several workers: one snapshot file each ------------------------------------------------------------------


def snapshot_of_another_worker(directory: Path, *, alive: bool) -> int:
    """Write the snapshot of a worker that served two GETs and has one request and one WebSocket open; its pid."""
    if alive:
        pid = os.getppid()  # a live process that is not this one
    else:
        done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        pid = int(done.stdout)  # exited, and reaped by run()
    other = ProxyMetrics(environ={})
    other.observe_http("peak", "GET", 200, 0.01, 0.005, None)
    other.observe_http("peak", "GET", 200, 0.01, 0.005, None)
    other.started = 1
    other.websocket_opened("peak")
    data = {**other.snapshot(), "pid": pid}
    (directory / f"mint_proxy_{pid}.json").write_text(json.dumps(data), encoding="utf-8")
    return pid


@pytest.mark.parametrize("alive", [True, False], ids=["live-worker", "dead-worker"])
def test_a_scrape_adds_every_workers_counters_and_only_live_workers_gauges(tmp_path: Path, alive: bool) -> None:
    snapshot_of_another_worker(tmp_path, alive=alive)
    metrics = ProxyMetrics(multiprocess_dir=str(tmp_path))
    metrics.observe_http("peak", "GET", 200, 0.02, 0.01, None)
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 3
    assert sample(text, "mint_proxy_request_duration_seconds_count", plugin="peak") == 3
    assert sample(text, "mint_proxy_active_requests") == (1 if alive else 0)
    assert sample(text, "mint_proxy_websocket_sessions_active", plugin="peak") == (1 if alive else 0)
    assert sample(text, "mint_proxy_websocket_sessions_total", plugin="peak") == 1


def test_a_scrape_skips_files_that_are_not_worker_snapshots(tmp_path: Path) -> None:
    """prometheus_client's own files, a snapshot being replaced (half written) and a pid of 0 are left out."""
    (tmp_path / "counter_123.db").write_bytes(b"\0" * 16)
    (tmp_path / "mint_proxy_999999.json").write_text('{"pid": 99', encoding="utf-8")
    metrics = ProxyMetrics(multiprocess_dir=str(tmp_path))
    metrics.observe_http("peak", "GET", 200, 0.02, 0.01, None)
    zero = {**ProxyMetrics(environ={}).snapshot(), "pid": 0, "active": 5}
    (tmp_path / "mint_proxy_0.json").write_text(json.dumps(zero), encoding="utf-8")
    text = metrics.render().decode()
    assert sample(text, "mint_proxy_requests_total", plugin="peak", method="GET", code="200") == 1
    assert sample(text, "mint_proxy_active_requests") == 0


def test_outside_an_event_loop_a_worker_writes_its_snapshot_at_once(tmp_path: Path) -> None:
    """The flush timer needs a running loop; without one (a sync caller) nothing is held back."""
    metrics = ProxyMetrics(environ={"PROMETHEUS_MULTIPROC_DIR": str(tmp_path)})
    metrics.observe_http("peak", "GET", 200, 0.02, 0.01, None)
    written = json.loads((tmp_path / f"mint_proxy_{os.getpid()}.json").read_text(encoding="utf-8"))
    assert written["requests"] == [["peak", "GET", 200, 1]]


def test_a_config_reload_writes_the_snapshot_at_once(tmp_path: Path) -> None:
    metrics = ProxyMetrics(multiprocess_dir=str(tmp_path))
    metrics.config_reloaded(False)
    written = json.loads((tmp_path / f"mint_proxy_{os.getpid()}.json").read_text(encoding="utf-8"))
    assert written["reloads"] == {"failure": 1} and written["last_reload"] == 0
