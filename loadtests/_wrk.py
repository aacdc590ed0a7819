"""Run wrk (pinned to a CPU) and read its results from a small Lua ``done`` hook as JSON."""

import json
from dataclasses import dataclass
from pathlib import Path

from loadtests._procs import Supervisor

# wrk calls done() once at the end; latency percentiles are in microseconds.
LUA_SCRIPT = """\
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK_JSON {"requests": %d, "duration_us": %d, "bytes": %d, "connect": %d, "read": %d, ' ..
    '"write": %d, "status": %d, "timeout": %d, "p50": %.1f, "p99": %.1f, "mean": %.1f}\\n',
    summary.requests, summary.duration, summary.bytes, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99), latency.mean))
end
"""
WRK_TIMEOUT_SLACK = 15.0


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run reports."""

    requests: int
    duration_s: float
    socket_errors: int
    status_errors: int
    p50_us: float
    p99_us: float
    mean_us: float

    @property
    def rps(self) -> float:
        return self.requests / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def error_summary(self) -> str:
        """Empty when the run was clean; otherwise says what went wrong."""
        parts = []
        if self.socket_errors:
            parts.append(f"{self.socket_errors} socket errors")
        if self.status_errors:
            parts.append(f"{self.status_errors} non-2xx/3xx responses")
        return ", ".join(parts)


def write_lua(directory: Path) -> Path:
    path = directory / "report.lua"
    path.write_text(LUA_SCRIPT)
    return path


def run_wrk(
    supervisor: Supervisor,
    url: str,
    *,
    connections: int,
    duration: int,
    lua_path: Path,
    cpu: int | None,
) -> WrkResult:
    """Run ``wrk -t1 -cN -dDs`` against ``url``; raise ``RuntimeError`` if it fails or prints no result."""
    argv = ["taskset", "-c", str(cpu)] if cpu is not None else []
    argv += ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--timeout", "5s", "-s", str(lua_path), url]
    code, output = supervisor.run("wrk", argv, timeout=duration + WRK_TIMEOUT_SLACK)
    line = next((x for x in output.splitlines() if x.startswith("WRK_JSON ")), None)
    if code != 0 or line is None:
        raise RuntimeError(f"wrk exited with {code} and no result:\n{output[-2000:]}")
    data = json.loads(line.removeprefix("WRK_JSON "))
    return WrkResult(
        requests=int(data["requests"]),
        duration_s=data["duration_us"] / 1e6,
        socket_errors=int(data["connect"] + data["read"] + data["write"] + data["timeout"]),
        status_errors=int(data["status"]),
        p50_us=float(data["p50"]),
        p99_us=float(data["p99"]),
        mean_us=float(data["mean"]),
    )
