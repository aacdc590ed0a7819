"""Benchmark mint_proxy against nginx and a direct connection to the same backend.

Run from the repository root (see loadtests/README.md)::

    .venv/bin/python -m loadtests.bench                      # full: 10 s wrk runs, 3 rounds, 1 GiB transfers
    .venv/bin/python -m loadtests.bench --quick              # smoke: 2 s runs, 100 MB transfers
    .venv/bin/python -m loadtests.bench --targets direct,nginx --out results.md

Layout on the 2-vCPU machine: wrk, the transfer client and the backend on CPU 0; the proxy
under test alone on CPU 1. Rounds are interleaved (for each round, every target in turn)
and the report shows medians; "added" latency and "× direct" ratios compare each target
with the direct run of the same round.
"""

import argparse
import os
import platform
import resource
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType

from loadtests._procs import RssSampler, Supervisor, cpu_idle_percent, cpu_seconds, cpu_task_seconds
from loadtests._report import MIB, RoundResult, render, summarize
from loadtests._targets import (
    ALL_TARGETS,
    BACKEND_CPU,
    CLIENT_CPU,
    INSTALL_HINT,
    PREFIX,
    PROXY_CPU,
    READY_TIMEOUT,
    REFERENCE_ONLY,
    REPO_ROOT,
    Backend,
    Target,
    TargetUnavailable,
    start_backend,
    start_target,
)
from loadtests._transfer import TransferError, download, transfer_deadline, upload
from loadtests._wrk import WRK_TIMEOUT_SLACK, WrkResult, run_wrk, write_lua

GIB = 1024**3
QUICK_STREAM_BYTES = 100_000_000
QUICK_DURATION = 2
MIN_IDLE_PERCENT = 90.0  # below this, warn that other processes share the machine
NOISY_LOAD_PERCENT = 5.0  # other processes' share of the proxy's CPU worth flagging
ASSUMED_TRANSFER_MBPS = 300.0  # only for the printed time estimate
STEP_ERRORS = (RuntimeError, TransferError, OSError, subprocess.TimeoutExpired, ValueError)


@dataclass(frozen=True, slots=True)
class Options:
    duration: int
    repeats: int
    warmup: int
    stream_bytes: int
    targets: tuple[str, ...]
    out: Path
    mint_app: str


