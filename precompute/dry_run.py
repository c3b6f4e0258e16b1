"""``precompute --dry-run``: what a stage-one job will cost, measured before it is spent.

A sample of the dataset's images (spread over it, so every part of the class-sorted tree is in it)
goes through the real stage-one path: the validation decode, the crop pipeline, the teacher
ensemble with precompute's pipelined launch, and the store's encoding and compression, into a
temporary store with the real store's layout. From it: the teachers' crops/s on this device, the
job's time, the store's size, and for each label encoding the share of the teachers' probability
mass it would drop (mean and max total variation on these teachers' own outputs). Nothing is
written at ``--out``; an existing store there is checked as a rerun would check it, and only its
pending images are counted.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mealkd import storage
from mealkd.core.dali_io import Backend, dali_threads, resolve_backend
from mealkd.core.dataset import DatasetIndex, scan_image_folder
from mealkd.core.distributed import Dist, launched_by_torchrun
from mealkd.core.probe import describe_unreadable, probe_images
from mealkd.core.timing import StageTimes, format_duration
from mealkd.core.windows import draw_all_windows
from mealkd.errors import UserError
from mealkd.precompute.crops import CropStream
from mealkd.precompute.ensemble import TeacherEnsemble
from mealkd.precompute.decoder_drift import job_decoder
from mealkd.precompute.runner import PrecomputeConfig, _check_existing, _settings, labelled_batches, load_ensemble
from mealkd.storage.commands import human_bytes
from mealkd.storage.encoding import encode_topk, normalise_rows, to_f16, topk_tv
from mealkd.storage.schema import DENSE, TOPK, busiest_rank_images, default_images_per_shard, label_row_bytes, parse_encoding, topk_index_dtype

#: teacher batches run before the clock starts (cuDNN autotuning, allocator growth), then the timed ones
WARMUP_BATCHES, TIMED_BATCHES = 3, 24
#: top-k encodings whose fidelity is reported beside the requested one
CANDIDATE_K = (5, 10, 20, 50, 100)
#: GPU counts the time is also estimated for (on a GPU)
GPU_COUNTS = (8, 64)


@dataclass(frozen=True)
class EncodingFit:
    """What one label encoding keeps of the sampled teacher rows."""

    encoding: str
    raw_bytes_per_crop: int
    mean_tv: float
    max_tv: float


def sample_ids(num_images: int, crops_per_image: int, batch_size: int) -> np.ndarray:
    """Image ids evenly spread over the dataset, enough for the warm-up and timed teacher batches."""
    want = -(-(WARMUP_BATCHES + TIMED_BATCHES) * batch_size // crops_per_image)
    return np.unique(np.linspace(0, num_images - 1, min(num_images, max(1, want))).round().astype(np.int64))


def timed_window(batches: int) -> int:
    """How many of ``batches`` labelled batches are warm-up, left out of the rate: ``WARMUP_BATCHES`` when
    at least one batch is left to time, else none (every batch timed, start-up included: a sample too
    small to time warm batches; before, the clock then restarted after the last batch and the rate was
    its crops over a few microseconds)."""
    return WARMUP_BATCHES if batches > WARMUP_BATCHES else 0


def pending_images(cfg: PrecomputeConfig, index: DatasetIndex, settings: dict, backend: Backend) -> tuple[int, str, bool]:
    """(images a run with ``cfg`` (whose store ``settings`` these are) would still label, a note on the store
    at --out, whether the run creates it: only then does it first decode every file to validate it)."""
    if not storage.store_exists(cfg.out):
        return len(index), f"--out {cfg.out} does not exist yet: the run creates it", True
    pending, stored = _check_existing(cfg, settings)
    if pending:  # the same verdict on the decoder as the run's (this one process's)
        job_decoder(stored, backend, Dist(), allow=cfg.allow_decoder_mismatch, where=f"--out {cfg.out}", command="precompute")
    writer = storage.StoreWriter(cfg.out)
    pending = writer.pending_shards()
    images = writer.images_in(pending)
    return images, f"--out {cfg.out} exists with these settings: {len(pending)} of {writer.num_shards} shards pending", False


def pending_shard_images(cfg: PrecomputeConfig, index: DatasetIndex, num_classes: int, creates: bool, processes: int) -> list[int]:
    """Images of each shard a job of ``processes`` would label: a new store's shards as that job would size
    them, an existing store's pending ones (its recorded size)."""
    if not creates:
        writer = storage.StoreWriter(cfg.out)
        return [int(stop - start) for start, stop in map(writer.shard_range, writer.pending_shards())]
    kind, k = parse_encoding(cfg.encoding)
    n = len(index)
    ips = cfg.images_per_shard or default_images_per_shard(n, cfg.crops_per_image, num_classes, kind, k, processes)
    return [min(ips, n - start) for start in range(0, n, ips)]


