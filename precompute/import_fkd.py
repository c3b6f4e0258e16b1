"""`mealkd import-fkd`: FKD's released soft labels -> a mealkd label store (top-k encoding).

Two passes over the label files, like precompute's validate-then-label:

1. **check** (only when the store does not exist yet): decode every image once with DALI's CPU
   decoder (sizes, unreadable files; ``core.probe``), refuse images with an EXIF rotation (FKD's
   crops are in PIL's unrotated pixel grid, DALI decodes rotated), read every label file
   (``precompute.fkd_format``: format, R and k the same in every file, class indices, windows
   inside the image). Anything bad is a one-line error naming the file and ``--skip-bad``, which
   records the image as excluded instead. Then the store is created with R, ``topk:k`` and the
   attributes that say where its labels came from.
2. **import**, shard by shard: the files are read again, converted, and each shard is written
   whole with ``done`` last (``StoreWriter.write_shard_encoded``), so a killed import continues
   with the same command and ends with the same arrays as an uninterrupted one.

The crops of an imported store are not drawn from a seed: its ``crop`` attribute says
``policy: "imported"`` and ``reproducible: false``, so no crops can be added to it (``mealkd
extend`` must refuse it) and ``verify --teachers`` can only recompute the stored windows.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.markup import escape

from mealkd import storage
from mealkd.console import make_console
from mealkd.core.dali_io import decoder_record, resolve_backend
from mealkd.core.dataset import DatasetIndex, scan_image_folder
from mealkd.core.probe import describe_unreadable, probe_images, refuse_nothing_to_train_on
from mealkd.core.windows import check_image_size
from mealkd.core.progress import RateColumn, make_progress
from mealkd.precompute.fkd_format import BadLabelFile, convert, label_file, label_root, read_label_file
from mealkd.precompute.lock import StoreLock, writing_store
from mealkd.precompute.settings import shard_size_difference
from mealkd.storage.encoding import to_f16
from mealkd.errors import UserError
from mealkd.storage.schema import topk_index_dtype

SOURCE = "fkd"
ROUNDING = ("FKD's RandomResizedCrop_FKD -> torchvision resized_crop -> PIL.Image.crop box (j*W, i*H, j*W + w*W, i*H + h*H) "
            "in float64, each edge rounded half to even (Pillow); edges up to 1 + side//1024 px outside the image clamped")
NOT_REPRODUCIBLE = ("windows and flips were read from FKD label files; they cannot be redrawn from a seed, so crops cannot be "
                    "added to this store (mealkd extend refuses it)")


@dataclass
class ImportConfig:
    label_dir: str
    data: str
    out: str
    teacher_name: str | None = None
    image_size: int = 224
    skip_bad: bool = False
    num_threads: int | None = None  # DALI CPU threads; None: auto (core.dali_io.auto_threads)
    images_per_shard: int | None = None

    def validate(self) -> None:
        check_image_size(self.image_size)  # precompute's bound
        if self.images_per_shard is not None and self.images_per_shard < 1:
            raise UserError(f"--images-per-shard {self.images_per_shard}: must be >= 1")
        if self.num_threads is not None and self.num_threads < 1:
            raise UserError(f"--num-threads {self.num_threads}: must be >= 1")


@dataclass
class ScanResult:
    sizes: np.ndarray  # (N, 2) decoded (H, W); 0 for unreadable images
    excluded: np.ndarray  # (N,) bool
    crops: int  # R
    k: int
    label_dtype: str  # the files' own dtype ("float16", "float32"), or "mixed: float16, float32"
    flip_rate: float
    clamped: int
    unreadable_images: int
    bad_label_files: int


def _exif_problem(path: Path, height: int, width: int) -> str | None:
    """Why FKD's pixel grid (PIL, no EXIF rotation) differs from DALI's decoded one, or None."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            orientation = im.getexif().get(0x0112, 1)
            size = im.size
    except Exception as err:  # noqa: BLE001 - DALI decoded it; PIL's opinion is only a cross-check
        return f"PIL cannot open it ({type(err).__name__})"
    if orientation not in (None, 1):
        return f"EXIF orientation {orientation}: FKD cropped the unrotated pixels, DALI decodes it rotated"
    if (size[1], size[0]) != (height, width):
        return f"PIL reads {size[1]}x{size[0]}, DALI {height}x{width}"
    return None


def _describe(items: list[tuple[Path, str]], limit: int = 3) -> str:
    named = ", ".join(f"{p} ({why})" for p, why in items[:limit])
    return named + (f" and {len(items) - limit} more" if len(items) > limit else "")


