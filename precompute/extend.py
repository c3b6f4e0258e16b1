"""``mealkd extend``: grow a finished store from R to R2 crops per image into a NEW store.

Why a new store, not in place: the crop axis is part of every shard's shape (one file per shard
holds all R crops), so growing R rewrites every label file anyway; writing them to a new path
keeps the source untouched and valid the whole time (distill runs reading it are unaffected), and
the result gets a new ``store_id``, so a distill run trained on the source cannot ``--resume`` on a
different label set. Delete the source afterwards if the disk space matters.

What makes it exact: crop windows are keyed by (seed, image, crop), so crops 0..R-1 of an R2 store
are the source's crops. Each shard of the new store is the source's stored rows for crops 0..R-1
(copied as stored: fp16 rows or top-k indices/values, byte for byte) plus the teachers' rows for
the new crops R..R2-1, encoded exactly as precompute encodes them. The stored windows are checked
against the generator first. The result equals, array by array, a store made with R2 from the
start (the teachers' floats for one crop do not depend on its batch neighbours on CPU; on GPU
they can differ in the last bits, as between any two GPU runs). For top-k the per-shard fidelity
(sum of TV, max TV, rows) adds the source's sums to the new crops', so new shards must cover
whole source shards: ``--images-per-shard`` must be a multiple of the source's.

Resumable like precompute: the new store is written shard by shard, ``done`` last, under the
store lock; rerunning the same command continues it; it is finalised (``completed``) only when
every shard is done.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console

from mealkd import storage
from mealkd.console import make_console
from mealkd.core.accel import PRECISIONS
from mealkd.core.dali_io import Backend, dali_threads, resolve_backend
from mealkd.core.dataset import DatasetIndex, scan_image_folder
from mealkd.core.distributed import Dist, init_distributed, shutdown
from mealkd.core.progress import RateColumn, make_progress
from mealkd.core.timing import StageTimes
from mealkd.core.windows import CropPolicy, draw_all_windows
from mealkd.core.models.spec import with_weight
from mealkd.precompute.crops import CropStream
from mealkd.precompute.decoder_drift import job_decoder, record_drift
from mealkd.precompute.ensemble import TeacherEnsemble
from mealkd.precompute.lock import writing_store
from mealkd.precompute.settings import SETTINGS_KEYS, other_settings, settings_differences, shard_size_difference
from mealkd.precompute.runner import (PrecomputeConfig, _settings, labelled_batches, labelling_times,
                                      load_ensemble, pending_for_rank, rank_share, run_locked, start_line)
from mealkd.storage.encoding import encode_topk, to_f16, topk_tv
from mealkd.errors import MissingFile, UserError
from mealkd.storage.lineage import inherited_attributes, same_location, source_record
from mealkd.storage.reader import LabelStore
from mealkd.storage.schema import DENSE, default_images_per_shard

#: dense float32 rows of new crops held at once (a shard is labelled in image blocks of this size)
BLOCK_BYTES = 256 * 2**20

#: the flag to blame when a setting of the current run differs from the source store's
_FLAG_OF = {
    "class_names": "--data", "dataset": "--data", "teachers": "--teachers",
    "precision": "--device", "crop": "STORE", "temperature": "STORE", "encoding_request": "STORE",
}


@dataclass
class ExtendConfig:
    store: str
    crops_per_image: int
    out: str
    data: str
    teachers: str | None = None
    batch_size: int = 64
    device: str = "auto"
    num_threads: int | None = None  # DALI CPU threads; None: auto (core.dali_io.auto_threads)
    images_per_shard: int | None = None
    compile: bool = False
    compile_backend: str = "inductor"
    allow_decoder_mismatch: bool = False  # label the new crops with another GPU model / DALI version than STORE's (recorded)


def _open_source(cfg: ExtendConfig) -> LabelStore:
    if same_location(cfg.store, cfg.out):
        raise UserError(f"--out {cfg.out}: is STORE itself; extend writes a new store (the source stays valid), choose another --out")
    try:
        source = storage.open_store(cfg.store, require_complete=True)
    except UserError as err:
        raise UserError(f"STORE {err}") from None
    r = source.crops_per_image
    if cfg.crops_per_image <= r:
        raise UserError(f"--crops-per-image {cfg.crops_per_image}: STORE already has {r} crops per image; pass more than {r}")
    if cfg.batch_size < 1:
        raise UserError(f"--batch-size {cfg.batch_size}: must be >= 1")
    return source


def _shard_size(cfg: ExtendConfig, source: LabelStore) -> int:
    """Dense: the automatic size for R2 if the source had the automatic size for R, else the
    source's. Top-k: the source's, or a multiple of it (fidelity sums per whole source shard)."""
    ips = source.images_per_shard
    if cfg.images_per_shard is not None:
        if cfg.images_per_shard < 1:
            raise UserError(f"--images-per-shard {cfg.images_per_shard}: must be >= 1")
        if source.topk is not None and cfg.images_per_shard % ips:
            raise UserError(f"--images-per-shard {cfg.images_per_shard}: a top-k store's new shards must cover whole source shards; "
                            f"use a multiple of the source's {ips}")
        return cfg.images_per_shard
    n, r, c = source.num_images, source.crops_per_image, source.num_classes
    if source.topk is None and ips == default_images_per_shard(n, r, c, DENSE, None):
        return default_images_per_shard(n, cfg.crops_per_image, c, DENSE, None)
    return ips


def recorded_specs(attrs: dict) -> str:
    """``--teachers`` as the store records them, each with its recorded weight (a store merged with
    ``--weights`` before 2026-11-27 kept each spec's own ``:w=``, not the teacher's weight in the merge)."""
    return ",".join(with_weight(str(t.get("spec")), float(t.get("weight", 1.0))) for t in attrs.get("teachers") or [])


def _precompute_config(cfg: ExtendConfig, source: LabelStore, teachers: str) -> PrecomputeConfig:
    a = source.attrs
    if a.get("precision") not in (None, *PRECISIONS):
        raise UserError(f"STORE {source.url}: its teachers ran at different precisions ({a.get('precision')}, a merged store); "
                        "extend each input store, then merge the extended stores")
    crop = a.get("crop") or {}
    if crop.get("policy") == "imported" or crop.get("reproducible") is False:
        raise UserError(f"STORE {source.url}: its crops were imported (e.g. from FKD), not drawn by mealkd's seeded crop generator, "
                        "so new crops cannot be added consistently; precompute a store of your own with the teachers instead")
    policy = CropPolicy.from_dict(crop)
    return PrecomputeConfig(
        data=cfg.data, teachers=teachers, out=cfg.out, crops_per_image=cfg.crops_per_image, image_size=policy.image_size,
        scale=policy.scale, ratio=policy.ratio, flip_prob=policy.flip_prob, seed=policy.seed, batch_size=cfg.batch_size,
        temperature=source.temperature, encoding=a.get("encoding_request") or "dense", device=cfg.device,
        precision=a.get("precision") or "auto", num_threads=cfg.num_threads, images_per_shard=cfg.images_per_shard,
        compile=cfg.compile, compile_backend=cfg.compile_backend,
    )


def _check_settings(source: LabelStore, settings: dict) -> None:
    """The current data/teachers/device must reproduce the source's settings exactly."""
    differing = [k for k in SETTINGS_KEYS if k in source.attrs and settings_differences(source.attrs, settings, (k,))]
    if not differing:
        return
    flag = _FLAG_OF.get(differing[0], "STORE")
    fixes = {
        "--data": "pass the precompute --data tree, unchanged",
        "--teachers": "pass the precompute --teachers (the same weights files and options, in any order, from any path), or omit --teachers to use the recorded specs",
        "--device": "run on the kind of device the store was made with",
        "STORE": "this store's settings cannot be reproduced here",
    }
    phrases = settings_differences(source.attrs, settings, tuple(differing))
    raise UserError(f"{flag}: this run would not reproduce what STORE {source.url} records ({'; '.join(phrases)}); {fixes[flag]}")


