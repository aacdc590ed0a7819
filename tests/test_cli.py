"""The ``mint-proxy`` command: in-process through ``main([...])``, and ``serve``/``demo`` as real subprocesses."""

import json
import os
import queue
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest
from websockets.sync.client import connect

from mint_proxy import __version__
from mint_proxy.cli import main
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV
from mint_proxy.tokens import verify_internal_token

SECRET = "test-internal-token-secret-0123456789abcdef"  # >= 32 bytes
GOOD_CONFIG = """\
[settings]
mount_path = "/api"
retry_window = 0

[proxy]
"/peak-picking" = "http://127.0.0.1:8005"
"/lcms" = { url = "unix:/run/mint/lcms.sock", plugin = "lcms-sequence", strip_prefix = true, read_timeout = 3600 }
"""
BROKEN_CONFIG = '[proxy]\n"/peak-picking" = { url = "ftp://127.0.0.1:8005" }\n'
BROKEN_MESSAGE = "[proxy.\"/peak-picking\"].url: upstream URL 'ftp://127.0.0.1:8005' has scheme 'ftp'"
STARTUP_DEADLINE = 20.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.fixture
def good_config(tmp_path: Path) -> Path:
    path = tmp_path / "config.dev.toml"
    path.write_text(GOOD_CONFIG, encoding="utf-8")
    return path


@pytest.fixture
def broken_config(tmp_path: Path) -> Path:
    path = tmp_path / "broken.toml"
    path.write_text(BROKEN_CONFIG, encoding="utf-8")
    return path


