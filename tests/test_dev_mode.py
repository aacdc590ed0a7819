"""The proxy running its own plugins: ``uvicorn mint_proxy:app`` (one or two workers),
``mint-proxy supervise`` and ``mint-proxy status``, with real plugin processes
(``tests.plugin_apps``) under the real supervisor.
"""

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mint_proxy import verify_internal_token
from mint_proxy.devconfig import CONFIG_ENV, RUNTIME_DIR_ENV, SECRET_ENV
from mint_proxy.plugins._election import LOCK_FILE
from mint_proxy.plugins.runtime import read_state

from .supervised import REPO_ROOT
from .test_app import Child, Uvicorn, child_env, poll, write_config
from .test_workers import RETRY_WINDOW, keep_alive_pair, worker_pids
from .utils import SECRET

DEADLINE = 30.0
FAST = "backoff_initial = 0.05\nbackoff_max = 0.2\ncrash_limit = 2\ncrash_window = 60\nstop_timeout = 5\n"


def plugin_table(prefix: str, app: str, extra: str = "", *, module: str = "plugin_apps") -> str:
    return f'[proxy."{prefix}"]\napp = "tests.{module}:{app}"\ncwd = "{REPO_ROOT}"\n{FAST}{extra}\n'


def states(runtime_dir: Path) -> dict[str, str]:
    state = read_state(str(runtime_dir))
    return {} if state is None else {slug: str(status.state) for slug, status in state.plugins.items()}


def pid_of(runtime_dir: Path, slug: str) -> int | None:
    state = read_state(str(runtime_dir))
    status = None if state is None else state.plugins.get(slug)  # absent while it is removed and added again
    return None if status is None else status.pid


def parent_of(pid: int) -> int:
    with open(f"/proc/{pid}/stat", "rb") as file:
        stat = file.read()
    return int(stat[stat.rfind(b")") + 2 :].split()[1])


@pytest.fixture
def runtime_dir(private_runtime_dir: str) -> Path:
    return Path(private_runtime_dir) / "rt"  # short: socket paths are limited to ~107 bytes


def start_uvicorn(tmp_path: Path, config: Path, runtime_dir: Path, *args: str, **env: str) -> Uvicorn:
    variables = {CONFIG_ENV: str(config), RUNTIME_DIR_ENV: str(runtime_dir), **env}
    return Uvicorn(*args, env=child_env(**variables), cwd=tmp_path)


@pytest.fixture
def two_workers_two_plugins(tmp_path: Path, runtime_dir: Path) -> Iterator[tuple[Uvicorn, Path]]:
    """``--workers 2`` supervising ``echo`` and ``boom``, which fails at every start."""
    config = tmp_path / "config.dev.toml"
    text = f"[settings]\nretry_window = {RETRY_WINDOW}\n" + plugin_table("/echo", "echo", module="wire_apps")
    text += plugin_table("/boom", "fails_at_startup")
    write_config(config, text)
    child = start_uvicorn(tmp_path, config, runtime_dir, "--workers", "2")
    try:
        poll(lambda: child.running() and states(runtime_dir).get("echo") == "READY", DEADLINE, "echo READY")
        poll(lambda: len(worker_pids(child.proc.pid)) == 2, DEADLINE, "two workers")
        yield child, runtime_dir
    finally:
        child.stop()


def test_two_workers_one_supervisor_both_route(two_workers_two_plugins: tuple[Uvicorn, Path]) -> None:
    """Exactly one worker supervises (it holds the lock, wrote the state, is the plugin's parent);
    both workers route to the plugin, and a token either worker minted verifies with the one secret."""
    child, runtime_dir = two_workers_two_plugins
    workers = worker_pids(child.proc.pid)
    state = read_state(str(runtime_dir))
    assert state is not None and state.pid in workers
    assert int((runtime_dir / LOCK_FILE).read_text()) == state.pid
    plugin_pid = state.plugins["echo"].pid
    assert plugin_pid is not None and parent_of(plugin_pid) == state.pid
    assert sum("supervising the plugins" in line for line in child.stderr) == 1
    secret = (runtime_dir / "internal-token.secret").read_text().strip()
    tokens: set[str] = set()
    deadline = time.monotonic() + DEADLINE
    while len(tokens) < 2:  # each worker signs its own cached token: two tokens are two workers
        assert time.monotonic() < deadline, "requests never reached the second worker"
        with httpx.Client(base_url=child.url, timeout=10) as client:  # a new connection each time
            response = client.get("/echo/x")
        assert response.status_code == 200
        tokens.add(response.json()["token"])
    for token in tokens:
        assert verify_internal_token(token, secret, plugin="echo").plugin == "echo"


