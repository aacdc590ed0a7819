"""mint_proxy's own cost per request, without sockets: the A/B tool for hot-path changes.

The proxy runs in-process against an in-memory upstream (a fake transport that answers every
request with the same response on the next loop iteration), fed hand-built ASGI scopes. What
is left is mint_proxy's code plus the event loop's futures: no uvicorn, no syscalls, no other
process. On a shared machine the wall-clock figure still moves by a few percent; the
instruction count (``--callgrind``, needs valgrind) does not, so two versions of the code
can be compared exactly::

    taskset -c 1 .venv/bin/python -m loadtests.hotpath              # µs per request, best of 5
    .venv/bin/python -m loadtests.hotpath --callgrind               # instructions per request
    .venv/bin/python -m loadtests.hotpath --callgrind --floor       # the same for loadtests.floor
    .venv/bin/python -m loadtests.hotpath --callgrind --metrics     # with ProxyMetrics counting

``--floor`` runs ``loadtests/floor.py``'s forwarder in the same harness: the event loop's futures
and a minimal exchange, none of mint_proxy's rules. The difference is what mint_proxy's own work
costs per request.

The request is wrk's (``Host`` only) and the response the benchmark backend's (uvicorn's Date and
Server, Content-Type, Content-Length, 13 bytes), so the numbers describe the benchmark's exchange.
"""

import argparse
import asyncio
import functools
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, MutableMapping, Sequence
from typing import Any, NamedTuple

from mint_proxy import ProxyMetrics, ProxyMiddleware, TokenIssuer
from mint_proxy._upstream import Connection

RESPONSE = (
    b"HTTP/1.1 200 OK\r\ndate: Tue, 01 Dec 2026 08:00:00 GMT\r\nserver: uvicorn\r\n"
    b"content-type: text/plain\r\ncontent-length: 13\r\n\r\nHello, world!"
)
WARMUP = 2000


class _EchoTransport:
    """Answers each write with ``RESPONSE``, delivered to the connection on the next loop iteration."""

    def __init__(self, loop: asyncio.AbstractEventLoop, conn: asyncio.Protocol) -> None:
        self.loop = loop
        self.conn = conn

    def write(self, data: bytes) -> None:
        self.loop.call_soon(self.conn.data_received, RESPONSE)

    def writelines(self, data: Sequence[bytes]) -> None:
        self.write(b"")

    def abort(self) -> None:
        raise RuntimeError("the hot path aborted its upstream connection")

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _scope() -> dict[str, Any]:
    return {
        "type": "http",
        "asgi": {"version": "3.0", "spec_version": "2.4"},
        "http_version": "1.1",
        "server": ("127.0.0.1", 8000),
        "client": ("127.0.0.1", 50000),
        "scheme": "http",
        "root_path": "",
        "headers": [(b"host", b"127.0.0.1:8000")],
        "state": {},
        "method": "GET",
        "path": "/bench/small",
        "raw_path": b"/bench/small",
        "query_string": b"",
    }


class Measured(NamedTuple):
    """One harness run: the seconds the measured requests took, every status (warm-up included),
    and the upstream connections idle in the pool afterwards."""

    elapsed: float
    statuses: list[int]
    idle: int


async def run(requests: int, metrics: bool = False) -> float:
    """Proxy ``requests`` GETs after a warm-up; return the seconds they took."""
    result = await measure(requests, metrics)
    if result.statuses != [200] * (WARMUP + requests) or result.idle != 1:
        raise RuntimeError("the hot path did not answer every request with 200 on one pooled connection")
    return result.elapsed


async def measure(requests: int, metrics: bool = False) -> Measured:
    """``run`` without its check: what the proxy answered, on how many pooled connections."""
    loop = asyncio.get_running_loop()
    proxy = ProxyMiddleware(
        None,
        routes={"/bench": "http://127.0.0.1:8001"},
        tokens=TokenIssuer("x" * 48),
        metrics=ProxyMetrics(environ={}) if metrics else None,
    )
    route = proxy.routes.match("/bench/small")
    if route is None:
        raise RuntimeError("the bench route does not match")
    conn = Connection(proxy.pool, route.upstream)
    conn.connection_made(_EchoTransport(loop, conn))  # type: ignore[arg-type]
    conn.idle_since = time.monotonic()
    proxy.pool._idle[route.upstream.address] = [conn]
    elapsed, statuses = await _drive(proxy, requests)
    return Measured(elapsed, statuses, proxy.pool.idle_count())


