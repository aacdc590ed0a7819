"""The pieces every worker runs beside the proxy: the state watcher and its 503, the supervisor
lock, the shared secret file, and the status views (``plugins._watch``, ``_election``,
``_secret``, ``_views``)."""

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from mint_proxy import ProxyMiddleware, RouteTable, TokenIssuer
from mint_proxy.plugins._election import LOCK_FILE, SupervisorLock
from mint_proxy.plugins._secret import SECRET_FILE, SecretFileError, shared_secret
from mint_proxy.plugins._views import status_document
from mint_proxy.plugins._watch import DOWN_RETRY_AFTER, StateWatcher, expected_back, plugin_unavailable
from mint_proxy.plugins.runtime import write_state
from mint_proxy.plugins.spec import PluginState, PluginStatus

from .supervised import supervised
from .utils import SECRET


def status(slug: str, state: PluginState, **fields: object) -> PluginStatus:
    return PluginStatus(slug, f"/{slug}", state, f"unix:/run/{slug}.sock", **fields)  # type: ignore[arg-type]


# --- which states refuse at once ------------------------------------------------------------------------


@pytest.mark.parametrize("state", [PluginState.STARTING, PluginState.READY, PluginState.STOPPING])
def test_plugins_up_or_coming_up_are_not_refused(state: PluginState) -> None:
    assert expected_back(status("p", state)) is None


@pytest.mark.parametrize("state", [PluginState.FATAL, PluginState.STOPPED])
def test_fatal_and_stopped_do_not_come_back_by_themselves(state: PluginState) -> None:
    assert expected_back(status("p", state)) == math.inf
    error = plugin_unavailable("p", math.inf, 2.0)
    assert error is not None and error.status == 503 and error.error == "plugin_unavailable"
    assert error.retry_after == DOWN_RETRY_AFTER


def test_backoff_is_expected_back_after_its_delay_and_its_last_start_time() -> None:
    back = expected_back(status("p", PluginState.BACKOFF, since=1000.0, retry_after=4.0, start_seconds=1.5))
    assert back == 1005.5


def test_a_plugin_back_within_the_retry_window_is_left_to_the_retry() -> None:
    assert plugin_unavailable("p", time.time() + 1.0, 2.0) is None
    error = plugin_unavailable("p", time.time() + 9.2, 2.0)
    assert error is not None and error.retry_after == 10  # rounded up


# --- the watcher -------------------------------------------------------------------------------------------


def test_watcher_follows_the_state_file_and_updates_its_dict_in_place(tmp_path: Path) -> None:
    watcher = StateWatcher(str(tmp_path))
    view = watcher.unavailable
    assert watcher.check() is False and view == {}  # no state file yet: everything is up
    write_state(
        str(tmp_path), {"a": status("a", PluginState.FATAL), "b": status("b", PluginState.READY)}, pid=1, started=0
    )
    assert watcher.check() is True
    assert view == {"a": math.inf} and watcher.unavailable is view
    assert watcher.check() is False  # unchanged
    write_state(str(tmp_path), {"a": status("a", PluginState.READY)}, pid=1, started=0)
    assert watcher.check() is True and view == {}


def test_watcher_keeps_the_last_view_when_the_file_is_broken(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    watcher = StateWatcher(str(tmp_path))
    write_state(str(tmp_path), {"a": status("a", PluginState.FATAL)}, pid=1, started=0)
    watcher.check()
    (tmp_path / "state.json").write_text("{not json", encoding="utf-8")
    assert watcher.check() is False
    assert watcher.unavailable == {"a": math.inf}
    assert "not a mint-proxy state file" in caplog.text


@pytest.mark.anyio
async def test_proxy_refuses_a_down_plugin_with_503_retry_after_and_the_request_id() -> None:
    down = {"p": math.inf}
    proxy = ProxyMiddleware(None, routes=RouteTable({"/p": "http://127.0.0.1:9"}), unavailable=down, retry_window=0)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=proxy), base_url="http://test") as client:
        response = await client.get("/p/x", headers={"X-Request-Id": "req-1"})
        assert response.status_code == 503
        assert response.headers["retry-after"] == str(DOWN_RETRY_AFTER)
        assert response.json() == {
            "error": "plugin_unavailable",
            "detail": "plugin 'p' is not running",
            "request_id": "req-1",
        }
        assert response.headers["x-request-id"] == "req-1"
        del down["p"]  # the watcher saw it come back: forwarded again (here: nothing listens, a 502)
        response = await client.get("/p/x")
        assert response.status_code == 502