def _existing_output(cfg: ExtendConfig, source: LabelStore, ips: int) -> bool:
    """True if ``--out`` is this extension, begun earlier (continue it); UserError if it is anything else."""
    if not storage.store_exists(cfg.out):
        return False
    out = storage.open_store(cfg.out, require_complete=False)
    origin = out.attrs.get("extended_from") or {}
    if origin.get("store_id") != source.store_id or out.crops_per_image != cfg.crops_per_image:
        raise UserError(f"--out {cfg.out}: a different label store is already there (not the extension of STORE to "
                        f"{cfg.crops_per_image} crops per image); choose another --out or delete it")
    differing = shard_size_difference(None if cfg.images_per_shard is None else ips, out.images_per_shard)
    if differing:
        raise other_settings(cfg.out, "this extension, begun with other settings", differing)
    return True


def _create_output(cfg: ExtendConfig, source: LabelStore, ips: int) -> None:
    attributes = inherited_attributes(source.attrs)
    attributes["extended_from"] = source_record(source.attrs, cfg.store)
    with writing_store(cfg.out):
        storage.create_store(
            cfg.out, attributes=attributes, paths=source.paths, targets=source.targets, sizes=source.sizes,
            crops_per_image=cfg.crops_per_image, num_classes=source.num_classes,
            encoding="dense" if source.topk is None else f"topk:{source.topk}", excluded=source.excluded,
            images_per_shard=ips,
        )