async def run_floor(requests: int) -> float:
    """``run`` for ``loadtests.floor``'s forwarder, on the same in-memory upstream and scope."""
    result = await measure_floor(requests)
    if result.statuses != [200] * (WARMUP + requests) or result.idle != 1:
        raise RuntimeError("the floor did not answer every request with 200 on one pooled connection")
    return result.elapsed


async def measure_floor(requests: int) -> Measured:
    """``measure`` for ``loadtests.floor``'s forwarder (``idle`` counts its own pooled connection)."""
    from loadtests import floor

    loop = asyncio.get_running_loop()
    conn = floor._Upstream()
    conn.connection_made(_EchoTransport(loop, conn))  # type: ignore[arg-type]
    floor._idle[:] = [conn]
    elapsed, statuses = await _drive(floor.app, requests)
    return Measured(elapsed, statuses, 1 if floor._idle == [conn] else 0)


async def _drive(app: Callable[..., Awaitable[None]], requests: int) -> tuple[float, list[int]]:
    """Send ``app`` WARMUP requests, then ``requests`` timed ones; return the seconds and every status."""
    statuses: list[int] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for _ in range(WARMUP):
        await app(_scope(), receive, send)
    began = time.perf_counter()
    for _ in range(requests):
        await app(_scope(), receive, send)
    return time.perf_counter() - began, statuses


def _instructions(requests: int, *, floor: bool, metrics: bool = False) -> int:
    """Instructions valgrind counts for the whole process with ``requests`` measured requests."""
    argv = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    argv += [sys.executable, "-m", "loadtests.hotpath", "--requests", str(requests), "--once"]
    argv += ["--floor"] if floor else []
    argv += ["--metrics"] if metrics else []
    # A fixed hash seed: str hashes decide dict and set layouts, which moved the count by up to 5k
    # between runs of one build; with it, reruns agree to a few hundred instructions.
    env = {**os.environ, "PYTHONHASHSEED": os.environ.get("PYTHONHASHSEED", "0")}
    out = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600, env=env)
    for line in out.stderr.splitlines():
        if "refs:" in line:
            return int(line.rsplit(None, 1)[-1].replace(",", ""))
    raise RuntimeError(f"no instruction count in valgrind's output:\n{out.stderr[-2000:]}")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtests.hotpath", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50_000, help="measured requests per run (default 50000)")
    parser.add_argument("--callgrind", action="store_true", help="count instructions per request with valgrind")
    parser.add_argument("--floor", action="store_true", help="measure loadtests.floor instead of mint_proxy")
    parser.add_argument("--metrics", action="store_true", help="count every request in a ProxyMetrics")
    parser.add_argument("--once", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    measure = run_floor if args.floor else functools.partial(run, metrics=args.metrics)
    runner: Callable[[Coroutine[Any, Any, float]], float] = asyncio.run
    try:
        import uvloop  # the loop the benchmark's uvicorn runs (it comes with uvicorn[standard])

        runner = uvloop.run
    except ImportError:
        pass
    if args.once:
        runner(measure(args.requests))
        return 0
    if args.callgrind:
        if shutil.which("valgrind") is None:
            print("error: valgrind is not installed (apt-get install -y valgrind)", file=sys.stderr)
            return 2
        # Two runs that differ only in the number of measured requests: start-up cancels out.
        small, large = 1000, 1000 + args.requests // 10
        count = functools.partial(_instructions, floor=args.floor, metrics=args.metrics)
        per_request = (count(large) - count(small)) / (large - small)
        print(f"instructions per request: {per_request:,.0f}")
        return 0
    best = min(runner(measure(args.requests)) for _ in range(5))
    print(f"µs per request (best of 5 × {args.requests}): {best / args.requests * 1e6:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