def encoding_fits(probs: np.ndarray, num_classes: int, requested: str = "dense") -> list[EncodingFit]:
    """Dense fp16 and top-k for the candidate K below C and the ``requested`` encoding's K (any K, so the
    one the run would use is always measured): raw bytes per crop and the total variation between the
    sampled float32 rows and the rows the store would return for them."""
    rows = probs.reshape(-1, num_classes).astype(np.float32)
    dense = normalise_rows(to_f16(rows))
    tv = 0.5 * np.abs(dense - rows).sum(1)
    fits = [EncodingFit("dense", sum(label_row_bytes(DENSE, None, num_classes)), float(tv.mean()), float(tv.max()))]
    index_dtype = topk_index_dtype(num_classes)
    kind, k_requested = parse_encoding(requested)
    for k in sorted(set(CANDIDATE_K) | ({k_requested} if kind == TOPK else set())):
        if k >= num_classes:
            break
        total, worst, n = topk_tv(rows, *encode_topk(rows, k, index_dtype))
        fits.append(EncodingFit(f"topk:{k}", sum(label_row_bytes(TOPK, k, num_classes)), total / max(1, n), worst))
    return fits


def stored_bytes(cfg: PrecomputeConfig, index: DatasetIndex, ensemble: TeacherEnsemble, settings: dict, ids: np.ndarray,
                 sizes: np.ndarray, windows: np.ndarray, flips: np.ndarray, probs: np.ndarray) -> dict[str, float]:
    """Bytes on disk per crop of the labels and of the crop windows + flips, and per image of the rest,
    from a temporary store of the sample written by the real writer with the full store's shard size
    (so its inner chunks, which set the compression, are the real store's)."""
    kind, k = parse_encoding(cfg.encoding)
    ips = cfg.images_per_shard or default_images_per_shard(len(index), cfg.crops_per_image, ensemble.num_classes, kind, k)
    with tempfile.TemporaryDirectory(prefix="mealkd-dry-run-") as tmp:
        url = str(Path(tmp) / "sample.zarr")
        sample = dict(settings, dataset={"num_images": len(ids), "fingerprint": "dry-run sample"})
        storage.create_store(url, attributes=sample, paths=[index.paths[i] for i in ids.tolist()], targets=index.targets[ids],
                             sizes=sizes, crops_per_image=cfg.crops_per_image, num_classes=ensemble.num_classes, encoding=cfg.encoding,
                             images_per_shard=ips)
        writer = storage.StoreWriter(url)
        for shard in writer.pending_shards():
            start, stop = writer.shard_range(shard)
            writer.write_shard(shard, windows[start:stop], flips[start:stop], probs[start:stop])
        files = [f for f in Path(url).rglob("*") if f.is_file()]
        fixed = sum(f.stat().st_size for f in files if f.name == "zarr.json")  # metadata: the same whatever the size
        data: dict[str, int] = {}
        for f in files:
            if f.name != "zarr.json":
                node = f.relative_to(url).parts[0]
                data[node] = data.get(node, 0) + f.stat().st_size
    crops = len(ids) * cfg.crops_per_image
    labels = sum(data.get(name, 0) for name in ("probs", "topk_idx", "topk_val"))
    geometry = data.get("windows", 0) + data.get("flips", 0)
    rest = sum(data.values()) - labels - geometry
    return {"labels_per_crop": labels / crops, "windows_per_crop": geometry / crops, "rest_per_image": rest / len(ids), "fixed": fixed}


