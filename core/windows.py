"""Crop windows drawn like torchvision ``RandomResizedCrop`` from a counter-based generator.

Each (seed, image index) owns a Philox stream (128-bit key = (seed, image index)), and crop ``r``
of that image uses the fixed block of draws ``[r * DRAWS_PER_CROP, (r + 1) * DRAWS_PER_CROP)``.
So a crop's window depends only on (seed, image, crop, image size, policy): never on batch size,
worker count, sharding, resume, or even on how many crops per image are drawn.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

from mealkd.errors import UserError

#: largest crop size accepted: S x S crops of every image are cut, stored windows resized to S and teachers
#: run at S; far beyond any model's input (EfficientNet-L2 takes 800), and a typo like 100000 would
#: otherwise end in an allocator traceback
MAX_IMAGE_SIZE = 4096


def check_image_size(size: int, flag: str = "--image-size") -> None:
    """A crop or input size of 1 to MAX_IMAGE_SIZE pixels, else a one-line UserError naming ``flag``."""
    if not 0 < size <= MAX_IMAGE_SIZE:
        raise UserError(f"{flag} {size}: must be a number of pixels from 1 to {MAX_IMAGE_SIZE}")


ATTEMPTS = 10  # torchvision's RandomResizedCrop tries 10 times before falling back to a centre crop
DRAWS_PER_CROP = 4 * ATTEMPTS + 1  # (scale, log-ratio, top, left) per attempt + the flip draw


@dataclass(frozen=True)
class CropPolicy:
    image_size: int
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_prob: float = 0.5
    seed: int = 0

    def validate(self) -> None:
        check_image_size(self.image_size)
        lo, hi = self.scale
        if not (0 < lo <= hi <= 1):
            raise UserError(f"--scale {lo} {hi}: need 0 < MIN <= MAX <= 1 (fractions of the image area)")
        rlo, rhi = self.ratio
        if not (0 < rlo <= rhi and math.isfinite(rhi)):  # NaN fails every comparison; inf passes them
            raise UserError(f"--ratio {rlo} {rhi}: need 0 < MIN <= MAX, finite numbers (aspect ratios w/h)")
        if not (0 <= self.flip_prob <= 1):
            raise UserError(f"--flip-prob {self.flip_prob}: must be within [0, 1]")
        if self.seed < 0:
            raise UserError(f"--seed {self.seed}: must be >= 0")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scale"] = list(self.scale)
        d["ratio"] = list(self.ratio)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CropPolicy":
        return cls(
            image_size=int(d["image_size"]),
            scale=tuple(d["scale"]),
            ratio=tuple(d["ratio"]),
            flip_prob=float(d["flip_prob"]),
            seed=int(d["seed"]),
        )


def _draws(seed: int, image_index: int, crops: int) -> np.ndarray:
    bit_generator = np.random.Philox(key=np.array([seed, image_index], dtype=np.uint64))
    return np.random.Generator(bit_generator).random((crops, DRAWS_PER_CROP))


def draw_windows(policy: CropPolicy, image_index: int, height: int, width: int, crops: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows (crops, 4) int32 as (y, x, h, w) and flips (crops,) bool for one image."""
    u = _draws(policy.seed, image_index, crops)
    area = height * width
    log_lo, log_hi = math.log(policy.ratio[0]), math.log(policy.ratio[1])
    scale_u = u[:, 0 : 4 * ATTEMPTS : 4]
    ratio_u = u[:, 1 : 4 * ATTEMPTS : 4]
    top_u = u[:, 2 : 4 * ATTEMPTS : 4]
    left_u = u[:, 3 : 4 * ATTEMPTS : 4]
    target_area = area * (policy.scale[0] + (policy.scale[1] - policy.scale[0]) * scale_u)
    aspect = np.exp(log_lo + (log_hi - log_lo) * ratio_u)
    w = np.rint(np.sqrt(target_area * aspect)).astype(np.int64)
    h = np.rint(np.sqrt(target_area / aspect)).astype(np.int64)
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = np.argmax(ok, axis=1)
    found = ok[np.arange(crops), first]
    rows = np.arange(crops)
    h_sel, w_sel = h[rows, first], w[rows, first]
    # torch.randint(0, n + 1) for a uniform integer in [0, n]
    y_sel = np.floor(top_u[rows, first] * (height - h_sel + 1)).astype(np.int64)
    x_sel = np.floor(left_u[rows, first] * (width - w_sel + 1)).astype(np.int64)
    fy, fx, fh, fw = _centre_fallback(height, width, policy.ratio)
    windows = np.where(found[:, None], np.stack([y_sel, x_sel, h_sel, w_sel], axis=1), np.array([fy, fx, fh, fw]))
    flips = u[:, DRAWS_PER_CROP - 1] < policy.flip_prob
    return windows.astype(np.int32), flips


def _centre_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def draw_all_windows(policy: CropPolicy, image_ids: np.ndarray, sizes: np.ndarray, crops: int) -> tuple[np.ndarray, np.ndarray]:
    """Windows (n, crops, 4) and flips (n, crops) for the given image ids with sizes (n, 2) = (H, W)."""
    n = len(image_ids)
    windows = np.zeros((n, crops, 4), dtype=np.int32)
    flips = np.zeros((n, crops), dtype=bool)
    for row, (image_index, (height, width)) in enumerate(zip(image_ids.tolist(), sizes.tolist())):
        windows[row], flips[row] = draw_windows(policy, image_index, height, width, crops)
    return windows, flips
