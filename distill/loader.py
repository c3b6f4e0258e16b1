"""Stage two's training loader: replays stored crops through DALI, labels travelling with the images.

Epoch e of a store with R crops per image uses crop slots (e*K + k) mod R, k < K, for every image,
so over R/K epochs each stored crop is used exactly once, and each epoch's labels are one
contiguous slot column of the store (the fast read path). The next epoch's labels, windows and
flips are read in a background thread while this epoch trains; a rank holds only its own images'
rows of the epoch's K slots (never the whole N x R windows array), labels kept as stored (fp16
rows or top-k pairs) and decoded to float32 one batch at a time. Label memory per rank: 2 epochs
(current + prefetched) x its images x K x stored row bytes, e.g. dense 1000-class fp16 = 2 x 2000 B
per image and crop: the size of ONE epoch's labels in float32. The per-batch feeds (file reads,
label decoding) are built by a second background thread, two batches ahead of the training step.

Sharding: each epoch a seeded permutation of the usable (non-excluded) images is padded by
wrapping to a multiple of world_size (as torch's DistributedSampler does, so every rank runs the
same number of steps) and rank r takes every world_size-th image from position r.
"""
from __future__ import annotations

import collections
import threading
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from mealkd.core.dali_io import Backend, background, batch_failed, build_pipeline, run_batches, to_torch
from mealkd.core.dataset import DatasetIndex
from mealkd.core.distributed import Dist
from mealkd.core.probe import failed_batch_error
from mealkd.core.replay import FILES, Normalization, recorded_hw_load, replay_graph, window_feed
from mealkd.storage import LabelStore
from mealkd.errors import UserError


class Batch(NamedTuple):
    """One training step's crops, sample-major (row b*K + k is image b's k-th crop of the step)."""

    images: torch.Tensor   # (B*K, 3, S, S) float32, normalised
    labels: torch.Tensor   # (B*K, C) float32 stored ensemble rows, decoded
    classes: torch.Tensor  # (B*K,) int64 the image's dataset class (for a hard-label term)


@dataclass(frozen=True)
class EpochData:
    """One epoch's plan and stored data for this rank (row i belongs to image ``ids[i]``)."""

    ids: np.ndarray  # (n,) image ids in visiting order
    slots: list[int]  # the K crop slots of the epoch
    labels: list[list[np.ndarray]]  # per slot, the rows as stored
    windows: np.ndarray  # (n, K, 4) int32
    flips: np.ndarray  # (n, K) bool


def batch_bounds(n: int, batch_size: int, crops_per_step: int) -> list[tuple[int, int]]:
    """A rank's batches of an epoch: [start, stop) ranges over its ``n`` images. When the remainder would be a
    batch of ONE crop (train-mode BatchNorm cannot normalise a single sample), the last two batches are split
    as (batch_size - 1, 2) instead, so nothing is dropped."""
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and batch_size > 2 and (n - bounds[-1][0]) * crops_per_step == 1:
        (a, _), (_, stop) = bounds[-2], bounds[-1]
        bounds[-2:] = [(a, stop - 2), (stop - 2, stop)]
    return bounds


