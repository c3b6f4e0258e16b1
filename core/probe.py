"""Validate a dataset with the DALI decoder and measure every image's decoded (H, W).

DALI fails a whole batch on one corrupt file, good samples included, so a failed batch is retried
file by file in fresh pipelines to name the culprits. Sizes come from ``fn.peek_image_shape``
(EXIF-aware, the decoder's orientation rule) and are cross-checked against the decoded shape.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from core.dali_io import Backend, build_pipeline, run_batches
from core.dataset import DatasetIndex
from core.replay import probe_graph

ProgressFn = Callable[[int], None]


def _probe_pipeline(backend: Backend, batch_size: int, num_threads: int):
    return build_pipeline(probe_graph(backend.decoder), batch_size=batch_size, backend=backend, num_threads=num_threads)


def _probe_batch(index: DatasetIndex, ids: list[int], pipe) -> np.ndarray:
    feed = {"encoded": [index.read_bytes(i) for i in ids]}
    ((peeked, decoded),) = list(run_batches(pipe, [feed], lambda outs: (np.array(outs[0].as_array()), np.array(outs[1].as_array()))))
    peeked = peeked.reshape(len(ids), -1)[:, :2]
    decoded = decoded.reshape(len(ids), -1)[:, :2]
    if not np.array_equal(peeked, decoded):
        bad = [index.paths[i] for i, p, d in zip(ids, peeked, decoded) if not np.array_equal(p, d)]
        raise RuntimeError(f"header and decoded sizes differ for {bad[:3]}")
    return decoded.astype(np.int32)


def probe_images(
    index: DatasetIndex,
    ids: np.ndarray,
    backend: Backend,
    *,
    batch_size: int = 64,
    num_threads: int = 2,
    progress: ProgressFn | None = None,
) -> tuple[np.ndarray, list[int]]:
    """Decode every image in ``ids``; return sizes (len(ids), 2) = (H, W) and the ids that failed.

    Failed images get size (0, 0). Zero-byte files fail without reaching DALI.
    """
    sizes = np.zeros((len(ids), 2), dtype=np.int32)
    bad: list[int] = []
    position = {int(i): row for row, i in enumerate(ids)}
    id_list = [int(i) for i in ids]
    pipe = None  # one pipeline for all clean batches (building and tearing one down per batch cost ~2/3 of the probe)
    for start in range(0, len(id_list), batch_size):
        chunk = id_list[start : start + batch_size]
        good = [i for i in chunk if index.byte_sizes[i] > 0]
        bad.extend(i for i in chunk if index.byte_sizes[i] == 0)
        try:
            if good and pipe is None:
                pipe = _probe_pipeline(backend, batch_size, num_threads)
            measured = _probe_batch(index, good, pipe) if good else np.zeros((0, 2), np.int32)
            for i, hw in zip(good, measured):
                sizes[position[i]] = hw
        except RuntimeError:
            pipe = None  # a failed run may leave the pipeline unusable: the next clean batch gets a new one
            for i in good:
                try:
                    sizes[position[i]] = _probe_batch(index, [i], _probe_pipeline(backend, 1, 1))[0]
                except RuntimeError:
                    bad.append(i)
        if progress is not None:
            progress(len(chunk))
    return sizes, sorted(bad)
