"""Stage one: the teacher pass over every image's seeded crops, written shard by shard.

Resumable by construction: a shard is written whole and only then marked done, so a rerun after
any interruption processes exactly the shards that are not done. Under torchrun, rank 0 lists the
pending shards and rank r takes every world_size-th of them from position r (balanced however a
partial run left them); rank 0 creates the store and finalises it.
"""
from __future__ import annotations

import collections
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass

import numpy as np
import torch
from rich.console import Console
from rich.markup import escape

from mealkd import storage
from mealkd.console import make_console
from mealkd.core.dali_io import Backend, dali_threads, decoder_record, resolve_backend
from mealkd.core.dataset import DatasetIndex, scan_image_folder
from mealkd.core.distributed import Dist, init_distributed, shutdown
from mealkd.core.models import load_model, parse_spec_list
from mealkd.core.probe import describe_unreadable, probe_images, refuse_nothing_to_train_on
from mealkd.core.progress import RateColumn, make_progress
from mealkd.core.replay import recorded_hw_load
from mealkd.core.timing import StageTimes
from mealkd.core.windows import CropPolicy, draw_all_windows
from mealkd.precompute.crops import CropBatch, CropStream
from mealkd.precompute.decoder_drift import job_decoder, record_drift
from mealkd.precompute.ensemble import TeacherEnsemble, check_temperature
from mealkd.precompute.lock import StoreLock, writing_store
from mealkd.precompute.settings import SETTINGS_KEYS, jsonable, other_settings, settings_differences, shard_size_difference
from mealkd.errors import UserError



@dataclass
class PrecomputeConfig:
    data: str
    teachers: str
    out: str
    crops_per_image: int = 10
    image_size: int = 224
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    seed: int = 0
    batch_size: int = 64
    temperature: float = 1.0
    encoding: str = "dense"
    device: str = "auto"
    precision: str = "auto"
    skip_bad: bool = False
    num_threads: int | None = None  # DALI CPU threads; None: auto (core.dali_io.auto_threads)
    images_per_shard: int | None = None
    compile: bool = False  # torch.compile the teachers (numerics only: not recorded, a rerun may change it)
    compile_backend: str = "inductor"
    allow_decoder_mismatch: bool = False  # continue a store begun with another GPU model / DALI version (recorded)

    @property
    def policy(self) -> CropPolicy:
        return CropPolicy(image_size=self.image_size, scale=tuple(self.scale), ratio=tuple(self.ratio), flip_prob=self.flip_prob, seed=self.seed)

    def validate(self) -> None:
        if self.crops_per_image < 1:
            raise UserError(f"--crops-per-image {self.crops_per_image}: must be >= 1")
        if self.batch_size < 1:
            raise UserError(f"--batch-size {self.batch_size}: must be >= 1")
        if self.images_per_shard is not None and self.images_per_shard < 1:
            raise UserError(f"--images-per-shard {self.images_per_shard}: must be >= 1")
        check_temperature(self.temperature)
        self.policy.validate()
        storage.parse_encoding(self.encoding)


def _settings(cfg: PrecomputeConfig, index: DatasetIndex, ensemble: TeacherEnsemble, backend: Backend) -> dict:
    return jsonable(
        {
            "class_names": index.class_names,
            "crop": cfg.policy.to_dict(),
            "teachers": ensemble.describe(),
            "temperature": cfg.temperature,
            "precision": ensemble.precision,
            "dataset": {"num_images": len(index), "fingerprint": index.fingerprint},
            "decoder": decoder_record(backend),
            "encoding_request": cfg.encoding,
        }
    )


def _check_existing(cfg: PrecomputeConfig, settings: dict) -> tuple[bool, dict | None]:
    """Check that the store at ``cfg.out`` is this run's; returns (whether it has pending shards, its
    ``decoder`` record), for :func:`~mealkd.precompute.decoder_drift.job_decoder` to judge the decoder
    the pending crops would be decoded with (a complete store decodes nothing)."""
    store = storage.open_store(cfg.out, require_complete=False)
    differing = settings_differences(store.attrs, dict(settings, crops_per_image=cfg.crops_per_image), (*SETTINGS_KEYS, "crops_per_image"))
    differing += shard_size_difference(cfg.images_per_shard, store.images_per_shard)
    if differing:
        raise other_settings(cfg.out, "a label store made with other settings", differing)
    return not bool(store.done.all()), store.attrs.get("decoder")


