"""The standalone app: ``mint_proxy.app`` / ``DevProxyApp`` and ``uvicorn mint_proxy:app``.

In-process tests serve ``DevProxyApp(environ=...)`` with ``tests.utils.serve``; the
``uvicorn mint_proxy:app`` tests run a real subprocess and read its stderr, which is
where a developer sees startup errors, reloads and access lines (issue item 22).
"""

import asyncio
import json
import logging
import os
import re
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypedDict

import httpx
import pytest

from mint_proxy import DevProxyApp, InvalidInternalToken, verify_internal_token
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV
from mint_proxy.plugins.runtime import ProcessRecord, boot_id, process_start_time, write_record

from .backends import header_values
from .conftest import PluginServer
from .utils import SECRET, free_port, serve

DEADLINE = 20.0  # seconds a subprocess may take to start, exit or show a line
RELOAD_DEADLINE = 10.0  # seconds an edit may take to apply (the watcher polls every second)
OTHER_SECRET = "a-different-secret-for-the-dev-app-0123456789"  # >= 32 bytes, not SECRET


def write_config(path: Path, text: str) -> None:
    """Write ``text`` and make sure the mtime moves forward, whatever the filesystem's clock granularity."""
    before = path.stat().st_mtime_ns if path.exists() else 0
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    mtime = max(time.time_ns(), before + 2_000_000_000)
    os.utime(path, ns=(mtime, mtime))


def child_env(**variables: str) -> dict[str, str]:
    env = {name: value for name, value in os.environ.items() if not name.startswith("MINT_")}
    env.update(variables)
    return env


def poll(condition: Callable[[], bool], deadline: float, what: str) -> None:
    """Check ``condition`` until it holds; fail after ``deadline`` seconds."""
    end = time.monotonic() + deadline
    while not condition():
        if time.monotonic() > end:
            pytest.fail(f"not true within {deadline} s: {what}")
        time.sleep(0.05)