class ReplayLoader:
    def __init__(
        self,
        store: LabelStore,
        index: DatasetIndex,
        norm: Normalization,
        backend: Backend,
        *,
        batch_size: int,
        crops_per_step: int = 1,
        seed: int = 0,
        dist: Dist = Dist(),
        shuffle: bool = True,
        num_threads: int | None = None,
        feed_depth: int = 2,
        hw_load: float | None = None,
    ):
        """``hw_load``: the hardware-decoder load of the GPU decoder (default: the one ``store`` records,
        so the crops are decoded as stage one decoded them)."""
        if not 1 <= crops_per_step <= store.crops_per_image:
            raise UserError(
                f"--crops-per-image-step {crops_per_step}: the store {store.url} holds {store.crops_per_image} crops per image; "
                f"use a value from 1 to {store.crops_per_image}"
            )
        self.store = store
        self.index = index
        self.backend = backend
        self.batch_size = batch_size
        self.crops_per_step = crops_per_step
        self.seed = seed
        self.dist = dist
        self.shuffle = shuffle
        self.usable = np.flatnonzero(~np.asarray(store.excluded, dtype=bool))
        self.feed_depth = feed_depth
        self.classes = np.asarray(store.targets, dtype=np.int64)
        self.hw_load = recorded_hw_load(store.attrs.get("decoder")) if hw_load is None else float(hw_load)
        self.pipe = build_pipeline(
            replay_graph(norm, backend.decoder, crops_per_step, with_classes=True, hw_load=self.hw_load),
            batch_size=batch_size, backend=backend, num_threads=num_threads, seed=seed,
        )
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labels")
        self._epochs: dict[int, Future] = {}
        self._lock = threading.Lock()

    # -- the plan ---------------------------------------------------------------------------
    def slots(self, epoch: int) -> list[int]:
        return [(epoch * self.crops_per_step + k) % self.store.crops_per_image for k in range(self.crops_per_step)]

    def images(self, epoch: int) -> np.ndarray:
        """This rank's image ids for ``epoch``, in visiting order."""
        order = self.usable
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(order)
        world = self.dist.world_size
        padded = np.resize(order, self.images_per_rank * world)  # wraps around like DistributedSampler
        return padded[self.dist.rank :: world]

    @property
    def images_per_rank(self) -> int:
        """Images every rank visits per epoch: the usable images over the ranks, rounded up."""
        return self._images_per_rank(self.dist.world_size)

    def _images_per_rank(self, world: int) -> int:
        return -(-len(self.usable) // world)

    def batch_starts(self, world: int, batch_size: int) -> list[int]:
        """Where the batches of a job of ``world`` processes x ``batch_size`` begin in the epoch's order, then its
        end: rank r takes every world-th image, so a step's global batch is a consecutive run of that order."""
        return [0] + [stop * world for _, stop in batch_bounds(self._images_per_rank(world), batch_size, self.crops_per_step)]

    def _bounds(self, n: int) -> list[tuple[int, int]]:
        return batch_bounds(n, self.batch_size, self.crops_per_step)

    def steps_per_epoch(self) -> int:
        return len(self._bounds(self.images_per_rank))  # no need to draw an epoch's permutation for a count

    def batch_crops(self) -> list[int]:
        """Crops in each of an epoch's batches on this rank, in order (the same on every rank)."""
        return [(stop - start) * self.crops_per_step for start, stop in self._bounds(self.images_per_rank)]

    # -- the epoch's stored data -------------------------------------------------------------
    def _read_epoch(self, epoch: int) -> EpochData:
        """This rank's stored data for ``epoch``: per slot, the labels as stored (fp16 rows, or top-k
        pairs; decoded to float32 one batch at a time) and the windows and flips of those images only,
        so memory is O(images of this rank x K), never O(N x R)."""
        ids = self.images(epoch)
        slots = self.slots(epoch)
        crops = [self.store.slot_crops(slot, ids) for slot in slots]
        return EpochData(
            ids=ids,
            slots=slots,
            labels=[self.store.slot_encoded(slot, ids) for slot in slots],
            windows=np.stack([w for w, _ in crops], axis=1),  # (n, K, 4)
            flips=np.stack([f for _, f in crops], axis=1),  # (n, K)
        )

    def prefetch(self, epoch: int) -> None:
        """Start reading ``epoch``'s stored data in the background (no-op if already started)."""
        with self._lock:
            if epoch not in self._epochs:
                self._epochs[epoch] = self._pool.submit(self._read_epoch, epoch)

    def _take_epoch(self, epoch: int) -> EpochData:
        self.prefetch(epoch)
        with self._lock:
            future = self._epochs.pop(epoch)
            for stale in [e for e in self._epochs if e < epoch]:
                self._epochs.pop(stale).cancel()
        return future.result()

    # -- iteration --------------------------------------------------------------------------
    def _feeds(self, data: EpochData, first_step: int = 0, issued: collections.deque | None = None):
        """Each batch's feed; ``issued`` receives the image ids of the batches fed (the latest ones)."""
        k = len(data.slots)
        for start, stop in self._bounds(len(data.ids))[first_step:]:
            batch = data.ids[start:stop]
            if issued is not None:
                issued.append(batch)
            labels = np.stack([self.store.decode([a[start:stop] for a in slot_rows]) for slot_rows in data.labels], axis=1)  # (b, K, C)
            feed: dict = {
                FILES: self.index.file_feed(batch.tolist()),
                "labels": np.ascontiguousarray(labels),  # batch-first arrays: one feed call, not one per sample
                "classes": np.repeat(self.classes[batch, None], k, axis=1),  # (b, K)
            }
            for j in range(k):
                feed.update(window_feed(data.windows[start:stop, j], data.flips[start:stop, j], suffix=str(j)))
            yield feed

    def _convert(self, outputs: tuple) -> Batch:
        device = self.backend.device
        crops = [to_torch(o, device) for o in outputs[:-2]]
        images = torch.stack(crops, dim=1).flatten(0, 1)  # sample-major: (b, k) -> b*K + k
        labels = to_torch(outputs[-2], device).flatten(0, 1)
        classes = to_torch(outputs[-1], device).flatten(0, 1)
        return Batch(images, labels, classes)

    def epoch(self, epoch: int, first_step: int = 0) -> Iterator[Batch]:
        """Yield this rank's batches for ``epoch`` from step ``first_step`` on (a run resumed inside the
        epoch: the earlier batches are neither read nor decoded); prefetches the next epoch's stored
        data. Feeds (file reads, label decoding) are built in a background thread, ``feed_depth``
        batches ahead."""
        data = self._take_epoch(epoch)
        self.prefetch(epoch + 1)
        issued: collections.deque = collections.deque(maxlen=self.feed_depth + 8)  # covers every batch DALI can hold
        try:
            yield from run_batches(self.pipe, background(self._feeds(data, first_step, issued), self.feed_depth), self._convert)
        except RuntimeError as err:
            if not batch_failed(err):
                raise
            raise self._undecodable(np.concatenate(list(issued)) if issued else np.zeros(0, np.int64), err) from None

    def _undecodable(self, ids: np.ndarray, err: RuntimeError) -> Exception:
        """Distill's fingerprint check catches files added, removed or resized before the run, so a file
        of a failed batch went away during the run or was rewritten in place with the same size."""
        return failed_batch_error(self.index, ids, self.backend, err, why_unseen=" with the same size, which the store's fingerprint "
                                  "of sizes cannot see", rerun="rerun with --resume (the last checkpoint is intact), or make a new store "
                                  "with precompute --skip-bad")

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
