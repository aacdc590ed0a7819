"""The runtime dir: its location and permissions, state.json, process records and the sweep."""

import json
import os
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import replace

import pytest

from mint_proxy.errors import MintProxyError
from mint_proxy.plugins import (
    PluginState,
    PluginStatus,
    RuntimeDirError,
    StateFileError,
    default_runtime_dir,
    ensure_runtime_dir,
    read_state,
    read_status,
    sweep,
)
from mint_proxy.plugins.runtime import (
    ProcessRecord,
    boot_id,
    process_start_time,
    read_records,
    write_record,
    write_state,
)

from .supervised import DEADLINE, group_members, short_tempdir, wait_all_exited


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    with short_tempdir() as path:
        yield ensure_runtime_dir(path)


# --- location --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"MINT_PROXY_RUNTIME_DIR": "/srv/mint/run", "XDG_RUNTIME_DIR": "/run/user/7"}, "/srv/mint/run"),
        ({"XDG_RUNTIME_DIR": "/run/user/7"}, "/run/user/7/mint-proxy"),
        ({"MINT_PROXY_RUNTIME_DIR": "", "XDG_RUNTIME_DIR": "/run/user/7"}, "/run/user/7/mint-proxy"),
        # A relative XDG_RUNTIME_DIR is invalid per the XDG spec: ignored.
        ({"XDG_RUNTIME_DIR": "run/user/7"}, None),
        ({}, None),  # None: the per-user temp dir, read at test time (conftest gives each test its own)
    ],
)
def test_default_runtime_dir(environ: dict[str, str], expected: str | None) -> None:
    """The env var wins, then $XDG_RUNTIME_DIR/mint-proxy, then a per-user temp dir."""
    if expected is None:
        expected = os.path.join(tempfile.gettempdir(), f"mint-proxy-{os.getuid()}")
    assert default_runtime_dir(environ) == expected


# --- permissions ------------------------------------------------------------------------------


def test_runtime_dir_is_created_0700_even_with_a_permissive_umask() -> None:
    """The directory guarding the sockets is created private to the user, parents included."""
    with short_tempdir() as path:
        nested = os.path.join(path, "a", "b")
        old = os.umask(0)
        try:
            created = ensure_runtime_dir(nested)
        finally:
            os.umask(old)
        assert created == nested
        assert stat.S_IMODE(os.stat(nested).st_mode) == 0o700


def test_runtime_dir_open_to_others_is_refused() -> None:
    """A runtime dir with group/other permissions is refused with the fix in the message."""
    with short_tempdir() as path:
        os.makedirs(path, mode=0o700)
        os.chmod(path, 0o755)
        with pytest.raises(RuntimeDirError, match=r"mode 0755.*chmod 700") as info:
            ensure_runtime_dir(path)
        assert isinstance(info.value, MintProxyError)


def test_runtime_dir_that_is_a_symbolic_link_is_refused() -> None:
    """A link planted at the (predictable) runtime path, even to a private directory of ours, is refused
    and nothing is written through it; a link higher up the path is fine."""
    with short_tempdir() as path:
        private = os.path.join(path, "private")
        os.makedirs(private, mode=0o700)
        planted = os.path.join(path, "mint-proxy-link")
        os.symlink(private, planted)

        with pytest.raises(RuntimeDirError, match=r"mint-proxy-link is a symbolic link, not a directory"):
            ensure_runtime_dir(planted)
        assert os.listdir(private) == []
        assert ensure_runtime_dir(os.path.join(planted, "rt")) == os.path.join(planted, "rt")

        dangling = os.path.join(path, "mint-proxy-dangling")
        os.symlink(os.path.join(path, "not-yet"), dangling)
        with pytest.raises(RuntimeDirError, match=r"mint-proxy-dangling is a symbolic link"):
            ensure_runtime_dir(dangling)
        assert not os.path.exists(os.path.join(path, "not-yet"))


@pytest.mark.skipif(os.getuid() != 0, reason="only root can give a directory to another user")
def test_runtime_dir_of_another_user_is_refused() -> None:
    """A runtime dir owned by someone else is refused, whatever its mode."""
    with short_tempdir() as path:
        os.makedirs(path, mode=0o700)
        os.chown(path, 12345, 12345)
        with pytest.raises(RuntimeDirError, match="owned by uid 12345"):
            ensure_runtime_dir(path)


def test_runtime_dir_that_cannot_be_created_names_it() -> None:
    """A path under a regular file cannot become a directory: the error names the path."""
    with tempfile.NamedTemporaryFile() as file:
        with pytest.raises(RuntimeDirError, match=f"runtime dir {file.name}/rt: cannot create it"):
            ensure_runtime_dir(os.path.join(file.name, "rt"))


# --- state.json -------------------------------------------------------------------------------