def _probe_all(cfg: PrecomputeConfig, index: DatasetIndex, backend: Backend, d: Dist, console: Console) -> tuple[np.ndarray, np.ndarray]:
    """Decode every file once (ranks split the work): sizes (N, 2) and the excluded mask."""
    mine = np.arange(d.rank, len(index), d.world_size)
    reasons_mine: dict[int, str] = {}
    with make_progress(console, RateColumn("images"), enabled=d.is_main) as progress:
        task = progress.add_task(rank_share("validate", d), total=len(mine))
        sizes_mine, bad_mine = probe_images(
            index, mine, backend, batch_size=min(64, cfg.batch_size), num_threads=cfg.num_threads,
            progress=lambda n: progress.advance(task, n), reasons=reasons_mine,
        )
    sizes = np.zeros((len(index), 2), dtype=np.int32)
    bad: list[int] = []
    reasons: dict[int, str] = {}
    for rank, (rank_sizes, rank_bad, rank_reasons) in enumerate(d.gather((sizes_mine, bad_mine, reasons_mine))):
        sizes[np.arange(rank, len(index), d.world_size)] = rank_sizes
        bad.extend(rank_bad)
        reasons.update(rank_reasons)
    bad.sort()
    if bad and not cfg.skip_bad:
        raise UserError(f"--data: {len(bad)} unreadable image file(s): {describe_unreadable(index, bad, reasons)}; "
                        "fix or remove them, or pass --skip-bad to exclude them")
    excluded = np.zeros(len(index), dtype=bool)
    excluded[bad] = True
    refuse_nothing_to_train_on(index, excluded, bad, reasons)
    if bad and d.is_main:
        console.print(f"[yellow]--skip-bad: excluding {len(bad)} unreadable file(s): {escape(describe_unreadable(index, bad, reasons, limit=10))}"
                      + (f" (`mealkd inspect {escape(cfg.out)}` lists them all)" if len(bad) > 10 else ""), soft_wrap=True)
    return sizes, excluded


def _prepare_store(cfg: PrecomputeConfig, index: DatasetIndex, ensemble: TeacherEnsemble, backend: Backend, d: Dist, console: Console) -> None:
    """Create the store (or check that the existing one is this run's); collective over ranks."""
    settings = _settings(cfg, index, ensemble, backend)
    exists = d.broadcast(storage.store_exists(cfg.out) if d.is_main else None)
    if exists:
        pending, stored = d.on_main(lambda: _check_existing(cfg, settings))
        if pending:
            decoder = job_decoder(stored, backend, d, allow=cfg.allow_decoder_mismatch, where=f"--out {cfg.out}", command="precompute")
            if d.is_main and decoder.drifts:
                record_drift(cfg.out, decoder.drifts, console)
        return
    # a new store records rank 0's decoder: the other ranks' are judged against it before any work
    decoder = job_decoder(None, backend, d, allow=cfg.allow_decoder_mismatch, where=f"--out {cfg.out}", command="precompute")
    sizes, excluded = _probe_all(cfg, index, backend, d, console)
    if d.is_main:
        with writing_store(cfg.out):
            storage.create_store(
                cfg.out,
                attributes=settings,
                paths=index.paths,
                targets=index.targets,
                sizes=sizes,
                crops_per_image=cfg.crops_per_image,
                num_classes=ensemble.num_classes,
                encoding=cfg.encoding,
                excluded=excluded,
                images_per_shard=cfg.images_per_shard,
                processes=d.world_size,
            )
            if decoder.drifts:
                record_drift(cfg.out, decoder.drifts, console)


