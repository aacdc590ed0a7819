"""One plugin's life: spawn, probe, watch, restart with backoff, stop. One task owns the process.

Theory of operation. ``PluginRunner.start`` creates the runner task and waits
until the first attempt has *settled* (READY, or failed into BACKOFF/FATAL). The
task loops: ``_run_once`` spawns the process group, drains its pipes, probes the
real endpoint until READY (or the process exits, or ``startup_timeout`` passes,
or a stop is asked for), then waits for exit or stop. Every exit that was not
asked for is a crash: ``_after_crash`` counts it in the crash window (FATAL at
``crash_limit``), resets the backoff exponent if the plugin had been READY for
``stable_after`` seconds, and sleeps ``uniform(0, min(backoff_max,
backoff_initial * 2**n))`` in BACKOFF; a stop request cuts the sleep short.
``stop`` sets the stop event and awaits the task, which sends SIGTERM to the
group, SIGKILL after ``stop_timeout``, and reaps. Nothing else touches the process.
"""

import asyncio
import collections
import contextlib
import logging
import os
import random
import signal
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from . import runtime
from ._launch import Endpoint, describe_exit, make_endpoint, plugin_argv, plugin_environment
from ._logs import LogSink, drain
from ._probe import probe
from .spec import PluginSpec, PluginState, PluginStatus

logger = logging.getLogger("mint_proxy.plugins")

_PROBE_TIMEOUT = 5.0
_PROBE_INTERVAL_MAX = 0.1  # a failed connect costs microseconds; READY 100 ms late costs more
_DRAIN_AFTER_EXIT = 1.0  # how long to wait for the last output once the leader has exited

Outcome = Literal["ready", "exited", "timeout", "stopped"]


@dataclass
class RunnerContext:
    """What every runner of one supervisor shares."""

    runtime_dir: str
    lifeline: int
    platform_url: str | None
    environ: dict[str, str] | None
    rng: random.Random
    changed: Callable[["PluginRunner"], None]
    supervisor_start_time: int