def test_state_file_round_trips_and_leaves_no_temp_file(runtime_dir: str) -> None:
    """write_state replaces state.json atomically; read_state/read_status give the same statuses."""
    status = PluginStatus(
        "peak-picking",
        "/peak-picking",
        PluginState.BACKOFF,
        f"unix:{runtime_dir}/peak-picking.sock",
        restarts=2,
        last_exit="signal SIGKILL",
        since=1.5,
        retry_after=0.25,
        log_tail=("a", "b"),
    )
    write_state(runtime_dir, {"peak-picking": status}, pid=123, started=4.5)
    write_state(runtime_dir, {"peak-picking": status}, pid=123, started=4.5)
    assert os.listdir(runtime_dir) == ["state.json"]
    state = read_state(runtime_dir)
    assert state is not None and (state.pid, state.started) == (123, 4.5)
    assert read_status(runtime_dir) == {"peak-picking": status}


def test_missing_state_file_reads_as_no_plugins(runtime_dir: str) -> None:
    """Before any supervisor wrote it, there is simply no state."""
    assert read_state(runtime_dir) is None
    assert read_status(runtime_dir) == {}
    assert read_status(os.path.join(runtime_dir, "missing")) == {}


@pytest.mark.parametrize("content", ["{", "[]", '{"supervisor": {}}', '{"supervisor": {"pid": 1, "started": 0}}'])
def test_malformed_state_file_is_a_clear_error(runtime_dir: str, content: str) -> None:
    """A state.json the supervisor did not write is reported with its path, not a traceback."""
    with open(os.path.join(runtime_dir, "state.json"), "w") as file:
        file.write(content)
    with pytest.raises(StateFileError, match="state.json: not a mint-proxy state file"):
        read_status(runtime_dir)


# --- process records and the sweep ----------------------------------------------------------

_GROUP_SCRIPT = (
    "import subprocess, sys, time; subprocess.Popen(['sleep', '60']); print('up', flush=True); time.sleep(60)"
)


def _spawn_group() -> "subprocess.Popen[str]":
    """A leader in its own process group with one child in the same group, like a plugin."""
    process = subprocess.Popen(
        [sys.executable, "-c", _GROUP_SCRIPT], process_group=0, stdout=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stdout.readline() == "up\n"
    return process


def _record(slug: str, pid: int, *, start_time: int | None = None, supervisor: int = 0) -> ProcessRecord:
    return ProcessRecord(
        slug=slug,
        pid=pid,
        start_time=start_time if start_time is not None else process_start_time(pid) or 0,
        boot_id=boot_id(),
        supervisor_pid=supervisor or 2**22 + 1,  # beyond pid_max on most systems: a dead supervisor
        supervisor_start_time=1,
    )


def _finish(process: "subprocess.Popen[str]") -> None:
    if process.poll() is None:
        os.killpg(process.pid, 9)
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def test_process_start_time_is_field_22_and_none_once_gone() -> None:
    """The start time identifies a process across PID reuse; a reaped process has none."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    assert process_start_time(process.pid) is None
    own = process_start_time(os.getpid())
    with open(f"/proc/{os.getpid()}/stat") as file:
        assert own == int(file.read().rsplit(")", 1)[1].split()[19])


def test_sweep_stops_the_whole_group_a_dead_supervisor_left(runtime_dir: str) -> None:
    """A recorded group whose leader still runs with the recorded start time is stopped, members too."""
    process = _spawn_group()
    try:
        members = group_members(process.pid)
        assert len(members) == 2
        write_record(runtime_dir, _record("left-behind", process.pid))
        swept = sweep(runtime_dir)
        assert [record.slug for record in swept] == ["left-behind"]
        process.wait(DEADLINE)
        assert wait_all_exited(members, DEADLINE) == set()
        assert list(read_records(runtime_dir)) == []
    finally:
        _finish(process)


def test_sweep_never_touches_a_reused_pid(runtime_dir: str) -> None:
    """A record whose pid now belongs to a process with another start time is dropped, not killed."""
    process = _spawn_group()
    try:
        start_time = process_start_time(process.pid)
        assert start_time is not None
        write_record(runtime_dir, _record("stale", process.pid, start_time=start_time - 1))
        assert sweep(runtime_dir) == []
        assert process.poll() is None
        assert list(read_records(runtime_dir)) == []
    finally:
        _finish(process)


def test_sweep_refuses_while_the_recording_supervisor_lives(runtime_dir: str) -> None:
    """Records of a supervisor that still runs mean the directory is in use: nothing is killed."""
    process = _spawn_group()
    try:
        record = _record("busy", process.pid)
        write_record(runtime_dir, replace(record, supervisor_pid=process.pid, supervisor_start_time=record.start_time))
        with pytest.raises(RuntimeDirError, match=f"in use by the supervisor with pid {process.pid}"):
            sweep(runtime_dir)
        assert process.poll() is None
    finally:
        _finish(process)


def test_unreadable_record_is_skipped(runtime_dir: str) -> None:
    """A damaged record file does not stop the sweep."""
    with open(os.path.join(runtime_dir, "broken.pid"), "w") as file:
        json.dump({"slug": "broken"}, file)
    assert list(read_records(runtime_dir)) == []
    assert sweep(runtime_dir) == []
