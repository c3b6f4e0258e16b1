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
            time.sleep(0.1)  # the consumer's own time is not the producer's
        got.append(item)
    assert got == [0, 1, 2, 3]
    # lower bounds from the sleeps; the one upper bound that matters: the work (>= 0.4 s) is not charged to
    # the input, whose own sleeps are 0.08 s (a loaded CI machine oversleeps; it does not sleep 0.32 s more)
    assert 0.08 <= times.get("input") < 0.4, times.seconds
    assert 0.4 <= times.get("work"), times.seconds
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


def test_time_report_names_each_wait_and_flags_an_input_bound_gpu_run():
    from mealkd.precompute.runner import time_report

    gpu = {"labelling_s": 10.0, "crops": 5000, "thread_s": {"crops": 3.0, "teachers": 5.0, "gpu": 1.0, "writes": 0.1}}
    line = time_report(gpu)
    assert line.startswith("500 crops/s over 10.00 s of labelling")
    assert "3.00 s for crops, 1.00 s for the GPU, 0.10 s for shard writes" in line and "5.00 s in the teachers" in line
    assert line.endswith("input-bound: raise --num-threads")
    assert "input-bound" not in time_report(dict(gpu, thread_s=dict(gpu["thread_s"], crops=1.0)))
    cpu = {"labelling_s": 10.0, "crops": 5000, "thread_s": {"crops": 3.0, "teachers": 6.0, "writes": 0.1}}
    assert "input-bound" not in time_report(cpu) and "the GPU" not in time_report(cpu)  # CPU: crops are cut in turn, by design
