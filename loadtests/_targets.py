"""Start the backend and each target (direct, nginx, the ASGI floors, mint_proxy over TCP or a Unix socket).

CPU layout on the 2-vCPU machine: the backend, wrk and the transfer client share CPU 0;
the proxy under test (nginx, a floor or mint_proxy) is alone on CPU 1.
"""

import os
import secrets
import shutil
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from loadtests._procs import Child, Supervisor, process_tree
from loadtests._transfer import get_small

ALL_TARGETS = (
    "direct",
    "nginx",
    "asgi_floor",
    "asgi_floor_fields",
    "mint_proxy",
    "mint_proxy_unix",
    "mint_proxy_nometrics",
)
# Measured for small GETs only (no streamed transfers): the floor (a reference, see loadtests/floor.py),
# the floor sending upstream the fields mint_proxy adds (MINT_FLOOR_FIELDS=1: the ceiling those bytes
# set) and mint_proxy with `[settings] metrics = false` (what counting costs per request).
REFERENCE_ONLY = frozenset({"asgi_floor", "asgi_floor_fields", "mint_proxy_nometrics"})
PREFIX = "/bench"
CLIENT_CPU = 0
BACKEND_CPU = 0
PROXY_CPU = 1
READY_TIMEOUT = 10.0
REPO_ROOT = Path(__file__).resolve().parent.parent
INSTALL_HINT = "apt-get update && apt-get install -y nginx wrk"

NGINX_CONF = """\
{user}worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_max_body_size 0;
    upstream bench_backend {{
        server 127.0.0.1:{backend_port};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port};
        location {prefix} {{
            proxy_pass http://bench_backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_request_buffering off;
        }}
    }}
}}
"""


class TargetUnavailable(Exception):
    """A target could not be started; the benchmark skips it and says why."""


@dataclass(slots=True)
class Target:
    """A running target: the port the client hits and the proxy process (``None`` for direct)."""

    name: str
    port: int
    proxy: Child | None

    def proxy_pids(self) -> list[int]:
        return process_tree(self.proxy.pid) if self.proxy is not None else []

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{PREFIX}{path}"


@dataclass(slots=True)
class Backend:
    child: Child
    port: int
    unix_path: Path