# --- the lock ----------------------------------------------------------------------------------------------


HOLD = """
import sys, time
from mint_proxy.plugins._election import SupervisorLock
assert SupervisorLock(sys.argv[1]).try_acquire()
print("locked", flush=True)
time.sleep(60)
"""


def test_one_process_holds_the_lock_until_it_exits(tmp_path: Path) -> None:
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        mine = SupervisorLock(str(tmp_path))
        assert mine.try_acquire() is False
        assert mine.holder() == holder.pid
        assert supervised(str(tmp_path))
        holder.kill()  # SIGKILL: the kernel releases the flock
        holder.wait(30)
        assert mine.try_acquire() is True
        assert mine.holder() == os.getpid()
        assert (tmp_path / LOCK_FILE).stat().st_mode & 0o777 == 0o600
    finally:
        holder.kill()
        holder.wait(30)
        assert holder.stdout is not None
        holder.stdout.close()
    mine.release()
    assert not supervised(str(tmp_path))


# --- the shared secret ---------------------------------------------------------------------------------------

RACE = """
import sys
from mint_proxy.plugins._secret import shared_secret
print(shared_secret(sys.argv[1]))
"""


def test_processes_racing_for_the_secret_all_get_the_one_written(tmp_path: Path) -> None:
    racers = [
        subprocess.Popen([sys.executable, "-c", RACE, str(tmp_path)], stdout=subprocess.PIPE, text=True)
        for _ in range(4)
    ]
    secrets = {racer.communicate(timeout=30)[0].strip() for racer in racers}
    assert len(secrets) == 1
    (secret,) = secrets
    assert len(secret) >= 32 and (tmp_path / SECRET_FILE).read_text().strip() == secret
    assert (tmp_path / SECRET_FILE).stat().st_mode & 0o777 == 0o600
    assert sorted(os.listdir(tmp_path)) == [SECRET_FILE]  # no temporary file left behind


def test_a_secret_file_others_can_read_is_refused(tmp_path: Path) -> None:
    shared_secret(str(tmp_path))
    os.chmod(tmp_path / SECRET_FILE, 0o644)
    with pytest.raises(SecretFileError, match="not a private"):
        shared_secret(str(tmp_path))


def test_a_symlinked_secret_file_is_refused(tmp_path: Path) -> None:
    (tmp_path / "elsewhere").write_text("x" * 64)
    os.symlink(tmp_path / "elsewhere", tmp_path / SECRET_FILE)
    with pytest.raises(SecretFileError, match="cannot read"):
        shared_secret(str(tmp_path))


def test_a_secret_file_too_short_to_sign_with_is_refused(tmp_path: Path) -> None:
    """A truncated or hand-written short file is never used as the signing secret."""
    path = tmp_path / SECRET_FILE
    path.write_text("short\n")
    path.chmod(0o600)
    with pytest.raises(SecretFileError, match="the shared secret is too short; delete the file"):
        shared_secret(str(tmp_path))


# --- the views -----------------------------------------------------------------------------------------------


def test_status_document_without_a_state_file(tmp_path: Path) -> None:
    assert status_document(str(tmp_path)) == {"runtime_dir": str(tmp_path), "supervisor": None, "plugins": {}}


def test_status_document_reports_the_supervisor_and_its_plugins(tmp_path: Path) -> None:
    write_state(str(tmp_path), {"a": status("a", PluginState.READY, pid=7)}, pid=os.getpid(), started=time.time())
    document = status_document(str(tmp_path))
    assert document["supervisor"]["running"] is True and document["supervisor"]["pid"] == os.getpid()
    assert document["plugins"]["a"]["state"] == "READY" and document["plugins"]["a"]["pid"] == 7
    json.dumps(document)  # plain JSON data throughout


def test_token_issuer_unaffected_by_the_watcher() -> None:
    # The proxy's default is an empty view: nothing is refused without a watcher.
    proxy = ProxyMiddleware(None, routes={"/p": "http://127.0.0.1:9"}, tokens=TokenIssuer(SECRET))
    assert dict(proxy.unavailable) == {}