def _label_shard(
    stream: CropStream, ensemble: TeacherEnsemble, cfg: PrecomputeConfig, start: int, stop: int, sizes: np.ndarray, excluded: np.ndarray, on_crops,
    times: StageTimes | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ids = np.arange(start, stop)
    rows = np.flatnonzero(~excluded[start:stop])  # excluded images keep zero windows and uniform rows
    windows = np.zeros((len(ids), cfg.crops_per_image, 4), dtype=np.int32)
    flips = np.zeros((len(ids), cfg.crops_per_image), dtype=bool)
    windows[rows], flips[rows] = draw_all_windows(cfg.policy, ids[rows], sizes[start:stop][rows], cfg.crops_per_image)
    probs = np.full((len(ids), cfg.crops_per_image, ensemble.num_classes), 1.0 / ensemble.num_classes, dtype=np.float32)
    crops = stream.batches((ids[rows]).tolist(), rows.tolist(), windows, flips)
    for batch, rows_probs in labelled_batches(crops, ensemble, times=times):
        probs[batch.rows, batch.crops] = rows_probs
        on_crops(len(batch.rows))
    return windows, flips, probs


def labelled_batches(batches: Iterable[CropBatch], ensemble: TeacherEnsemble, lag: int = 2,
                     times: StageTimes | None = None) -> Iterator[tuple[CropBatch, np.ndarray]]:
    """(batch, its averaged probabilities) for each crop batch, in order.

    ``times`` collects this thread's seconds: ``crops`` (waiting for the next crop batch: decoding
    and cutting), ``teachers`` (the ensemble call: on CPU the teachers' compute, on a GPU launching
    their kernels) and ``gpu`` (waiting for the GPU's results).

    On a GPU the teachers of batch t are launched and their result copied to pinned host memory
    without waiting; batch t is collected ``lag`` batches later, so decoding, cutting and feeding the
    next batches overlap the teachers (with a wait per batch the labelling pass ran at 0.57x the
    teachers alone on an H100). A batch with a non-finite teacher output is recomputed by the ensemble's
    checked path (fp32 fallback, or the bad-weights error). On CPU every batch is computed in turn.
    """
    times = times if times is not None else StageTimes()
    batches = times.waiting(batches, "crops")
    if ensemble.device.type != "cuda":
        for batch in batches:
            with times.stage("teachers"):
                probs = ensemble(batch.inputs).numpy()
            yield batch, probs
        return
    in_flight: collections.deque = collections.deque()

    def settle(item: tuple) -> tuple[CropBatch, np.ndarray]:
        batch, host, finite, done = item
        with times.stage("gpu"):
            done.synchronize()
        if not bool(finite.all()):
            with times.stage("teachers"):
                return batch, ensemble(batch.inputs).cpu().numpy()
        return batch, host.numpy()

    for batch in batches:
        with times.stage("teachers"):
            average, finite = ensemble.launch(batch.inputs)
        host = torch.empty(average.shape, dtype=average.dtype, pin_memory=True)
        host.copy_(average, non_blocking=True)
        finite_host = torch.empty(finite.shape, dtype=finite.dtype, pin_memory=True)
        finite_host.copy_(finite, non_blocking=True)
        done = torch.cuda.Event()
        done.record(torch.cuda.current_stream(ensemble.device))
        in_flight.append((batch, host, finite_host, done))
        if len(in_flight) > lag:
            yield settle(in_flight.popleft())
    while in_flight:
        yield settle(in_flight.popleft())


def run_precompute(cfg: PrecomputeConfig, console: Console | None = None) -> dict:
    """Run (or continue) stage one; returns a summary. Collective under torchrun."""
    console = console or make_console()
    cfg.validate()
    backend = resolve_backend(cfg.device)
    d = init_distributed(backend.device)
    try:
        d.on_main(lambda: storage.check_output(cfg.out))  # before the scan and the hours of validation decode
        index = d.on_main(lambda: scan_image_folder(cfg.data))  # one scan per job: 64 ranks each stat-ing 1.28M files load a shared file system
        ignored = index.describe_ignored()
        if ignored and d.is_main:
            console.print(f"[yellow]--data {escape(cfg.data)}: {escape(ignored)}", soft_wrap=True)
        ensemble = load_ensemble(cfg, index, backend)
        return run_locked(cfg.out, d, lambda: _prepare_store(cfg, index, ensemble, backend, d, console),
                          lambda: _label_pending(cfg, index, ensemble, backend, d, console))
    finally:
        shutdown(d)


def load_ensemble(cfg: PrecomputeConfig, index: DatasetIndex, backend: Backend) -> TeacherEnsemble:
    """The ``--teachers`` ensemble for ``index``'s classes on ``backend``'s device."""
    teachers = [load_model(spec, num_classes=len(index.class_names)) for spec in parse_spec_list(cfg.teachers)]
    return TeacherEnsemble(teachers, default_size=cfg.image_size, temperature=cfg.temperature, device=backend.device, precision=cfg.precision,
                           class_names=index.class_names, compile_backend=cfg.compile_backend if cfg.compile else None)


def run_locked(out: str, d: Dist, prepare: Callable[[], None], label: Callable[[], dict]) -> dict:
    """The collective skeleton of a store-writing command: rank 0 holds the store lock for the whole run;
    ``prepare`` (create or check the store), every rank labels its pending shards (``label``), rank 0
    finalises; returns this rank's summary with ``complete``."""
    with ExitStack() as held:
        # rank 0 holds the lock; a refusal (another writer) reaches every rank as one line, not a broken collective
        d.on_main(lambda: held.enter_context(StoreLock(out)) and None)
        prepare()
        d.barrier()
        summary = job_summary(label(), d)
        d.barrier()
        if d.is_main:
            with writing_store(out):
                summary["complete"] = storage.StoreWriter(out).finalize()
    return summary


def rank_share(what: str, d: Dist) -> str:
    """A progress bar's name: rank 0 draws its own share only, and says so when there are other ranks."""
    return what if d.world_size == 1 else f"{what} (rank 0 of {d.world_size})"


#: summary counts that add up over ranks (the labelling seconds are the slowest rank's)
_JOB_SUMS = ("images", "crops", "shards_written", "fp32_fallbacks")


def job_summary(mine: dict, d: Dist) -> dict:
    """This rank's labelling summary with the job's totals (collective): the counts summed over ranks and
    ``labelling_s`` the slowest rank's, so the rate is the job's (rank 0 printed its own share as the job's);
    ``thread_s`` stays this rank's (``time_report`` says whose)."""
    ranks = d.gather({key: mine.get(key, 0) for key in (*_JOB_SUMS, "labelling_s")})
    if len(ranks) == 1:
        return mine
    totals = {key: sum(r[key] for r in ranks) for key in _JOB_SUMS}
    return {**mine, **totals, "labelling_s": max(r["labelling_s"] for r in ranks), "processes": len(ranks)}


def labelling_times(started: float, times: StageTimes) -> dict:
    """The summary fields :func:`time_report` reads: the labelling loop's seconds since ``started``
    (``time.perf_counter()``) and its thread's seconds per stage."""
    return {"labelling_s": time.perf_counter() - started, "thread_s": {name: round(sec, 4) for name, sec in times.seconds.items()}}


def time_report(summary: dict) -> str:
    """One line: the job's labelling rate (its crops over the slowest rank's seconds) and where rank 0's
    labelling thread spent the time. On a GPU a thread that waits long for crops is input-bound (more
    DALI threads help); on a CPU the crops are cut in turn with the teachers, by design, so the wait is
    their cost, not a hint."""
    seconds, spent = summary["labelling_s"], summary["thread_s"]
    waits = [f"{spent[name]:.2f} s for {what}" for name, what in (("crops", "crops"), ("gpu", "the GPU"), ("writes", "shard writes")) if name in spent]
    processes = summary.get("processes", 1)
    whose = "the labelling thread" if processes == 1 else "rank 0's labelling thread"
    line = (f"{summary['crops'] / max(seconds, 1e-9):,.0f} crops/s"
            + ("" if processes == 1 else f" by {processes} processes") + f" over {seconds:.2f} s of labelling; {whose} waited "
            f"{', '.join(waits)} and spent {spent.get('teachers', 0.0):.2f} s in the teachers")
    if "gpu" in spent and spent.get("crops", 0.0) > 0.2 * seconds:
        line += f"; input-bound: raise --num-threads ({summary['dali_threads']} now)" if "dali_threads" in summary else "; input-bound: raise --num-threads"
    return line


def start_line(command: str, out: str, ensemble: TeacherEnsemble, backend: Backend, d: Dist, num_threads: int | None,
               writer: storage.StoreWriter, pending: list[int], crops_per_image: int) -> str:
    """One line on what a labelling run does (printed at its start, so a cluster log says it): the work,
    the teachers, where they run, and the store's state."""
    teachers = ", ".join(f"{t['spec']}{' (BatchNorm folded)' if folded else ''}" for t, folded in zip(ensemble.describe(), ensemble.folded))
    images = writer.images_in(pending)
    total = writer.num_shards  # "all pending" is a new store, or one whose every shard a repair reopened
    state = f"all {total} shard(s) pending" if len(pending) == total else f"continuing: {len(pending)} of {total} shards pending"
    return (f"{command}: {images:,} images x {crops_per_image} crops = {images * crops_per_image:,} crops to label by {d.world_size} "
            f"process(es); teachers {teachers}; {backend.device} {ensemble.precision}, {dali_threads(num_threads, backend)} DALI threads; "
            f"store {out} ({state})")


def idle_warning(shards: int, processes: int, total: int) -> str:
    """Why some ranks will do nothing: a rank labels whole shards, and fewer than ranks are pending (of
    ``total``). The remedy differs: a store this run creates can still be made with smaller shards."""
    fix = "a store made with a smaller --images-per-shard spreads the work" if shards == total else "the other shards are done"
    return f"{shards} of {total} shard(s) to label for {processes} processes: {processes - shards} process(es) will idle ({fix})"


def pending_for_rank(pending: list[int], rank: int, world_size: int) -> list[int]:
    """This rank's share of the pending shards: every world_size-th, so counts differ by at most one."""
    return list(pending[rank::world_size])


def _label_pending(cfg: PrecomputeConfig, index: DatasetIndex, ensemble: TeacherEnsemble, backend: Backend, d: Dist, console: Console) -> dict:
    writer = storage.StoreWriter(cfg.out)
    store = storage.open_store(cfg.out, require_complete=False)
    sizes, excluded = store.sizes, store.excluded
    # rank 0 lists the pending shards once (before anyone writes) and every rank takes an equal share of
    # THEM: after a partial run, `shard % world` could leave one rank all the work and the rest waiting
    pending = d.broadcast(writer.pending_shards() if d.is_main else None)
    mine = pending_for_rank(pending, d.rank, d.world_size)
    total_images = writer.images_in(mine)
    if d.is_main and 0 < len(pending) < d.world_size:
        console.print(f"[yellow]precompute[/]: {idle_warning(len(pending), d.world_size, writer.num_shards)}", soft_wrap=True)
    if d.is_main:
        console.print(start_line("precompute", cfg.out, ensemble, backend, d, cfg.num_threads, writer, pending, cfg.crops_per_image),
                      soft_wrap=True, highlight=False, markup=False)
    # decode as the store's first shards were decoded: at its recorded hardware-decoder load, not today's default
    stream = CropStream(index, ensemble.norms, backend, batch_size=cfg.batch_size, num_threads=cfg.num_threads,
                        hw_load=recorded_hw_load(store.attrs.get("decoder")))
    crops_done = images_done = 0
    times = StageTimes()
    started = time.perf_counter()
    with make_progress(console, RateColumn("images"), RateColumn("crops", "crops_per_image"), enabled=d.is_main) as progress:
        task = progress.add_task(rank_share("teachers", d), total=total_images, crops_per_image=cfg.crops_per_image)

        def on_crops(n: int) -> None:
            nonlocal crops_done
            crops_done += n
            progress.advance(task, n / cfg.crops_per_image)

        # The write (encode + disk) of shard s overlaps the teacher pass of shard s+1, on one writer
        # thread; at most one shard waits to be written (memory: two shards' float32 labels).
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="shard-writer") as pool:
            in_flight: Future | None = None
            for shard in mine:
                start, stop = writer.shard_range(shard)
                windows, flips, probs = _label_shard(stream, ensemble, cfg, start, stop, sizes, excluded, on_crops, times)
                if in_flight is not None:
                    with writing_store(cfg.out), times.stage("writes"):
                        in_flight.result()
                in_flight = pool.submit(writer.write_shard, shard, windows, flips, probs)
                images_done += writer.images_in([shard])
                progress.update(task, completed=images_done)
            if in_flight is not None:
                with writing_store(cfg.out), times.stage("writes"):
                    in_flight.result()
    return {"shards_written": len(mine), "images": total_images, "crops": crops_done, "rank": d.rank,
            "fp32_fallbacks": ensemble.fp32_fallbacks, "dali_threads": dali_threads(cfg.num_threads, backend), **labelling_times(started, times)}
