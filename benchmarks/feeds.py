"""What handing one batch of crop windows to DALI costs the calling thread (run by hand, CPU is enough).

Stage one's labelling thread feeds the cut pipeline and launches the teachers; on a GPU, where the
teachers' kernel launches already fill that thread, every millisecond of feeding shows in the rate.
Compared in one run: ``core.replay.window_feed`` (one batch-first array per source) against the
per-crop lists it used before (one small array per crop), building the feed and ``feed_input``.

    PYTHONPATH=. python benchmarks/feeds.py [--batch 128] [--repeats 300]
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from nvidia.dali import fn, pipeline_def, types

from mealkd.core.replay import window_feed


def per_crop_lists(windows: np.ndarray, flips: np.ndarray) -> dict[str, list]:
    """The previous feed: one array per crop (the baseline)."""
    return {"anchor": list(np.ascontiguousarray(windows[:, :2])), "shape": list(np.ascontiguousarray(windows[:, 2:])),
            "flip": list(np.asarray(flips, dtype=np.int32))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=128, help="Crops per batch (default 128, the GPU check's).")
    parser.add_argument("--repeats", type=int, default=300, help="Batches fed per measurement.")
    ns = parser.parse_args()

    @pipeline_def(batch_size=ns.batch, num_threads=1, device_id=None, prefetch_queue_depth=1, exec_async=False, exec_pipelined=False)
    def windows_only():
        return tuple(fn.external_source(name=n, dtype=types.INT32, batch=True) for n in ("anchor", "shape", "flip"))

    pipe = windows_only()
    pipe.build()
    rng = np.random.default_rng(0)
    windows = rng.integers(0, 500, size=(ns.batch, 4)).astype(np.int32)
    flips = rng.random(ns.batch) < 0.5
    timings: dict[str, list[float]] = {"per-crop lists (before)": [], "batch-first arrays (window_feed)": []}
    makers = {"per-crop lists (before)": per_crop_lists, "batch-first arrays (window_feed)": window_feed}
    for _ in range(3):  # interleaved, so a busy moment hits both
        for name, make in makers.items():
            started = time.perf_counter()
            for _ in range(ns.repeats):
                for source, data in make(windows, flips).items():
                    pipe.feed_input(source, data)
                pipe.run()
            timings[name].append((time.perf_counter() - started) / ns.repeats * 1e3)
    base = min(timings["per-crop lists (before)"])
    for name, values in timings.items():
        print(f"{name:>34}: {min(values):.3f} ms per batch of {ns.batch} (feed + run; best of 3), {base / min(values):.1f}x")


if __name__ == "__main__":
    main()
