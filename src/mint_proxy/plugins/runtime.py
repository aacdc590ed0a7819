"""The runtime directory: where plugin sockets, ``state.json`` and process records live.

Layout of ``<runtime_dir>`` (mode 0700, owned by the user that runs the supervisor)::

    <slug>.sock          the plugin's Unix socket (its route: ``unix:<runtime_dir>/<slug>.sock``)
    <slug>.pid           the process record of the plugin's running process group (JSON)
    state.json           {"supervisor": {"pid", "started"}, "plugins": {slug: PluginStatus}}

The directory is the only guard on the sockets (uvicorn's ``--uds`` makes a socket
0666), so ``ensure_runtime_dir`` refuses one that another user owns or that
grants any group/other permission.

Process records make a supervisor that starts able to stop what a previous
incarnation left behind (it was SIGKILLed, or the machine's OOM killer took it):
each names the process group, its leader's start time (``/proc/<pid>/stat`` field
22, clock ticks since boot) and the boot id. A record whose leader is alive with
the same start time on the same boot is ours; anything else is a reused PID and is
left alone. Nothing is ever matched by process name.
"""

import contextlib
import json
import logging
import os
import signal
import stat
import tempfile
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import MintProxyError
from .spec import PluginStatus

STATE_FILE = "state.json"
RUNTIME_DIR_ENV = "MINT_PROXY_RUNTIME_DIR"
_RECORD_SUFFIX = ".pid"

logger = logging.getLogger("mint_proxy.plugins")


class RuntimeDirError(MintProxyError):
    """Raised when the runtime directory cannot be created, is not private, or is in use."""


class StateFileError(RuntimeDirError):
    """Raised when ``state.json`` exists but is not a state file the supervisor wrote."""


def default_runtime_dir(environ: Mapping[str, str] | None = None) -> str:
    """``$MINT_PROXY_RUNTIME_DIR``, else ``$XDG_RUNTIME_DIR/mint-proxy``, else a per-user temp dir."""
    env = os.environ if environ is None else environ
    configured = env.get(RUNTIME_DIR_ENV, "")
    if configured:
        return os.path.abspath(configured)
    xdg = env.get("XDG_RUNTIME_DIR", "")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "mint-proxy")
    return os.path.join(tempfile.gettempdir(), f"mint-proxy-{os.getuid()}")


def ensure_runtime_dir(path: str | os.PathLike[str]) -> str:
    """Create ``path`` with mode 0700 if missing; refuse one that is not private to this user.

    The path itself must be a directory, not a symbolic link: the default one sits in the shared
    temp dir, where another user could have put a link to a directory of ours (or swap it later),
    as tmux and ssh-agent refuse for theirs. Links higher up the path are followed.
    Returns the absolute path. Raises ``RuntimeDirError`` naming the directory and the fix.
    """
    directory = os.path.abspath(os.fspath(path))
    try:
        if not os.path.islink(directory):  # (a link, even a dangling one, is refused below)
            os.makedirs(directory, mode=0o700, exist_ok=True)
        info = os.lstat(directory)
    except OSError as exc:
        raise RuntimeDirError(f"runtime dir {directory}: cannot create it ({exc.strerror})") from exc
    if not stat.S_ISDIR(info.st_mode):
        raise RuntimeDirError(
            f"runtime dir {directory} is a symbolic link, not a directory; "
            "set MINT_PROXY_RUNTIME_DIR or [settings] runtime_dir to the directory itself"
        )
    if info.st_uid != os.getuid():
        raise RuntimeDirError(
            f"runtime dir {directory} is owned by uid {info.st_uid}, not by this user (uid {os.getuid()}); "
            "set MINT_PROXY_RUNTIME_DIR or [settings] runtime_dir to a directory of your own"
        )
    if info.st_mode & 0o077:
        raise RuntimeDirError(
            f"runtime dir {directory} has mode {info.st_mode & 0o777:04o}: other users could reach the plugin "
            f"sockets; run 'chmod 700 {directory}' or choose another directory"
        )
    return directory


