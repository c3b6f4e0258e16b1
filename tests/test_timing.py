"""core.timing.StageTimes: a loop's seconds per stage, as both stages report them."""
from __future__ import annotations

import time

from mealkd.core.timing import StageTimes


def slow_items(n: int, delay: float):
    for i in range(n):
        time.sleep(delay)
        yield i


def test_waiting_charges_only_the_wait_for_each_item():
    times = StageTimes()
    got = []
    for item in times.waiting(slow_items(4, 0.02), "input"):
        with times.stage("work"):
            time.sleep(0.06)  # the consumer's own time is not the producer's
        got.append(item)
    assert got == [0, 1, 2, 3]
    assert 0.08 <= times.get("input") < 0.2, times.seconds
    assert 0.24 <= times.get("work") < 0.5, times.seconds
    assert times.get("absent") == 0.0


def test_stage_counts_time_when_the_block_raises():
    times = StageTimes()
    try:
        with times.stage("failing"):
            time.sleep(0.02)
            raise ValueError("boom")
    except ValueError:
        pass
    assert times.get("failing") >= 0.02
