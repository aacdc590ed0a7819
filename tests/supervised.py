"""Helpers for tests that run real plugin processes under a real ``PluginSupervisor``."""

import asyncio
import contextlib
import fcntl
import logging
import os
import random
import select
import shutil
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx

from mint_proxy.plugins import PluginSpec, PluginState, PluginStatus, PluginSupervisor, RestartPolicy
from mint_proxy.plugins._election import LOCK_FILE

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = RestartPolicy(backoff_initial=0.05, backoff_max=0.2, stable_after=60.0, crash_limit=5, crash_window=60.0)
DEADLINE = 30.0  # generous: every wait below ends on an event long before this

# A command plugin that ignores SIGTERM and answers 200 on the listening socket it inherits ({fd}).
STUBBORN = (
    "import signal, socket, sys\n"
    "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "server = socket.socket(fileno=int(sys.argv[1]))\n"
    "while True:\n"
    "    conn, _ = server.accept()\n"
    "    conn.recv(65536)\n"
    "    conn.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n')\n"
    "    conn.close()\n"
)


def app_spec(slug: str, app: str = "hello", **options: Any) -> PluginSpec:
    options.setdefault("cwd", REPO_ROOT)
    options.setdefault("restart", FAST)
    options.setdefault("stop_timeout", 5.0)
    options.setdefault("startup_timeout", DEADLINE)
    return PluginSpec(slug, app=f"tests.plugin_apps:{app}", **options)


def stubborn_spec(slug: str, **options: Any) -> PluginSpec:
    options.setdefault("restart", FAST)
    options.setdefault("startup_timeout", DEADLINE)
    return PluginSpec(slug, command=(sys.executable, "-c", STUBBORN, "{fd}"), **options)


@contextlib.contextmanager
def short_tempdir() -> Iterator[str]:
    """A directory under /tmp with a short path: Unix socket paths are limited to ~107 bytes."""
    parent = tempfile.mkdtemp(prefix="mp-")
    try:
        yield os.path.join(parent, "rt")
    finally:
        shutil.rmtree(parent, ignore_errors=True)


class CapRandom(random.Random):
    """Jitter that always draws the cap, so backoff delays are the exact exponential sequence."""

    def uniform(self, a: float, b: float) -> float:
        return b


class Changes:
    """Every status ``on_change`` reported, and a way to wait for one."""

    def __init__(self) -> None:
        self.seen: list[PluginStatus] = []
        self._event = asyncio.Event()

    def __call__(self, status: PluginStatus) -> None:
        self.seen.append(status)
        self._event.set()

    async def wait_for(self, slug: str, state: PluginState, *, after: int = 0) -> PluginStatus:
        """The first status of ``slug`` in ``state`` among changes ``after`` and later."""
        async with asyncio.timeout(DEADLINE):
            while True:
                for status in self.seen[after:]:
                    if status.slug == slug and status.state is state:
                        return status
                self._event.clear()
                await self._event.wait()


class Lines(logging.Handler):
    """Collects what a plugin wrote (the ``mint_proxy.plugins.<slug>`` logger); wait for a line."""

    def __init__(self, slug: str) -> None:
        super().__init__(logging.INFO)
        self.logger = logging.getLogger(f"mint_proxy.plugins.{slug}")
        self.lines: list[str] = []
        self._event = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())
        self._event.set()

    def __enter__(self) -> "Lines":
        self._level = self.logger.level
        self.logger.setLevel(logging.INFO)
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        self.logger.removeHandler(self)
        self.logger.setLevel(self._level)

    async def wait_for(self, predicate: Callable[[str], bool], count: int = 1) -> list[str]:
        async with asyncio.timeout(DEADLINE):
            while True:
                found = [line for line in self.lines if predicate(line)]
                if len(found) >= count:
                    return found
                self._event.clear()
                await self._event.wait()


@contextlib.asynccontextmanager
async def supervising(specs: list[PluginSpec], runtime_dir: str, **options: Any) -> AsyncIterator[PluginSupervisor]:
    """A started supervisor that is always stopped afterwards."""
    supervisor = PluginSupervisor(specs, runtime_dir=runtime_dir, **options)
    try:
        async with asyncio.timeout(DEADLINE):
            await supervisor.start()
        yield supervisor
    finally:
        await supervisor.stop()


def unix_client(status: PluginStatus) -> httpx.AsyncClient:
    assert status.endpoint.startswith("unix:")
    transport = httpx.AsyncHTTPTransport(uds=status.endpoint[len("unix:") :])
    return httpx.AsyncClient(transport=transport, base_url="http://plugin", timeout=DEADLINE)


def group_members(pgid: int) -> set[int]:
    """Every live process whose process group is ``pgid`` (read from /proc)."""
    members = set()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as file:
                stat = file.read()
        except OSError:
            continue
        fields = stat[stat.rfind(b")") + 2 :].split()
        if fields[0] not in (b"Z", b"X") and int(fields[2]) == pgid:
            members.add(int(name))
    return members


def wait_all_exited(pids: set[int], timeout: float) -> set[int]:
    """Wait (on pidfds, no polling) until every pid has exited; return those still running."""
    fds = {}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            fds[os.pidfd_open(pid)] = pid
    deadline = time.monotonic() + timeout
    try:
        pending = dict(fds)
        while pending:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            readable, _, _ = select.select(list(pending), [], [], remaining)
            for fd in readable:
                del pending[fd]
        return {pid for pid in pending.values() if _running(pid)}
    finally:
        for fd in fds:
            os.close(fd)


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return False
    return stat[stat.rfind(b")") + 2 :].split()[0] not in (b"Z", b"X")


class SupervisedApp:
    """``app`` served with ``supervisor`` running for the server's lifespan, in the server's loop.

    Startup completes once every plugin settled (``PluginSupervisor.start``); a start
    that raises fails the server's startup with its message.
    """

    def __init__(self, app: Any, supervisor: PluginSupervisor) -> None:
        self.app = app
        self.supervisor = supervisor

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return
        await receive()  # lifespan.startup
        try:
            async with asyncio.timeout(DEADLINE):
                await self.supervisor.start()
        except Exception as exc:
            await self.supervisor.stop()
            await send({"type": "lifespan.startup.failed", "message": repr(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.supervisor.stop()
        await send({"type": "lifespan.shutdown.complete"})


def supervised(runtime_dir: str) -> bool:
    """True if some process holds ``runtime_dir``'s supervisor lock right now (a brief shared-lock probe).

    For tests only: the proxy itself never asks, it tries to take the lock."""
    try:
        fd = os.open(os.path.join(runtime_dir, LOCK_FILE), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False
