"""The demo's real data: scikit-learn's copy of the UCI handwritten digits, written as JPEG files.

1,797 real 8x8 scans (16 grey levels), upscaled to ``side`` pixels and saved as an ImageFolder
train/val split fixed by a seed, so the demo exercises the real DALI JPEG path.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def write_digits(root: Path, *, side: int = 32, val_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> tuple[Path, Path]:
    """Write root/train/<digit>/*.jpg and root/val/<digit>/*.jpg once; returns (train, val) dirs."""
    train_dir, val_dir = root / "train", root / "val"
    marker = root / ".complete"
    if marker.exists():
        return train_dir, val_dir
    from sklearn.datasets import load_digits  # shipped with scikit-learn: no download

    digits = load_digits()
    images = (digits.images / 16.0 * 255.0).round().astype(np.uint8)
    labels = digits.target
    order = np.random.default_rng(seed).permutation(len(images))
    if limit is not None:
        order = order[:limit]
    n_val = int(round(len(order) * val_fraction))
    for split_dir, ids in ((val_dir, order[:n_val]), (train_dir, order[n_val:])):
        for i in ids.tolist():
            class_dir = split_dir / f"digit_{labels[i]}"
            class_dir.mkdir(parents=True, exist_ok=True)
            pixels = Image.fromarray(images[i], mode="L").resize((side, side), Image.BICUBIC).convert("RGB")
            pixels.save(class_dir / f"{i:04d}.jpg", quality=95)
    marker.write_text("ok\n")
    return train_dir, val_dir
