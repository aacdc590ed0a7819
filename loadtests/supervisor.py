"""What the plugin supervisor costs: start to READY, SIGKILL to READY, idle CPU and RSS with N plugins.

    .venv/bin/python -m loadtests.supervisor                # 10 rounds, 20 idle plugins for 30 s
    .venv/bin/python -m loadtests.supervisor --rounds 3 --plugins 5 --idle 5

The plugin is ``tests.plugin_apps:hello`` under the bundled host (uvicorn), the
same trivial app the tests use. Restart figures use a zero backoff so they
measure the mechanics (exit noticed, spawn, import, bind, probe); in production
the backoff adds ``uniform(0, backoff_initial)`` = 0-0.5 s to the first restart.
"""

import argparse
import asyncio
import os
import random
import resource
import signal
import statistics
import tempfile
import time

from mint_proxy.plugins import PluginSpec, PluginState, PluginStatus, PluginSupervisor, RestartPolicy

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POLICY = RestartPolicy(backoff_initial=0.001, backoff_max=0.001, crash_limit=1000)


class _NoJitter(random.Random):
    def uniform(self, a: float, b: float) -> float:
        return 0.0


def _spec(slug: str) -> PluginSpec:
    return PluginSpec(slug, app="tests.plugin_apps:hello", cwd=REPO_ROOT, restart=POLICY, stop_timeout=5.0)


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _summary(values: list[float]) -> str:
    ms = sorted(v * 1000 for v in values)
    return f"median {statistics.median(ms):.0f} ms, min {ms[0]:.0f} ms, max {ms[-1]:.0f} ms (n={len(ms)})"


async def _start_to_ready(runtime_dir: str, rounds: int) -> tuple[list[float], list[float]]:
    walls, probes = [], []
    for index in range(rounds):
        supervisor = PluginSupervisor([_spec(f"start{index}")], runtime_dir=runtime_dir)
        began = time.perf_counter()
        status = (await supervisor.start())[f"start{index}"]
        walls.append(time.perf_counter() - began)
        assert status.state is PluginState.READY and status.start_seconds is not None
        probes.append(status.start_seconds)
        await supervisor.stop()
    return walls, probes


async def _restart_to_ready(runtime_dir: str, rounds: int) -> list[float]:
    ready = asyncio.Event()

    def on_change(status: PluginStatus) -> None:
        if status.state is PluginState.READY:
            ready.set()

    supervisor = PluginSupervisor([_spec("restart")], runtime_dir=runtime_dir, on_change=on_change, rng=_NoJitter())
    await supervisor.start()
    times = []
    try:
        for _ in range(rounds):
            pid = supervisor.status()["restart"].pid
            assert pid is not None
            ready.clear()
            began = time.perf_counter()
            os.kill(pid, signal.SIGKILL)
            await ready.wait()
            times.append(time.perf_counter() - began)
    finally:
        await supervisor.stop()
    return times


async def _idle(runtime_dir: str, plugins: int, seconds: float) -> tuple[float, int, int]:
    supervisor = PluginSupervisor([_spec(f"idle{i}") for i in range(plugins)], runtime_dir=runtime_dir)
    statuses = await supervisor.start()
    assert all(status.state is PluginState.READY for status in statuses.values())
    try:
        before = resource.getrusage(resource.RUSAGE_SELF)
        await asyncio.sleep(seconds)
        after = resource.getrusage(resource.RUSAGE_SELF)
        cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
        hosts = sum(_rss_kib(status.pid) for status in supervisor.status().values() if status.pid)
        return cpu / seconds, _rss_kib(os.getpid()), hosts
    finally:
        await supervisor.stop()


async def _main(rounds: int, plugins: int, idle: float) -> None:
    with tempfile.TemporaryDirectory(prefix="mp-bench-") as parent:
        runtime_dir = os.path.join(parent, "rt")
        baseline_rss = _rss_kib(os.getpid())
        walls, probes = await _start_to_ready(runtime_dir, rounds)
        print(f"start to READY (start() wall clock): {_summary(walls)}")
        print(f"start to READY (spawn to first good probe): {_summary(probes)}")
        print(f"SIGKILL to READY (zero backoff): {_summary(await _restart_to_ready(runtime_dir, rounds))}")
        cpu, rss, hosts = await _idle(runtime_dir, plugins, idle)
        print(
            f"{plugins} idle plugins for {idle:g} s: supervisor CPU {cpu * 100:.2f} % of one core, "
            f"supervisor RSS {rss / 1024:.1f} MiB (process before any plugin: {baseline_rss / 1024:.1f} MiB), "
            f"plugin hosts {hosts / 1024:.0f} MiB in total"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--plugins", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    asyncio.run(_main(args.rounds, args.plugins, args.idle))


if __name__ == "__main__":
    main()
