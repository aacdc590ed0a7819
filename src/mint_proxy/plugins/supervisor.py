"""``PluginSupervisor``: runs isolated plugins and publishes their state to the runtime dir.

    supervisor = PluginSupervisor([PluginSpec("peak-picking", app="peak_picking.app:app")])
    await supervisor.start()      # each plugin READY or failed (see status())
    ...
    await supervisor.stop()       # SIGTERM to every group, SIGKILL after stop_timeout

It is an asyncio object run inside the caller's loop (the ASGI lifespan or
``mint-proxy supervise``). It installs no signal handlers. Every state change is
written to ``<runtime_dir>/state.json`` (atomically) and passed to ``on_change``.
One supervisor per runtime dir: ``start`` sweeps what a previous incarnation left
and refuses a directory whose supervisor is still alive.
"""

import asyncio
import logging
import os
import random
import time
from collections.abc import Callable, Iterable, Mapping

from . import runtime
from ._runner import PluginRunner, RunnerContext
from .spec import PluginSpec, PluginState, PluginStatus

logger = logging.getLogger("mint_proxy.plugins")

DEFAULT_TAIL_LINES = 50


class PluginSupervisor:
    """Start, probe, restart and stop isolated plugin processes.

    ``runtime_dir`` defaults to ``default_runtime_dir()``; ``platform_url`` becomes the
    plugins' ``MINT_PLATFORM_URL``; ``on_change(status)`` is called on every state change.
    ``environ`` is the environment the plugins' minimal one is taken from (default
    ``os.environ``); ``rng`` draws the backoff jitter (tests pass a seeded one).
    """

    def __init__(
        self,
        specs: Iterable[PluginSpec] = (),
        *,
        runtime_dir: str | os.PathLike[str] | None = None,
        platform_url: str | None = None,
        on_change: Callable[[PluginStatus], None] | None = None,
        environ: Mapping[str, str] | None = None,
        rng: random.Random | None = None,
        tail_lines: int = DEFAULT_TAIL_LINES,
    ) -> None:
        self.runtime_dir = os.path.abspath(
            os.fspath(runtime_dir) if runtime_dir is not None else runtime.default_runtime_dir(environ)
        )
        self.platform_url = platform_url
        self._on_change = on_change
        self._environ = dict(environ) if environ is not None else None
        self._rng = rng or random.Random()
        self._tail_lines = tail_lines
        self._specs: dict[str, PluginSpec] = {}
        for spec in specs:
            self._check_new(spec)
            self._specs[spec.slug] = spec
        self._runners: dict[str, PluginRunner] = {}
        self._last: dict[str, PluginStatus] = {}  # final statuses from before the last stop()
        self._launching: set[str] = set()  # what start() launches next (reported STARTING meanwhile)
        self._context: RunnerContext | None = None
        self._lifeline_write = -1
        self._started = 0.0
        self._stops = 0  # stop() calls so far: a start() that was stopped while preparing starts nothing

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()``."""
        return self._context is not None

    @property
    def started_at(self) -> float:
        """Epoch of the last ``start()`` (0.0 before the first)."""
        return self._started

    def status(self) -> dict[str, PluginStatus]:
        """Every plugin's current status, by slug.

        A plugin ``start()`` is about to launch is STARTING (routing workers reading the first
        ``state.json`` must bridge it with their retry, not answer 503); one never launched, STOPPED.
        """
        result = {}
        for slug, spec in self._specs.items():
            runner = self._runners.get(slug)
            if runner is not None:
                result[slug] = runner.status()
            elif slug in self._last:
                result[slug] = self._last[slug]
            else:
                pending = PluginState.STARTING if slug in self._launching else PluginState.STOPPED
                result[slug] = PluginStatus(slug, spec.prefix, pending, "unix:" + spec.socket_path(self.runtime_dir))
        return result

    async def start(self) -> dict[str, PluginStatus]:
        """Prepare the runtime dir, sweep leftovers, start every plugin; return once each settled."""
        if self._context is None:
            stops = self._stops
            directory = runtime.ensure_runtime_dir(self.runtime_dir)
            await asyncio.to_thread(runtime.sweep, directory)
            if self._stops != stops:  # stop() was called meanwhile: it wins
                return self.status()
            read, self._lifeline_write = os.pipe()  # both ends close-on-exec; children get `read` by pass_fds
            self._started = time.time()
            self._context = RunnerContext(
                runtime_dir=directory,
                lifeline=read,
                platform_url=self.platform_url,
                environ=self._environ,
                rng=self._rng,
                changed=self._changed,
                supervisor_start_time=runtime.process_start_time(os.getpid()) or 0,
            )
            self._launching = set(self._specs)
            self._write_state()
        await asyncio.gather(*(self.start_plugin(slug) for slug in list(self._specs)))
        return self.status()

    async def stop(self) -> None:
        """Stop every plugin (concurrently) and release the lifeline; the supervisor can start again."""
        self._stops += 1
        self._launching.clear()
        await asyncio.gather(*(runner.stop() for runner in self._runners.values()))
        for runner in self._runners.values():
            runner.close()
        context, self._context = self._context, None
        if context is not None:
            self._write_state(context.runtime_dir, stopped=time.time())
            self._last.update((slug, runner.status()) for slug, runner in self._runners.items())
            os.close(context.lifeline)
            os.close(self._lifeline_write)
            self._lifeline_write = -1
        self._runners.clear()

    async def start_plugin(self, slug: str) -> PluginStatus:
        """Start one plugin (also one that is FATAL or STOPPED); return once READY or failed."""
        runner = self._runner(slug)
        self._launching.discard(slug)
        await runner.start()
        return runner.status()

    async def stop_plugin(self, slug: str) -> PluginStatus:
        """Stop one plugin; stopping one that is not running is fine."""
        self._spec(slug)
        runner = self._runners.get(slug)
        if runner is not None:
            await runner.stop()
        return self.status()[slug]

    async def restart_plugin(self, slug: str) -> PluginStatus:
        """Stop, then start one plugin; clears FATAL and the crash count."""
        await self.stop_plugin(slug)
        return await self.start_plugin(slug)

    async def add(self, spec: PluginSpec) -> PluginStatus:
        """Add a plugin at runtime; started at once if the supervisor runs."""
        self._check_new(spec)
        self._specs[spec.slug] = spec
        if self._context is None:
            return self.status()[spec.slug]
        return await self.start_plugin(spec.slug)

    async def update(self, spec: PluginSpec) -> PluginStatus:
        """Run ``spec`` from now on: add it if new; if it differs from the current one, restart
        only that plugin with it; if it is equal, leave the running plugin alone."""
        current = self._specs.get(spec.slug)
        if current is None:
            return await self.add(spec)
        if current == spec:
            return self.status()[spec.slug]
        runner = self._runners.get(spec.slug)
        was_running = runner is not None and runner.state is not PluginState.STOPPED  # FATAL too: retry
        await self._stop_for_good(spec.slug)
        stale = self._runners.pop(spec.slug, None)
        if stale is not None:
            stale.close()
        self._specs[spec.slug] = spec
        if self._context is not None and was_running:
            return await self.start_plugin(spec.slug)
        if self._context is not None:
            self._write_state()
        return self.status()[spec.slug]

    async def reconcile(self, specs: Iterable[PluginSpec]) -> dict[str, PluginStatus]:
        """Make the supervised set exactly ``specs`` (a reloaded config): remove plugins not in it,
        add new ones, restart changed ones; unchanged plugins keep running untouched."""
        wanted = {spec.slug: spec for spec in specs}
        await asyncio.gather(*(self.remove(slug) for slug in list(self._specs) if slug not in wanted))
        await asyncio.gather(*(self.update(spec) for spec in wanted.values()))
        return self.status()

    async def remove(self, slug: str) -> None:
        """Stop a plugin and forget it."""
        await self._stop_for_good(slug)
        runner = self._runners.pop(slug, None)
        if runner is not None:
            runner.close()
        self._specs.pop(slug, None)  # (a concurrent remove may have dropped it)
        self._last.pop(slug, None)
        if self._context is not None:
            self._write_state()

    # --- internals ------------------------------------------------------------------------------

    async def _stop_for_good(self, slug: str) -> None:
        """Stop the plugin before its runner is dropped, again if a concurrent start or restart,
        resumed by the same stop, launched it meanwhile: a dropped runner must never run."""
        await self.stop_plugin(slug)
        while (runner := self._runners.get(slug)) is not None and runner.running:
            await runner.stop()

    def _check_new(self, spec: PluginSpec) -> None:
        if not isinstance(spec, PluginSpec):
            raise TypeError(f"expected a PluginSpec, got {type(spec).__name__}")
        if spec.slug in self._specs:
            raise ValueError(f"plugin {spec.slug!r} is already supervised")

    def _spec(self, slug: str) -> PluginSpec:
        try:
            return self._specs[slug]
        except KeyError:
            raise KeyError(f"no plugin named {slug!r} is supervised") from None

    def _runner(self, slug: str) -> PluginRunner:
        spec = self._spec(slug)
        if self._context is None:
            raise RuntimeError("the supervisor is not started: call start() first")
        runner = self._runners.get(slug)
        if runner is None:
            runner = self._runners[slug] = PluginRunner(spec, self._context, tail_lines=self._tail_lines)
        return runner

    def _changed(self, runner: PluginRunner) -> None:
        status = runner.status()
        logger.info("%s: %s%s", status.slug, status.state, f" (pid {status.pid})" if status.pid else "")
        self._write_state()
        if self._on_change is not None:
            try:
                self._on_change(status)
            except Exception:
                logger.exception("on_change callback failed for %s", status.slug)

    def _write_state(self, runtime_dir: str | None = None, *, stopped: float | None = None) -> None:
        directory = runtime_dir or (self._context.runtime_dir if self._context else self.runtime_dir)
        try:
            runtime.write_state(directory, self.status(), pid=os.getpid(), started=self._started, stopped=stopped)
        except OSError as exc:
            logger.error("cannot write %s: %s", os.path.join(directory, runtime.STATE_FILE), exc)
