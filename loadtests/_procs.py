"""Child processes and /proc readings: start, track by PID, stop; CPU time and RSS of a process tree.

Every process the benchmark starts goes through ``Supervisor``. It records each child by
``(pid, start time)`` so a reused PID is never signalled, and ``stop_all`` (run from a
``finally``) sends SIGTERM, waits 5 s, then SIGKILLs the child and any of its descendants
(nginx workers) that are still alive.
"""

import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

CLK_TCK = os.sysconf("SC_CLK_TCK")
STOP_GRACE_SECONDS = 5.0
RSS_SAMPLE_SECONDS = 0.02


@dataclass(frozen=True, slots=True)
class _Stat:
    state: str
    ppid: int
    cpu_ticks: int
    start_ticks: int


def _read_stat(pid: int) -> _Stat | None:
    """Parse ``/proc/PID/stat``; ``None`` if the process is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(b")") + 2 :].split()
    # fields[0] is field 3 (state): ppid is field 4, utime 14, stime 15, starttime 22.
    return _Stat(
        state=fields[0].decode(),
        ppid=int(fields[1]),
        cpu_ticks=int(fields[11]) + int(fields[12]),
        start_ticks=int(fields[19]),
    )


def children(pid: int) -> list[int]:
    """Direct children of ``pid``, from ``/proc/PID/task/*/children`` or a scan of ``/proc``."""
    found: set[int] = set()
    task_dir = Path(f"/proc/{pid}/task")
    try:
        for task in task_dir.iterdir():
            found.update(int(c) for c in (task / "children").read_text().split())
        return sorted(found)
    except FileNotFoundError:
        pass  # no CONFIG_PROC_CHILDREN, or the process is gone: fall back to a scan
    except ProcessLookupError:
        return []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            stat = _read_stat(int(entry.name))
            if stat is not None and stat.ppid == pid:
                found.add(int(entry.name))
    return sorted(found)


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its live descendants (nginx master plus workers)."""
    tree: list[int] = []
    pending = [pid]
    while pending:
        current = pending.pop()
        if _read_stat(current) is None:
            continue
        tree.append(current)
        pending.extend(children(current))
    return tree


def cpu_seconds(pids: Iterable[int]) -> float:
    """Sum of utime + stime, in seconds, over the live processes ``pids``."""
    ticks = 0
    for pid in pids:
        stat = _read_stat(pid)
        if stat is not None:
            ticks += stat.cpu_ticks
    return ticks / CLK_TCK


def rss_bytes(pids: Iterable[int]) -> int:
    """Sum of VmRSS, in bytes, over the live processes ``pids``."""
    total = 0
    for pid in pids:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def _cpu_jiffies() -> dict[str, list[int]]:
    """Per-CPU jiffies from ``/proc/stat``: user nice system idle iowait irq softirq steal."""
    jiffies = {}
    for line in Path("/proc/stat").read_text().splitlines():
        name, *values = line.split()
        if name.startswith("cpu") and name != "cpu":
            jiffies[name] = [int(v) for v in values[:8]]
    return jiffies


def cpu_task_seconds(cpu: int) -> float:
    """Seconds CPU ``cpu`` has spent running tasks (user, nice, system) or stolen by the hypervisor.

    Interrupt and softirq time is left out, so on the proxy's CPU this minus the proxy's own
    utime+stime is what other processes (and steal) took.
    """
    user, nice, system, _, _, _, _, steal = _cpu_jiffies().get(f"cpu{cpu}", [0] * 8)
    return (user + nice + system + steal) / CLK_TCK


def cpu_idle_percent(seconds: float = 1.0) -> dict[str, float]:
    """How idle each CPU was over the next ``seconds`` (to warn when others share the machine)."""
    before = _cpu_jiffies()
    time.sleep(seconds)
    after = _cpu_jiffies()
    idle = {}
    for name, now in after.items():
        then = before.get(name, now)
        total = sum(now) - sum(then)
        idle[name] = 100.0 * ((now[3] + now[4]) - (then[3] + then[4])) / total if total else 100.0
    return idle


class RssSampler:
    """Sample the summed RSS of ``pids`` every 20 ms in a thread; ``growth`` is peak minus the start value."""

    def __init__(self, pids: Sequence[int], interval: float = RSS_SAMPLE_SECONDS) -> None:
        self._pids = list(pids)
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.baseline = 0
        self.peak = 0

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.peak = max(self.peak, rss_bytes(self._pids))

    @property
    def growth(self) -> int:
        return max(0, self.peak - self.baseline)

    def __enter__(self) -> Self:
        self.baseline = self.peak = rss_bytes(self._pids)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self._pids))


@dataclass(slots=True)
class Child:
    """One process started by the supervisor."""

    name: str
    popen: "subprocess.Popen[bytes]"
    start_ticks: int
    log_path: Path | None
    known_descendants: dict[int, int] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def remember_descendants(self) -> None:
        """Record descendants by (pid, start time), so ``stop`` can kill orphans that outlive the parent."""
        for pid in process_tree(self.pid)[1:]:
            stat = _read_stat(pid)
            if stat is not None:
                self.known_descendants[pid] = stat.start_ticks

    def log_tail(self, lines: int = 15) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


class Supervisor:
    """Start child processes and guarantee they are stopped, by PID, when the ``with`` block ends."""

    def __init__(self) -> None:
        self._children: list[Child] = []

    def start(
        self,
        name: str,
        argv: Sequence[str],
        *,
        log_path: Path | None = None,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        stdout: int | IO[bytes] | None = None,
    ) -> Child:
        """Start ``argv`` in its own session (so Ctrl-C reaches only us, and we stop it in order)."""
        out: int | IO[bytes] | None = stdout
        log_file = None
        if out is None:
            if log_path is not None:
                log_file = open(log_path, "ab")  # closed right after Popen duplicates it
                out = log_file
            else:
                out = subprocess.DEVNULL
        try:
            popen = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT if log_path is not None or stdout is not None else subprocess.DEVNULL,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
            )
        finally:
            if log_file is not None:
                log_file.close()
        stat = _read_stat(popen.pid)
        child = Child(name, popen, stat.start_ticks if stat else -1, log_path)
        self._children.append(child)
        return child

    def run(self, name: str, argv: Sequence[str], *, timeout: float) -> tuple[int, str]:
        """Run ``argv`` to completion (killed after ``timeout`` seconds); return its exit code and output."""
        child = self.start(name, argv, stdout=subprocess.PIPE)
        try:
            out, _ = child.popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.stop(child)
            raise
        finally:
            if child.alive():
                self.stop(child)  # interrupted (Ctrl-C): never leave it running
        if child in self._children:
            self._children.remove(child)
        return child.popen.returncode, out.decode(errors="replace")

    def stop(self, child: Child) -> None:
        """SIGTERM, wait up to 5 s, SIGKILL; then SIGKILL any remembered descendant still alive."""
        if child.alive():
            child.remember_descendants()
            _signal(child.pid, child.start_ticks, signal.SIGTERM)
            try:
                child.popen.wait(STOP_GRACE_SECONDS)
            except subprocess.TimeoutExpired:
                _signal(child.pid, child.start_ticks, signal.SIGKILL)
                child.popen.wait(STOP_GRACE_SECONDS)
        else:
            child.popen.wait()
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        for pid, start_ticks in child.known_descendants.items():
            while _same_process(pid, start_ticks) and time.monotonic() < deadline:
                time.sleep(0.05)  # workers exit on their own once the master is gone
            _signal(pid, start_ticks, signal.SIGKILL)
        if child in self._children:
            self._children.remove(child)

    def stop_all(self) -> None:
        """Stop every child, newest first; keep going if one of them fails to stop."""
        errors: list[BaseException] = []
        for child in reversed(list(self._children)):
            try:
                self.stop(child)
            except Exception as exc:  # keep stopping the others, re-raise below
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()


def _same_process(pid: int, start_ticks: int) -> bool:
    stat = _read_stat(pid)
    return stat is not None and stat.state not in ("Z", "X") and stat.start_ticks == start_ticks


def _signal(pid: int, start_ticks: int, sig: signal.Signals) -> None:
    """Send ``sig`` to ``pid`` only if it is still the process we started (guards against PID reuse)."""
    if _same_process(pid, start_ticks):
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
