"""The benchmark's own harnesses keep working (no timing asserts: speed lives in loadtests/)."""

import asyncio

from loadtests import hotpath


def test_hotpath_harness_answers_every_request_on_one_pooled_connection() -> None:
    # hotpath.run raises unless every request got a 200 and the one upstream connection was reused.
    elapsed = asyncio.run(hotpath.run(200))

    assert elapsed > 0


def test_hotpath_floor_harness_answers_every_request_on_one_pooled_connection() -> None:
    elapsed = asyncio.run(hotpath.run_floor(200))

    assert elapsed > 0
