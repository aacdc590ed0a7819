"""The benchmark's own harnesses keep working (no timing asserts: speed lives in loadtests/)."""

import ast
import asyncio
import importlib
import os
import subprocess
import sys
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx
import pytest

from loadtests import floor, hotpath
from loadtests._report import RoundResult, render, summarize
from mint_proxy import verify_internal_token

from .utils import SECRET, free_port

LOCUSTFILE = Path(__file__).resolve().parent.parent / "loadtests" / "locustfile.py"


def test_hotpath_harness_answers_every_request_on_one_pooled_connection() -> None:
    """The in-memory harness gets a 200 for every request, all on the one pooled upstream connection."""
    result = asyncio.run(hotpath.measure(200))

    assert result.statuses == [200] * (hotpath.WARMUP + 200)
    assert result.idle == 1


def test_hotpath_floor_harness_answers_every_request_on_one_pooled_connection() -> None:
    """The same for the floor's forwarder: 200s only, its one connection reused throughout."""
    result = asyncio.run(hotpath.measure_floor(200))

    assert result.statuses == [200] * (hotpath.WARMUP + 200)
    assert result.idle == 1


def test_report_gives_latency_against_nginx_and_the_floor_and_cpu_at_one_connection() -> None:
    """The bench's ratios are taken per round against direct, then the median; then target ÷ reference."""
    rounds = [
        RoundResult("direct", 0, p50_us=50),
        RoundResult("nginx", 0, p50_us=150, proxy_cpu1_us=60),
        RoundResult("asgi_floor", 0, p50_us=200, proxy_cpu1_us=120),
        RoundResult("mint_proxy", 0, p50_us=250, proxy_cpu1_us=150),
    ]
    [_, nginx, floor, mint] = summarize(rounds, ["direct", "nginx", "asgi_floor", "mint_proxy"])

    assert mint.values["added_p50_vs_nginx"] == 2.0
    assert mint.values["added_p50_vs_asgi_floor"] == 200 / 150
    assert floor.values["added_p50_vs_nginx"] == 1.5
    assert mint.values["proxy_cpu1_us"] == 150
    assert "| mint_proxy | 250 | — | 200 | — | 2.00 | 1.33 | 150.0 |" in render(
        [nginx, floor, mint], rounds, meta=[], skipped={}
    )


def test_report_leads_with_the_ratios_to_the_floor_taken_round_by_round() -> None:
    """The report opens with CPU, added p50 and throughput against asgi_floor's in the same round, and the goals."""
    rounds = [
        RoundResult("direct", 0, p50_us=50, rps64=30000),
        RoundResult("asgi_floor", 0, p50_us=150, rps64=20000, proxy_cpu_us=40),
        RoundResult("mint_proxy", 0, p50_us=160, rps64=18000, proxy_cpu_us=50),
        RoundResult("direct", 1, p50_us=60, rps64=30000),
        RoundResult("asgi_floor", 1, p50_us=260, rps64=10000, proxy_cpu_us=80),
        RoundResult("mint_proxy", 1, p50_us=300, rps64=9000, proxy_cpu_us=120),
    ]
    summaries = summarize(rounds, ["direct", "asgi_floor", "mint_proxy"])
    mint = summaries[-1].values

    assert mint["cpu64_vs_floor"] == (50 / 40 + 120 / 80) / 2  # per round, then the median of two
    assert mint["added_p50_vs_floor"] == (110 / 100 + 240 / 200) / 2
    assert mint["rps64_vs_floor"] == 0.9
    report = render(summaries, rounds, meta=[], skipped={})
    assert report.index("## Against the floor") < report.index("## Latency")
    assert "| mint_proxy | 1.38 | 1.15 | 0.90 | **NO** |" in report  # CPU is over its 1.3 goal


def test_report_shows_the_floor_with_fields_against_the_floor_as_a_reference() -> None:
    """``asgi_floor_fields`` gets its ratios to the floor in the floor table, "reference" for a verdict,
    the line saying it is the spec's ceiling, and no goal rows of its own."""
    rounds = [
        RoundResult("direct", 0, p50_us=50, rps64=30000),
        RoundResult("asgi_floor", 0, p50_us=150, rps64=20000, proxy_cpu_us=40),
        RoundResult("asgi_floor_fields", 0, p50_us=160, rps64=17000, proxy_cpu_us=44),
        RoundResult("mint_proxy", 0, p50_us=200, rps64=15000, proxy_cpu_us=60),
    ]
    summaries = summarize(rounds, ["direct", "asgi_floor", "asgi_floor_fields", "mint_proxy"])
    report = render(summaries, rounds, meta=[], skipped={})
    floor_table = report[report.index("## Against the floor") : report.index("## Latency")]

    assert "| asgi_floor_fields | 1.10 | 1.10 | 0.85 | reference |" in floor_table
    assert "| mint_proxy | 1.50 | 1.50 | 0.75 | **NO** |" in floor_table
    assert floor_table.index("| asgi_floor_fields |") < floor_table.index("| mint_proxy |")
    assert "`asgi_floor_fields` is the floor sending upstream the fields the spec makes a proxy add" in floor_table
    assert "| asgi_floor_fields | 160 | — | 110 | — | — | 1.10 | — |" in report  # added p50 ÷ asgi_floor's
    assert "| asgi_floor_fields |" not in report[report.index("## Goals") : report.index("## Raw rounds")]