class Child:
    """A subprocess this test started; threads drain stdout and stderr into lists so pipes never block."""

    def __init__(self, argv: list[str], *, env: dict[str, str], cwd: Path) -> None:
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._readers = [
            threading.Thread(target=self._drain, args=(self.proc.stdout, self.stdout), daemon=True),
            threading.Thread(target=self._drain, args=(self.proc.stderr, self.stderr), daemon=True),
        ]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _drain(stream: object, lines: list[str]) -> None:
        assert stream is not None
        for line in stream:  # type: ignore[attr-defined]
            lines.append(line)

    def wait_for_stderr(self, pattern: str) -> str:
        """The first stderr line matching the regex ``pattern``; fail after ``DEADLINE`` or if the process exits."""
        end = time.monotonic() + DEADLINE
        while True:
            for line in list(self.stderr):
                if re.search(pattern, line):
                    return line
            if self.proc.poll() is not None and not any(r.is_alive() for r in self._readers):
                pytest.fail(f"exited {self.proc.returncode} before {pattern!r}; stderr: {''.join(self.stderr)}")
            if time.monotonic() > end:
                pytest.fail(f"no stderr line matching {pattern!r} within {DEADLINE} s: {''.join(self.stderr)}")
            time.sleep(0.02)

    def running(self) -> bool:
        """True while the process runs; fail the test with its stderr once it has exited."""
        if self.proc.poll() is not None:
            self._join()
            pytest.fail(f"exited {self.proc.returncode}; stderr: {''.join(self.stderr)}")
        return True

    def wait(self) -> int:
        """Wait for the process to exit on its own (fail after ``DEADLINE``)."""
        try:
            code = self.proc.wait(timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            self.stop()
            pytest.fail(f"still running after {DEADLINE} s; stderr: {''.join(self.stderr)}")
        self._join()
        return code

    def stop(self) -> int:
        """SIGTERM this process (by its PID) and wait for it; return its exit code."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=DEADLINE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._join()
        return self.proc.returncode

    def _join(self) -> None:
        for reader in self._readers:
            reader.join(timeout=5)
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Uvicorn(Child):
    """``python -m uvicorn mint_proxy:app`` on 127.0.0.1 and a free port."""

    def __init__(self, *args: str, env: dict[str, str], cwd: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        argv = [sys.executable, "-m", "uvicorn", "mint_proxy:app", "--port", str(self.port), "--host", "127.0.0.1"]
        super().__init__([*argv, *args], env=env, cwd=cwd)

    def get(self, path: str) -> httpx.Response:
        return httpx.get(self.url + path, timeout=10)


@pytest.fixture
def run_uvicorn(tmp_path: Path) -> Iterator[Callable[..., Uvicorn]]:
    """Start ``uvicorn mint_proxy:app`` subprocesses in ``tmp_path``; stop each one at teardown."""
    started: list[Uvicorn] = []

    def start(*args: str, **variables: str) -> Uvicorn:
        child = Uvicorn(*args, env=child_env(**variables), cwd=tmp_path)
        started.append(child)
        return child

    yield start
    for child in started:
        child.stop()


# -- (a) import reads nothing --------------------------------------------------------------------------

PROBE = """
import json, os, sys

opened = []
sys.addaudithook(lambda event, args: opened.append(args[0]) if event == "open" else None)
read = []
getitem = os._Environ.__getitem__

def spy(self, key):
    read.append(key)
    return getitem(self, key)

os._Environ.__getitem__ = spy
import mint_proxy
during = {"opened": list(opened), "read": list(read)}

# Control: the same instruments do see a read of the variable and an attempt to open the file.
del opened[:], read[:]
try:
    open(os.environ.get("MINT_PROXY_CONFIG"), "rb")
except OSError:
    pass
print(json.dumps({
    "opened": [os.fsdecode(p) for p in during["opened"] if isinstance(p, (str, bytes))],
    "read": during["read"],
    "control_opened": [os.fsdecode(p) for p in opened if isinstance(p, (str, bytes))],
    "control_read": read,
    # The distribution's own packages: mint_proxy and mint_plugin (the supervisor's plugin host).
    "allowed": [
        sys.prefix,
        sys.base_prefix,
        sys.exec_prefix,
        os.path.dirname(mint_proxy.__file__),
        os.path.dirname(sys.modules["mint_plugin"].__file__ or ""),
    ],
    "proxy": repr(mint_proxy.app.proxy),
}))
"""


class Probe(TypedDict):
    """What ``PROBE`` saw while ``import mint_proxy`` ran, what its control saw, and the config path."""

    opened: list[str]
    read: list[str]
    control_opened: list[str]
    control_read: list[str]
    allowed: list[str]
    proxy: str
    missing: str


def run_probe(tmp_path: Path) -> Probe:
    """``python -c PROBE`` with ``MINT_PROXY_CONFIG`` naming a missing file and a too-short secret."""
    missing = tmp_path / "does-not-exist" / "config.dev.toml"
    env = child_env(**{CONFIG_ENV: str(missing), SECRET_ENV: "too-short"})
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=DEADLINE
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    seen: dict[str, Any] = json.loads(done.stdout)
    probe = Probe(
        opened=seen["opened"],
        read=seen["read"],
        control_opened=seen["control_opened"],
        control_read=seen["control_read"],
        allowed=seen["allowed"],
        proxy=seen["proxy"],
        missing=str(missing),
    )
    assert probe["control_read"] == [CONFIG_ENV] and probe["control_opened"] == [str(missing)]  # instruments work
    return probe


def test_import_succeeds_with_a_missing_config_and_a_short_secret(tmp_path: Path) -> None:
    probe = run_probe(tmp_path)
    assert probe["proxy"] == "None"  # mint_proxy.app has loaded nothing


def test_import_does_not_open_the_config_file(tmp_path: Path) -> None:
    probe = run_probe(tmp_path)
    assert probe["missing"] not in probe["opened"]


def test_import_opens_no_file_outside_python_and_the_package(tmp_path: Path) -> None:
    probe = run_probe(tmp_path)
    roots = tuple(os.path.join(root, "") for root in probe["allowed"])
    assert [path for path in probe["opened"] if not os.path.abspath(path).startswith(roots)] == []


def test_import_reads_no_mint_environment_variable(tmp_path: Path) -> None:
    probe = run_probe(tmp_path)
    assert [name for name in probe["read"] if str(name).startswith("MINT_")] == []


# -- (b, c) DevProxyApp in process ------------------------------------------------------------------------


@pytest.fixture
def peak_config(tmp_path: Path, plugin: PluginServer) -> Path:
    path = tmp_path / "config.dev.toml"
    write_config(path, f'[proxy]\n"/peak" = "{plugin.url}"\n')
    return path


def test_dev_app_proxies_with_tokens_signed_by_the_environment_secret(
    http: str, peak_config: Path, plugin: PluginServer
) -> None:
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config), SECRET_ENV: OTHER_SECRET})
    with serve(app, http=http, lifespan="on") as running:
        response = httpx.get(running.url + "/peak/x?q=1", timeout=10)
    assert response.status_code == 200
    assert response.json()["raw_path"] == "/peak/x"
    [token] = header_values(plugin.app.seen[0], "x-mint-internal-token")
    assert verify_internal_token(token, OTHER_SECRET, plugin="peak").plugin == "peak"
    with pytest.raises(InvalidInternalToken):
        verify_internal_token(token, SECRET)


def test_dev_app_unrouted_path_is_a_json_404(peak_config: Path, plugin: PluginServer) -> None:
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config), SECRET_ENV: OTHER_SECRET})
    with serve(app, lifespan="on") as running:
        response = httpx.get(running.url + "/elsewhere", timeout=10)
    assert response.status_code == 404
    assert response.json()["error"] == "not_found"
    assert plugin.app.seen == []


def test_dev_app_explicit_environ_wins_over_os_environ(
    peak_config: Path, plugin: PluginServer, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv(CONFIG_ENV, str(tmp_path / "missing.toml"))
    monkeypatch.setenv(SECRET_ENV, "short")
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config), SECRET_ENV: OTHER_SECRET})
    with serve(app, lifespan="on") as running:
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200


class WithoutLifespan:
    """Keeps lifespan from ``DevProxyApp`` (as a server without lifespan would) but closes its pool at shutdown.

    Without lifespan nothing closes the pooled upstream connections, and uvloop refuses to
    close a loop with open handles; the test is about loading, not about that.
    """

    def __init__(self, app: DevProxyApp) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        if self.app.proxy is not None:
            self.app.proxy.pool.close()
        await send({"type": "lifespan.shutdown.complete"})


def test_dev_app_without_lifespan_loads_on_the_first_request(peak_config: Path, plugin: PluginServer) -> None:
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config), SECRET_ENV: OTHER_SECRET})
    with serve(WithoutLifespan(app), lifespan="on") as running:
        assert app.proxy is None
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
    assert app.proxy is not None


def test_dev_app_without_a_secret_warns_and_uses_one_generated_in_the_runtime_dir(
    peak_config: Path, plugin: PluginServer, caplog: pytest.LogCaptureFixture
) -> None:
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config)})
    with caplog.at_level(logging.WARNING, logger="mint_proxy"), serve(WithoutLifespan(app), lifespan="on") as running:
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
    warnings = [r for r in caplog.records if r.name == "mint_proxy" and r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert SECRET_ENV in warnings[0].getMessage() and "generated" in warnings[0].getMessage()
    [token] = header_values(plugin.app.seen[0], "x-mint-internal-token")
    with pytest.raises(InvalidInternalToken, match="signature"):
        verify_internal_token(token, SECRET)


def test_dev_app_lifespan_shows_the_random_secret_warning_on_stderr(
    peak_config: Path, plugin: PluginServer, capsys: pytest.CaptureFixture[str]
) -> None:
    app = DevProxyApp(environ={CONFIG_ENV: str(peak_config)})
    with serve(app, lifespan="on", log_level="info") as running:
        assert httpx.get(running.url + "/peak/x", timeout=10).status_code == 200
    err = capsys.readouterr().err
    assert re.search(rf"WARNING mint_proxy: {SECRET_ENV} is not set: .*generated", err)
    assert re.search(r'"GET /peak/x" plugin=peak status=200', err)


# -- (d) startup failures under uvicorn ----------------------------------------------------------------------


def assert_clean_failure(child: Uvicorn, *expected: str) -> str:
    code = child.wait()
    err = "".join(child.stderr)
    assert code != 0
    for text in expected:
        assert text in err
    assert "Traceback" not in err
    return err


def test_broken_config_makes_uvicorn_exit_with_file_key_and_problem(
    tmp_path: Path, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    config = tmp_path / "broken.dev.toml"
    write_config(config, '[proxy]\n"/peak" = { url = "ftp://127.0.0.1:8005" }\n')
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    assert_clean_failure(child, "broken.dev.toml", '[proxy."/peak"].url', "scheme 'ftp'")


def test_unknown_key_makes_uvicorn_exit_naming_it(tmp_path: Path, run_uvicorn: Callable[..., Uvicorn]) -> None:
    config = tmp_path / "typo.toml"
    write_config(config, '[proxy."/peak"]\nurl = "http://127.0.0.1:8005"\nread_timout = 5\n')
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    assert_clean_failure(child, "typo.toml", '[proxy."/peak"].read_timout', "unknown key", "read_timeout")


def test_missing_config_makes_uvicorn_exit_naming_the_file(tmp_path: Path, run_uvicorn: Callable[..., Uvicorn]) -> None:
    child = run_uvicorn(**{CONFIG_ENV: "nowhere.toml", SECRET_ENV: SECRET})
    assert_clean_failure(child, "nowhere.toml", "no such file", CONFIG_ENV)


def test_short_secret_makes_uvicorn_exit_without_echoing_it(
    peak_config: Path, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    secret = "short-s3cr3t-value"
    child = run_uvicorn(**{CONFIG_ENV: str(peak_config), SECRET_ENV: secret})
    err = assert_clean_failure(child, SECRET_ENV, "at least 32 bytes")
    assert secret not in err


# -- (e) reload, (f) access log ---------------------------------------------------------------------------


@pytest.fixture
def reloading(tmp_path: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]) -> tuple[Uvicorn, Path]:
    """``uvicorn mint_proxy:app`` on a config routing ``/a`` to ``plugin``, started and answering."""
    config = tmp_path / "config.dev.toml"
    write_config(config, f'[proxy]\n"/a" = "{plugin.url}"\n')
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    child.wait_for_stderr("Uvicorn running on")
    assert child.get("/a/x").status_code == 200
    return child, config


def test_uvicorn_app_signs_tokens_with_the_environment_secret(
    reloading: tuple[Uvicorn, Path], plugin: PluginServer
) -> None:
    [token] = header_values(plugin.app.seen[0], "x-mint-internal-token")
    assert verify_internal_token(token, SECRET, plugin="a").plugin == "a"


def test_edited_config_replaces_the_routes_without_a_restart(
    reloading: tuple[Uvicorn, Path], plugin: PluginServer, plugin2: PluginServer
) -> None:
    """Editing the config file replaces the routes in the running server, without a restart."""
    child, config = reloading
    write_config(config, f'[proxy]\n"/b" = "{plugin2.url}"\n')
    poll(
        lambda: child.get("/b/x").status_code == 200 and child.get("/a/x").status_code == 404,
        RELOAD_DEADLINE,
        "/b routed and /a gone",
    )
    assert plugin2.app.seen[-1]["raw_path"] == "/b/x"
    assert child.proc.poll() is None


def test_broken_edit_keeps_the_last_good_routes_and_logs_the_error(
    reloading: tuple[Uvicorn, Path], plugin: PluginServer, plugin2: PluginServer
) -> None:
    """A broken config edit keeps the last good routes and logs the error."""
    child, config = reloading
    write_config(config, f'[proxy]\n"/b" = "{plugin2.url}"\n')
    poll(lambda: child.get("/b/x").status_code == 200, RELOAD_DEADLINE, "/b routed")
    write_config(config, '[proxy]\n"/b" = { url = "ftp://127.0.0.1:1" }\n')
    line = child.wait_for_stderr("keeping the last good routes")
    assert "ERROR" in line and "config.dev.toml" in line and '[proxy."/b"].url' in line and "'ftp'" in line
    assert child.get("/b/x").status_code == 200
    assert child.get("/a/x").status_code == 404
    assert child.proc.poll() is None


def test_changed_mount_path_asks_for_a_restart_and_keeps_routing(
    reloading: tuple[Uvicorn, Path], plugin: PluginServer
) -> None:
    child, config = reloading
    write_config(config, f'[settings]\nmount_path = "/api"\n\n[proxy]\n"/a" = "{plugin.url}"\n')
    line = child.wait_for_stderr("restart the proxy")
    assert "WARNING" in line and "mount_path" in line
    assert child.get("/a/x").status_code == 200  # the running proxy keeps its mount path


def test_uvicorn_app_reads_config_dev_toml_from_the_working_directory(
    tmp_path: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    write_config(tmp_path / "config.dev.toml", f'[proxy]\n"/peak" = "{plugin.url}"\n')
    child = run_uvicorn(**{SECRET_ENV: SECRET})  # no MINT_PROXY_CONFIG; cwd is tmp_path
    child.wait_for_stderr("Uvicorn running on")
    assert child.get("/peak/x").status_code == 200
    assert plugin.app.seen[0]["raw_path"] == "/peak/x"


def test_uvicorn_app_without_a_secret_warns_on_stderr(
    peak_config: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    child = run_uvicorn(**{CONFIG_ENV: str(peak_config)})
    line = child.wait_for_stderr(f"{SECRET_ENV} is not set")
    assert "WARNING" in line and "generated" in line
    child.wait_for_stderr("Uvicorn running on")
    assert child.get("/peak/x").status_code == 200
    [token] = header_values(plugin.app.seen[0], "x-mint-internal-token")
    with pytest.raises(InvalidInternalToken, match="signature"):
        verify_internal_token(token, SECRET)


def test_access_log_is_on_stderr_by_default(reloading: tuple[Uvicorn, Path], plugin: PluginServer) -> None:
    child, _ = reloading
    response = httpx.get(child.url + "/a/x?q=1", headers={"X-Request-Id": "access-log-check"}, timeout=10)
    assert response.status_code == 200
    line = child.wait_for_stderr(r'access-log-check "GET /a/x\?q=1" plugin=a status=200 [0-9.]+ms in=0 out=\d+ ')
    assert line.split()[2:4] == ["INFO", "mint_proxy.access:"]


def test_no_access_log_silences_the_access_lines(
    peak_config: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    child = run_uvicorn("--no-access-log", **{CONFIG_ENV: str(peak_config), SECRET_ENV: SECRET})
    child.wait_for_stderr("Uvicorn running on")
    assert child.get("/peak/x").status_code == 200
    assert len(plugin.app.seen) == 1
    child.stop()  # everything the process logged is on the pipe once it has exited
    err = "".join(child.stderr)
    assert "Shutting down" in err
    assert "plugin=peak" not in err


def test_log_level_warning_silences_the_access_lines(
    peak_config: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    child = run_uvicorn("--log-level", "warning", **{CONFIG_ENV: str(peak_config), SECRET_ENV: SECRET})
    poll(lambda: child.running() and _answers(child.url + "/peak/x"), DEADLINE, "the server answers")
    child.stop()
    assert len(plugin.app.seen) >= 1
    assert "plugin=peak" not in "".join(child.stderr)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=10).status_code == 200
    except httpx.TransportError:
        return False


# -- (g) mounted as middleware: logging is the platform's business ---------------------------------------

PLATFORM_SCRIPT = """
import logging, sys

import uvicorn
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer

port, upstream, mode = int(sys.argv[1]), sys.argv[2], sys.argv[3]
if mode == "configured":
    logging.basicConfig(level=logging.INFO, format="%(name)s %(levelname)s %(message)s")


async def home(request):
    return PlainTextResponse("platform")


routes = RouteTable({"/peak": upstream})
middleware = [Middleware(ProxyMiddleware, routes=routes, tokens=TokenIssuer("s" * 40))]
app = Starlette(routes=[Route("/", home)], middleware=middleware)
uvicorn.run(app, host="127.0.0.1", port=port, log_config=None)
"""


def run_platform(tmp_path: Path, plugin: PluginServer, mode: str) -> str:
    """Run the platform script, proxy one request through it, stop it and return its stderr."""
    script = tmp_path / "platform_app.py"  # not platform.py: that would shadow the stdlib module
    script.write_text(PLATFORM_SCRIPT, encoding="utf-8")
    port = free_port()
    child = Child([sys.executable, str(script), str(port), plugin.url, mode], env=child_env(), cwd=tmp_path)
    try:
        poll(lambda: child.running() and _answers(f"http://127.0.0.1:{port}/"), DEADLINE, "the platform answers")
        assert httpx.get(f"http://127.0.0.1:{port}/peak/x", timeout=10).status_code == 200
    finally:
        child.stop()
    return "".join(child.stderr)


def test_mounted_middleware_prints_nothing_without_platform_logging(tmp_path: Path, plugin: PluginServer) -> None:
    err = run_platform(tmp_path, plugin, "silent")
    assert len(plugin.app.seen) == 1
    assert "plugin=peak" not in err
    assert err == ""


def test_mounted_middleware_logs_through_the_platforms_logging(tmp_path: Path, plugin: PluginServer) -> None:
    err = run_platform(tmp_path, plugin, "configured")
    assert re.search(r'mint_proxy.access INFO [0-9a-f]{32} "GET /peak/x" plugin=peak status=200 ', err)


# -- (h) operations: startup log, empty config, JSON log format --------------------------------------------


def test_startup_logs_the_file_and_its_routes(
    tmp_path: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    config = tmp_path / "config.dev.toml"
    write_config(config, f'[proxy]\n"/a" = "{plugin.url}"\n')
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    line = child.wait_for_stderr("loaded ")
    assert f"INFO mint_proxy: loaded {config}: 1 route: /a -> {plugin.url}" in line


def test_an_empty_config_is_a_warning_at_startup(tmp_path: Path, run_uvicorn: Callable[..., Uvicorn]) -> None:
    config = tmp_path / "config.dev.toml"
    write_config(config, "")
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    line = child.wait_for_stderr("loaded ")
    assert "WARNING mint_proxy: loaded" in line and "no routes: every request will be answered 404" in line


def test_an_edit_that_empties_the_config_is_a_warning(reloading: tuple[Uvicorn, Path]) -> None:
    child, config = reloading
    write_config(config, "[proxy]\n")
    line = child.wait_for_stderr("reloaded ")
    assert "WARNING mint_proxy: reloaded" in line and "no routes" in line


def test_json_log_format_prints_one_json_object_per_line(
    tmp_path: Path, plugin: PluginServer, run_uvicorn: Callable[..., Uvicorn]
) -> None:
    config = tmp_path / "config.dev.toml"
    write_config(config, f'[proxy]\n"/a" = "{plugin.url}"\n')
    child = run_uvicorn(**{CONFIG_ENV: str(config), SECRET_ENV: SECRET, "MINT_PROXY_LOG_FORMAT": "json"})
    child.wait_for_stderr("Uvicorn running on")
    assert child.get("/a/x").status_code == 200
    line = child.wait_for_stderr(r'^\{.*"request_id"')
    data = json.loads(line)
    assert (data["level"], data["method"], data["path"], data["plugin"], data["status"]) == (
        "INFO",
        "GET",
        "/a/x",
        "a",
        200,
    )
    startup = json.loads(child.wait_for_stderr(r'^\{.*"loaded '))
    assert startup["logger"] == "mint_proxy" and startup["level"] == "INFO"


def test_an_unknown_log_format_fails_startup(peak_config: Path, run_uvicorn: Callable[..., Uvicorn]) -> None:
    child = run_uvicorn(**{CONFIG_ENV: str(peak_config), SECRET_ENV: SECRET, "MINT_PROXY_LOG_FORMAT": "xml"})
    assert child.wait() != 0
    assert "MINT_PROXY_LOG_FORMAT='xml': must be 'text' or 'json'" in "".join(child.stderr)


# -- edits that need a restart, and a runtime dir another supervisor holds (in-process) -----------------------


def test_an_edit_of_runtime_dir_or_shared_plugins_asks_for_a_restart_and_keeps_the_old_runtime_dir(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Routes apply at once; the runtime dir (lock, state, sockets) and the in-process mounts cannot move live."""
    config = tmp_path / "config.dev.toml"
    write_config(config, f'[settings]\nruntime_dir = "{tmp_path / "rt1"}"\n[proxy]\n"/a" = "http://127.0.0.1:9"\n')
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})
    proxy = app.setup()
    try:
        write_config(
            config,
            f'[settings]\nruntime_dir = "{tmp_path / "rt2"}"\n[proxy]\n"/b" = "http://127.0.0.1:9"\n'
            '[shared."/s"]\napp = "somewhere:app"\n',
        )
        assert app.watcher is not None
        with caplog.at_level(logging.WARNING, logger="mint_proxy"):
            assert not app.watcher.check()  # the first look sees the edit; the next applies it, as it held still
            assert app.watcher.check()
        assert [route.prefix for route in proxy.routes.routes()] == ["/b"]
        assert app.config is not None and app.config.runtime_dir == str(tmp_path / "rt1")
        warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
        assert f"{config}: [shared] plugins changed; restart the platform to mount them" in warnings
        assert f"{config}: runtime_dir changed; restart the proxy to apply it" in warnings
    finally:
        proxy.pool.close()