def run_dry_run(cfg: PrecomputeConfig) -> dict:
    """Measure a sample through the real stage-one path and extrapolate to the job (see the module docstring)."""
    if launched_by_torchrun():
        raise UserError("--dry-run: measures one process; run it without torchrun (it prints the time for several processes too)")
    cfg.validate()
    storage.check_output(cfg.out)  # what the run refuses first, the dry run refuses too
    backend = resolve_backend(cfg.device)
    index = scan_image_folder(cfg.data)
    ensemble = load_ensemble(cfg, index, backend)
    settings = _settings(cfg, index, ensemble, backend)
    todo, store_note, creates = pending_images(cfg, index, settings, backend)
    ids = sample_ids(len(index), cfg.crops_per_image, cfg.batch_size)

    sampled = len(ids)
    started = time.perf_counter()
    reasons: dict[int, str] = {}
    sizes, bad = probe_images(index, ids, backend, batch_size=min(64, cfg.batch_size), num_threads=cfg.num_threads, reasons=reasons)
    probe_s = time.perf_counter() - started
    good = ~np.isin(ids, bad)
    if not good.any():
        raise UserError(f"--data {cfg.data}: none of the {len(ids)} sampled images could be decoded; check the tree (precompute would stop on them)")
    ids, sizes = ids[good], sizes[good]
    windows, flips = draw_all_windows(cfg.policy, ids, sizes, cfg.crops_per_image)
    probs = np.zeros((len(ids), cfg.crops_per_image, ensemble.num_classes), dtype=np.float32)

    stream = CropStream(index, ensemble.norms, backend, batch_size=cfg.batch_size, num_threads=cfg.num_threads)
    partial = len(ids) * cfg.crops_per_image % cfg.batch_size
    if cfg.compile and partial:  # compile the sample's last, smaller batch shape now, not inside the timed batches
        ensemble.launch([torch.zeros(partial, 3, n.size, n.size, device=backend.device) for n in ensemble.norms])
    times = StageTimes()
    if backend.is_cuda:
        torch.cuda.reset_peak_memory_stats(backend.device)
    ends, crops = [time.perf_counter()], []  # the clock before the first batch, then after each one
    labelled = labelled_batches(stream.batches(ids.tolist(), list(range(len(ids))), windows, flips), ensemble, times=times)
    for batch, rows in labelled:
        probs[batch.rows, batch.crops] = rows
        ends.append(time.perf_counter())
        crops.append(len(batch.rows))
    warmup = timed_window(len(crops))
    crops_per_s = sum(crops[warmup:]) / max(ends[-1] - ends[warmup], 1e-9)

    kind, _ = parse_encoding(cfg.encoding)
    bytes_ = stored_bytes(cfg, index, ensemble, settings, ids, sizes, windows, flips, probs)
    total_crops = todo * cfg.crops_per_image
    return {
        "images": len(index),
        "pending_images": todo,
        "store": store_note,
        "crops": total_crops,
        "crops_per_image": cfg.crops_per_image,
        "sample_images": int(good.sum()),
        "sample_unreadable": int((~good).sum()),
        "unreadable_named": describe_unreadable(index, sorted(bad), reasons, limit=5) if bad else "",
        "skip_bad": cfg.skip_bad,
        "sample_crops": int(len(ids)) * cfg.crops_per_image,
        "timed_batches": len(crops) - warmup,
        "warmup_batches": warmup,
        "device": torch.cuda.get_device_name(backend.device) if backend.is_cuda else f"CPU, {torch.get_num_threads()} torch threads",
        "dali_threads": dali_threads(cfg.num_threads, backend),
        "teachers": [{"spec": t["spec"], "folded": f} for t, f in zip(ensemble.describe(), ensemble.folded)],
        "precision": ensemble.precision,
        "compiled": cfg.compile_backend if cfg.compile else None,
        "crops_per_s": crops_per_s,
        "teacher_hours": total_crops / max(crops_per_s, 1e-9) / 3600,
        # per GPU count: the busiest rank's share of the images (ranks label whole shards, every G-th)
        "busiest_share": {g: busiest_rank_images(pending_shard_images(cfg, index, ensemble.num_classes, creates, g), g) / max(todo, 1)
                          for g in GPU_COUNTS},
        "validation_hours": todo * probe_s / sampled / 3600 if creates else 0.0,
        "peak_gpu_mib": torch.cuda.max_memory_allocated(backend.device) / 2**20 if backend.is_cuda else None,
        "thread_s": {name: round(sec, 3) for name, sec in times.seconds.items()},
        "bytes": bytes_,
        "store_bytes": todo * cfg.crops_per_image * (bytes_["labels_per_crop"] + bytes_["windows_per_crop"]) + todo * bytes_["rest_per_image"]
        + (bytes_["fixed"] if creates else 0),
        "encoding": cfg.encoding,
        "encoding_kind": kind,
        "fits": [fit.__dict__ for fit in encoding_fits(probs, ensemble.num_classes, cfg.encoding)],
    }