class _ShardExtender:
    """Builds one shard of the extended store: the source's crops as stored + the new crops."""

    def __init__(self, source: LabelStore, stream: CropStream, ensemble: TeacherEnsemble, policy: CropPolicy, r2: int,
                 writer: storage.StoreWriter):
        self.source, self.stream, self.ensemble, self.policy, self.r2 = source, stream, ensemble, policy, r2
        self.writer = writer
        self.r = source.crops_per_image
        self.c = source.num_classes
        self.block = max(1, BLOCK_BYTES // ((r2 - self.r) * self.c * 4))
        self.source_fidelity = source.shard_fidelity()
        self.times = StageTimes()  # the labelling thread's seconds, as precompute reports them

    def windows(self, start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        """All R2 windows/flips of images [start, stop); the first R must equal the stored ones."""
        sizes, excluded = self.source.sizes[start:stop], self.source.excluded[start:stop]
        rows = np.flatnonzero(~excluded)
        windows = np.zeros((stop - start, self.r2, 4), np.int32)
        flips = np.zeros((stop - start, self.r2), bool)
        windows[rows], flips[rows] = draw_all_windows(self.policy, np.arange(start, stop)[rows], sizes[rows], self.r2)
        old_w, old_f = self.source.block_crops(start, stop)
        same = np.all(windows[:, : self.r] == old_w, axis=(1, 2)) & np.all(flips[:, : self.r] == old_f, axis=1)
        if not same.all():
            image = start + int(np.argmin(same))
            raise UserError(f"STORE {self.source.url}: the stored crops of image {image} are not the ones the crop generator "
                            f"draws for its recorded policy (seed {self.policy.seed}); this store cannot be extended, "
                            "make a new one with `mealkd precompute --crops-per-image R2`")
        return windows, flips

    def new_rows(self, start: int, stop: int, windows: np.ndarray, flips: np.ndarray, on_crops) -> np.ndarray:
        """float32 (n, R2-R, C) teacher rows of the new crops (excluded images: uniform rows)."""
        excluded = self.source.excluded[start:stop]
        probs = np.full((stop - start, self.r2 - self.r, self.c), 1.0 / self.c, np.float32)
        rows = np.flatnonzero(~excluded)
        new_w = np.ascontiguousarray(windows[:, self.r:])
        new_f = np.ascontiguousarray(flips[:, self.r:])
        crops = self.stream.batches((start + rows).tolist(), rows.tolist(), new_w, new_f)
        for batch, rows_probs in labelled_batches(crops, self.ensemble, times=self.times):  # precompute's teacher pass
            probs[batch.rows, batch.crops] = rows_probs
            on_crops(len(batch.rows))
        return probs

    def source_fidelity_rows(self, start: int, stop: int) -> tuple[float, float, int]:
        """Sum of TV, max TV and rows of the source shards that make up images [start, stop)."""
        ips = self.source.images_per_shard
        rows = self.source_fidelity[start // ips: -(-stop // ips)]
        return float(rows[:, 0].sum()), float(rows[:, 1].max(initial=0.0)), int(rows[:, 2].sum())

    def build(self, shard: int, on_crops) -> None:
        start, stop = self.writer.shard_range(shard)
        windows, flips = self.windows(start, stop)
        old = self.source.block_encoded(start, stop)
        kept = ~self.source.excluded[start:stop]
        parts: list[list[np.ndarray]] = [[] for _ in old]
        total, worst, count = self.source_fidelity_rows(start, stop) if self.source.topk is not None else (0.0, 0.0, 0)
        for lo in range(start, stop, self.block):
            hi = min(stop, lo + self.block)
            probs = self.new_rows(lo, hi, windows[lo - start: hi - start], flips[lo - start: hi - start], on_crops)
            if self.source.topk is None:
                parts[0].append(to_f16(probs))
            else:
                idx, val = encode_topk(probs, self.source.topk, old[0].dtype)
                parts[0].append(idx)
                parts[1].append(val)
                keep = kept[lo - start: hi - start]
                t, w, n = topk_tv(probs[keep], idx[keep], val[keep])
                total, worst, count = total + t, max(worst, w), count + n
        labels = [np.concatenate([o, np.concatenate(p, axis=0)], axis=1) for o, p in zip(old, parts)]
        fidelity = None if self.source.topk is None else (total, worst, count)
        with self.times.stage("writes"):
            self.writer.write_shard_encoded(shard, windows, flips, labels, fidelity)


def _scanned(data: str, source: storage.LabelStore) -> DatasetIndex:
    """The --data tree's index, refused unless it is the dataset ``source`` was made from."""
    index = scan_image_folder(data)
    storage.refuse_other_dataset(source, index.fingerprint, index.paths, data)
    return index


def run_extend(cfg: ExtendConfig, console: Console | None = None) -> dict:
    """Extend (or continue extending) ``cfg.store`` into ``cfg.out``; collective under torchrun."""
    console = console or make_console()
    source = _open_source(cfg)
    ips = _shard_size(cfg, source)
    stored_backend = (source.attrs.get("decoder") or {}).get("backend") or "cpu"
    if cfg.device == "auto" and stored_backend != "cpu" and not torch.cuda.is_available():
        raise UserError(f"STORE {cfg.store}: its crops were decoded on a GPU (DALI backend '{stored_backend}') and this machine has "
                        "none, so --device auto cannot decode the new crops as the old ones were; extend it on a GPU machine")
    backend = resolve_backend(("cpu" if stored_backend == "cpu" else "cuda") if cfg.device == "auto" else cfg.device)
    d = init_distributed(backend.device)
    try:
        d.on_main(lambda: storage.check_output(cfg.out))
        teachers = cfg.teachers or recorded_specs(source.attrs)
        pcfg = _precompute_config(cfg, source, teachers)
        index = d.on_main(lambda: _scanned(cfg.data, source))  # one scan per job, not per rank; its refusal printed once
        try:
            ensemble = load_ensemble(pcfg, index, backend)  # the fingerprint matched: index's classes are the store's
        except MissingFile as err:
            if cfg.teachers:
                raise
            raise UserError(f"STORE {cfg.store}: its recorded teachers ({teachers}) cannot be loaded here: {err}; their paths are as "
                            "precompute was given them: run from the directory it ran in, or pass --teachers", echoed=err.echoed) from None
        _check_settings(source, _settings(pcfg, index, ensemble, backend))
        decoder = job_decoder(source.attrs.get("decoder"), backend, d, allow=cfg.allow_decoder_mismatch, where=f"STORE {cfg.store}",
                              command="extend")

        def prepare() -> None:
            if not d.is_main:
                return
            if not _existing_output(cfg, source, ips):
                _create_output(cfg, source, ips)
            if decoder.drifts and storage.StoreWriter(cfg.out).pending_shards():  # a finished extension decodes nothing
                record_drift(cfg.out, decoder.drifts, console)

        return run_locked(cfg.out, d, prepare,
                          lambda: _extend_pending(cfg, source, index, ensemble, backend, decoder.hw_load, pcfg.policy, d, console))
    finally:
        shutdown(d)


def _extend_pending(cfg: ExtendConfig, source: LabelStore, index: DatasetIndex, ensemble: TeacherEnsemble, backend: Backend,
                    hw_load: float, policy: CropPolicy, d: Dist, console: Console) -> dict:
    writer = storage.StoreWriter(cfg.out)
    pending = d.broadcast(writer.pending_shards() if d.is_main else None)
    mine = pending_for_rank(pending, d.rank, d.world_size)
    stream = CropStream(index, ensemble.norms, backend, batch_size=cfg.batch_size, num_threads=cfg.num_threads, hw_load=hw_load)
    extender = _ShardExtender(source, stream, ensemble, policy, cfg.crops_per_image, writer)
    new_per_image = cfg.crops_per_image - source.crops_per_image
    total_images = writer.images_in(mine)
    if d.is_main:
        console.print(start_line("extend", cfg.out, ensemble, backend, d, cfg.num_threads, writer, pending, new_per_image),
                      soft_wrap=True, highlight=False, markup=False)
    crops_done = images_done = 0
    started = time.perf_counter()
    with make_progress(console, RateColumn("images"), RateColumn("crops", "crops_per_image"), enabled=d.is_main) as progress:
        task = progress.add_task(rank_share("new crops", d), total=total_images, crops_per_image=new_per_image)

        def on_crops(n: int) -> None:
            nonlocal crops_done
            crops_done += n
            progress.advance(task, n / new_per_image)

        for shard in mine:
            with writing_store(cfg.out):
                extender.build(shard, on_crops)
            images_done += writer.images_in([shard])
            progress.update(task, completed=images_done)
    return {"shards_written": len(mine), "images": total_images, "crops": crops_done, "rank": d.rank,
            "fp32_fallbacks": ensemble.fp32_fallbacks, "dali_threads": dali_threads(cfg.num_threads, backend),
            **labelling_times(started, extender.times)}
