"""FKD's released soft-label files: where they are, how to read them safely, and how their crop
fractions become mealkd windows.

Format (FKD, Shen & Xing, "A Fast Knowledge Distillation Framework for Visual Recognition"; its
label generator saves one file per training image with ``torch.save``):

* path: ``<label dir>/<split>/<class>/<name>.tar``, the image's path relative to the split with the
  extension replaced by ``.tar`` (FKD's own loader cuts the file name at its first dot, so
  ``a.b.JPEG`` -> ``a.tar``; both spellings are looked up);
* content: a list ``[coords, flips, labels]`` of numpy arrays (or tensors), optionally fp16:
  ``coords`` (R, 4) = (i/H, j/W, h/H, w/W), the crop's top, left, height and width as fractions of
  the image's height H and width W; ``flips`` (R,) bool; ``labels`` (R, 2, k) with ``labels[:, 0]``
  the top-k class indices (stored as floats) and ``labels[:, 1]`` their softmax values
  (``marginal_smoothing_k5`` / ``_k10``), or (R, 2) for FKD's ``smoothing`` type (k = 1).

The rounding rule (``fractions_to_windows``): FKD's ``RandomResizedCrop_FKD`` multiplies the
fractions by the PIL image's size (``.item()``: float64 arithmetic on the stored float32/float16
value) and passes the four floats to ``torchvision.transforms.functional.resized_crop``, which
crops with ``PIL.Image.crop((left, top, left + width, top + height))``; Pillow rounds each of the
four box edges with Python's ``round`` (half to even). So the pixels FKD's students see are
rows ``round(i*H) .. round(i*H + h*H) - 1`` and columns ``round(j*W) .. round(j*W + w*W) - 1``:
that is the window stored here. (Truncating with ``int()`` would shift a crop whose fraction was
stored as e.g. 36.99998/H by one pixel; ``tests/test_import_fkd.py`` checks the rule against
torchvision + Pillow cropping the same image.)

Windows that round outside the image: fp16 fractions carry up to ``side / 2048`` pixels of error
per edge, so an edge can land a pixel past the border (PIL would pad it with black; DALI refuses an
out-of-bounds window). Such edges are clamped to the image and counted, up to
``overshoot_tolerance(side)`` pixels; a window further outside, or empty, means the labels were made
for other image files, and the file is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mealkd.errors import UserError

SUFFIX = ".tar"
#: Largest sum of the k stored probabilities accepted: fp16 rounding of values summing to <= 1 (the
#: bound `mealkd verify` checks top-k rows against)
MAX_MASS = 1.0 + 2.0**-11 + 1e-5


class BadLabelFile(Exception):
    """A label file that is missing, unreadable, or not in FKD's format; ``str()`` is the reason."""


@dataclass(frozen=True)
class FkdLabels:
    """One image's FKD labels, widened: coords float64 (R, 4), flips bool (R,), idx int64 (R, k),
    val float32 (R, k); ``dtype``: the file's own dtype of its labels array (e.g. ``"float16"`` for
    FKD's ``--use_fp16``), before widening."""

    coords: np.ndarray
    flips: np.ndarray
    idx: np.ndarray
    val: np.ndarray
    dtype: str = "float32"

    @property
    def crops(self) -> int:
        return int(self.coords.shape[0])

    @property
    def k(self) -> int:
        return int(self.idx.shape[1])


def label_root(label_dir: Path, data_root: Path, class_names: list[str]) -> Path:
    """The directory holding ``<class>/<name>.tar``: ``LABEL_DIR/<split>`` (``<split>`` = the name of
    ``--data``, as FKD lays its labels out) if it has a class directory of ``--data``, else
    ``LABEL_DIR`` itself."""
    if not label_dir.is_dir():
        raise UserError(f"LABEL_DIR {label_dir}: not a directory; pass FKD's soft-label directory (LABEL_DIR/<split>/<class>/<image>.tar)")
    for candidate in (label_dir / data_root.name, label_dir):
        if any((candidate / name).is_dir() for name in class_names):
            return candidate
    raise UserError(
        f"LABEL_DIR {label_dir}: none of --data's class directories ({', '.join(class_names[:3])}"
        f"{', ...' if len(class_names) > 3 else ''}) is under it or under {label_dir / data_root.name}; "
        "pass FKD's soft-label directory for this dataset (LABEL_DIR/<split>/<class>/<image>.tar)"
    )


def label_file(root: Path, rel_path: str) -> Path:
    """The label file of the image at ``rel_path`` (relative to --data): ``<rel path>.tar`` with the
    extension replaced, else FKD's loader's spelling (file name cut at its first dot). Returns the
    first spelling if neither exists (for the error message)."""
    rel = Path(rel_path)
    first = root / rel.with_suffix(SUFFIX)
    if first.is_file():
        return first
    cut = root / rel.parent / (rel.name.split(".")[0] + SUFFIX)
    return cut if cut.is_file() else first


def _safe_numpy_globals() -> list:
    """What torch's weights-only unpickler must additionally allow to rebuild plain numpy arrays
    (FKD saves numpy arrays): the array constructor under numpy 2's and numpy 1's module names, the
    ndarray and dtype classes and the numeric dtypes' classes. Object arrays still fail: their items
    need other globals."""
    import numpy._core.multiarray as multiarray

    numeric = sorted({type(np.dtype(code)) for code in "?bBhHiIlLqQefdg"}, key=lambda t: t.__name__)
    return [(multiarray._reconstruct, "numpy.core.multiarray._reconstruct"), multiarray._reconstruct, np.ndarray, np.dtype, *numeric]