def _scan(cfg: ImportConfig, index: DatasetIndex, root: Path, console: Console) -> ScanResult:
    """Pass 1: every image decoded, every label file read and converted (nothing kept)."""
    n, num_classes = len(index), len(index.class_names)
    reasons: dict[int, str] = {}
    with make_progress(console, RateColumn("images")) as progress:
        task = progress.add_task("decode images", total=n)
        sizes, bad_images = probe_images(index, np.arange(n), resolve_backend("cpu"), num_threads=cfg.num_threads,
                                         progress=lambda m: progress.advance(task, m), reasons=reasons)
    for i in range(n):
        if i not in reasons:
            why = _exif_problem(index.root / index.paths[i], int(sizes[i, 0]), int(sizes[i, 1]))
            if why:
                bad_images.append(i)
                reasons[i] = why
    bad_images = sorted(set(bad_images))
    if bad_images and not cfg.skip_bad:
        raise UserError(f"--data: {len(bad_images)} image file(s) mealkd cannot replay FKD's crops on: "
                        f"{describe_unreadable(index, bad_images, reasons)}; fix or remove them, or pass --skip-bad to exclude them")
    excluded = np.zeros(n, bool)
    excluded[bad_images] = True
    bad_labels: list[tuple[Path, str]] = []
    bad_label_ids: list[int] = []  # the images of bad_labels
    shape: tuple[int, int] | None = None  # (R, k) of the first good file
    dtypes: set[str] = set()  # the good files' own label dtypes (read_label_file widens the values to float32)
    flips_on = flips_total = clamped = 0
    with make_progress(console, RateColumn("files")) as progress:
        task = progress.add_task("check label files", total=n)
        for i in range(n):
            progress.advance(task)
            if excluded[i]:
                continue
            path = label_file(root, index.paths[i])
            try:
                labels = read_label_file(path, num_classes)
                if shape is None:
                    shape = (labels.crops, labels.k)
                elif (labels.crops, labels.k) != shape:
                    raise BadLabelFile(f"holds {labels.crops} crops with top-{labels.k}, the other files {shape[0]} with top-{shape[1]}")
                _, n_clamped = convert(labels, int(sizes[i, 0]), int(sizes[i, 1]))
            except BadLabelFile as err:
                bad_labels.append((path, str(err)))
                bad_label_ids.append(i)
                excluded[i] = True
                continue
            clamped += n_clamped
            dtypes.add(labels.dtype)
            flips_on += int(labels.flips.sum())
            flips_total += labels.crops
    if bad_labels and not cfg.skip_bad:
        raise UserError(f"LABEL_DIR {cfg.label_dir}: {len(bad_labels)} label file(s) missing or unreadable: {_describe(bad_labels)}; "
                        "fix them, or pass --skip-bad to exclude those images")
    label_reasons = {i: f"its label file {path}: {why}" for i, (path, why) in zip(bad_label_ids, bad_labels)}
    refuse_nothing_to_train_on(index, excluded, sorted(bad_images + bad_label_ids), {**reasons, **label_reasons},
                               none_usable="can be imported (each is unreadable or its label file missing or bad)",
                               unusable="unusable (unreadable, or its label file missing or bad)",
                               fix_all="point --data and LABEL_DIR at a dataset and its FKD labels",
                               fix_class="fix those files or remove the class directory")
    assert shape is not None  # some image kept (refused above otherwise), so its label file was read
    if bad_labels or bad_images:
        console.print(f"[yellow]--skip-bad: excluding {len(bad_images)} image(s) and {len(bad_labels)} label file(s), e.g. "
                      f"{escape(_describe(bad_labels, 1) if bad_labels else describe_unreadable(index, bad_images, reasons, limit=1))}",
                      soft_wrap=True)
    r, k = shape
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed: " + ", ".join(sorted(dtypes))
    if k >= num_classes:
        raise UserError(f"LABEL_DIR {cfg.label_dir}: the files hold top-{k} labels but --data has {num_classes} classes; "
                        "point --data at the dataset the labels were made for")
    return ScanResult(sizes=sizes, excluded=excluded, crops=r, k=k, label_dtype=dtype, flip_rate=flips_on / max(1, flips_total),
                      clamped=clamped, unreadable_images=len(bad_images), bad_label_files=len(bad_labels))


def _attributes(cfg: ImportConfig, index: DatasetIndex, root: Path, scan: ScanResult) -> dict:
    label_dir = str(Path(cfg.label_dir).expanduser().resolve())
    return {
        "class_names": index.class_names,
        "crop": {"policy": "imported", "source": SOURCE, "reproducible": False, "image_size": cfg.image_size,
                 "flip_prob": round(scan.flip_rate, 4), "note": NOT_REPRODUCIBLE},
        "teachers": [{"spec": f"imported:{SOURCE}", "name": cfg.teacher_name or "unknown (FKD's files do not record it)",
                      "source": "FKD soft-label files", "label_dir": label_dir, "topk": scan.k, "crops_per_image": scan.crops,
                      "weight": 1.0, "weights_sha256": None, "input_size": "unknown"}],
        "temperature": 1.0,
        "dataset": {"num_images": len(index), "fingerprint": index.fingerprint},
        "decoder": decoder_record(resolve_backend("cpu")),
        "imported": {
            "format": SOURCE, "label_dir": label_dir, "label_root": str(root.resolve()), "crops_per_image": scan.crops,
            "topk": scan.k, "label_dtype": scan.label_dtype, "rounding": ROUNDING, "clamped_windows": scan.clamped,
            "excluded": {"unreadable_images": scan.unreadable_images, "bad_label_files": scan.bad_label_files},
            "fidelity": "not measured: FKD stored top-k rows only; the per-shard fidelity rows count 0 rows",
            "pixels": "FKD's teachers saw PIL-decoded crops; mealkd replays the same windows with DALI's CPU decoder",
            "temperature": "FKD's generator default (softmax at T = 1); not recorded in the files",
        },
    }