def test_crash_loop_is_an_immediate_503_in_every_worker(two_workers_two_plugins: tuple[Uvicorn, Path]) -> None:
    child, runtime_dir = two_workers_two_plugins
    poll(lambda: states(runtime_dir).get("boom") == "FATAL", DEADLINE, "boom FATAL after its crash loop")
    refused: dict[str, float] = {}  # worker (its token) -> seconds its 503 took
    deadline = time.monotonic() + DEADLINE
    while len(refused) < 2:
        assert time.monotonic() < deadline, f"503 seen from {len(refused)} worker(s) only"
        one, two, took = keep_alive_pair(child.port, "/echo/x", "/boom/x")  # one connection: one worker
        if not two.startswith(b"HTTP/1.1 503"):
            continue  # that worker has not read the new state yet
        head, _, body = two.partition(b"\r\n\r\n")
        assert b"\r\nretry-after: " in head.lower()
        assert json.loads(body)["error"] == "plugin_unavailable"
        refused[json.loads(one.partition(b"\r\n\r\n")[2])["token"]] = took
    assert max(refused.values()) < RETRY_WINDOW / 4  # at once, not after the retry window


def test_status_json_and_text(two_workers_two_plugins: tuple[Uvicorn, Path]) -> None:
    _, runtime_dir = two_workers_two_plugins
    poll(lambda: states(runtime_dir).get("boom") == "FATAL", DEADLINE, "boom FATAL")
    env = child_env(**{RUNTIME_DIR_ENV: str(runtime_dir)})
    cli = [sys.executable, "-m", "mint_proxy.cli", "status"]
    out = subprocess.run([*cli, "--json"], env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert out.returncode == 0, out.stderr
    document = json.loads(out.stdout)
    assert document["supervisor"]["running"] is True
    assert document["plugins"]["echo"]["state"] == "READY"
    assert document["plugins"]["boom"]["state"] == "FATAL"
    assert any("boom-marker" in line for line in document["plugins"]["boom"]["log_tail"])
    text = subprocess.run(cli, env=env, capture_output=True, text=True, timeout=DEADLINE)
    assert text.returncode == 0
    assert "running" in text.stdout.splitlines()[0]
    rows = {line.split()[0]: line.split()[1] for line in text.stdout.splitlines()[3:]}
    assert rows == {"boom": "FATAL", "echo": "READY"}


def test_a_plugin_killed_during_load_loses_and_mixes_up_nothing(tmp_path: Path, runtime_dir: Path) -> None:
    """1,000 requests while the plugin is SIGKILLed: each gets its own answer (its request id
    echoed back by the plugin) or a clean JSON 502/503 carrying its own request id; none hangs or vanishes."""
    config = tmp_path / "config.dev.toml"
    text = f"[settings]\nretry_window = {RETRY_WINDOW}\n" + plugin_table("/echo", "echo", module="wire_apps")
    write_config(config, text)
    child = start_uvicorn(tmp_path, config, runtime_dir, **{SECRET_ENV: SECRET})
    try:
        poll(lambda: child.running() and states(runtime_dir).get("echo") == "READY", DEADLINE, "READY")
        results = asyncio.run(_load(child.url, runtime_dir, total=1000, concurrency=16))
    finally:
        child.stop()
    assert len(results) == 1000
    counts: dict[int, int] = {}
    for request_id, status, body, header_id in results:
        counts[status] = counts.get(status, 0) + 1
        assert header_id == request_id
        if status == 200:
            assert json.loads(body)["request_id"] == request_id  # the plugin's answer to this very request
        else:
            assert status in (502, 503), (status, body)
            assert json.loads(body)["request_id"] == request_id
    assert counts.get(200, 0) > 0
    restarted = read_state(str(runtime_dir))
    assert restarted is not None and restarted.plugins["echo"].restarts >= 1
    print(f"\nstatus counts during a SIGKILL under load: {counts}")


async def _load(url: str, runtime_dir: Path, *, total: int, concurrency: int) -> list[tuple[str, int, str, str]]:
    results: list[tuple[str, int, str, str]] = []
    queue = iter(range(total))
    killed = asyncio.Event()

    async def worker(client: httpx.AsyncClient) -> None:
        for n in queue:
            request_id = f"load-{n:04d}"
            if n == total // 3 and not killed.is_set():
                killed.set()
                pid = pid_of(runtime_dir, "echo")
                assert pid is not None
                os.kill(pid, signal.SIGKILL)
            response = await client.get(f"/echo/{n}", headers={"X-Request-Id": request_id})
            results.append((request_id, response.status_code, response.text, response.headers["x-request-id"]))

    async with httpx.AsyncClient(base_url=url, timeout=DEADLINE) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def test_editing_one_plugin_restarts_only_that_plugin(tmp_path: Path, runtime_dir: Path) -> None:
    config = tmp_path / "config.dev.toml"
    write_config(config, plugin_table("/a", "hello") + plugin_table("/b", "hello", "strip_prefix = true\n"))
    child = start_uvicorn(tmp_path, config, runtime_dir, **{SECRET_ENV: SECRET})
    try:
        ready = {"a": "READY", "b": "READY"}
        poll(lambda: child.running() and states(runtime_dir) == ready, DEADLINE, "both READY")
        a, b = pid_of(runtime_dir, "a"), pid_of(runtime_dir, "b")
        write_config(
            config,
            plugin_table("/a", "hello") + plugin_table("/b", "hello", 'strip_prefix = true\nenv = { MARK = "2" }\n'),
        )
        poll(lambda: pid_of(runtime_dir, "b") not in (None, b) and states(runtime_dir) == ready, DEADLINE, "b again")
        assert pid_of(runtime_dir, "a") == a
        assert json.loads(child.get("/b/env").text)["MARK"] == "2"
        child.wait_for_stderr(r"plugin b changed in the config: restarting it")
    finally:
        child.stop()


DEV_PLUGIN = """
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"VERSION"})
"""


def test_dev_mode_command_plugin_hot_reloads_while_the_proxy_runs(tmp_path: Path, runtime_dir: Path) -> None:
    """``command = "uvicorn mod:app --reload --uds {socket}"``: the proxy starts it, prefixes its log
    lines with the slug, and an edit of the plugin's code is served without restarting the proxy."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "devplug.py").write_text(textwrap.dedent(DEV_PLUGIN).replace("VERSION", "v1"))
    config = tmp_path / "config.dev.toml"
    command = f"{sys.executable} -m uvicorn devplug:app --reload --reload-dir {code} --uds {{socket}}"
    write_config(config, f'[proxy."/dev"]\ncommand = "{command}"\ncwd = "{code}"\n')
    child = start_uvicorn(tmp_path, config, runtime_dir, **{SECRET_ENV: SECRET})
    try:
        poll(lambda: child.running() and states(runtime_dir).get("dev") == "READY", DEADLINE, "dev READY")
        assert child.get("/dev/x").text == "v1"
        child.wait_for_stderr(r"dev \| .*(Uvicorn running|Started reloader)")
        proxy_pid, plugin_pid = child.proc.pid, pid_of(runtime_dir, "dev")
        edited = textwrap.dedent(DEV_PLUGIN).replace("VERSION", "v2")

        def edit_served() -> bool:
            # uvicorn's reloader arms its file watcher only after it started the worker, so an edit made
            # the moment the worker answers can go unseen: edit again until one is seen.
            (code / "devplug.py").write_text(edited)
            return child.get("/dev/x").text == "v2"

        poll(edit_served, DEADLINE, "the edit is served")
        assert child.proc.pid == proxy_pid and child.running()
        assert pid_of(runtime_dir, "dev") == plugin_pid  # uvicorn's reloader restarted its worker, not us
    finally:
        child.stop()
    assert states(runtime_dir)["dev"] == "STOPPED"


def test_supervise_runs_the_plugins_and_workers_that_only_route_use_them(tmp_path: Path, runtime_dir: Path) -> None:
    config = tmp_path / "config.dev.toml"
    write_config(config, plugin_table("/hello", "hello"))
    env = child_env(**{RUNTIME_DIR_ENV: str(runtime_dir), SECRET_ENV: SECRET})
    supervise = Child([sys.executable, "-m", "mint_proxy.cli", "supervise", str(config)], env=env, cwd=tmp_path)
    proxy = start_uvicorn(tmp_path, config, runtime_dir, MINT_PROXY_SUPERVISE="off", **{SECRET_ENV: SECRET})
    try:
        poll(lambda: supervise.running() and states(runtime_dir).get("hello") == "READY", DEADLINE, "READY")
        proxy.wait_for_stderr("Application startup complete")
        # The routing worker may have read state.json while the plugin was still starting; it
        # follows the file within a poll, and then forwards.
        poll(lambda: proxy.get("/hello/x").text == "hi", DEADLINE, "the routing worker forwards")
        state = read_state(str(runtime_dir))
        assert state is not None and state.pid == supervise.proc.pid
        assert int((runtime_dir / LOCK_FILE).read_text()) == supervise.proc.pid
        plugin_pid = state.plugins["hello"].pid
        assert plugin_pid is not None
        assert supervise.stop() == 0  # SIGTERM: the plugins stop with it
        poll(lambda: not os.path.exists(f"/proc/{plugin_pid}"), DEADLINE, "the plugin stopped")
        assert states(runtime_dir)["hello"] == "STOPPED"
        # The worker that only routes reads the new state on its next poll: from then on, 503 at once.
        poll(lambda: proxy.get("/hello/x").status_code == 503, DEADLINE, "the routing worker refuses it")
        assert proxy.get("/hello/x").json()["error"] == "plugin_unavailable"
    finally:
        supervise.stop()
        proxy.stop()