def _as_array(value, name: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    if not isinstance(value, np.ndarray):
        raise BadLabelFile(f"{name} is a {type(value).__name__}, not an array")
    if value.dtype == object:
        raise BadLabelFile(f"{name} holds Python objects, not numbers")
    return value


def read_label_file(path: Path, num_classes: int) -> FkdLabels:
    """Load and check one FKD label file; BadLabelFile with the reason if it is missing, unreadable
    or not in FKD's format. Loading goes through mealkd's one loading policy
    (``core.checkpoint_io``, weights_only=True) with numpy arrays allowed."""
    import torch

    from mealkd.core.checkpoint_io import load_torch_file

    if not path.is_file():
        raise BadLabelFile("missing")
    try:
        with torch.serialization.safe_globals(_safe_numpy_globals()):
            content = load_torch_file(path, "FKD label file")
    except UserError as err:
        raise BadLabelFile(str(err).split(": ", 1)[-1]) from None
    if not isinstance(content, (list, tuple)) or len(content) != 3:
        raise BadLabelFile(f"holds a {type(content).__name__}, not FKD's [coords, flips, labels] list")
    coords, flips, labels = (_as_array(v, n) for v, n in zip(content, ("coords", "flips", "labels")))
    if coords.ndim != 2 or coords.shape[1] != 4 or coords.shape[0] < 1:
        raise BadLabelFile(f"coords have shape {coords.shape}, not (R, 4)")
    r = coords.shape[0]
    if flips.shape != (r,):
        raise BadLabelFile(f"flips have shape {flips.shape}, not ({r},)")
    if labels.ndim == 2 and labels.shape == (r, 2):
        labels = labels[:, :, None]  # FKD 'smoothing': top-1 index and value
    if labels.ndim != 3 or labels.shape[:2] != (r, 2) or labels.shape[2] < 1:
        raise BadLabelFile(f"labels have shape {labels.shape}, not ({r}, 2, k) top-k indices and values "
                           "(FKD's 'hard' labels carry no probabilities and are not supported)")
    stored_dtype = str(labels.dtype)
    coords = coords.astype(np.float64)
    if not np.isfinite(coords).all():
        raise BadLabelFile("coords hold NaN/inf")
    if flips.dtype != np.bool_:
        if not np.isin(flips, (0, 1)).all():
            raise BadLabelFile("flips are not 0/1")
        flips = flips.astype(bool)
    raw_idx = labels[:, 0, :].astype(np.float64)
    val = labels[:, 1, :].astype(np.float32)
    if not (np.isfinite(raw_idx).all() and (raw_idx == np.round(raw_idx)).all()):
        raise BadLabelFile("top-k indices are not whole numbers")
    idx = raw_idx.astype(np.int64)
    if idx.min() < 0 or idx.max() >= num_classes:
        raise BadLabelFile(f"a class index ({int(idx.max()) if idx.max() >= num_classes else int(idx.min())}) is outside "
                           f"[0, {num_classes}), the class count of --data")
    if np.any(np.diff(np.sort(idx, axis=1), axis=1) == 0):
        raise BadLabelFile("a crop lists one class twice in its top-k")
    if not np.isfinite(val).all() or val.min() < 0:
        raise BadLabelFile("top-k values are negative or NaN/inf")
    mass = val.sum(axis=1, dtype=np.float64)
    if mass.max() > MAX_MASS:
        raise BadLabelFile(f"top-k values sum to {mass.max():.4f} > 1: not softmax probabilities")
    return FkdLabels(coords=coords, flips=flips, idx=idx, val=val, dtype=stored_dtype)


def overshoot_tolerance(side: int) -> int:
    """Pixels an edge may round past the border and still be clamped: fp16 fractions are off by up
    to side/2048 per stored value, an edge sums two of them, plus half a pixel of rounding."""
    return 1 + int(side) // 1024


def fractions_to_windows(coords: np.ndarray, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """FKD (i/H, j/W, h/H, w/W) fractions -> mealkd windows (R, 4) int32 (y, x, h, w) in pixels of an
    H x W image, with FKD's rounding (module docstring), and the overshoot in pixels (R,): how far
    the rounded window reached outside the image before it was clamped (0 for most crops).
    A window that is empty after clamping gets overshoot ``inf``."""
    c = np.asarray(coords, np.float64)
    top, left = c[:, 0] * height, c[:, 1] * width
    y0, x0 = np.rint(top), np.rint(left)  # round half to even, as Python's round() in Pillow's crop
    y1, x1 = np.rint(top + c[:, 2] * height), np.rint(left + c[:, 3] * width)
    over = np.maximum.reduce([-y0, -x0, y1 - height, x1 - width, np.zeros_like(y0)])
    y0, x0 = np.clip(y0, 0, height), np.clip(x0, 0, width)
    y1, x1 = np.clip(y1, 0, height), np.clip(x1, 0, width)
    h, w = y1 - y0, x1 - x0
    over = np.where((h < 1) | (w < 1), np.inf, over)
    windows = np.stack([y0, x0, np.maximum(h, 0), np.maximum(w, 0)], axis=1).astype(np.int32)
    return windows, over


def convert(labels: FkdLabels, height: int, width: int) -> tuple[np.ndarray, int]:
    """Windows (R, 4) of one image and the number of clamped windows; BadLabelFile if a window lies
    further outside the image than ``overshoot_tolerance`` allows, or is empty."""
    windows, over = fractions_to_windows(labels.coords, height, width)
    worst = float(over.max())
    if worst > overshoot_tolerance(max(height, width)):
        crop = int(np.argmax(over))
        where = "lies outside" if np.isinf(worst) else f"reaches {worst:.0f} px outside"
        fractions = ", ".join(f"{v:.4g}" for v in labels.coords[crop])
        raise BadLabelFile(f"crop {crop} at fractions ({fractions}) {where} the {height}x{width} image: labels made for other image files")
    return windows, int((over > 0).sum())