def _check_existing(cfg: ImportConfig, index: DatasetIndex) -> None:
    attrs = storage.open_store(cfg.out, require_complete=False, check_files=False).attrs
    imported = attrs.get("imported") or {}
    if imported.get("format") != SOURCE:
        raise UserError(f"--out {cfg.out}: a label store not made by `mealkd import-fkd` is already there; use another --out")
    label_dir = str(Path(cfg.label_dir).expanduser().resolve())
    checks = [("--data (dataset fingerprint)", (attrs.get("dataset") or {}).get("fingerprint"), index.fingerprint),
              ("LABEL_DIR", imported.get("label_dir"), label_dir),
              ("--image-size", (attrs.get("crop") or {}).get("image_size"), cfg.image_size)]
    if cfg.teacher_name is not None:
        checks.append(("--teacher-name", (attrs.get("teachers") or [{}])[0].get("name"), cfg.teacher_name))
    differing = [f"{flag} {have!r} in the store" for flag, have, want in checks if have != want]
    differing += shard_size_difference(cfg.images_per_shard, int(attrs.get("images_per_shard") or 0))
    if differing:
        raise UserError(f"--out {cfg.out}: an import with other settings is already there ({'; '.join(differing)}); "
                        "use another --out, or delete it to start over")


def _shard_labels(cfg: ImportConfig, index: DatasetIndex, root: Path, store, start: int, stop: int,
                  num_classes: int) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """Windows, flips and [top-k indices, fp16 values] of images [start, stop). Excluded images get
    zero windows and a uniform row (as precompute writes them)."""
    r, k = store.crops_per_image, store.topk
    n = stop - start
    windows = np.zeros((n, r, 4), np.int32)
    flips = np.zeros((n, r), bool)
    idx = np.broadcast_to(np.arange(k, dtype=topk_index_dtype(num_classes)), (n, r, k)).copy()
    val = np.full((n, r, k), 1.0 / num_classes, np.float32)
    sizes, excluded = store.sizes, store.excluded
    for row, i in enumerate(range(start, stop)):
        if excluded[i]:
            continue
        path = label_file(root, index.paths[i])
        try:
            labels = read_label_file(path, num_classes)
            if (labels.crops, labels.k) != (r, k):
                raise BadLabelFile(f"holds {labels.crops} crops with top-{labels.k}, the store {r} with top-{k}")
            windows[row], _ = convert(labels, int(sizes[i, 0]), int(sizes[i, 1]))
        except BadLabelFile as err:
            raise UserError(f"LABEL_DIR {cfg.label_dir}: {path} ({err}) changed since this import started; restore it, "
                            f"or delete --out {cfg.out} and rerun (with --skip-bad to exclude it)") from None
        flips[row] = labels.flips
        idx[row] = labels.idx
        val[row] = labels.val
    return windows, flips, [idx, to_f16(val)]


def run_import(cfg: ImportConfig, console: Console | None = None) -> dict:
    """Create (or continue) the store at ``cfg.out`` from FKD's label files; returns a summary."""
    console = console or make_console()
    cfg.validate()
    storage.check_output(cfg.out)
    index = scan_image_folder(cfg.data)
    root = label_root(Path(cfg.label_dir).expanduser(), index.root, index.class_names)
    num_classes = len(index.class_names)
    with StoreLock(cfg.out):
        if storage.store_exists(cfg.out):
            _check_existing(cfg, index)
        else:
            scan = _scan(cfg, index, root, console)
            with writing_store(cfg.out, "the imported store"):
                storage.create_store(cfg.out, attributes=_attributes(cfg, index, root, scan), paths=index.paths,
                                     targets=index.targets, sizes=scan.sizes, crops_per_image=scan.crops,
                                     num_classes=num_classes, encoding=f"topk:{scan.k}", excluded=scan.excluded,
                                     images_per_shard=cfg.images_per_shard)
        writer = storage.StoreWriter(cfg.out)
        store = storage.open_store(cfg.out, require_complete=False, check_files=False)
        pending = writer.pending_shards()
        images = writer.images_in(pending)
        with make_progress(console, RateColumn("images")) as progress:
            task = progress.add_task("import", total=images)
            for shard in pending:
                start, stop = writer.shard_range(shard)
                windows, flips, labels = _shard_labels(cfg, index, root, store, start, stop, num_classes)
                with writing_store(cfg.out, "the imported store"):
                    writer.write_shard_encoded(shard, windows, flips, labels, fidelity=(0.0, 0.0, 0))
                progress.advance(task, stop - start)
        with writing_store(cfg.out, "the imported store"):
            complete = writer.finalize()
    return {"images": images, "shards_written": len(pending), "complete": complete,
            "crops_per_image": store.crops_per_image, "topk": store.topk,
            "excluded": int(store.excluded.sum()), "clamped_windows": (store.attrs.get("imported") or {}).get("clamped_windows", 0)}