def parse_args(argv: Sequence[str] | None) -> Options:
    parser = argparse.ArgumentParser(prog="python -m loadtests.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=None, help="seconds per wrk run (default 10; --quick: 2)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds; medians reported (default 3)")
    parser.add_argument(
        "--targets",
        default=",".join(ALL_TARGETS),
        help=f"comma-separated subset of {','.join(ALL_TARGETS)} (direct is always added; default: all)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: 2 s wrk runs and 100 MB transfers")
    parser.add_argument(
        "--stream-mb",
        type=float,
        default=None,
        help="size of each streamed transfer in MB (default 1 GiB; --quick: 100)",
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="also write the markdown report here (default loadtests/results/…)"
    )
    parser.add_argument(
        "--mint-app",
        default="mint_proxy:app",
        help="ASGI app that uvicorn runs for the mint_proxy targets (default mint_proxy:app)",
    )
    args = parser.parse_args(argv)
    names = [t.strip() for t in args.targets.split(",") if t.strip()]
    unknown = sorted(set(names) - set(ALL_TARGETS))
    if unknown:
        parser.error(f"--targets: unknown {', '.join(unknown)}; choose from {', '.join(ALL_TARGETS)}")
    targets = tuple(t for t in ALL_TARGETS if t == "direct" or t in names)  # fixed order, direct first
    duration = args.duration if args.duration is not None else (QUICK_DURATION if args.quick else 10)
    if duration < 1 or args.repeats < 1:
        parser.error("--duration and --repeats must be at least 1")
    if args.stream_mb is not None and args.stream_mb <= 0:
        parser.error("--stream-mb must be positive")
    if args.stream_mb is not None:
        stream_bytes = int(args.stream_mb * 1e6)
    else:
        stream_bytes = QUICK_STREAM_BYTES if args.quick else GIB
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    out = args.out if args.out is not None else REPO_ROOT / "loadtests" / "results" / f"bench-{stamp}.md"
    return Options(duration, args.repeats, 1 if args.quick else 2, stream_bytes, targets, out, args.mint_app)


def estimate(opts: Options) -> tuple[float, float]:
    """Expected and worst-case wall time in seconds."""
    n = len(opts.targets)
    transfer = 2 * opts.stream_bytes / (ASSUMED_TRANSFER_MBPS * 1e6)
    expected = n * (opts.warmup + 1) + opts.repeats * n * (3 * opts.duration + transfer + 1)
    worst = n * (READY_TIMEOUT + opts.warmup + WRK_TIMEOUT_SLACK)
    worst += opts.repeats * n * (3 * (opts.duration + WRK_TIMEOUT_SLACK) + 2 * transfer_deadline(opts.stream_bytes))
    return expected + READY_TIMEOUT, worst + READY_TIMEOUT


def preflight() -> str | None:
    """Return an error message if a required tool or CPU is missing."""
    missing = [tool for tool in ("wrk", "taskset") if shutil.which(tool) is None]
    if missing:
        return f"missing {', '.join(missing)}; install with: {INSTALL_HINT} (taskset is in util-linux)"
    cpus = os.sched_getaffinity(0)
    if not {CLIENT_CPU, BACKEND_CPU, PROXY_CPU} <= cpus:
        return f"needs CPUs {CLIENT_CPU} and {PROXY_CPU}; this process may use {sorted(cpus)}"
    return None


class _Run:
    """One benchmark run: the backend, the targets and the measurements."""

    def __init__(self, opts: Options, supervisor: Supervisor, tmp: Path, backend: Backend) -> None:
        self.opts = opts
        self.supervisor = supervisor
        self.tmp = tmp
        self.backend = backend
        self.lua = write_lua(tmp)
        self.targets: list[Target] = []
        self.skipped: dict[str, str] = {}
        self.results: list[RoundResult] = []

    def wrk(self, target: Target, connections: int, duration: int) -> WrkResult:
        return run_wrk(
            self.supervisor,
            target.url("/small"),
            connections=connections,
            duration=duration,
            lua_path=self.lua,
            cpu=CLIENT_CPU,
        )

    def start(self) -> None:
        for name in self.opts.targets:
            try:
                target = start_target(name, self.supervisor, self.backend, self.tmp, mint_app=self.opts.mint_app)
            except TargetUnavailable as exc:
                self.skipped[name] = str(exc)
                print(f"SKIPPED {name}: {str(exc).splitlines()[0]}")
                continue
            where = f"proxy PIDs {target.proxy_pids()} on CPU {PROXY_CPU}" if target.proxy else "no proxy"
            print(f"{name} ready on 127.0.0.1:{target.port} ({where})")
            try:
                self.wrk(target, 64, self.opts.warmup)  # warm up connection pools and code paths
            except STEP_ERRORS as exc:
                self.skipped[name] = f"warm-up run failed: {exc}"
                print(f"SKIPPED {name}: warm-up run failed: {str(exc).splitlines()[0]}")
                if target.proxy is not None:
                    self.supervisor.stop(target.proxy)
                continue
            self.targets.append(target)

    def measure(self, target: Target, round_index: int) -> RoundResult:
        result = RoundResult(target.name, round_index)
        steps = [self._latency, self._throughput]
        if target.name not in REFERENCE_ONLY:
            steps += [self._download, self._upload]
        proxy_pids = target.proxy_pids()
        tasks_before, proxy_before, began = cpu_task_seconds(PROXY_CPU), cpu_seconds(proxy_pids), time.monotonic()
        for step in steps:
            try:
                step(target, result)
            except STEP_ERRORS as exc:
                result.errors.append(f"{step.__name__.lstrip('_')}: {str(exc).strip()[:500]}")
            if target.proxy is not None and not target.proxy.alive():
                result.errors.append(f"proxy exited with {target.proxy.popen.returncode}:\n{target.proxy.log_tail()}")
                break
        others = (cpu_task_seconds(PROXY_CPU) - tasks_before) - (cpu_seconds(proxy_pids) - proxy_before)
        result.other_load_pct = max(0.0, 100.0 * others / (time.monotonic() - began))
        return result

    def _latency(self, target: Target, result: RoundResult) -> None:
        proxy_pids = target.proxy_pids()
        proxy_before = cpu_seconds(proxy_pids)
        run = self.wrk(target, 1, self.opts.duration)
        proxy_after = cpu_seconds(proxy_pids)
        self._note(result, "c1", run)
        result.p50_us, result.p99_us = run.p50_us, run.p99_us
        if run.requests and proxy_pids:
            result.proxy_cpu1_us = (proxy_after - proxy_before) * 1e6 / run.requests

    def _throughput(self, target: Target, result: RoundResult) -> None:
        run = self.wrk(target, 16, self.opts.duration)
        self._note(result, "c16", run)
        result.rps16 = run.rps
        backend_pids = [self.backend.child.pid]
        proxy_pids = target.proxy_pids()
        proxy_before, backend_before = cpu_seconds(proxy_pids), cpu_seconds(backend_pids)
        client_before, wrk_before, began = cpu_task_seconds(CLIENT_CPU), _children_cpu_seconds(), time.monotonic()
        run = self.wrk(target, 64, self.opts.duration)
        proxy_after, backend_after = cpu_seconds(proxy_pids), cpu_seconds(backend_pids)
        # What took CPU 0 besides wrk (a reaped child by now) and the backend: other processes.
        others = (cpu_task_seconds(CLIENT_CPU) - client_before) - (_children_cpu_seconds() - wrk_before)
        others -= backend_after - backend_before
        result.client_other_load_pct = max(0.0, 100.0 * others / (time.monotonic() - began))
        self._note(result, "c64", run)
        result.rps64 = run.rps
        if run.requests:
            result.backend_cpu_us = (backend_after - backend_before) * 1e6 / run.requests
            if proxy_pids:
                result.proxy_cpu_us = (proxy_after - proxy_before) * 1e6 / run.requests

    def _download(self, target: Target, result: RoundResult) -> None:
        with RssSampler(target.proxy_pids()) as rss:
            done = download(target.port, f"{PREFIX}/stream", self.opts.stream_bytes)
        result.get_mbps = done.mb_per_s
        result.get_rss_mib = rss.growth / MIB if target.proxy else None

    def _upload(self, target: Target, result: RoundResult) -> None:
        with RssSampler(target.proxy_pids()) as rss:
            done = upload(target.port, f"{PREFIX}/upload", self.opts.stream_bytes)
        result.post_mbps = done.mb_per_s
        result.post_rss_mib = rss.growth / MIB if target.proxy else None

    @staticmethod
    def _note(result: RoundResult, label: str, run: WrkResult) -> None:
        if run.error_summary:
            result.errors.append(f"wrk {label}: {run.error_summary}")

    def rounds(self) -> None:
        for round_index in range(self.opts.repeats):
            for target in self.targets:
                if target.proxy is not None and not target.proxy.alive():
                    continue
                began = time.monotonic()
                result = self.measure(target, round_index)
                self.results.append(result)
                noisy = (result.other_load_pct or 0.0) >= NOISY_LOAD_PERCENT
                starved = (result.client_other_load_pct or 0.0) >= NOISY_LOAD_PERCENT
                print(
                    f"round {round_index + 1}/{self.opts.repeats} {target.name:<16} "
                    f"p50 {_short(result.p50_us)} µs  @64 {_short(result.rps64)} req/s  "
                    f"proxy {_short(result.proxy_cpu_us, 1)} µs/req  GET {_short(result.get_mbps)} MB/s  "
                    f"POST {_short(result.post_mbps)} MB/s  ({time.monotonic() - began:.0f} s)"
                    + (f"  [{len(result.errors)} error(s)]" if result.errors else "")
                    + (f"  [others used {result.other_load_pct:.0f}% of CPU {PROXY_CPU}]" if noisy else "")
                    + (
                        f"  [others used {result.client_other_load_pct:.0f}% of CPU {CLIENT_CPU} at 64 connections:"
                        " wrk and the backend were slowed, req/s @64 is low]"
                        if starved
                        else ""
                    ),
                    flush=True,
                )


def _short(value: float | None, digits: int = 0) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _children_cpu_seconds() -> float:
    """User + system CPU seconds of this process's reaped children (wrk, once a run is over)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _others_load(results: Sequence[RoundResult], client: bool = False) -> str:
    measured = [r.client_other_load_pct if client else r.other_load_pct for r in results]
    loads = [load for load in measured if load is not None]
    return f"median {statistics.median(loads):.1f}%, max {max(loads):.1f}%" if loads else "not measured"


def _versions() -> str:
    parts = [f"Python {platform.python_version()}", f"kernel {platform.release()}"]
    for argv in (["nginx", "-v"], ["wrk", "-v"]):
        if shutil.which(argv[0]):
            out = subprocess.run(argv, capture_output=True, text=True, timeout=5)
            text = (out.stdout + out.stderr).strip().splitlines()
            if text:
                parts.append(text[0].split(" [")[0].replace("nginx version: ", ""))
    return ", ".join(parts)


class _Signalled(BaseException):
    """SIGTERM or SIGHUP arrived: unwind like Ctrl-C so every ``finally`` stops its processes."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _raise_signalled(signum: int, frame: FrameType | None) -> None:
    raise _Signalled(signum)


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse_args(argv)
    problem = preflight()
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    expected, worst = estimate(opts)
    size = f"{opts.stream_bytes / GIB:.2f} GiB" if opts.stream_bytes >= GIB else f"{opts.stream_bytes / 1e6:.0f} MB"
    print(
        f"targets {', '.join(opts.targets)}; {opts.repeats} round(s) of wrk c1/c16/c64 × {opts.duration} s "
        f"plus {size} GET and POST per target.\n"
        f"estimated time ~{expected / 60:.1f} min (transfers assumed at {ASSUMED_TRANSFER_MBPS:.0f} MB/s); "
        f"hard upper bound {worst / 60:.0f} min.",
        flush=True,
    )
    idle = cpu_idle_percent()
    idle_text = ", ".join(f"{name} {value:.0f}%" for name, value in idle.items())
    if min(idle.values(), default=100.0) < MIN_IDLE_PERCENT:
        print(f"warning: the machine is busy before the run (idle: {idle_text}); results will be noisy", flush=True)
    os.sched_setaffinity(0, {CLIENT_CPU})  # the transfer client shares CPU 0 with wrk and the backend
    signal.signal(signal.SIGTERM, _raise_signalled)
    signal.signal(signal.SIGHUP, _raise_signalled)
    started = datetime.now(UTC)
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="mint-bench-") as tmp_name, Supervisor() as supervisor:
            backend = start_backend(supervisor, Path(tmp_name))
            print(f"backend ready on 127.0.0.1:{backend.port} and {backend.unix_path} (CPU {BACKEND_CPU})")
            run = _Run(opts, supervisor, Path(tmp_name), backend)
            run.start()
            run.rounds()
    except KeyboardInterrupt:
        print("\ninterrupted: all started processes were stopped", file=sys.stderr)
        return 130
    except _Signalled as exc:
        print(f"\nstopped by signal {exc.signum}: all started processes were stopped", file=sys.stderr)
        return 128 + exc.signum
    meta = [
        f"{started:%Y-%m-%d %H:%M} UTC, {os.cpu_count()} vCPUs, {_versions()}",
        f"wrk runs of {opts.duration} s, {opts.repeats} interleaved round(s), medians; "
        f"transfers of {size} each way ({opts.stream_bytes:,} bytes; MB = 10^6 bytes)",
        f"CPU layout: wrk, transfer client and backend on CPU {CLIENT_CPU}; proxy under test alone on CPU {PROXY_CPU}",
        f"CPU idle in the second before the run: {idle_text}; other processes' load on the proxy's CPU "
        f"{PROXY_CPU} during the measurements: {_others_load(run.results)}; on wrk's and the backend's CPU "
        f"{CLIENT_CPU} during the 64-connection runs: {_others_load(run.results, client=True)} (load there "
        "leaves the proxy waiting for work: compare req/s @64 only between rounds where it is near 0)",
        f"wall time {time.monotonic() - began:.0f} s",
    ]
    report = render(summarize(run.results, opts.targets), run.results, meta=meta, skipped=run.skipped)
    print("\n" + report)
    opts.out.parent.mkdir(parents=True, exist_ok=True)
    opts.out.write_text(report)
    print(f"report written to {opts.out}")
    return 1 if any(r.errors for r in run.results) else 0


if __name__ == "__main__":
    sys.exit(main())