def gpu_hours(result: dict, gpus: int) -> float:
    """The job's hours on ``gpus`` processes: the busiest rank's teacher time + an even share of validation."""
    return result["teacher_hours"] * result["busiest_share"][gpus] + result["validation_hours"] / gpus


def report_lines(result: dict) -> list[str]:
    """The dry run's findings as lines for the terminal. Times for several processes are shown on a GPU
    only: there each process has its own GPU and labels its own shards; CPU processes share the cores.
    Such a job takes as long as its busiest rank's whole shards (not the images / G a rank would label
    if work split evenly), plus its share of the validation decode."""
    r, b = result, result["bytes"]
    teachers = ", ".join(f"{t['spec']}{' (BatchNorm folded)' if t['folded'] else ''}" for t in r["teachers"])
    total = r["teacher_hours"] + r["validation_hours"]
    time_line = f"time, one process: {format_duration(3600 * total)}"
    if r["validation_hours"]:
        time_line += (f" (teachers {format_duration(3600 * r['teacher_hours'])}, "
                      f"validation decode of every file {format_duration(3600 * r['validation_hours'])})")
    if r["peak_gpu_mib"] is not None:
        time_line += "; " + ", ".join(f"{g} GPUs: {format_duration(3600 * gpu_hours(r, g))}" for g in r["busiest_share"])
    lines = [
        f"dry run: nothing was written. {r['store']}",
        f"work: {r['pending_images']:,} of {r['images']:,} images x {r['crops_per_image']:,} crops = {r['crops']:,} crops to label",
        f"teachers: {teachers}; {r['precision']} on {r['device']}" + (f"; torch.compile ({r['compiled']})" if r.get("compiled") else "")
        + f"; {r['dali_threads']} DALI threads",
        f"measured: {r['crops_per_s']:,.0f} crops/s over {r['timed_batches']} batches "
        + (f"after {r['warmup_batches']} untimed warm-up batches " if r["warmup_batches"] else
           f"(every batch timed, start-up included: too few for {WARMUP_BATCHES} untimed warm-up batches and a timed one) ")
        + f"({r['sample_images']} images sampled"
        + (f", {r['sample_unreadable']} more unreadable" if r["sample_unreadable"] else "") + ")"
        + (f"; peak GPU memory {r['peak_gpu_mib']:,.0f} MiB" if r["peak_gpu_mib"] is not None else ""),
        time_line,
        f"to write: {human_bytes(r['store_bytes'])} ({r['encoding']}: labels {b['labels_per_crop']:,.1f} B/crop, windows + flips "
        f"{b['windows_per_crop']:,.1f} B/crop, paths and the rest {b['rest_per_image']:,.0f} B/image, as written for the sample)",
        "label encodings on the sampled crops (total variation between the teachers' float32 rows and what the store returns):",
    ]
    if r["sample_unreadable"]:
        lines.insert(4, f"unreadable: {r['sample_unreadable']} sampled file(s) cannot be decoded ({r['unreadable_named']}); "
                     + ("the run will exclude every such file (--skip-bad)" if r["skip_bad"] else
                        "the run will stop on them after validating every file: fix or remove them, or pass --skip-bad"))
    for fit in r["fits"]:
        chosen = "  <- --encoding" if parse_encoding(fit["encoding"]) == parse_encoding(r["encoding"]) else ""
        lines.append(f"  {fit['encoding']:>9}: {fit['raw_bytes_per_crop']:>6,} B/crop before compression, mean TV {fit['mean_tv']:.4f}, "
                     f"max {fit['max_tv']:.4f}{chosen}")
    return lines