class PluginRunner:
    def __init__(self, spec: PluginSpec, context: RunnerContext, *, tail_lines: int) -> None:
        self.spec = spec
        self.context = context
        self.sink = LogSink(spec.slug, tail_lines)
        self.endpoint: Endpoint | None = None
        self.state = PluginState.STOPPED
        self.pid: int | None = None
        self.restarts = 0
        self.last_exit: str | None = None
        self.since = time.time()
        self.start_seconds: float | None = None
        self._retry_at: float | None = None
        self._crashes: collections.deque[float] = collections.deque()
        self._attempt = 0
        self._task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._settled = asyncio.Event()

    # --- control ---------------------------------------------------------------------------

    def status(self) -> PluginStatus:
        retry_after = None
        if self.state is PluginState.BACKOFF and self._retry_at is not None:
            retry_after = round(max(0.0, self._retry_at - time.monotonic()), 3)
        endpoint = self.endpoint.url if self.endpoint else "unix:" + self.spec.socket_path(self.context.runtime_dir)
        return PluginStatus(
            slug=self.spec.slug,
            prefix=self.spec.prefix,
            state=self.state,
            endpoint=endpoint,
            pid=self.pid,
            restarts=self.restarts,
            last_exit=self.last_exit,
            since=self.since,
            start_seconds=self.start_seconds,
            retry_after=retry_after,
            log_tail=tuple(self.sink.tail),
        )

    @property
    def running(self) -> bool:
        """True while the runner task runs (STARTING, READY, BACKOFF or STOPPING)."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the runner unless it runs; return once the first attempt is READY or has failed."""
        if self._task is None or self._task.done():
            if self.state is PluginState.FATAL or self.state is PluginState.STOPPED:
                self._crashes.clear()
                self._attempt = 0
            self._stop = asyncio.Event()
            self._settled = asyncio.Event()
            if self.endpoint is None:
                self.endpoint = make_endpoint(self.spec, self.context.runtime_dir)
            self._task = asyncio.create_task(self._run(), name=f"mint-plugin-{self.spec.slug}")
        await self._settled.wait()

    async def stop(self) -> None:
        """Stop the process group (SIGTERM, SIGKILL after ``stop_timeout``); fine if already dead."""
        task = self._task
        if task is not None:
            self._stop.set()
            await asyncio.shield(task)
        if self.state is not PluginState.STOPPED:
            self._retry_at = None
            self._set(PluginState.STOPPED)

    def close(self) -> None:
        """Release the endpoint the supervisor holds (a ``{port}``/``{fd}`` socket)."""
        if self.endpoint is not None:
            self.endpoint.close()

    # --- the runner task -------------------------------------------------------------------

    def _set(self, state: PluginState) -> None:
        self.state = state
        self.since = time.time()
        self.context.changed(self)

    async def _run(self) -> None:
        try:
            while not self._stop.is_set():
                ready_for = await self._run_once()
                if self._stop.is_set() or not await self._after_crash(ready_for):
                    break
        except Exception:
            logger.exception("%s: the supervisor failed to run this plugin", self.spec.slug)
            self.last_exit = "supervisor error"
            self._set(PluginState.FATAL)
        finally:
            if self._stop.is_set():
                self._retry_at = None
                self._set(PluginState.STOPPED)
            self._settled.set()

    async def _after_crash(self, ready_for: float | None) -> bool:
        """Count the crash; FATAL (False) or sleep the backoff in BACKOFF (True: start again)."""
        policy = self.spec.restart
        now = time.monotonic()
        self._crashes.append(now)
        while self._crashes and self._crashes[0] < now - policy.crash_window:
            self._crashes.popleft()
        if len(self._crashes) >= policy.crash_limit:
            logger.error(
                "%s: %d crashes within %g s; FATAL until restarted by hand (last: %s)",
                self.spec.slug,
                len(self._crashes),
                policy.crash_window,
                self.last_exit,
            )
            self._retry_at = None
            self._set(PluginState.FATAL)
            return False
        if ready_for is not None and ready_for >= policy.stable_after:
            self._attempt = 0
        cap = min(policy.backoff_max, policy.backoff_initial * 2 ** min(self._attempt, 60))
        delay = self.context.rng.uniform(0.0, cap)
        self._attempt += 1
        self._retry_at = now + delay
        logger.warning("%s: %s; restarting in %.2f s", self.spec.slug, self.last_exit, delay)
        self._set(PluginState.BACKOFF)
        self._settled.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), delay)
            return False
        self._retry_at = None
        self.restarts += 1
        return True

    async def _run_once(self) -> float | None:
        """One process lifetime; returns how long it was READY (None if it never was)."""
        spec, context = self.spec, self.context
        assert self.endpoint is not None
        if self.endpoint.url.startswith("unix:"):
            _unlink_stale_socket(spec.socket_path(context.runtime_dir))
        argv, fds = plugin_argv(spec, self.endpoint, context.runtime_dir, lifeline=context.lifeline)
        env = plugin_environment(spec, platform_url=context.platform_url, environ=context.environ)
        started = time.monotonic()
        try:
            process = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
                cwd=spec.cwd,
                # Its own process group (and session). Not process_group=0: uvloop, uvicorn's
                # default loop, refuses that keyword ("unexpected kwargs: process_group").
                start_new_session=True,
                pass_fds=fds,
            )
        except OSError as exc:
            self.last_exit = f"cannot start {argv[0]!r}: {exc.strerror or exc}"
            logger.error("%s: %s", spec.slug, self.last_exit)
            return None
        pid = process.pid
        self.pid = pid
        assert process.stdout is not None and process.stderr is not None
        drains: list[asyncio.Task[object]] = [
            asyncio.create_task(drain(process.stdout, self.sink, stream="stdout", pid=pid)),
            asyncio.create_task(drain(process.stderr, self.sink, stream="stderr", pid=pid)),
        ]
        exited = asyncio.create_task(_leader_exit(process))
        stopping = asyncio.create_task(self._stop.wait())
        self._set(PluginState.STARTING)
        ready_at: float | None = None
        try:
            start_time = runtime.process_start_time(pid)
            if start_time is not None:  # failing to write it stops the group (finally), never leaks it
                runtime.write_record(
                    context.runtime_dir,
                    runtime.ProcessRecord(
                        spec.slug, pid, start_time, runtime.boot_id(), os.getpid(), context.supervisor_start_time
                    ),
                )
            outcome = await self._await_ready(started, exited, stopping)
            if outcome == "ready":
                ready_at = time.monotonic()
                self.start_seconds = round(ready_at - started, 4)
                self._set(PluginState.READY)
                self._settled.set()
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if exited.done():
                _signal_group(pid, signal.SIGKILL)  # whatever the leader left in its group
            else:
                if outcome == "timeout":
                    logger.error("%s: not ready after %g s; stopping it", spec.slug, spec.startup_timeout)
                self._set(PluginState.STOPPING)
                await self._terminate(pid, exited)
            returncode = await exited
            # The last output; then let asyncio finish the transport (pipes closed, process reaped).
            drains.append(asyncio.create_task(process.wait()))
            await asyncio.wait(drains, timeout=_DRAIN_AFTER_EXIT)
            self.last_exit = describe_exit(returncode)
            if outcome == "timeout":
                self.last_exit = f"startup timeout after {spec.startup_timeout:g} s ({self.last_exit})"
            elif outcome == "exited":
                lines = "\n".join(f"    {line}" for line in self.sink.tail)
                logger.error("%s exited while starting (%s); last lines:\n%s", spec.slug, self.last_exit, lines)
        finally:
            stopping.cancel()
            for task in drains:
                task.cancel()
            if not exited.done():  # cancelled: never leave the group behind
                _signal_group(pid, signal.SIGKILL)
            runtime.remove_record(context.runtime_dir, spec.slug)
            self.pid = None
        return None if ready_at is None else time.monotonic() - ready_at

    async def _await_ready(
        self, started: float, exited: "asyncio.Task[int]", stopping: "asyncio.Task[bool]"
    ) -> Outcome:
        assert self.endpoint is not None
        deadline = started + self.spec.startup_timeout
        interval = 0.01
        while True:
            if exited.done():
                return "exited"
            if stopping.done():
                return "stopped"
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return "timeout"
            probing = asyncio.create_task(
                probe(self.endpoint.url, self.spec.health_path, timeout=min(remaining, _PROBE_TIMEOUT))
            )
            done, _ = await asyncio.wait({probing, exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if probing not in done:
                probing.cancel()
                continue
            if probing.result():
                return "ready"
            await asyncio.wait({exited, stopping}, timeout=min(interval, max(0.0, deadline - time.monotonic())))
            interval = min(interval * 2, _PROBE_INTERVAL_MAX)

    async def _terminate(self, pid: int, exited: "asyncio.Task[int]") -> None:
        """SIGTERM to the group, SIGKILL to the group after ``stop_timeout``, reap."""
        deadline = time.monotonic() + self.spec.stop_timeout
        _signal_group(pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(asyncio.shield(exited), self.spec.stop_timeout)
        except TimeoutError:
            logger.warning("%s: still running %g s after SIGTERM; SIGKILL", self.spec.slug, self.spec.stop_timeout)
        # The leader is gone (or late): give the rest of its group the same deadline.
        while _group_exists(pid) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        _signal_group(pid, signal.SIGKILL)
        await exited


async def _leader_exit(process: asyncio.subprocess.Process) -> int:
    """The group leader's exit status as soon as it exits.

    ``process.wait()`` also waits for the stdout/stderr pipes to close, which never
    happens while a child the leader left behind still holds them: the crash would
    go unnoticed. A pidfd (Linux) becomes readable when the leader itself exits.
    """
    loop = asyncio.get_running_loop()
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):  # not Linux, or already exited and reaped
        pidfd = -1
    try:
        if pidfd >= 0:
            gone = loop.create_future()
            loop.add_reader(pidfd, _resolve, gone)
            try:
                await gone
            finally:
                loop.remove_reader(pidfd)
        while process.returncode is None:  # the child watcher reaps it a moment later
            await asyncio.sleep(0.01 if pidfd >= 0 else 0.1)
        return process.returncode
    finally:
        if pidfd >= 0:
            os.close(pidfd)


def _resolve(future: "asyncio.Future[None]") -> None:
    if not future.done():
        future.set_result(None)


def _signal_group(pgid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signum)


def _group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


def _unlink_stale_socket(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)