def test_a_runtime_dir_another_live_supervisor_recorded_leaves_this_process_routing_only(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock was free but the directory's records belong to a supervisor that still runs: this
    process logs why, releases the lock, routes, and tries again later instead of killing its plugins."""
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir(mode=0o700)
    other = os.getppid()  # alive, and not this process
    record = ProcessRecord("old", 2**22 + 1, 1, boot_id(), other, process_start_time(other) or 0)
    write_record(str(runtime_dir), record)
    config = tmp_path / "config.dev.toml"
    write_config(config, f'[settings]\nruntime_dir = "{runtime_dir}"\n[proxy."/p"]\napp = "tests.plugin_apps:hello"\n')
    app = DevProxyApp(environ={CONFIG_ENV: str(config), SECRET_ENV: SECRET})

    async def start_and_close() -> None:
        await app.start()
        try:
            assert app.supervisor is None and app.lock is not None and not app.lock.held
        finally:
            await app.close()

    with caplog.at_level(logging.ERROR, logger="mint_proxy"):
        asyncio.run(start_and_close())
    [error] = [record.getMessage() for record in caplog.records if record.levelno == logging.ERROR]
    assert (
        f"cannot supervise {runtime_dir}: runtime dir {runtime_dir} is in use by the supervisor with pid {other}"
        in error
    )
    assert error.endswith("routing only, trying again in 10s")
