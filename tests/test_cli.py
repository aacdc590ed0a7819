"""The ``mint-proxy`` command: in-process through ``main([...])``, and ``serve``/``demo`` as real subprocesses."""

import json
import os
import queue
import re
import shlex
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
from mint_proxy.plugins.runtime import read_state
from mint_proxy.tokens import verify_internal_token

from .utils import read_head

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
        runtime_dir = words[words.index("--runtime-dir") + 1]
        (websocket_command,) = [line.strip() for line in printed if "ws://" in line]
        yield {
            "proxy": urls[0],
            "runtime_dir": runtime_dir,
            "websocket_command": websocket_command,
            **{urlsplit(url).path: url for url in urls[1:]},
        }
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
        "runtime_dir",
        "websocket_command",
    ]


def test_demo_plugins_are_processes_the_supervisor_runs(demo: dict[str, str]) -> None:
    state = read_state(demo["runtime_dir"])
    assert state is not None
    assert {slug: str(status.state) for slug, status in state.plugins.items()} == {
        "peak-picking": "READY",
        "lcms-sequence": "READY",
    }
    for status in state.plugins.values():
        assert status.pid is not None and status.pid != state.pid and os.path.exists(f"/proc/{status.pid}")
        assert status.endpoint == f"unix:{demo['runtime_dir']}/{status.slug}.sock"


def test_demo_keep_alive_requests_after_the_first_are_not_delayed(demo: dict[str, str]) -> None:
    """Without TCP_NODELAY on the demo's listening socket, every request after the first on a
    keep-alive connection waited ~40 ms for the client's delayed ACK (Nagle). Even the fastest
    of five would take that long, so the bound is on the fastest, far below 40 ms."""
    address = urlsplit(demo["proxy"])
    request = b"GET /api/peak-picking/peaks?n=1 HTTP/1.1\r\nHost: demo\r\n\r\n"
    took = []
    with socket.create_connection((address.hostname, address.port), timeout=10) as sock:
        for _ in range(6):
            started = time.perf_counter()
            sock.sendall(request)
            head = read_head(sock)
            assert head.startswith(b"HTTP/1.1 200"), head
            length = int(re.search(rb"(?i)content-length: *([0-9]+)", head).group(1))  # type: ignore[union-attr]
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += sock.recv(65536)
            took.append(time.perf_counter() - started)
    assert min(took[1:]) < 0.010, took


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


def test_demo_websocket_command_works_as_printed_outside_the_venv(demo: dict[str, str]) -> None:
    """The printed WebSocket client command runs from a shell whose PATH has no venv in it."""
    environ = {"PATH": "/usr/bin:/bin", "HOME": os.environ.get("HOME", "/")}
    done = subprocess.run(
        shlex.split(demo["websocket_command"]), input="hello\n", capture_output=True, text=True, env=environ, timeout=30
    )
    assert done.returncode == 0 and "Connected to ws://" in done.stdout, (done.stdout, done.stderr)


def test_demo_on_a_busy_port_suggests_another(capsys: pytest.CaptureFixture[str]) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        assert main(["demo", "--port", str(busy.getsockname()[1]), "--duration", "1"]) == 1
    assert "--port" in capsys.readouterr().err


