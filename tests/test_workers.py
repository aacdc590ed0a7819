"""``uvicorn mint_proxy:app --workers 2``: one supervisor lock holder, every worker routes, shares
the token secret and answers a plugin the supervisor reports down with an immediate 503.

The state file here is written by the test the way the supervisor writes it (atomically), so
these tests guard the workers' side alone; tests/test_supervised.py runs the real supervisor.
"""

import json
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mint_proxy import verify_internal_token
from mint_proxy.devconfig import CONFIG_ENV, RUNTIME_DIR_ENV
from mint_proxy.plugins._election import LOCK_FILE
from mint_proxy.plugins._secret import SECRET_FILE
from mint_proxy.plugins.spec import PluginState, PluginStatus

from .backends import header_values
from .conftest import PluginServer
from .supervised import supervised
from .test_app import Uvicorn, child_env, poll, write_config
from .utils import read_head

RETRY_WINDOW = 2.0


def write_state(runtime_dir: Path, statuses: list[PluginStatus], *, pid: int = 4242) -> None:
    """Write ``state.json`` as the supervisor does: a temp file, then os.replace."""
    document = {
        "supervisor": {"pid": pid, "started": time.time()},
        "plugins": {status.slug: status.to_json() for status in statuses},
    }
    temp = runtime_dir / ".state.json.tmp"
    temp.write_text(json.dumps(document), encoding="utf-8")
    os.replace(temp, runtime_dir / "state.json")


def worker_pids(master: int) -> set[int]:
    """The uvicorn workers among ``master``'s children (not multiprocessing's resource tracker)."""
    with open(f"/proc/{master}/task/{master}/children", encoding="ascii") as file:
        children = [int(pid) for pid in file.read().split()]
    workers = set()
    for pid in children:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as file:
                if b"spawn_main" in file.read():
                    workers.add(pid)
        except OSError:
            continue
    return workers


@pytest.fixture
def two_workers(tmp_path: Path, plugin: PluginServer) -> Iterator[tuple[Uvicorn, Path]]:
    """Two workers on one config: /ok goes to a live plugin, /down to a socket nobody listens on."""
    runtime_dir = tmp_path / "run"
    config = tmp_path / "config.dev.toml"
    write_config(
        config,
        f"""
        [settings]
        retry_window = {RETRY_WINDOW}
        [proxy]
        "/ok" = "{plugin.url}"
        "/down" = "unix:{runtime_dir}/down.sock"
        """,
    )
    env = child_env(**{CONFIG_ENV: str(config), RUNTIME_DIR_ENV: str(runtime_dir)})
    child = Uvicorn("--workers", "2", env=env, cwd=tmp_path)
    try:
        poll(lambda: child.running() and len(worker_pids(child.proc.pid)) == 2, 20, "two workers")
        poll(lambda: sum("Application startup complete" in line for line in child.stderr) >= 2, 20, "both started")
        yield child, runtime_dir
    finally:
        child.stop()


def keep_alive_pair(port: int, first: str, second: str) -> tuple[bytes, bytes, float]:
    """Two GETs on one new connection (so one worker): both heads, and the second's duration."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(f"GET {first} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        one = read_response(sock)
        started = time.perf_counter()
        sock.sendall(f"GET {second} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        two = read_response(sock)
        return one, two, time.perf_counter() - started


def read_response(sock: socket.socket) -> bytes:
    data = read_head(sock)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length"))
    )
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


def test_exactly_one_worker_holds_the_supervisor_lock_and_another_takes_over_when_it_dies(
    two_workers: tuple[Uvicorn, Path],
) -> None:
    child, runtime_dir = two_workers
    workers = worker_pids(child.proc.pid)
    holder = int((runtime_dir / LOCK_FILE).read_text().strip())
    assert holder in workers
    assert supervised(str(runtime_dir))
    os.kill(holder, signal.SIGKILL)  # the kernel drops its flock; the other worker polls for it
    poll(
        lambda: (runtime_dir / LOCK_FILE).read_text().strip() not in ("", str(holder)),
        10,
        "another worker takes the lock",
    )
    assert int((runtime_dir / LOCK_FILE).read_text()) in worker_pids(child.proc.pid)
    assert supervised(str(runtime_dir))


def test_both_workers_route_and_sign_with_one_generated_secret(
    two_workers: tuple[Uvicorn, Path], plugin: PluginServer
) -> None:
    child, runtime_dir = two_workers
    secret_file = runtime_dir / SECRET_FILE
    assert secret_file.stat().st_mode & 0o777 == 0o600
    secret = secret_file.read_text().strip()
    tokens: set[str] = set()
    deadline = time.monotonic() + 20
    while len(tokens) < 2:  # each worker caches its own token: two tokens are two workers
        assert time.monotonic() < deadline, "requests never reached the second worker"
        with httpx.Client(base_url=child.url, timeout=10) as client:  # a new connection each time
            assert client.get("/ok/x").status_code == 200
        tokens.add(header_values(plugin.app.seen[-1], "x-mint-internal-token")[0])
    for token in tokens:  # a token minted in one worker verifies with the secret every worker uses
        assert verify_internal_token(token, secret, plugin="ok").plugin == "ok"


def test_a_plugin_reported_down_gets_an_immediate_503_in_every_worker(
    two_workers: tuple[Uvicorn, Path], plugin: PluginServer
) -> None:
    child, runtime_dir = two_workers
    status = PluginStatus("down", "/down", PluginState.FATAL, f"unix:{runtime_dir}/down.sock", since=time.time())
    write_state(runtime_dir, [status])
    refused: dict[str, float] = {}  # worker (its token) -> seconds its 503 took
    deadline = time.monotonic() + 30
    while len(refused) < 2:
        assert time.monotonic() < deadline, f"503 seen from {len(refused)} worker(s) only"
        seen = len(plugin.app.seen)
        one, two, took = keep_alive_pair(child.port, "/ok/x", "/down/x")
        assert one.startswith(b"HTTP/1.1 200")
        worker = header_values(plugin.app.seen[seen], "x-mint-internal-token")[0]
        if two.startswith(b"HTTP/1.1 502"):
            continue  # this worker has not polled the state file yet (it waited out the retry window)
        head, _, body = two.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503"), two
        assert b"\r\nretry-after: 30" in head.lower()
        document = json.loads(body)
        assert document["error"] == "plugin_unavailable"
        assert document["request_id"] and document["request_id"].encode() in head
        refused[worker] = took
    # Answered at once, not after the retry window: a ratio to the window, not a speed bound.
    assert max(refused.values()) < RETRY_WINDOW / 4


def test_a_plugin_back_within_the_retry_window_is_forwarded_not_refused(
    two_workers: tuple[Uvicorn, Path], plugin: PluginServer
) -> None:
    child, runtime_dir = two_workers
    soon = PluginStatus(
        "ok", "/ok", PluginState.BACKOFF, plugin.url, since=time.time(), retry_after=0.5, start_seconds=0.2
    )
    later = PluginStatus("down", "/down", PluginState.BACKOFF, "", since=time.time(), retry_after=600)
    write_state(runtime_dir, [soon, later])
    poll(lambda: child.get("/down/x").status_code == 503, 10, "the state file applies")
    response = child.get("/down/x")
    assert 590 <= int(response.headers["retry-after"]) <= 600
    assert child.get("/ok/x").status_code == 200  # BACKOFF, but back within the window: forwarded
