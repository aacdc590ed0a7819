"""PluginStatusApp: the read-only JSON status view, from state.json and from a live supervisor."""

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from starlette.applications import Starlette
from starlette.routing import Mount

from mint_proxy.plugins import (
    PluginState,
    PluginStatus,
    PluginStatusApp,
    ensure_runtime_dir,
    read_state,
    supervisor_running,
)
from mint_proxy.plugins.runtime import SupervisorState, write_state

from .supervised import app_spec, short_tempdir, supervising

pytestmark = pytest.mark.anyio


@pytest.fixture
def runtime_dir() -> Iterator[str]:
    with short_tempdir() as path:
        yield ensure_runtime_dir(path)


def _client(app: object) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://admin")  # type: ignore[arg-type]


def _write(runtime_dir: str) -> PluginStatus:
    status = PluginStatus("hello", "/hello", PluginState.BACKOFF, f"unix:{runtime_dir}/hello.sock", retry_after=1.5)
    write_state(runtime_dir, {"hello": status}, pid=os.getpid(), started=time.time())
    return status


async def test_lists_every_plugin_from_the_state_file(runtime_dir: str) -> None:
    """GET / gives the supervisor and every plugin's status as state.json has them."""
    status = _write(runtime_dir)
    async with _client(PluginStatusApp(runtime_dir=runtime_dir)) as client:
        response = await client.get("/")
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    document = response.json()
    assert document["supervisor"]["pid"] == os.getpid() and document["supervisor"]["running"] is True
    assert document["plugins"] == {"hello": status.to_json()}


async def test_one_plugin_and_an_unknown_one(runtime_dir: str) -> None:
    """GET /<slug> gives one status; an unknown slug is a JSON 404 carrying the request id."""
    status = _write(runtime_dir)
    async with _client(PluginStatusApp(runtime_dir=runtime_dir)) as client:
        one = await client.get("/hello")
        missing = await client.get("/nope", headers={"X-Request-Id": "admin-1"})
    assert one.json() == status.to_json()
    assert missing.status_code == 404
    assert missing.json() == {"error": "not_found", "detail": "no plugin named 'nope'", "request_id": "admin-1"}


async def test_only_reads(runtime_dir: str) -> None:
    """Anything but GET/HEAD is a 405 with Allow; HEAD has no body."""
    _write(runtime_dir)
    async with _client(PluginStatusApp(runtime_dir=runtime_dir)) as client:
        post = await client.post("/hello")
        head = await client.head("/")
    assert post.status_code == 405 and post.headers["allow"] == "GET, HEAD"
    assert post.json()["error"] == "method_not_allowed"
    assert head.status_code == 200 and head.content == b""


async def test_no_state_yet_and_a_broken_state_file(runtime_dir: str) -> None:
    """No state.json: no plugins. A state.json the supervisor did not write: 503 naming the file."""
    app = PluginStatusApp(runtime_dir=runtime_dir)
    async with _client(app) as client:
        assert (await client.get("/")).json() == {"supervisor": None, "plugins": {}}
        with open(os.path.join(runtime_dir, "state.json"), "w") as file:
            file.write("{")
        broken = await client.get("/")
    assert broken.status_code == 503
    assert broken.json()["error"] == "state_unreadable" and "state.json" in broken.json()["detail"]


async def test_mounted_on_an_admin_path(runtime_dir: str) -> None:
    """Under a Starlette Mount the slug is read below the mount path."""
    status = _write(runtime_dir)
    platform = Starlette(routes=[Mount("/admin/plugins", app=PluginStatusApp(runtime_dir=runtime_dir))])
    async with _client(platform) as client:
        response = await client.get("/admin/plugins/hello")
    assert response.json() == status.to_json()


def test_takes_exactly_one_source() -> None:
    """A view needs either a supervisor or a runtime dir, not both, not neither."""
    with pytest.raises(TypeError, match="exactly one"):
        PluginStatusApp()


async def test_live_supervisor_and_state_file_agree(runtime_dir: str) -> None:
    """The live view and the state.json view of a running supervisor show the same plugins."""
    async with supervising([app_spec("hello")], runtime_dir) as supervisor:
        async with (
            _client(PluginStatusApp(supervisor=supervisor)) as live,
            _client(PluginStatusApp(runtime_dir=runtime_dir)) as shared,
        ):
            from_live = (await live.get("/")).json()
            from_file = (await shared.get("/")).json()
    assert from_live["plugins"]["hello"]["state"] == "READY"
    assert from_live["plugins"]["hello"]["pid"] == from_file["plugins"]["hello"]["pid"]
    assert from_file["supervisor"] == {"pid": os.getpid(), "started": supervisor.started_at, "running": True}
    state = read_state(runtime_dir)
    assert state is not None and state.stopped is not None and not supervisor_running(state)


async def test_a_stopped_live_supervisor_is_not_running(runtime_dir: str) -> None:
    """The live view says running only between start() and stop(), as the state.json view does."""
    async with supervising([app_spec("hello")], runtime_dir) as supervisor:
        async with _client(PluginStatusApp(supervisor=supervisor)) as live:
            assert (await live.get("/")).json()["supervisor"]["running"] is True
    async with (
        _client(PluginStatusApp(supervisor=supervisor)) as live,
        _client(PluginStatusApp(runtime_dir=runtime_dir)) as shared,
    ):
        from_live = (await live.get("/")).json()
        from_file = (await shared.get("/")).json()
    assert from_file["supervisor"]["running"] is False
    assert from_live["supervisor"]["running"] is False
    assert from_live["plugins"]["hello"]["state"] == "STOPPED"


def test_supervisor_running_is_safe_against_pid_reuse() -> None:
    """A live pid that started after the supervisor said it did is some other process."""
    assert supervisor_running(SupervisorState(os.getpid(), time.time(), {}))
    assert not supervisor_running(SupervisorState(os.getpid(), 1.0, {}))  # "started" in 1970
    assert not supervisor_running(SupervisorState(os.getpid(), time.time(), {}, stopped=time.time()))


def test_a_supervisor_killed_before_it_could_write_stopped_is_not_running() -> None:
    """SIGKILL leaves ``stopped`` unset: the pid being gone is what tells."""
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not supervisor_running(SupervisorState(int(gone.stdout), time.time(), {}))