# --- token --kid, the generated secret, status, check and serve --platform with plugins -----------------


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        pytest.param(["--kid", "2026-12"], {}, id="flag"),
        pytest.param([], {"MINT_INTERNAL_TOKEN_KID": "2026-12"}, id="environment"),
        pytest.param(["--kid", "2026-12"], {"MINT_INTERNAL_TOKEN_KID": "other"}, id="flag-wins"),
    ],
)
def test_token_carries_the_key_id_a_rotation_verifier_needs(
    argv: list[str], environ: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    assert main(["token", "peak-picking", *argv]) == 0
    token = capsys.readouterr().out.strip()
    # The README's rotation example: a mapping of kid -> secret refuses a token without a kid.
    assert verify_internal_token(token, {"2026-12": SECRET, "2026-05": "x" * 40}).plugin == "peak-picking"


def test_token_with_an_empty_kid_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv(SECRET_ENV, SECRET)
    assert main(["token", "p", "--kid", ""]) == 2
    assert "--kid: kid must be a non-empty str" in capsys.readouterr().err


def test_token_uses_the_secret_the_proxy_generated_in_the_runtime_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from mint_proxy.plugins._secret import shared_secret

    monkeypatch.delenv(SECRET_ENV, raising=False)
    monkeypatch.setenv("MINT_PROXY_RUNTIME_DIR", str(tmp_path))
    secret = shared_secret(str(tmp_path))
    assert main(["token", "peak-picking"]) == 0
    assert verify_internal_token(capsys.readouterr().out.strip(), secret).plugin == "peak-picking"


def test_status_without_a_supervisor_says_so_and_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 1
    assert "no supervisor has written a state file here yet" in capsys.readouterr().out
    assert main(["status", "--runtime-dir", str(tmp_path), "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["supervisor"] is None


def test_status_of_a_broken_state_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "state.json").write_text("{")
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a mint-proxy state file" in err and "Traceback" not in err


def test_status_reads_the_runtime_dir_from_a_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mint_proxy.plugins.runtime import write_state
    from mint_proxy.plugins.spec import PluginState, PluginStatus

    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir()
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nruntime_dir = "{runtime_dir}"\n[proxy."/p"]\napp = "m:app"\n')
    write_state(
        str(runtime_dir), {"p": PluginStatus("p", "/p", PluginState.BACKOFF, "unix:x", restarts=3)}, pid=1, started=0
    )
    assert main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "NOT running" in out.splitlines()[0]
    assert out.splitlines()[3].split()[:4] == ["p", "BACKOFF", "-", "3"]


def test_check_lists_supervised_plugins_with_their_socket(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text(
        f'[settings]\nruntime_dir = "{tmp_path}"\n[proxy."/p"]\ncommand = "uvicorn m:app --uds {{socket}}"\n'
    )
    assert main(["check", str(config)]) == 0
    assert f"unix:{tmp_path}/p.sock" in capsys.readouterr().out


def test_check_names_file_key_and_problem_for_plugin_keys(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text('[proxy."/p"]\napp = "m:app"\ncrash_limit = 0\n')
    assert main(["check", str(config)]) == 2
    assert f'{config}: [proxy."/p"].crash_limit: must be a positive integer, got 0' in capsys.readouterr().err


def test_serve_with_an_unimportable_platform_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.dev.toml"
    config.write_text("")
    assert main(["serve", "--config", str(config), "--platform", "no_such_module:app", "--port", "0"]) == 2
    err = capsys.readouterr().err
    assert "--platform 'no_such_module:app'" in err and "Traceback" not in err


PLATFORM = """
async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                print("platform-started", flush=True)
            kind = message["type"].removeprefix("lifespan.")
            await send({"type": f"lifespan.{kind}.complete"})
            if kind == "shutdown":
                return
    body = ("platform saw " + scope["path"]).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"%d" % len(body))]})
    await send({"type": "http.response.body", "body": body})
"""


@pytest.mark.parametrize("kind", ["import-string", "url"])
def test_serve_platform_gets_what_no_route_matches(tmp_path: Path, kind: str) -> None:
    """One port serves the whole product: routes go to plugins, everything else to the platform,
    either imported and run behind the proxy (its lifespan included) or at a URL run by hand."""
    (tmp_path / "the_platform.py").write_text(PLATFORM)
    backend = tmp_path / "plugin.py"
    backend.write_text(PLATFORM.replace("platform saw", "plugin saw"))
    plugin_port, platform_port, port = free_port(), free_port(), free_port()
    env = {**os.environ, SECRET_ENV: SECRET, "PYTHONPATH": str(tmp_path)}
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[proxy]\n"/peak" = "http://127.0.0.1:{plugin_port}"\n')
    servers = [
        subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "plugin:app", "--port", str(plugin_port), "--log-level", "warning"],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
        )
    ]
    target = "the_platform:app"
    if kind == "url":
        target = f"http://127.0.0.1:{platform_port}"
        argv = [sys.executable, "-m", "uvicorn", "the_platform:app", "--port", str(platform_port)]
        servers.append(
            subprocess.Popen([*argv, "--log-level", "warning"], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL)
        )
    child = _Child("serve", "--config", str(config), "--port", str(port), "--platform", target, env=env)
    try:
        child.wait_for("Uvicorn running on")
        if kind == "import-string":
            assert any("platform-started" in line for line in child.seen)
        deadline = time.monotonic() + 20
        while True:
            try:
                plugin = httpx.get(f"http://127.0.0.1:{port}/peak/x", timeout=10)
                platform = httpx.get(f"http://127.0.0.1:{port}/experiments/7", timeout=10)
                if plugin.status_code == 200 and platform.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the plugin and platform never both answered"
            time.sleep(0.1)
        assert plugin.text == "plugin saw /peak/x"
        assert platform.text == "platform saw /experiments/7"
    finally:
        child.stop()
        for server in servers:
            server.terminate()
            server.wait(15)


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


# --- status of a live supervisor, supervise and demo usage errors, serve on a busy port -----------------


def test_status_of_a_running_supervisor_shows_how_long_each_plugin_has_been_in_its_state(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Ages read as seconds under two minutes, minutes under two hours, then hours."""
    from mint_proxy.plugins.runtime import write_state
    from mint_proxy.plugins.spec import PluginState, PluginStatus

    now = time.time()
    plugins = {
        slug: PluginStatus(slug, f"/{slug}", PluginState.READY, f"unix:{slug}.sock", pid=100 + n, since=now - age)
        for n, (slug, age) in enumerate([("fresh", 30), ("minutes", 600), ("hours", 3 * 3600)])
    }
    plugins["never"] = PluginStatus("never", "/never", PluginState.STOPPED, "unix:never.sock", last_exit="exit 3")
    write_state(str(tmp_path), plugins, pid=os.getpid(), started=now)
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"{tmp_path}: supervisor pid {os.getpid()} running"
    rows = {line.split()[0]: line.split() for line in lines[3:]}
    assert rows["fresh"][4] == "30s" and rows["minutes"][4] == "10m" and rows["hours"][4] == "3.0h"
    assert rows["never"][2:] == ["-", "0", "-", "exit", "3", "unix:never.sock"]


def test_status_of_a_supervisor_without_plugins_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mint_proxy.plugins.runtime import write_state

    write_state(str(tmp_path), {}, pid=os.getpid(), started=time.time(), stopped=time.time())
    assert main(["status", "--runtime-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.strip().endswith("NOT running (the states below are its last word); no plugins")


def test_supervise_with_a_broken_config_exits_2_naming_the_problem(
    broken_config: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["supervise", str(broken_config)]) == 2
    err = capsys.readouterr().err
    assert BROKEN_MESSAGE in err and "Traceback" not in err


@pytest.mark.parametrize("duration", ["0", "-1", "nan"])
def test_demo_with_a_duration_that_is_not_positive_exits_2(duration: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--port", "0", "--duration", duration]) == 2
    assert "--duration must be a positive number of seconds" in capsys.readouterr().err


def test_serve_on_a_port_in_use_exits_1(good_config: Path) -> None:
    """uvicorn cannot bind, logs why and exits: ``serve`` returns its failure status instead of raising."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        assert main(["serve", "--config", str(good_config), "--port", str(port), "--log-level", "critical"]) == 1
