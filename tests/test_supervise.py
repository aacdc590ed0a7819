"""``mint-proxy supervise`` in-process (``mint_proxy._supervise``): a startup failure, and waiting for the lock.

``tests/test_dev_mode.py`` runs the command as a real process beside routing-only workers.
"""

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import pytest

from mint_proxy import DevProxyApp
from mint_proxy._supervise import _run
from mint_proxy.cli import main
from mint_proxy.devconfig import CONFIG_ENV, SECRET_ENV
from mint_proxy.plugins._election import SupervisorLock

from .utils import SECRET


def config_for(tmp_path: Path, runtime_dir: Path) -> Path:
    config = tmp_path / "config.dev.toml"
    config.write_text(f'[settings]\nruntime_dir = "{runtime_dir}"\n[proxy."/p"]\napp = "tests.plugin_apps:hello"\n')
    return config


def test_a_runtime_dir_open_to_others_fails_startup_with_exit_1(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The config is valid, but the app cannot start on it: one line on stderr naming the problem."""
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir()
    runtime_dir.chmod(0o777)
    assert main(["supervise", str(config_for(tmp_path, runtime_dir))]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mint-proxy supervise: error: runtime dir {runtime_dir}") and "Traceback" not in err


def test_while_another_process_supervises_it_waits_and_sigterm_stops_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """It names the holder's pid, starts nothing, and exits 0 on SIGTERM."""
    runtime_dir = tmp_path / "rt"
    runtime_dir.mkdir(mode=0o700)
    holder = SupervisorLock(str(runtime_dir))
    assert holder.try_acquire()  # this test's lock stands for the other process
    app = DevProxyApp(environ={CONFIG_ENV: str(config_for(tmp_path, runtime_dir)), SECRET_ENV: SECRET})

    def waiting() -> bool:
        return any("waiting to take over" in record.getMessage() for record in caplog.records)

    async def run_until_sigterm() -> int:
        running = asyncio.ensure_future(_run(app))
        deadline = time.monotonic() + 10
        while not waiting() and not running.done() and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert waiting(), "no 'waiting to take over' warning"
        os.kill(os.getpid(), signal.SIGTERM)  # handled by _run's loop signal handler
        return await asyncio.wait_for(running, 10)

    try:
        with caplog.at_level(logging.INFO, logger="mint_proxy"):
            assert asyncio.run(run_until_sigterm()) == 0
    finally:
        holder.release()
    [warning] = [record.getMessage() for record in caplog.records if "waiting to take over" in record.getMessage()]
    assert warning == f"{runtime_dir} is supervised by pid {os.getpid()}; waiting to take over when it exits"
    assert app.supervisor is None
