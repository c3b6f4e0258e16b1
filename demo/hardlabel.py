"""Plain PyTorch hard-label training, as a user trains teachers and the student baseline.

Not part of mealkd's pipeline: the demo needs trained teachers and a "good initialisation" for the
student, and builds them the ordinary way (one-hot cross-entropy, RandomResizedCrop augmentation).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image
from torchvision.transforms import v2

from mealkd.core.checkpoint_io import load_torch_file
from mealkd.core.dataset import scan_image_folder
from mealkd.core.replay import IMAGENET_MEAN, IMAGENET_STD


def load_tensors(root: Path) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """All images of an ImageFolder as a uint8 (N, 3, H, W) tensor, their targets and class names."""
    index = scan_image_folder(root)
    images = np.stack([np.asarray(Image.open(index.root / p).convert("RGB")) for p in index.paths])
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(index.targets.astype(np.int64)), index.class_names


def train_hard_labels(
    arch: str,
    images: torch.Tensor,
    targets: torch.Tensor,
    *,
    num_classes: int,
    image_size: int,
    epochs: int,
    scale: tuple[float, float],
    seed: int,
    batch_size: int = 64,
    lr: float = 0.05,
    init: Path | None = None,
) -> torch.nn.Module:
    """Train a torchvision ``arch`` with one-hot labels (from scratch, or on from the state dict ``init``).

    SGD with nesterov momentum, weight decay 5e-4, one-cycle schedule (from scratch) or cosine (continued).
    """
    torch.manual_seed(seed)
    model = torchvision.models.get_model(arch, num_classes=num_classes)
    if init is not None:
        model.load_state_dict(load_torch_file(init, "hard-label init"))
    augment = v2.Compose([v2.RandomResizedCrop(image_size, scale=scale, antialias=True), v2.ToDtype(torch.float32, scale=True), v2.Normalize(IMAGENET_MEAN, IMAGENET_STD)])
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * (-(-len(images) // batch_size))
    if init is None:
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.15)
    else:
        scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            x = torch.stack([augment(images[i]) for i in batch.tolist()])
            loss = torch.nn.functional.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    return model.eval()