@pytest.fixture
def reload_floor(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., ModuleType]]:
    """Import ``loadtests.floor`` again under the environment given; the module as it was afterwards."""

    def reload(**environ: str) -> ModuleType:
        for name in ("MINT_FLOOR_FIELDS", "MINT_FLOOR_UPSTREAM", "MINT_INTERNAL_TOKEN_SECRET"):
            monkeypatch.delenv(name, raising=False)
        for name, value in environ.items():
            monkeypatch.setenv(name, value)
        return importlib.reload(floor)

    yield reload
    monkeypatch.undo()
    importlib.reload(floor)


def _recording(written: list[bytes]) -> type[hotpath._EchoTransport]:
    """The harness's in-memory upstream, keeping what is written to it in ``written``."""

    class Recording(hotpath._EchoTransport):
        def write(self, data: bytes) -> None:
            written.append(bytes(data))
            super().write(data)

        def writelines(self, data: Sequence[bytes]) -> None:
            self.write(b"".join(data))

    return Recording


def _floor_request(module: ModuleType) -> bytes:
    """What the floor writes upstream for wrk's GET (the hotpath harness's scope), over an in-memory upstream."""
    written: list[bytes] = []

    async def receive() -> dict[str, Any]:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: MutableMapping[str, Any]) -> None:
        pass

    async def one_request() -> None:
        conn = module._Upstream()
        conn.connection_made(_recording(written)(asyncio.get_running_loop(), conn))
        module._idle[:] = [conn]
        await module.app(hotpath._scope(), receive, send)

    asyncio.run(one_request())
    [request] = written
    return request


def test_floor_sends_only_the_request_line_and_host_without_the_fields_switch(
    reload_floor: Callable[..., ModuleType],
) -> None:
    """The plain floor's upstream request is still ``GET target`` and the upstream's host, nothing else."""
    module = reload_floor(MINT_FLOOR_UPSTREAM="127.0.0.1:8001", MINT_FLOOR_FIELDS="0")

    assert _floor_request(module) == b"GET /bench/small HTTP/1.1\r\nhost: 127.0.0.1\r\n\r\n"


def test_floor_with_the_fields_switch_sends_the_fields_mint_proxy_adds(reload_floor: Callable[..., ModuleType]) -> None:
    """``MINT_FLOOR_FIELDS=1``: after the request line, the client's Host, X-Forwarded-*, Via,
    a 32-hex request id and a real internal token for the bench route, then the end of the head."""
    module = reload_floor(
        MINT_FLOOR_UPSTREAM="127.0.0.1:8001", MINT_FLOOR_FIELDS="1", MINT_INTERNAL_TOKEN_SECRET=SECRET
    )

    head, _, rest = _floor_request(module).partition(b"\r\nx-mint-internal-token: ")
    token, _, end = rest.partition(b"\r\n")
    lines = head.split(b"\r\n")
    assert lines[:6] == [
        b"GET /bench/small HTTP/1.1",
        b"host: 127.0.0.1:8000",
        b"x-forwarded-for: 127.0.0.1",
        b"x-forwarded-proto: http",
        b"x-forwarded-host: 127.0.0.1:8000",
        b"via: 1.1 mint-proxy-00000000",
    ]
    name, _, request_id = lines[6].partition(b": ")
    assert (name, len(request_id), len(lines)) == (b"x-request-id", 32, 7)
    assert set(request_id) <= set(b"0123456789abcdef")
    assert verify_internal_token(token.decode(), SECRET, plugin="bench").plugin == "bench"
    assert end == b"\r\n"


def test_floor_with_the_fields_switch_sends_as_many_bytes_as_mint_proxy(
    reload_floor: Callable[..., ModuleType], monkeypatch: pytest.MonkeyPatch
) -> None:
    """For wrk's GET, the floor with fields writes upstream the same field names, in the same order,
    and the same number of bytes as mint_proxy does: the reference follows the proxy's request."""
    module = reload_floor(MINT_FLOOR_FIELDS="1")
    written: list[bytes] = []
    monkeypatch.setattr(hotpath, "_EchoTransport", _recording(written))
    asyncio.run(hotpath.measure(1))
    proxy, floor_request = written[-1], _floor_request(module)

    def names(request: bytes) -> list[bytes]:
        return [line.partition(b":")[0] for line in request.split(b"\r\n")[1:]]

    assert names(floor_request) == names(proxy)
    assert len(floor_request) == len(proxy)


def _demo_paths() -> dict[str, str]:
    """``DEMO_PATHS`` from the locustfile, read without importing locust (it monkeypatches the process)."""
    tree = ast.parse(LOCUSTFILE.read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "DEMO_PATHS" for t in node.targets):
            paths: dict[str, str] = ast.literal_eval(node.value)
            return paths
    raise AssertionError("loadtests/locustfile.py defines no DEMO_PATHS")


def test_locustfile_demo_paths_exist_on_the_demo(tmp_path: Path) -> None:
    """``MINT_BENCH_TARGET=demo`` aims at paths the running demo answers with 200."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINT_")}
    argv = [sys.executable, "-m", "mint_proxy.cli", "demo", "--port", str(port), "--duration", "60"]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # wait for the "proxy on" line, not a sleep
            if "proxy on" in line:
                break
        base = f"http://127.0.0.1:{port}"
        paths = _demo_paths()
        with httpx.Client(base_url=base, timeout=10) as client:
            assert client.post(paths.pop("run"), content=b"m" * 512).status_code == 200
            for path in paths.values():
                assert client.get(path).status_code == 200, path
    finally:
        proc.terminate()
        proc.communicate(timeout=20)
