"""The benchmark's own harnesses keep working (no timing asserts: speed lives in loadtests/)."""

import asyncio

from loadtests import hotpath
from loadtests._report import RoundResult, render, summarize


def test_hotpath_harness_answers_every_request_on_one_pooled_connection() -> None:
    # hotpath.run raises unless every request got a 200 and the one upstream connection was reused.
    elapsed = asyncio.run(hotpath.run(200))

    assert elapsed > 0


def test_hotpath_floor_harness_answers_every_request_on_one_pooled_connection() -> None:
    elapsed = asyncio.run(hotpath.run_floor(200))

    assert elapsed > 0


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
