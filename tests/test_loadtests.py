"""The benchmark's own harnesses keep working (no timing asserts: speed lives in loadtests/)."""

import ast
import asyncio
import os
import subprocess
import sys
from pathlib import Path

import httpx

from loadtests import hotpath
from loadtests._report import RoundResult, render, summarize

from .utils import free_port

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