def free_port() -> int:
    """Bind port 0 on 127.0.0.1, read the port the kernel chose, close, and return it."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def pinned(cpu: int, argv: list[str]) -> list[str]:
    """Prefix ``argv`` with ``taskset -c CPU`` (taskset execs, so the PID stays the program's)."""
    return ["taskset", "-c", str(cpu), *argv]


def wait_ready(child: Child, port: int, path: str, timeout: float = READY_TIMEOUT) -> None:
    """Poll ``GET path`` until it answers 200 ``Hello, world!``; raise ``TargetUnavailable`` otherwise."""
    deadline = time.monotonic() + timeout
    last_error = "no answer"
    while time.monotonic() < deadline:
        if not child.alive():
            tail = child.log_tail()
            last = tail.strip().splitlines()[-1] if tail.strip() else "no output"
            raise TargetUnavailable(
                f"{child.name} exited with code {child.popen.returncode} during startup ({last})\n{tail}"
            )
        try:
            status, body = get_small(port, path, timeout=1.0)
            if status == 200 and body == b"Hello, world!":
                child.remember_descendants()
                return
            last_error = f"answered {status} {body[:100]!r}"
        except OSError as exc:
            last_error = str(exc)
        except Exception as exc:  # a half-written response while it starts up
            last_error = repr(exc)
        time.sleep(0.05)
    raise TargetUnavailable(
        f"{child.name} not healthy within {timeout:.0f} s on port {port} ({last_error})\n{child.log_tail()}"
    )


def start_backend(supervisor: Supervisor, tmp: Path) -> Backend:
    port = free_port()
    unix_path = tmp / "backend.sock"
    argv = [sys.executable, "-m", "loadtests.backend", "--port", str(port), "--uds", str(unix_path)]
    child = supervisor.start(
        "backend", pinned(BACKEND_CPU, argv), log_path=tmp / "backend.log", cwd=REPO_ROOT, env=_python_env()
    )
    try:
        wait_ready(child, port, f"{PREFIX}/small")
    except TargetUnavailable as exc:
        raise SystemExit(f"the benchmark backend did not start: {exc}") from exc
    return Backend(child, port, unix_path)


def _python_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    # The repo root for ``loadtests``; src/ in case mint_proxy is not installed in this venv.
    paths = (str(REPO_ROOT), str(REPO_ROOT / "src"), env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra or {})
    return env


def _start_nginx(supervisor: Supervisor, backend: Backend, tmp: Path) -> Target:
    nginx = shutil.which("nginx")
    if nginx is None:
        raise TargetUnavailable(f"nginx is not installed; install it with: {INSTALL_HINT}")
    root = tmp / "nginx"
    root.mkdir()
    port = free_port()
    # As root, nginx would switch workers to 'nobody', who cannot use our temp dir: stay root.
    user = "user root root;\n" if os.geteuid() == 0 else ""
    conf = root / "nginx.conf"
    conf.write_text(NGINX_CONF.format(user=user, tmp=root, backend_port=backend.port, port=port, prefix=PREFIX))
    argv = [nginx, "-p", str(root), "-e", str(root / "nginx-error.log"), "-c", str(conf), "-g", "daemon off;"]
    child = supervisor.start("nginx", pinned(PROXY_CPU, argv), log_path=root / "nginx-stdout.log")
    _wait_or_stop(supervisor, child, port)
    return Target("nginx", port, child)


def _start_mint_proxy(supervisor: Supervisor, backend: Backend, tmp: Path, *, app: str, name: str) -> Target:
    unix = name == "mint_proxy_unix"
    upstream = f"unix:{backend.unix_path}" if unix else f"http://127.0.0.1:{backend.port}"
    settings = "[settings]\nmetrics = false\n" if name == "mint_proxy_nometrics" else ""
    config = tmp / f"{name}.toml"
    config.write_text(f'{settings}[proxy]\n"{PREFIX}" = "{upstream}"\n')
    port = free_port()
    env = _python_env({"MINT_PROXY_CONFIG": str(config), "MINT_INTERNAL_TOKEN_SECRET": secrets.token_urlsafe(48)})
    argv = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]
    child = supervisor.start(name, pinned(PROXY_CPU, argv), log_path=tmp / f"{name}.log", env=env, cwd=REPO_ROOT)
    _wait_or_stop(supervisor, child, port)
    return Target(name, port, child)


def _start_floor(supervisor: Supervisor, backend: Backend, tmp: Path, *, name: str) -> Target:
    port = free_port()
    fields = name == "asgi_floor_fields"  # sends upstream the fields mint_proxy adds, its token signed the same way
    env = _python_env({"MINT_FLOOR_UPSTREAM": f"127.0.0.1:{backend.port}", "MINT_FLOOR_FIELDS": "1" if fields else "0"})
    if fields:
        env["MINT_INTERNAL_TOKEN_SECRET"] = secrets.token_urlsafe(48)
    argv = [sys.executable, "-m", "uvicorn", "loadtests.floor:app", "--host", "127.0.0.1", "--port", str(port)]
    argv += ["--no-access-log", "--log-level", "warning", "--loop", "uvloop", "--http", "httptools"]
    child = supervisor.start(name, pinned(PROXY_CPU, argv), log_path=tmp / f"{name}.log", env=env, cwd=REPO_ROOT)
    _wait_or_stop(supervisor, child, port)
    return Target(name, port, child)


def _wait_or_stop(supervisor: Supervisor, child: Child, port: int) -> None:
    try:
        wait_ready(child, port, f"{PREFIX}/small")
    except TargetUnavailable:
        supervisor.stop(child)
        raise


def start_target(name: str, supervisor: Supervisor, backend: Backend, tmp: Path, *, mint_app: str) -> Target:
    """Start target ``name`` and wait until it answers; raise ``TargetUnavailable`` if it cannot."""
    match name:
        case "direct":
            return Target("direct", backend.port, None)
        case "nginx":
            return _start_nginx(supervisor, backend, tmp)
        case "asgi_floor" | "asgi_floor_fields":
            return _start_floor(supervisor, backend, tmp, name=name)
        case "mint_proxy" | "mint_proxy_unix" | "mint_proxy_nometrics":
            return _start_mint_proxy(supervisor, backend, tmp, app=mint_app, name=name)
    raise ValueError(f"unknown target {name!r}; choose from {', '.join(ALL_TARGETS)}")