# --- state.json ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SupervisorState:
    """What ``state.json`` says: who supervises the directory and each plugin's last status."""

    pid: int
    started: float
    plugins: dict[str, PluginStatus]
    stopped: float | None = None  # epoch of the supervisor's stop(), if it stopped cleanly


def write_state(
    runtime_dir: str,
    plugins: Mapping[str, PluginStatus],
    *,
    pid: int,
    started: float,
    stopped: float | None = None,
) -> None:
    """Replace ``<runtime_dir>/state.json`` atomically (temp file + ``os.replace``)."""
    supervisor: dict[str, Any] = {"pid": pid, "started": started}
    if stopped is not None:
        supervisor["stopped"] = stopped
    document = {
        "supervisor": supervisor,
        "plugins": {slug: status.to_json() for slug, status in plugins.items()},
    }
    _write_atomic(os.path.join(runtime_dir, STATE_FILE), json.dumps(document, indent=1))


def read_state(runtime_dir: str | os.PathLike[str]) -> SupervisorState | None:
    """The last state the supervisor wrote, or None if it never wrote one.

    Raises ``StateFileError`` if the file is there but is not valid JSON of the right shape.
    """
    path = os.path.join(os.fspath(runtime_dir), STATE_FILE)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StateFileError(f"{path}: cannot read it ({exc.strerror})") from exc
    try:
        document = json.loads(text)
        supervisor = document["supervisor"]
        plugins = {str(slug): PluginStatus.from_json(data) for slug, data in document["plugins"].items()}
        stopped = supervisor.get("stopped")
        return SupervisorState(
            int(supervisor["pid"]), float(supervisor["started"]), plugins, None if stopped is None else float(stopped)
        )
    except (ValueError, KeyError, TypeError, AttributeError) as exc:
        raise StateFileError(f"{path}: not a mint-proxy state file ({exc!r})") from exc


def supervisor_running(state: SupervisorState) -> bool:
    """Whether the supervisor that wrote ``state`` still runs (PID reuse safe where /proc exists).

    False once it stopped cleanly. A live process under its pid counts only if it
    started before the supervisor recorded its own start.
    """
    if state.stopped is not None:
        return False
    if not os.path.exists("/proc/self/stat"):
        try:
            os.kill(state.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    ticks = process_start_time(state.pid)
    if ticks is None:
        return False
    boot = _boot_time()
    if boot is None:
        return True
    return boot + ticks / os.sysconf("SC_CLK_TCK") <= state.started + 1.0


def _boot_time() -> float | None:
    try:
        with open("/proc/stat", encoding="ascii") as file:
            for line in file:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def read_status(runtime_dir: str | os.PathLike[str]) -> dict[str, PluginStatus]:
    """Every plugin's last status from ``state.json``; empty if there is no state file yet."""
    state = read_state(runtime_dir)
    return {} if state is None else state.plugins


def _write_atomic(path: str, text: str) -> None:
    directory, name = os.path.split(path)
    fd, temp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temp)
        raise


# --- process records and the sweep ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ProcessRecord:
    """One plugin process group that a supervisor started: enough to find it again, safely."""

    slug: str
    pid: int  # the group leader; the group id is the same number (process_group=0)
    start_time: int  # /proc/<pid>/stat field 22
    boot_id: str
    supervisor_pid: int
    supervisor_start_time: int


def _stat_fields(pid: int) -> list[bytes] | None:
    """``/proc/<pid>/stat`` from field 3 on (``[0]`` is field 3), or None if gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as file:
            stat = file.read()
    except OSError:
        return None
    # Field 2 (comm) is parenthesised and may contain spaces or ')': split after the last ')'.
    fields = stat[stat.rfind(b")") + 2 :].split()
    if len(fields) < 20 or fields[0] in (b"Z", b"X"):
        return None
    return fields


def process_start_time(pid: int) -> int | None:
    """Field 22 of ``/proc/<pid>/stat`` (start time in clock ticks since boot), or None if gone."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[19])


