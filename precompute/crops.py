"""Stage one's crop stream: decode each image once, cut all its stored windows, batch the crops.

Batches are formed per shard, always starting at the shard's first image, so the composition of
every teacher batch (and therefore every float it produces) depends only on the shard: not on
world size, resume point, or which rank processes it.
"""
from __future__ import annotations

import collections
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from mealkd.core.dali_io import Backend, background, batch_failed, build_pipeline, run_batches, to_samples, to_torch
from mealkd.core.dataset import DatasetIndex
from mealkd.core.probe import failed_batch_error
from mealkd.core.replay import FILES, HW_DECODER_LOAD, Normalization, cut_graph, decode_graph, window_feed


@dataclass
class CropBatch:
    rows: np.ndarray  # (B,) image row within the shard
    crops: np.ndarray  # (B,) crop slot
    inputs: list[torch.Tensor]  # one (B, 3, S, S) float tensor per normalisation


class CropStream:
    """Builds the two DALI pipelines once and streams crop batches for any list of images."""

    def __init__(self, index: DatasetIndex, norms: list[Normalization], backend: Backend, *, batch_size: int, num_threads: int | None = None,
                 prefetch: bool | None = None, hw_load: float = HW_DECODER_LOAD):
        """``prefetch`` (default: on a GPU): file reads, decoding and the cut feeds are produced by a
        background thread, two batches ahead, while this thread launches the teachers. On an H100
        the teachers' kernel launches and this feed work shared one Python thread and the labelling
        pass ran at 0.64x the teachers alone. On CPU the cores are the teachers'. ``hw_load``: the
        hardware-decoder load on a GPU (a new store's is :data:`HW_DECODER_LOAD`; an existing store's
        crops are re-cut with the load it records)."""
        self.prefetch = backend.is_cuda if prefetch is None else prefetch
        self.index = index
        self.norms = norms
        self.backend = backend
        self.batch_size = batch_size
        self.decode_batch = max(1, min(batch_size, 32))
        self._decode = build_pipeline(decode_graph(backend.decoder, hw_load), batch_size=self.decode_batch, backend=backend, num_threads=num_threads)
        self._cut = build_pipeline(cut_graph(norms, backend.is_cuda), batch_size=batch_size, backend=backend, num_threads=num_threads)

    def _decoded(self, image_ids: list[int]) -> Iterator[list]:
        issued: collections.deque = collections.deque(maxlen=4)  # the batches DALI may hold when one fails

        def feeds():
            for s in range(0, len(image_ids), self.decode_batch):
                issued.append(image_ids[s : s + self.decode_batch])
                yield {FILES: self.index.file_feed(issued[-1])}

        try:
            yield from run_batches(self._decode, feeds(), lambda outs: to_samples(outs[0], self.backend.device))
        except RuntimeError as err:
            if not batch_failed(err):
                raise
            raise failed_batch_error(self.index, [i for batch in issued for i in batch], self.backend, err,
                                     rerun="rerun the same command (finished shards are kept)") from None

    def _cut_feeds(self, image_ids: list[int], rows: list[int], windows: np.ndarray, flips: np.ndarray, meta: list):
        pending: list[tuple[object, int, int]] = []  # (decoded image, row, crop)
        crops_per_image = windows.shape[1]
        images = (img for batch in self._decoded(image_ids) for img in batch)
        for row, image in zip(rows, images):
            pending.extend((image, row, c) for c in range(crops_per_image))
            while len(pending) >= self.batch_size:
                yield self._feed(pending[: self.batch_size], windows, flips, meta)
                pending = pending[self.batch_size :]
        if pending:
            yield self._feed(pending, windows, flips, meta)

    @staticmethod
    def _feed(items: list, windows: np.ndarray, flips: np.ndarray, meta: list) -> dict:
        rows = np.array([r for _, r, _ in items])
        crops = np.array([c for _, _, c in items])
        meta.append((rows, crops))
        return {"image": [img for img, _, _ in items], **window_feed(windows[rows, crops], flips[rows, crops])}

    def batches(self, image_ids: list[int], rows: list[int], windows: np.ndarray, flips: np.ndarray) -> Iterator[CropBatch]:
        """Crops for images ``image_ids`` (dataset ids) whose windows/flips are at ``rows`` of the arrays."""
        meta: list[tuple[np.ndarray, np.ndarray]] = []
        feeds = self._cut_feeds(image_ids, rows, windows, flips, meta)
        if self.prefetch:
            feeds = background(feeds, depth=2)  # meta grows ahead, in feed order; it is read in the same order below
        device = self.backend.device
        # On CPU the teachers use every core; overlapping DALI with them costs more than it saves.
        ahead = self.backend.is_cuda
        for outputs in run_batches(self._cut, feeds, lambda outs: [to_torch(o, device) for o in outs], ahead=ahead):
            rows_b, crops_b = meta.pop(0)
            yield CropBatch(rows=rows_b, crops=crops_b, inputs=outputs)
