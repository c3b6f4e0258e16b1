"""Test data made on the fly: small JPEG ImageFolder trees and tiny teacher models."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image


def smooth_image(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A smooth random RGB image (JPEG-friendly, with structure a tiny CNN can tell apart)."""
    coarse = rng.integers(0, 256, size=(max(2, height // 8), max(2, width // 8), 3), dtype=np.uint8)
    return np.array(Image.fromarray(coarse).resize((width, height), Image.BILINEAR))


def make_jpeg_tree(
    root: Path,
    classes: int = 3,
    per_class: int = 4,
    *,
    seed: int = 0,
    min_side: int = 24,
    max_side: int = 48,
) -> Path:
    """root/class_<k>/img_<i>.jpg with random sizes; returns root."""
    rng = np.random.default_rng(seed)
    for k in range(classes):
        class_dir = root / f"class_{k}"
        class_dir.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
            pixels = smooth_image(rng, h, w)
            pixels[..., k % 3] = np.clip(pixels[..., k % 3].astype(int) + 60, 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(class_dir / f"img_{i:03d}.jpg", quality=90)
    return root


def jpeg_bytes(pixels: np.ndarray, **save_kwargs) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", **save_kwargs)
    return buffer.getvalue()
