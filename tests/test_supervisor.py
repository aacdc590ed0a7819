"""PluginSupervisor against real plugin processes and real signals."""

import asyncio
import json
import os
import signal
import stat
import subprocess
import sys

import pytest

from mint_proxy.plugins import PluginSpec, PluginState, PluginSupervisor, RestartPolicy, read_state, read_status
from mint_proxy.plugins._logs import MAX_LINE

from .supervised import (
    DEADLINE,
    FAST,
    REPO_ROOT,
    CapRandom,
    Changes,
    Lines,
    app_spec,
    group_members,
    short_tempdir,
    stubborn_spec,
    supervising,
    unix_client,
    wait_all_exited,
)
from .utils import SECRET

pytestmark = pytest.mark.anyio

SLOW = RestartPolicy(backoff_initial=60.0, backoff_max=60.0)  # with CapRandom: stays in BACKOFF for the test


@pytest.fixture
def runtime_dir() -> object:
    with short_tempdir() as path:
        yield path


async def test_no_state_file_written_while_starting_calls_a_plugin_unavailable(
    runtime_dir: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Every state.json written during start() shows the plugin STARTING or READY, never one of the
    states routing workers answer 503 for: a worker that reads the first file must let its retry
    bridge the start, not refuse requests until its next poll."""
    from mint_proxy.plugins import runtime
    from mint_proxy.plugins.spec import UNAVAILABLE_STATES

    written: list[PluginState] = []
    write_state = runtime.write_state

    def recording(directory: str, statuses: dict[str, object], **kwargs: object) -> None:
        written.extend(status.state for status in statuses.values())  # type: ignore[attr-defined]
        write_state(directory, statuses, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(runtime, "write_state", recording)
    async with supervising([app_spec("hello")], runtime_dir) as supervisor:
        assert supervisor.status()["hello"].state is PluginState.READY
    assert written[-1] is PluginState.STOPPED  # (stop() records it)
    starting = written[: written.index(PluginState.READY) + 1]
    assert starting and not UNAVAILABLE_STATES.intersection(starting), written


async def test_start_reports_ready_with_its_endpoint_in_status_and_state_file(runtime_dir: str) -> None:
    """A started plugin is READY, answers on <runtime_dir>/<slug>.sock, and state.json says the same."""
    async with supervising([app_spec("hello")], runtime_dir) as supervisor:
        status = supervisor.status()["hello"]
        assert status.state is PluginState.READY
        assert status.endpoint == f"unix:{runtime_dir}/hello.sock"
        assert status.prefix == "/hello"
        assert status.pid is not None and os.getpgid(status.pid) == status.pid  # its own group
        assert status.start_seconds is not None and status.start_seconds > 0
        assert status.restarts == 0 and status.last_exit is None and status.retry_after is None
        assert any("Application startup complete" in line for line in status.log_tail)
        async with unix_client(status) as client:
            assert (await client.get("/")).text == "hi"
        state = read_state(runtime_dir)
        assert state is not None and state.pid == os.getpid() and state.started > 0
        assert state.plugins["hello"].state is PluginState.READY
        assert state.plugins["hello"].pid == status.pid
        assert stat.S_IMODE(os.stat(runtime_dir).st_mode) == 0o700
        pid = status.pid
    assert read_status(runtime_dir)["hello"].state is PluginState.STOPPED
    assert supervisor.status()["hello"].state is PluginState.STOPPED
    assert wait_all_exited({pid}, DEADLINE) == set()
    assert not os.path.exists(os.path.join(runtime_dir, "hello.pid"))


async def test_sigkilled_plugin_restarts_and_backoff_grows(runtime_dir: str) -> None:
    """Each SIGKILL is a crash: BACKOFF with a doubling delay, then READY again under a new pid."""
    policy = RestartPolicy(backoff_initial=0.05, backoff_max=5.0, stable_after=60.0, crash_limit=10)
    changes = Changes()
    async with supervising(
        [app_spec("hello", restart=policy)], runtime_dir, on_change=changes, rng=CapRandom()
    ) as supervisor:
        delays = []
        for _ in range(3):
            pid = supervisor.status()["hello"].pid
            assert pid is not None
            mark = len(changes.seen)
            os.kill(pid, signal.SIGKILL)
            backoff = await changes.wait_for("hello", PluginState.BACKOFF, after=mark)
            assert backoff.last_exit == "signal SIGKILL" and backoff.pid is None
            delays.append(backoff.retry_after)
            ready = await changes.wait_for("hello", PluginState.READY, after=mark)
            assert ready.pid not in (None, pid)
        assert delays == [pytest.approx(0.05, abs=0.01), pytest.approx(0.1, abs=0.01), pytest.approx(0.2, abs=0.01)]
        assert supervisor.status()["hello"].restarts == 3


async def test_exit_code_zero_is_a_crash_too(runtime_dir: str) -> None:
    """A plugin that exits 0 without being asked is restarted like any other crash."""
    changes = Changes()
    async with supervising([app_spec("hello")], runtime_dir, on_change=changes) as supervisor:
        mark = len(changes.seen)
        async with unix_client(supervisor.status()["hello"]) as client:
            with pytest.raises(Exception):  # noqa: B017 - the process exits mid-request
                await client.get("/exit0")
        backoff = await changes.wait_for("hello", PluginState.BACKOFF, after=mark)
        assert backoff.last_exit == "exit 0"
        await changes.wait_for("hello", PluginState.READY, after=mark)


async def test_crash_loop_ends_in_fatal_until_restarted_by_hand(runtime_dir: str, tmp_path: object) -> None:
    """crash_limit crashes within crash_window make the plugin FATAL; restart_plugin clears it."""
    crash_file = os.path.join(str(tmp_path), "crash")
    open(crash_file, "w").close()
    policy = RestartPolicy(backoff_initial=0.01, backoff_max=0.05, crash_limit=3, crash_window=60.0)
    changes = Changes()
    spec = app_spec("flaky", restart=policy, env={"CRASH_FILE": crash_file})
    async with supervising([spec], runtime_dir, on_change=changes) as supervisor:
        fatal = await changes.wait_for("flaky", PluginState.FATAL)
        assert fatal.restarts == 2 and fatal.pid is None and fatal.last_exit == "exit 3"
        assert any("crash-marker" in line for line in fatal.log_tail)
        assert read_status(runtime_dir)["flaky"].state is PluginState.FATAL
        starts = [s for s in changes.seen if s.state is PluginState.STARTING]
        assert len(starts) == 3  # never more than crash_limit attempts: no storm
        os.unlink(crash_file)
        status = await supervisor.restart_plugin("flaky")
        assert status.state is PluginState.READY


async def test_exit_while_starting_fails_at_once_with_the_last_lines(runtime_dir: str) -> None:
    """A plugin that dies during startup fails now (not at startup_timeout), and says why."""
    spec = app_spec("boom", app="fails_at_startup", startup_timeout=600.0, restart=SLOW)
    async with supervising([spec], runtime_dir, rng=CapRandom()) as supervisor:  # allows DEADLINE, not 600 s
        status = supervisor.status()["boom"]
        assert status.state is PluginState.BACKOFF and status.last_exit == "exit 3"
        assert any("boom-marker" in line for line in status.log_tail)


async def test_startup_timeout_stops_the_plugin_and_counts_a_crash(runtime_dir: str) -> None:
    """A plugin not ready within startup_timeout is stopped, counted as a crash, and goes FATAL at the limit."""
    policy = RestartPolicy(backoff_initial=0.01, backoff_max=0.01, crash_limit=1)
    spec = app_spec("slow", app="never_ready", startup_timeout=0.5, stop_timeout=0.5, restart=policy)
    async with supervising([spec], runtime_dir) as supervisor:
        status = supervisor.status()["slow"]
        assert status.state is PluginState.FATAL
        assert status.last_exit is not None and status.last_exit.startswith("startup timeout after 0.5 s")
        assert status.pid is None


async def test_health_path_must_answer_200_before_ready(runtime_dir: str, tmp_path: object) -> None:
    """With a health_path, a 503 there keeps the plugin STARTING; the first 200 makes it READY."""
    health_file = os.path.join(str(tmp_path), "healthy")
    spec = app_spec("hello", health_path="/healthz", env={"HEALTH_FILE": health_file})
    supervisor = PluginSupervisor([spec], runtime_dir=runtime_dir)
    try:
        with Lines("hello") as lines:
            starting = asyncio.create_task(supervisor.start())
            await lines.wait_for(lambda line: '"GET /healthz HTTP/1.1" 503' in line, count=2)
            assert supervisor.status()["hello"].state is PluginState.STARTING
            open(health_file, "w").close()
            async with asyncio.timeout(DEADLINE):
                await starting
        assert supervisor.status()["hello"].state is PluginState.READY
    finally:
        await supervisor.stop()


async def test_plugin_that_cannot_bind_fails_with_the_reason(runtime_dir: str) -> None:
    """A socket path the plugin cannot listen on fails the start at once, naming the problem."""
    os.makedirs(os.path.join(runtime_dir, "hello.sock"))  # a directory where the socket should be
    os.chmod(runtime_dir, 0o700)
    async with supervising([app_spec("hello", restart=SLOW)], runtime_dir, rng=CapRandom()) as supervisor:
        status = supervisor.status()["hello"]
        assert status.state is PluginState.BACKOFF and status.last_exit == "exit 3"
        assert any("cannot listen on" in line for line in status.log_tail)


async def test_plugin_environment_is_clean(runtime_dir: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The plugin gets its own env and the MINT_* contract variables, never the platform's secret."""
    monkeypatch.setenv("MINT_INTERNAL_TOKEN_SECRET", SECRET)
    monkeypatch.setenv("PLATFORM_DATABASE_URL", "postgres://secret")
    spec = app_spec("hello", env={"PLUGIN_SETTING": "42"})
    async with supervising([spec], runtime_dir, platform_url="http://127.0.0.1:9") as supervisor:
        async with unix_client(supervisor.status()["hello"]) as client:
            env = (await client.get("/env")).json()
    assert "MINT_INTERNAL_TOKEN_SECRET" not in env
    assert SECRET not in json.dumps(env)
    assert "PLATFORM_DATABASE_URL" not in env
    assert env["PLUGIN_SETTING"] == "42"
    assert env["MINT_PLUGIN_SLUG"] == "hello"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["MINT_PLATFORM_URL"] == "http://127.0.0.1:9"


async def test_ten_megabytes_without_newline_never_blocks_the_plugin(runtime_dir: str) -> None:
    """10 MB on stdout with no newline is drained while written, in bounded lines, nothing lost."""
    with Lines("hello") as lines:
        async with supervising([app_spec("hello")], runtime_dir) as supervisor:
            async with unix_client(supervisor.status()["hello"]) as client:
                response = await client.get("/bigout")
            assert response.text == "written"
            await lines.wait_for(lambda line: "handling /bigout" in line)
            xs = [line for line in lines.lines if line.startswith("hello | xxx")]
            assert xs and max(len(line) for line in xs) <= len("hello | ") + MAX_LINE
            assert sum(len(line) - len("hello | ") for line in xs) == 10 * 1024 * 1024


async def test_stop_escalates_to_sigkill_for_the_whole_group(runtime_dir: str) -> None:
    """A plugin group that ignores SIGTERM is SIGKILLed after stop_timeout, every member included."""
    async with supervising([stubborn_spec("stubborn", stop_timeout=0.3)], runtime_dir) as supervisor:
        status = supervisor.status()["stubborn"]
        assert status.state is PluginState.READY and status.endpoint.startswith("http://127.0.0.1:")
        assert status.pid is not None
        members = group_members(status.pid)
        assert len(members) == 2  # the watchdog and the command it runs
        stopped = await supervisor.stop_plugin("stubborn")
        assert stopped.state is PluginState.STOPPED
        assert stopped.last_exit == "signal SIGKILL"
        assert wait_all_exited(members, DEADLINE) == set()
        again = await supervisor.stop_plugin("stubborn")  # stopping a stopped plugin is fine
        assert again.state is PluginState.STOPPED


async def test_add_and_remove_plugins_at_runtime(runtime_dir: str) -> None:
    """add() starts a new plugin at once; remove() stops it and drops it from status and state.json."""
    async with supervising([], runtime_dir) as supervisor:
        status = await supervisor.add(app_spec("late"))
        assert status.state is PluginState.READY
        assert read_status(runtime_dir)["late"].state is PluginState.READY
        with pytest.raises(ValueError, match="already supervised"):
            await supervisor.add(app_spec("late"))
        pid = status.pid
        assert pid is not None
        await supervisor.remove("late")
        assert "late" not in supervisor.status()
        assert "late" not in read_status(runtime_dir)
        assert wait_all_exited({pid}, DEADLINE) == set()
        with pytest.raises(KeyError):
            await supervisor.stop_plugin("late")


_SUPERVISOR_SCRIPT = """
import asyncio, json, sys
from mint_proxy.plugins import PluginSupervisor
from tests.supervised import app_spec, stubborn_spec

async def main():
    specs = [app_spec("host"), stubborn_spec("stubborn", stop_timeout=float(sys.argv[2]))]
    supervisor = PluginSupervisor(specs, runtime_dir=sys.argv[1])
    statuses = await supervisor.start()
    print(json.dumps({slug: [status.state, status.pid] for slug, status in statuses.items()}), flush=True)
    await asyncio.sleep(3600)

asyncio.run(main())
"""


def _start_supervisor_process(runtime_dir: str, stop_timeout: float) -> tuple["subprocess.Popen[str]", dict[str, int]]:
    process = subprocess.Popen(
        [sys.executable, "-c", _SUPERVISOR_SCRIPT, runtime_dir, str(stop_timeout)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    started = json.loads(line)
    assert all(state == "READY" for state, _ in started.values()), started
    return process, {slug: pid for slug, (_, pid) in started.items()}


def _kill(process: "subprocess.Popen[str]") -> None:
    process.kill()
    process.wait()
    if process.stdout is not None:
        process.stdout.close()


def test_sigkilled_supervisor_leaves_no_plugin_process_after_two_seconds() -> None:
    """Killing the supervisor with SIGKILL takes every plugin process with it (PDEATHSIG, lifeline)."""
    with short_tempdir() as runtime_dir:
        process, pids = _start_supervisor_process(runtime_dir, stop_timeout=0.5)
        members = set().union(*(group_members(pid) for pid in pids.values()))
        assert len(members) == 3  # the host; the watchdog and its command
        _kill(process)
        assert wait_all_exited(members, 2.0) == set()


async def test_second_incarnation_sweeps_what_the_first_left(runtime_dir: str) -> None:
    """A new supervisor stops the live plugin groups its SIGKILLed predecessor recorded."""
    # The stubborn plugin ignores SIGTERM and the lifeline grants it 60 s: it outlives its supervisor.
    process, pids = await asyncio.to_thread(_start_supervisor_process, runtime_dir, 60.0)
    leftovers = group_members(pids["stubborn"])
    _kill(process)
    assert wait_all_exited(leftovers, 0.2) == leftovers  # still there
    async with supervising([stubborn_spec("stubborn", stop_timeout=0.3), app_spec("host")], runtime_dir) as supervisor:
        assert wait_all_exited(leftovers, 0.0) == set()
        status = supervisor.status()["stubborn"]
        assert status.state is PluginState.READY and status.pid not in leftovers


async def test_supervisor_refuses_a_runtime_dir_whose_supervisor_lives(runtime_dir: str) -> None:
    """Two supervisors never share a runtime dir: the second one refuses to start."""
    from mint_proxy.plugins import RuntimeDirError

    process, _ = await asyncio.to_thread(_start_supervisor_process, runtime_dir, 1.0)
    try:
        supervisor = PluginSupervisor([app_spec("other")], runtime_dir=runtime_dir)
        with pytest.raises(RuntimeDirError, match=f"in use by the supervisor with pid {process.pid}"):
            await supervisor.start()
    finally:
        _kill(process)


def test_before_start_a_plugin_can_be_added_but_not_started() -> None:
    """Adding before ``start()`` only records the spec (STOPPED); starting one asks for ``start()`` first."""
    supervisor = PluginSupervisor([], runtime_dir="/nonexistent")
    status = asyncio.run(supervisor.add(PluginSpec("later", app="x:y", restart=FAST)))
    assert (status.slug, status.state, status.pid) == ("later", PluginState.STOPPED, None)
    with pytest.raises(RuntimeError, match=r"not started: call start\(\) first"):
        asyncio.run(supervisor.start_plugin("later"))


def test_a_duplicate_slug_or_a_non_spec_is_refused() -> None:
    supervisor = PluginSupervisor([PluginSpec("known", app="x:y", restart=FAST)], runtime_dir="/nonexistent")
    with pytest.raises(ValueError, match="plugin 'known' is already supervised"):
        asyncio.run(supervisor.add(PluginSpec("known", app="other:app", restart=FAST)))
    with pytest.raises(TypeError, match="expected a PluginSpec, got dict"):
        asyncio.run(supervisor.add({"slug": "x"}))  # type: ignore[arg-type]


def test_a_spec_with_an_unknown_slug_is_a_key_error() -> None:
    """Operations on a plugin the supervisor does not know name it."""
    supervisor = PluginSupervisor([PluginSpec("known", app="x:y", restart=FAST)], runtime_dir="/nonexistent")
    with pytest.raises(KeyError, match="unknown"):
        asyncio.run(supervisor.start_plugin("unknown"))


async def test_command_plugin_on_the_socket_placeholder(runtime_dir: str) -> None:
    """A command with {socket} (here plain `uvicorn --uds`) listens on the plugin's fixed socket path."""
    spec = PluginSpec(
        "cmd",
        command=(sys.executable, "-m", "uvicorn", "tests.plugin_apps:hello", "--uds", "{socket}"),
        cwd=REPO_ROOT,
        restart=FAST,
        startup_timeout=DEADLINE,
    )
    async with supervising([spec], runtime_dir) as supervisor:
        status = supervisor.status()["cmd"]
        assert status.state is PluginState.READY and status.endpoint == f"unix:{runtime_dir}/cmd.sock"
        async with unix_client(status) as client:
            assert (await client.get("/whoami", headers={"X-Request-Id": "r1"})).status_code == 200


async def test_command_plugin_on_the_port_placeholder_keeps_its_port_across_restarts(runtime_dir: str) -> None:
    """{port}: the supervisor holds the loopback port for the plugin, so a restart finds it again."""
    spec = PluginSpec(
        "web",
        command=(sys.executable, "-m", "http.server", "--bind", "127.0.0.1", "{port}"),
        restart=FAST,
        startup_timeout=DEADLINE,
        stop_timeout=2.0,
    )
    changes = Changes()
    async with supervising([spec], runtime_dir, on_change=changes) as supervisor:
        status = supervisor.status()["web"]
        assert status.state is PluginState.READY and status.endpoint.startswith("http://127.0.0.1:")
        assert status.pid is not None
        mark = len(changes.seen)
        os.killpg(status.pid, signal.SIGKILL)
        ready = await changes.wait_for("web", PluginState.READY, after=mark)
        assert ready.endpoint == status.endpoint and ready.pid != status.pid


_LEAVES_A_CHILD = (
    "import socket, subprocess, sys\n"
    "subprocess.Popen(['sleep', '600'])  # same group, same stdout/stderr pipes\n"
    "server = socket.socket(fileno=int(sys.argv[1]))\n"
    "while True:\n"
    "    conn, _ = server.accept()\n"
    "    conn.recv(65536)\n"
    "    conn.sendall(b'HTTP/1.1 200 OK\\r\\nContent-Length: 0\\r\\nConnection: close\\r\\n\\r\\n')\n"
    "    conn.close()\n"
)


async def test_leader_death_is_noticed_while_its_children_hold_the_pipes(runtime_dir: str) -> None:
    """A crashed group leader counts at once even if children keep its output open; they are killed."""
    spec = PluginSpec(
        "parent", command=(sys.executable, "-c", _LEAVES_A_CHILD, "{fd}"), restart=FAST, startup_timeout=DEADLINE
    )
    changes = Changes()
    async with supervising([spec], runtime_dir, on_change=changes) as supervisor:
        status = supervisor.status()["parent"]
        assert status.pid is not None
        members = group_members(status.pid)
        assert len(members) == 3  # watchdog, command, sleep
        mark = len(changes.seen)
        os.kill(status.pid, signal.SIGKILL)  # the leader alone
        backoff = await changes.wait_for("parent", PluginState.BACKOFF, after=mark)
        assert backoff.last_exit == "signal SIGKILL"
        assert await asyncio.to_thread(wait_all_exited, members, DEADLINE) == set()
        await changes.wait_for("parent", PluginState.READY, after=mark)


async def test_reconcile_restarts_only_what_changed(runtime_dir: str) -> None:
    """A reloaded plugin set: the unchanged plugin keeps its process, the edited one restarts,
    the dropped one stops, the new one starts."""
    keep, edit, drop = app_spec("keep"), app_spec("edit"), app_spec("drop")
    async with supervising([keep, edit, drop], runtime_dir) as supervisor:
        before = supervisor.status()
        edited = app_spec("edit", env={"VERSION": "2"})
        after = await supervisor.reconcile([keep, edited, app_spec("new")])
        assert set(after) == {"keep", "edit", "new"}
        assert after["keep"].pid == before["keep"].pid
        assert after["edit"].state is PluginState.READY and after["edit"].pid != before["edit"].pid
        assert after["new"].state is PluginState.READY
        assert set(read_status(runtime_dir)) == {"keep", "edit", "new"}
        async with unix_client(after["edit"]) as client:
            assert (await client.get("/env")).json()["VERSION"] == "2"
        dropped = before["drop"].pid
        assert dropped is not None and wait_all_exited({dropped}, DEADLINE) == set()
        await supervisor.stop_plugin("keep")
        stopped = await supervisor.update(app_spec("keep", env={"VERSION": "2"}))
        assert stopped.state is PluginState.STOPPED  # a plugin stopped by hand stays stopped


async def test_stop_while_start_is_preparing_leaves_no_plugin_running(runtime_dir: str) -> None:
    """stop() called while start() is still preparing the runtime dir wins: once both return, no
    plugin process runs and the supervisor counts as stopped (a shutdown during startup)."""
    supervisor = PluginSupervisor([app_spec("early")], runtime_dir=runtime_dir)
    try:
        starting = asyncio.create_task(supervisor.start())
        await asyncio.sleep(0)  # start() now sweeps the runtime dir in a thread
        await supervisor.stop()
        async with asyncio.timeout(DEADLINE):
            statuses = await starting
        assert statuses["early"].state is PluginState.STOPPED and statuses["early"].pid is None
        assert not supervisor.started
    finally:
        await supervisor.stop()


async def test_remove_while_the_plugin_is_starting_stops_it(runtime_dir: str) -> None:
    """remove() of a plugin whose add() is still waiting for READY stops its process group and forgets it."""
    changes = Changes()
    async with supervising([], runtime_dir, on_change=changes) as supervisor:
        adding = asyncio.create_task(supervisor.add(app_spec("slowpoke", "never_ready")))
        starting = await changes.wait_for("slowpoke", PluginState.STARTING)
        assert starting.pid is not None
        await supervisor.remove("slowpoke")
        async with asyncio.timeout(DEADLINE):
            await adding
        assert "slowpoke" not in supervisor.status()
        assert wait_all_exited({starting.pid}, DEADLINE) == set()
        assert group_members(starting.pid) == set()


async def test_a_process_record_that_cannot_be_written_leaves_no_process_behind(runtime_dir: str) -> None:
    """When the supervisor cannot write a plugin's process record, the process it just spawned is
    stopped with it: never a plugin running unwatched, its pipes unread, while status says FATAL."""
    os.makedirs(os.path.join(runtime_dir, "hello.pid"), mode=0o700)  # the record cannot replace a directory
    os.chmod(runtime_dir, 0o700)
    async with supervising([app_spec("hello")], runtime_dir) as supervisor:
        status = supervisor.status()["hello"]
        assert status.state is PluginState.FATAL
        pids = {pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _runs_host_for(pid, runtime_dir)}
        assert wait_all_exited(pids, DEADLINE) == set()  # gone while the supervisor still runs
        assert status.pid is None


def _runs_host_for(pid: int, runtime_dir: str, slug: str = "hello") -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as file:
            return f"{runtime_dir}/{slug}.sock".encode() in file.read()
    except OSError:
        return False


async def test_a_restart_racing_an_update_leaves_no_untracked_process(runtime_dir: str) -> None:
    """restart_plugin and update (a config reload) on one plugin at once: afterwards exactly one
    process runs, the one status() reports, and stop() leaves none (no runner lost track of its own)."""
    import dataclasses

    async with supervising([app_spec("racy")], runtime_dir) as supervisor:
        changed = dataclasses.replace(app_spec("racy"), env={"CHANGED": "1"})
        async with asyncio.timeout(DEADLINE):
            await asyncio.gather(supervisor.restart_plugin("racy"), supervisor.update(changed))
        status = supervisor.status()["racy"]
        assert status.state is PluginState.READY and status.pid is not None
        hosts = {
            pid
            for pid in map(int, filter(str.isdigit, os.listdir("/proc")))
            if _runs_host_for(pid, runtime_dir, "racy")
        }
        assert wait_all_exited(hosts - {status.pid}, 2.0) == set()
    hosts = {
        pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if _runs_host_for(pid, runtime_dir, "racy")
    }
    assert wait_all_exited(hosts, DEADLINE) == set()