class _Child:
    """``python -m mint_proxy.cli ARGS`` as a subprocess; a thread drains its output so it never blocks on a pipe."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mint_proxy.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        self.seen: list[str] = []
        self._queue: queue.Queue[str] = queue.Queue()
        self._reader = threading.Thread(target=self._drain, daemon=True)
        self._reader.start()

    def _drain(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line)

    def wait_for(self, text: str) -> list[str]:
        """Return the lines read so far once one contains ``text``; fail after ``STARTUP_DEADLINE``."""
        deadline = time.monotonic() + STARTUP_DEADLINE
        while not any(text in line for line in self.seen):
            try:
                self.seen.append(self._queue.get(timeout=max(0.0, deadline - time.monotonic())))
            except queue.Empty:
                pytest.fail(f"no line containing {text!r} before the deadline; got {self.seen!r}")
        return self.seen

    def stop(self) -> int:
        """SIGTERM the process this test started (by its PID), wait for it, and close the pipe."""
        self.proc.terminate()
        try:
            return self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise
        finally:
            self._reader.join(timeout=5)
            assert self.proc.stdout is not None
            self.proc.stdout.close()


# --- --version and usage ------------------------------------------------------------------------------


def test_version_prints_the_package_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"mint-proxy {__version__}"


def test_no_command_prints_usage_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "usage: mint-proxy" in capsys.readouterr().err


def test_invalid_port_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--port", "99999"]) == 2
    assert "is not a port number" in capsys.readouterr().err


# --- check ----------------------------------------------------------------------------------------------


def test_check_prints_the_route_table_aligned(good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(good_config)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f'{good_config}: OK, 2 routes, mount_path "/api", retry_window 0s, admin_path "/_mint"'
    header, peak, lcms = out[2:]
    assert header.split() == [
        "prefix",
        "upstream",
        "plugin",
        "strip_prefix",
        "connect_timeout",
        "read_timeout",
        "max_body_bytes",
    ]
    assert peak.split() == ["/peak-picking", "http://127.0.0.1:8005", "peak-picking", "no", "5s", "300s", "-"]
    assert lcms.split() == ["/lcms", "unix:/run/mint/lcms.sock", "lcms-sequence", "yes", "5s", "3600s", "-"]
    # Aligned: every column starts at the same offset in each row.
    assert header.index("upstream") == peak.index("http://") == lcms.index("unix:")
    assert header.index("max_body_bytes") == peak.rindex("-") == lcms.rindex("-")


def test_check_of_a_config_without_routes_prints_the_summary_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("", encoding="utf-8")
    assert main(["check", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.out == f'{path}: OK, 0 routes, mount_path "", retry_window 2s, admin_path "/_mint"\n'
    assert (
        captured.err
        == f"mint-proxy: warning: {path}: no routes: every request will be answered 404; add routes under [proxy]\n"
    )


def test_check_of_a_broken_config_prints_the_message_and_exits_2(
    broken_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check", str(broken_config)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"mint-proxy: error: {broken_config}: {BROKEN_MESSAGE}")
    assert "Traceback" not in captured.err


def test_check_of_a_missing_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["check", str(tmp_path / "nope.toml")]) == 2
    err = capsys.readouterr().err
    assert "nope.toml: no such file" in err
    assert "Traceback" not in err


def test_check_without_an_argument_reads_the_config_serve_would(
    good_config: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(good_config))
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith(f"{good_config}: OK, 2 routes")


def test_check_without_an_argument_defaults_to_config_dev_toml(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["check"]) == 2
    err = capsys.readouterr().err
    assert f"config.dev.toml: no such file (looked in {tmp_path / 'config.dev.toml'}); set {CONFIG_ENV}" in err
    (tmp_path / "config.dev.toml").write_text('[proxy]\n"/a" = "http://127.0.0.1:9001"\n', encoding="utf-8")
    assert main(["check"]) == 0
    assert capsys.readouterr().out.startswith("config.dev.toml: OK, 1 route,")


def test_serve_rejects_an_unknown_log_format(good_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(good_config), "--log-format", "yaml"]) == 2
    assert "invalid choice: 'yaml'" in capsys.readouterr().err


# --- token ----------------------------------------------------------------------------------------------


def test_token_prints_a_token_verified_for_the_plugin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert main(["token", "peak-picking", "--ttl", "60"]) == 0
    captured = capsys.readouterr()
    claims = verify_internal_token(captured.out.strip(), SECRET, plugin="peak-picking")
    assert claims.expires_at - claims.issued_at == 60
    assert SECRET not in captured.out + captured.err


def test_token_reads_the_secret_from_the_named_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.setenv("OTHER_SECRET", SECRET)
    assert main(["token", "billing", "--secret-env", "OTHER_SECRET"]) == 0
    assert verify_internal_token(capsys.readouterr().out.strip(), SECRET).plugin == "billing"


def test_token_without_the_secret_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv(SECRET_ENV, raising=False)
    assert main(["token", "peak-picking"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert f"{SECRET_ENV} is not set" in captured.err
    assert "Traceback" not in captured.err


def test_token_with_a_short_secret_exits_2_without_echoing_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, "short-secret-value")
    assert main(["token", "peak-picking"]) == 2
    captured = capsys.readouterr()
    assert f"{SECRET_ENV}: secret must be at least 32 bytes" in captured.err
    assert "short-secret-value" not in captured.out + captured.err


def test_token_with_a_too_short_ttl_exits_2(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert main(["token", "peak-picking", "--ttl", "1"]) == 2
    assert "ttl must be" in capsys.readouterr().err


# --- serve ----------------------------------------------------------------------------------------------


def test_serve_with_a_broken_config_exits_2(broken_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["serve", "--config", str(broken_config), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert BROKEN_MESSAGE in err
    assert "Traceback" not in err


def test_serve_takes_the_config_from_the_environment(
    broken_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(broken_config))
    assert main(["serve", "--port", str(free_port())]) == 2
    assert BROKEN_MESSAGE in capsys.readouterr().err


def test_serve_with_a_short_secret_exits_2_without_echoing_it(
    good_config: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, "short-secret-value")
    assert main(["serve", "--config", str(good_config), "--port", str(free_port())]) == 2
    err = capsys.readouterr().err
    assert f"{SECRET_ENV}: secret must be at least 32 bytes" in err
    assert "short-secret-value" not in err


@pytest.fixture
def served(tmp_path: Path) -> Iterator[str]:
    """``mint-proxy serve`` in a subprocess, on a config whose only route has nothing behind it."""
    dead = free_port()
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nretry_window = 0\n\n[proxy]\n"/peak-picking" = "http://127.0.0.1:{dead}"\n')
    port = free_port()
    env = {**os.environ, SECRET_ENV: SECRET}
    child = _Child("serve", "--config", str(config), "--port", str(port), env=env)
    try:
        child.wait_for("Uvicorn running on")
        yield f"http://127.0.0.1:{port}"
    finally:
        child.stop()


def test_serve_answers_502_json_for_a_route_with_nothing_behind_it(served: str) -> None:
    response = httpx.get(f"{served}/peak-picking/peaks", timeout=10)
    assert response.status_code == 502
    body = response.json()
    assert body["error"] == "bad_gateway"
    assert body["request_id"] == response.headers["x-request-id"]


def test_serve_answers_404_json_for_an_unrouted_path(served: str) -> None:
    response = httpx.get(f"{served}/elsewhere", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"


# --- demo -----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def demo() -> Iterator[dict[str, str]]:
    """``mint-proxy demo`` in a subprocess; yields the printed URLs by path, plus ``proxy``."""
    child = _Child("demo", "--port", str(free_port()), "--duration", "20")
    try:
        printed = child.wait_for("Ctrl-C to stop.")
        words = [word.strip("'") for line in printed for word in line.split()]
        urls = [word for word in words if word.startswith(("http://", "ws://"))]
        yield {"proxy": urls[0], **{urlsplit(url).path: url for url in urls[1:]}}
    finally:
        assert child.stop() == 0, "".join(child.seen)


def test_demo_prints_the_urls_to_try(demo: dict[str, str]) -> None:
    assert sorted(demo) == [
        "/api/lcms-sequence/status",
        "/api/lcms-sequence/ws",
        "/api/peak-picking/events",
        "/api/peak-picking/peaks",
        "/api/peak-picking/run",
        "proxy",
    ]


def test_demo_peaks_echo_the_request_id_and_the_verified_plugin(demo: dict[str, str]) -> None:
    response = httpx.get(demo["/api/peak-picking/peaks"], headers={"X-Request-Id": "demo-test-1"}, timeout=10)
    assert response.status_code == 200
    body = response.json()
    assert len(body["peaks"]) == 3
    assert body["request_id"] == "demo-test-1"
    assert body["token_plugin"] == "peak-picking"


def test_demo_run_counts_the_posted_bytes(demo: dict[str, str]) -> None:
    response = httpx.post(demo["/api/peak-picking/run"], content=b"x" * 100_000, timeout=10)
    assert response.json()["received_bytes"] == 100_000


def test_demo_events_stream_as_server_sent_events(demo: dict[str, str]) -> None:
    with httpx.stream("GET", demo["/api/peak-picking/events"], timeout=10) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = [json.loads(line[len("data: ") :]) for line in response.iter_lines() if line.startswith("data: ")]
    assert data == [{"step": i, "of": 5} for i in range(5)]


def test_demo_lcms_status_answers_through_the_proxy(demo: dict[str, str]) -> None:
    body = httpx.get(demo["/api/lcms-sequence/status"], timeout=10).json()
    assert body["state"] == "idle"
    assert body["token_plugin"] == "lcms-sequence"


def test_demo_websocket_echoes_through_the_proxy(demo: dict[str, str]) -> None:
    with connect(demo["/api/lcms-sequence/ws"], open_timeout=10) as websocket:
        websocket.send("hello")
        assert websocket.recv(timeout=10) == "hello"
        websocket.send(b"\x00\x01")
        assert websocket.recv(timeout=10) == b"\x00\x01"


def test_demo_on_a_busy_port_suggests_another(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["demo", "--port", str(busy.getsockname()[1]), "--duration", "1"]) == 1
    assert "--port" in capsys.readouterr().err


def test_serve_log_format_json_prints_json_access_lines(tmp_path: Path) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text('[proxy]\n"/peak-picking" = "http://127.0.0.1:9"\n', encoding="utf-8")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")} | {SECRET_ENV: SECRET}
    child = _Child("serve", "--config", str(config), "--port", str(port), "--log-format", "json", env=env)
    try:
        child.wait_for("Uvicorn running on")
        assert httpx.get(f"http://127.0.0.1:{port}/elsewhere", timeout=10).status_code == 404
        lines = child.wait_for('"path":"/elsewhere"')
    finally:
        child.stop()
    [line] = [line for line in lines if '"path":"/elsewhere"' in line]
    data = json.loads(line)
    assert (data["status"], data["plugin"], data["reason"]) == (404, "-", "not_found: no route matches this path")