def _process_group(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[2])  # field 5, pgrp


def boot_id() -> str:
    try:
        with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as file:
            return file.read().strip()
    except OSError:
        return ""


def is_alive(pid: int, start_time: int, boot: str) -> bool:
    """True if ``pid`` is the very process that started at ``start_time`` on boot ``boot``."""
    return bool(boot) and boot == boot_id() and process_start_time(pid) == start_time


def write_record(runtime_dir: str, record: ProcessRecord) -> None:
    data = {
        "slug": record.slug,
        "pid": record.pid,
        "start_time": record.start_time,
        "boot_id": record.boot_id,
        "supervisor_pid": record.supervisor_pid,
        "supervisor_start_time": record.supervisor_start_time,
    }
    _write_atomic(os.path.join(runtime_dir, record.slug + _RECORD_SUFFIX), json.dumps(data))


def remove_record(runtime_dir: str, slug: str) -> None:
    """Remove a process record; one that cannot be removed is harmless (the sweep checks start times)."""
    with contextlib.suppress(OSError):
        os.unlink(os.path.join(runtime_dir, slug + _RECORD_SUFFIX))


def read_records(runtime_dir: str) -> Iterator[ProcessRecord]:
    """Every readable process record in ``runtime_dir``; unreadable ones are logged and skipped."""
    try:
        names = sorted(os.listdir(runtime_dir))
    except FileNotFoundError:
        return
    for name in names:
        if not name.endswith(_RECORD_SUFFIX) or name.startswith("."):
            continue
        path = os.path.join(runtime_dir, name)
        try:
            with open(path, encoding="utf-8") as file:
                data: dict[str, Any] = json.load(file)
            yield ProcessRecord(
                slug=str(data["slug"]),
                pid=int(data["pid"]),
                start_time=int(data["start_time"]),
                boot_id=str(data["boot_id"]),
                supervisor_pid=int(data["supervisor_pid"]),
                supervisor_start_time=int(data["supervisor_start_time"]),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("ignoring unreadable process record %s: %r", path, exc)


def sweep(runtime_dir: str, *, grace: float = 2.0) -> list[ProcessRecord]:
    """Stop every process group a previous supervisor incarnation left in ``runtime_dir``.

    A record counts only if its leader is alive with the recorded start time on this boot
    (PID reuse safe). Each such group gets SIGTERM, then SIGKILL once ``grace`` seconds
    pass. Records are removed. Returns the records of the groups that were stopped.
    Raises ``RuntimeDirError`` if the supervisor that wrote a live record is itself still
    running (another supervisor owns the directory).
    """
    me = os.getpid()
    live: list[ProcessRecord] = []
    for record in read_records(runtime_dir):
        if record.supervisor_pid != me and is_alive(
            record.supervisor_pid, record.supervisor_start_time, record.boot_id
        ):
            raise RuntimeDirError(
                f"runtime dir {runtime_dir} is in use by the supervisor with pid {record.supervisor_pid}; "
                "stop it first or use another runtime dir"
            )
        if is_alive(record.pid, record.start_time, record.boot_id) and _process_group(record.pid) == record.pid:
            live.append(record)
        else:
            remove_record(runtime_dir, record.slug)
    for record in live:
        logger.warning("stopping %s (pid %d) left behind by a previous supervisor", record.slug, record.pid)
        _signal_group(record.pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    pending = list(live)
    while pending:
        pending = [r for r in pending if is_alive(r.pid, r.start_time, r.boot_id)]
        if not pending or time.monotonic() >= deadline:
            break
        time.sleep(0.02)
    for record in pending:
        if is_alive(record.pid, record.start_time, record.boot_id):
            _signal_group(record.pid, signal.SIGKILL)
    for record in live:
        remove_record(runtime_dir, record.slug)
    return live


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)
